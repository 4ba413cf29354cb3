//! Console output shared by the training examples: a progress bar per run on a terminal (plain
//! lines otherwise), and the default output folder under cargo's `target/`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::error::Error;
use std::io::IsTerminal;
use std::path::PathBuf;

/// One run's progress: a bar on a terminal, else one plain line per milestone.
pub struct Progress {
    bar: Option<ProgressBar>,
    prefix: String,
    unit: &'static str,
    len: usize,
}

impl Progress {
    /// Starts reporting a run named `name` (padded to `name_width`) of `len` `unit`s
    /// (`"epoch"`, `"iter"`).
    ///
    /// # Errors
    /// The bar's template is invalid.
    pub fn new(
        name: &str,
        name_width: usize,
        unit: &'static str,
        len: usize,
    ) -> Result<Self, Box<dyn Error>> {
        let prefix = format!("{name:<name_width$}");
        let bar = if std::io::stdout().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix}} [{{bar:30}}] {unit} {{pos:>4}}/{{len}} {{msg}} ({{elapsed}})"
                ))?
                .progress_chars("=> "),
            );
            bar.set_prefix(prefix.clone());
            Some(bar)
        } else {
            None
        };
        Ok(Progress {
            bar,
            prefix,
            unit,
            len,
        })
    }

    /// Reports position `pos` with `message`: moves the bar, or (without a terminal) prints a
    /// line when `milestone` is set.
    pub fn update(&self, pos: usize, message: &str, milestone: bool) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(pos as u64);
                bar.set_message(message.to_string());
            }
            None if milestone => println!(
                "{} {} {pos:>4}/{}  {message}",
                self.prefix, self.unit, self.len
            ),
            None => {}
        }
    }

    /// Leaves the bar drawn at its last position.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// The default output folder `name` in cargo's target folder, found from this binary's path
/// (`<target>/<profile>/examples/<example>`), else `./target/name`.
pub fn default_out_dir(name: &str) -> PathBuf {
    let target = std::env::current_exe().ok().and_then(|exe| {
        let examples = exe.parent()?;
        (examples.file_name()? == "examples")
            .then(|| examples.parent()?.parent().map(PathBuf::from))
            .flatten()
    });
    target.unwrap_or_else(|| PathBuf::from("target")).join(name)
}
