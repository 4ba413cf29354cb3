//! Trains a small MLP on real data with Adafactor and with AdamW, and compares them.
//!
//! `cargo run --release --example train` (add `-- --help` for the options). The red wine quality
//! data (1599 wines, 11 physico-chemical features, quality 3 to 8) ships inside the
//! `linfa-datasets` crate, so nothing is downloaded. Quality is predicted as a 6-class label by
//! an 11-64-64-6 ReLU network. Every run starts from the same seeded weights and sees the same
//! batches; only the optimizer differs. The output is a table, one machine-readable
//! `result ...` line per run, and a PNG chart of loss and accuracy against step.

#[path = "train/chart.rs"]
mod chart;
#[path = "train/cli.rs"]
mod cli;
#[path = "train/training.rs"]
mod training;

use cli::{parse_args, Args, Command, USAGE};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::error::Error;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use training::{
    load_wine, parameter_count, train_run, Point, RunResult, CLASSES, FEATURES, HIDDEN,
};

fn main() -> ExitCode {
    let command = match parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let args = match command {
        Command::Help => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Command::Train(args) => args,
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The default chart folder: `adafactor-train` in cargo's target folder, found from this
/// binary's path (`<target>/<profile>/examples/train`), else `./target`.
fn default_out_dir() -> PathBuf {
    let target = std::env::current_exe().ok().and_then(|exe| {
        let examples = exe.parent()?;
        (examples.file_name()? == "examples")
            .then(|| examples.parent()?.parent().map(PathBuf::from))
            .flatten()
    });
    target
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("adafactor-train")
}

fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    let cfg = args.train;
    let out = args.out.clone().unwrap_or_else(default_out_dir);
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

    let terminal = std::io::stdout().is_terminal();
    let name_width = args.runs.iter().map(|r| r.name.len()).max().unwrap_or(8);
    let mut results = Vec::with_capacity(args.runs.len());
    for spec in &args.runs {
        let result = if terminal {
            let bar = ProgressBar::with_draw_target(
                Some(cfg.epochs as u64),
                ProgressDrawTarget::stdout(),
            );
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] epoch {pos:>3}/{len} {msg} ({elapsed})",
                )?
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{:<name_width$}", spec.name));
            let mut on_point = |p: &Point| {
                bar.set_position(p.epoch as u64);
                bar.set_message(format!(
                    "loss {:.4}  test acc {:.4}",
                    p.train_loss, p.test_accuracy
                ));
            };
            let result = train_run(&data, spec, &cfg, &mut on_point);
            bar.finish();
            result?
        } else {
            let every = (cfg.epochs / 6).max(1);
            let mut on_point = |p: &Point| {
                if p.epoch.is_multiple_of(every) || p.epoch == cfg.epochs {
                    println!(
                        "{:<name_width$} epoch {:>3}/{}  loss {:.4}  test acc {:.4}",
                        spec.name, p.epoch, cfg.epochs, p.train_loss, p.test_accuracy
                    );
                }
            };
            train_run(&data, spec, &cfg, &mut on_point)?
        };
        results.push(result);
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
    chart::write_png(&results, data.majority_accuracy, &title, &path)?;
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
