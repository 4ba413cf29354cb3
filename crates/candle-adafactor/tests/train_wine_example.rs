//! Tests of the `train_wine` example (`examples/train_wine.rs`), on its own code: the wine data split,
//! the seeded initialisation, short training runs, the options and the chart.

#[allow(dead_code)]
#[path = "../examples/train_wine/training.rs"]
mod training;

#[allow(dead_code)]
#[path = "../examples/train_wine/cli.rs"]
mod cli;

#[allow(dead_code)]
#[path = "../examples/common/chart.rs"]
mod chart;
mod common;

#[allow(dead_code)]
#[path = "../examples/common/options.rs"]
mod options;

#[allow(dead_code)]
#[path = "../examples/common/rng.rs"]
mod rng;

use candle_core::Tensor;
use cli::{parse_args, Command};
use training::{
    build_model, default_runs, load_wine, parameter_count, train_run, OptimizerKind, Point,
    RunSpec, TrainConfig, CLASSES, FEATURES, PRESETS,
};

fn short(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        ..TrainConfig::default()
    }
}

fn spec(name: &str) -> RunSpec {
    RunSpec::parse(name, &PRESETS).expect("a preset name parses")
}

fn column_stats(x: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let rows = x.to_vec2::<f32>().expect("a 2-D f32 tensor");
    let n = rows.len() as f32;
    let mean: Vec<f32> = (0..FEATURES)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f32>() / n)
        .collect();
    let std: Vec<f32> = (0..FEATURES)
        .map(|j| (rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f32>() / n).sqrt())
        .collect();
    (mean, std)
}

#[test]
fn wine_data_is_split_80_20_and_standardised_with_training_statistics() {
    let data = load_wine(42).expect("the wine data loads");
    assert_eq!(data.n_train + data.n_test, 1599);
    assert_eq!(data.n_test, 320);
    assert_eq!(data.train_x.dims(), &[data.n_train, FEATURES]);
    assert_eq!(data.test_x.dims(), &[data.n_test, FEATURES]);
    let (mean, std) = column_stats(&data.train_x);
    for j in 0..FEATURES {
        assert!(mean[j].abs() < 1e-4, "feature {j}: train mean {}", mean[j]);
        assert!(
            (std[j] - 1.0).abs() < 1e-3,
            "feature {j}: train std {}",
            std[j]
        );
    }
    // The test part uses the training statistics, so it is only roughly standardised.
    let (test_mean, _) = column_stats(&data.test_x);
    assert!(test_mean.iter().any(|m| m.abs() > 1e-3));
    let labels: Vec<u32> = data.train_y.to_vec1().expect("u32 labels");
    assert!(labels.iter().all(|&c| (c as usize) < CLASSES));
    // Quality 5 (class 2) and 6 (class 3) are the two common scores of this data set.
    assert!(data.majority_class == 2 || data.majority_class == 3);
    assert!(data.majority_accuracy > 0.3 && data.majority_accuracy < 0.5);
}

#[test]
fn the_split_depends_on_the_seed_only() {
    let a = load_wine(7).expect("loads");
    let b = load_wine(7).expect("loads");
    let c = load_wine(8).expect("loads");
    let rows = |t: &Tensor| t.to_vec2::<f32>().expect("2-D");
    assert_eq!(rows(&a.test_x), rows(&b.test_x));
    assert_ne!(rows(&a.test_x), rows(&c.test_x));
}

#[test]
fn the_initial_weights_depend_on_the_seed_only() {
    let weights = |seed| {
        let (varmap, _) = build_model(seed).expect("the model builds");
        let mut vars: Vec<(String, Vec<f32>)> = varmap
            .data()
            .lock()
            .expect("unpoisoned")
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.flatten_all().and_then(|t| t.to_vec1()).expect("f32"),
                )
            })
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    };
    let (a, b, c) = (weights(1), weights(1), weights(2));
    assert_eq!(a, b);
    assert_ne!(a, c);
    for (name, values) in &a {
        if name.ends_with("bias") {
            assert!(values.iter().all(|&v| v == 0.0), "{name} starts at zero");
        } else {
            // Glorot uniform: within the limit and not all equal.
            let limit = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(limit > 0.0 && limit < 0.75, "{name}: max |w| = {limit}");
        }
    }
}

#[test]
fn a_short_adafactor_run_lowers_the_loss_and_beats_the_majority_class() {
    let data = load_wine(42).expect("loads");
    let mut seen = Vec::new();
    let run = train_run(
        &data,
        &spec("adafactor-paper"),
        &short(5),
        &mut |p: &Point| seen.push(*p),
    )
    .expect("the run trains");
    assert_eq!(seen, run.history, "every point is reported");
    assert_eq!(run.history.len(), 6);
    let steps_per_epoch = data.n_train.div_ceil(32);
    assert_eq!(run.last().step, 5 * steps_per_epoch);
    let (first, last) = (run.history[0], run.last());
    assert!(
        last.train_loss < 0.7 * first.train_loss,
        "loss {} -> {}",
        first.train_loss,
        last.train_loss
    );
    assert!(
        last.test_accuracy > data.majority_accuracy + 0.05,
        "test accuracy {} vs majority class {}",
        last.test_accuracy,
        data.majority_accuracy
    );
}

