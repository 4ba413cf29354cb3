//! The `train` example's chart panels: training and validation loss against step, one line per
//! run, with the unigram baseline as the reference line.

use crate::chart::{Panel, Series};
use crate::training::RunResult;

/// Training loss (left) and validation loss (right) of every run.
pub fn panels(results: &[RunResult], unigram_baseline: f32) -> [Panel; 2] {
    let series = |curve: fn(&RunResult) -> &[(usize, f32)]| -> Vec<Series> {
        results
            .iter()
            .map(|r| Series {
                label: format!("{} (lr {:e})", r.spec.name, r.spec.learning_rate),
                points: curve(r).iter().map(|&(s, v)| (s as f32, v)).collect(),
            })
            .collect()
    };
    let baseline = Some(("unigram baseline".to_string(), unigram_baseline));
    [
        Panel {
            caption: format!(
                "training loss (mean of {} steps)",
                crate::training::CURVE_EVERY
            ),
            y_desc: "cross-entropy (nats/char)".into(),
            series: series(|r| &r.train_curve),
            reference: baseline.clone(),
            bounds: (0.0, f32::INFINITY),
            legend_on_top: true,
        },
        Panel {
            caption: "validation loss".into(),
            y_desc: "cross-entropy (nats/char)".into(),
            series: series(|r| &r.val_curve),
            reference: baseline,
            bounds: (0.0, f32::INFINITY),
            legend_on_top: true,
        },
    ]
}
