//! Command-line pieces shared by the training examples: named runs (`NAME` or `NAME@LR`),
//! number options, and the `main` that turns parsed options into an exit code.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;

/// A named run: `(name, optimizer kind, default learning rate)`.
pub type Preset<K> = (&'static str, K, f64);

/// One run: a name (for the table, the chart and the `result` lines), an optimizer and its
/// learning rate.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec<K> {
    /// Name shown in the output.
    pub name: String,
    /// The optimizer.
    pub kind: K,
    /// Its learning rate (for a schedule, its peak).
    pub learning_rate: f64,
}

impl<K: Copy> RunSpec<K> {
    /// Parses `NAME` or `NAME@LR`, NAME one of `presets`; `@LR` sets another learning rate, and
    /// the run is then named as written.
    ///
    /// # Errors
    /// An unknown name, or a learning rate that is not a positive finite number.
    pub fn parse(text: &str, presets: &[Preset<K>]) -> Result<Self, String> {
        let (base, lr) = match text.split_once('@') {
            Some((base, lr)) => (base, Some(lr)),
            None => (text, None),
        };
        let (_, kind, default_lr) = presets
            .iter()
            .find(|(name, _, _)| *name == base)
            .ok_or_else(|| {
                let names: Vec<&str> = presets.iter().map(|p| p.0).collect();
                format!(
                    "unknown optimizer `{base}` in `{text}`; expected one of {}",
                    names.join(", ")
                )
            })?;
        let learning_rate = match lr {
            Some(lr) => parse_learning_rate(lr).map_err(|e| format!("in `{text}`: {e}"))?,
            None => *default_lr,
        };
        Ok(RunSpec {
            name: text.to_string(),
            kind: *kind,
            learning_rate,
        })
    }
}

/// Every preset as a run, in order.
pub fn preset_runs<K: Copy>(presets: &[Preset<K>]) -> Vec<RunSpec<K>> {
    presets
        .iter()
        .map(|&(name, kind, learning_rate)| RunSpec {
            name: name.to_string(),
            kind,
            learning_rate,
        })
        .collect()
}

/// The runs named in `names` (comma-separated, spaces allowed).
///
/// # Errors
/// An unknown or repeated name, or a bad learning rate.
pub fn parse_runs<K: Copy>(names: &str, presets: &[Preset<K>]) -> Result<Vec<RunSpec<K>>, String> {
    let specs = names
        .split(',')
        .map(|n| RunSpec::parse(n.trim(), presets))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|s| s.name == spec.name) {
            return Err(format!("`{}` is listed twice", spec.name));
        }
    }
    Ok(specs)
}

/// Parses a learning rate: a positive finite number.
///
/// # Errors
/// Not a number, not finite, or not positive.
pub fn parse_learning_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(lr) if lr.is_finite() && lr > 0.0 => Ok(lr),
        _ => Err(format!(
            "learning rate `{text}` is not a positive finite number"
        )),
    }
}

/// Parses the value of `option` as a whole number >= 1.
///
/// # Errors
/// Not a whole number, or zero.
pub fn parse_count(option: &str, value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "{option} expects a whole number >= 1, got `{value}`"
        )),
    }
}

/// Parses the value of `--seed`.
///
/// # Errors
/// Not a whole number >= 0.
pub fn parse_seed(value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| format!("--seed expects a whole number >= 0, got `{value}`"))
}

/// Parsed options of a training example.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainArgs<T, K> {
    /// What every run shares (steps, batches, seed).
    pub train: T,
    /// The runs, in order.
    pub runs: Vec<RunSpec<K>>,
    /// Output folder of the chart (`None`: the default under `target/`).
    pub out: Option<PathBuf>,
}

/// What a command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command<A> {
    /// Train with these options.
    Train(A),
    /// Print the usage text.
    Help,
}

/// Runs `train` on parsed options and turns the outcome into an exit code: 2 with `usage`
/// for bad options, 1 for a failed run.
pub fn exit_code<A>(
    command: Result<Command<A>, String>,
    usage: &str,
    train: impl FnOnce(A) -> Result<(), Box<dyn Error>>,
) -> ExitCode {
    match command {
        Err(e) => {
            eprintln!("error: {e}\n\n{usage}");
            ExitCode::from(2)
        }
        Ok(Command::Help) => {
            print!("{usage}");
            ExitCode::SUCCESS
        }
        Ok(Command::Train(args)) => match train(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