#[test]
fn keras_default_adafactor_also_learns_but_more_slowly() {
    let data = load_wine(42).expect("loads");
    let keras = train_run(&data, &spec("adafactor"), &short(3), &mut |_| {}).expect("trains");
    let paper = train_run(&data, &spec("adafactor-paper"), &short(3), &mut |_| {}).expect("trains");
    assert_eq!(keras.history[0], paper.history[0], "same initial weights");
    assert!(keras.last().train_loss < keras.history[0].train_loss);
    assert!(paper.last().train_loss < keras.last().train_loss);
}

#[test]
fn runs_are_reproducible() {
    let data = load_wine(42).expect("loads");
    let a = train_run(&data, &spec("adafactor"), &short(2), &mut |_| {}).expect("trains");
    let b = train_run(&data, &spec("adafactor"), &short(2), &mut |_| {}).expect("trains");
    assert_eq!(a.history, b.history);
}

#[test]
fn adafactor_keeps_factored_statistics_and_adamw_two_moments() {
    let data = load_wine(42).expect("loads");
    let (varmap, _) = build_model(42).expect("builds");
    // Weights: one float per row and per column; biases: one per element.
    let expected: usize = varmap
        .all_vars()
        .iter()
        .map(|v| match *v.dims() {
            [rows, cols] => rows + cols,
            _ => v.elem_count(),
        })
        .sum();
    let adafactor = train_run(&data, &spec("adafactor"), &short(1), &mut |_| {}).expect("trains");
    let adamw = train_run(&data, &spec("adamw"), &short(1), &mut |_| {}).expect("trains");
    assert_eq!(adafactor.state_bytes, 4 * expected);
    assert_eq!(adamw.state_bytes, 2 * 4 * parameter_count(&varmap));
    assert!(adamw.last().train_loss < adamw.history[0].train_loss);
}

#[test]
fn a_zero_batch_size_is_an_error_that_names_it() {
    let data = load_wine(42).expect("loads");
    let cfg = TrainConfig {
        batch_size: 0,
        ..short(1)
    };
    let err = train_run(&data, &spec("adamw"), &cfg, &mut |_| {}).expect_err("rejected");
    assert!(err.to_string().contains("batch size (0)"), "{err}");
}

fn args(list: &[&str]) -> Result<Command, String> {
    parse_args(list.iter().map(|s| s.to_string()))
}

#[test]
fn options_default_to_three_runs_of_60_epochs() {
    let Ok(Command::Train(a)) = args(&[]) else {
        panic!("no arguments means train")
    };
    assert_eq!(a.train, TrainConfig::default());
    assert_eq!(a.train.epochs, 60);
    assert_eq!(a.runs, default_runs());
    let names: Vec<&str> = a.runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["adafactor", "adafactor-paper", "adamw"]);
    assert_eq!(args(&["--help"]), Ok(Command::Help));
    assert_eq!(args(&["--epochs", "3", "-h"]), Ok(Command::Help));
}

#[test]
fn options_set_epochs_seed_runs_and_learning_rates() {
    let Ok(Command::Train(a)) = args(&[
        "--epochs=3",
        "--seed",
        "7",
        "--optimizers",
        "adamw,adafactor@5e-3",
        "--lr",
        "0.02",
        "--out",
        "charts",
    ]) else {
        panic!("valid options")
    };
    assert_eq!(
        (a.train.epochs, a.train.seed, a.train.batch_size),
        (3, 7, 32)
    );
    assert_eq!(a.out.as_deref(), Some(std::path::Path::new("charts")));
    assert_eq!(a.runs.len(), 2);
    assert_eq!(
        (a.runs[0].kind, a.runs[0].learning_rate),
        (OptimizerKind::AdamW, 0.02)
    );
    assert_eq!(a.runs[1].name, "adafactor@5e-3");
    assert_eq!(a.runs[1].learning_rate, 5e-3, "@LR wins over --lr");
}

#[test]
fn bad_options_are_errors_that_name_the_problem() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["--epochs", "0"],
            "--epochs expects a whole number >= 1, got `0`",
        ),
        (&["--epochs"], "--epochs expects a value"),
        (&["--batch-size=x"], "got `x`"),
        (&["--lr", "-1"], "learning rate `-1`"),
        (&["--optimizers", "sgd"], "unknown optimizer `sgd`"),
        (&["--optimizers", "adamw,adamw"], "`adamw` is listed twice"),
        (&["--frobnicate"], "unknown argument `--frobnicate`"),
    ];
    for (argv, expected) in cases {
        let err = args(argv).expect_err("rejected");
        assert!(err.contains(expected), "{argv:?}: {err}");
    }
}

#[test]
fn the_chart_is_a_png_with_text_and_one_colour_per_run() {
    let data = load_wine(42).expect("loads");
    let runs: Vec<_> = default_runs()
        .iter()
        .map(|s| train_run(&data, s, &short(1), &mut |_| {}).expect("trains"))
        .collect();
    let dir = std::env::temp_dir().join(format!("adafactor-train-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp folder");
    let path = dir.join("train.png");
    let panels = training::chart_panels(&runs, data.majority_accuracy);
    chart::write_png("test chart", "step", &panels, &path).expect("draws");
    let pixels = common::ChartPixels::read(&path);
    assert_eq!((pixels.width, pixels.height), (chart::WIDTH, chart::HEIGHT));
    // Dark grey-scale pixels: axes and text; the first run's blue: its lines and legend.
    let (dark, blue) = (pixels.dark(), pixels.of_colour([31, 119, 180]));
    assert!(dark > 2000, "{dark} dark pixels");
    assert!(blue > 100, "{blue} pixels of the first run's colour");
    std::fs::remove_dir_all(&dir).ok();
}
