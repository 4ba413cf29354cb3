//! Trains a small MLP on real data with Adafactor and with AdamW, and compares them.
//!
//! `cargo run --release --example train_wine` (add `-- --help` for the options). The red wine quality
//! data (1599 wines, 11 physico-chemical features, quality 3 to 8) ships inside the
//! `linfa-datasets` crate, so nothing is downloaded. Quality is predicted as a 6-class label by
//! an 11-64-64-6 ReLU network. Every run starts from the same seeded weights and sees the same
//! batches; only the optimizer differs. The output is a table, one machine-readable
//! `result ...` line per run, and a PNG chart of loss and accuracy against step.

#[path = "common/chart.rs"]
mod chart;
#[path = "train_wine/cli.rs"]
mod cli;
#[allow(dead_code)]
#[path = "common/options.rs"]
mod options;
#[path = "common/report.rs"]
mod report;
// Shared with the other training example, which uses other parts.
#[allow(dead_code)]
#[path = "common/rng.rs"]
mod rng;
#[path = "train_wine/training.rs"]
mod training;

use cli::{parse_args, Args, USAGE};
use report::{default_out_dir, Progress};
use std::error::Error;
use std::process::ExitCode;
use training::{
    load_wine, parameter_count, train_run, Point, RunResult, CLASSES, FEATURES, HIDDEN,
};

fn main() -> ExitCode {
    options::exit_code(parse_args(std::env::args().skip(1)), USAGE, |args| {
        run(&args)
    })
}

fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    let cfg = args.train;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_out_dir("adafactor-train-wine"));
    std::fs::create_dir_all(&out)
        .map_err(|e| format!("cannot create the output folder {}: {e}", out.display()))?;
    let data = load_wine(cfg.seed)?;
    let params = parameter_count(&training::build_model(cfg.seed)?.0);
    let steps_per_epoch = data.n_train.div_ceil(cfg.batch_size);
    println!(
        "red wine quality: {} train / {} test samples, {FEATURES} features, {CLASSES} classes \
         (quality 3..8), split with seed {}",
        data.n_train, data.n_test, cfg.seed
    );
    println!(
        "model: {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES} ReLU MLP, {params} parameters; \
         {} epochs x {steps_per_epoch} steps of batch {}",
        cfg.epochs, cfg.batch_size
    );
    println!(
        "always predicting the majority class (quality {}) scores {:.4} on the test set\n",
        data.majority_class + training::MIN_QUALITY,
        data.majority_accuracy
    );

    let name_width = args.runs.iter().map(|r| r.name.len()).max().unwrap_or(8);
    let mut results = Vec::with_capacity(args.runs.len());
    for spec in &args.runs {
        let progress = Progress::new(&spec.name, name_width, "epoch", cfg.epochs)?;
        let every = (cfg.epochs / 6).max(1);
        let mut on_point = |p: &Point| {
            progress.update(
                p.epoch,
                &format!("loss {:.4}  test acc {:.4}", p.train_loss, p.test_accuracy),
                p.epoch.is_multiple_of(every) || p.epoch == cfg.epochs,
            );
        };
        let result = train_run(&data, spec, &cfg, &mut on_point);
        progress.finish();
        results.push(result?);
    }

    print_table(&results, name_width);
    for r in &results {
        let last = r.last();
        println!(
            "result optimizer={} test_accuracy={:.4} train_loss={:.4} state_bytes={} seconds={:.2}",
            r.spec.name, last.test_accuracy, last.train_loss, r.state_bytes, r.seconds
        );
    }

    let path = out.join("train.png");
    let title = format!(
        "Adafactor vs AdamW: {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES} MLP on red wine quality, \
         batch {}, seed {}",
        cfg.batch_size, cfg.seed
    );
    chart::write_png(
        &title,
        "step",
        &training::chart_panels(&results, data.majority_accuracy),
        &path,
    )?;
    println!("chart: {}", path.display());
    Ok(())
}

fn print_table(results: &[RunResult], name_width: usize) {
    let w = name_width.max("optimizer".len());
    println!();
    println!(
        "{:<w$}  {:>8}  {:>10}  {:>9}  {:>11}  {:>7}",
        "optimizer", "lr", "train loss", "test acc", "state bytes", "seconds"
    );
    for r in results {
        let last = r.last();
        println!(
            "{:<w$}  {:>8}  {:>10.4}  {:>9.4}  {:>11}  {:>7.2}",
            r.spec.name,
            format!("{:e}", r.spec.learning_rate),
            last.train_loss,
            last.test_accuracy,
            r.state_bytes,
            r.seconds
        );
    }
    println!();
}
