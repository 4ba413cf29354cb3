//! The `train` example's chart: training loss and test accuracy against step, one line per
//! run, drawn with plotters into a PNG. Text uses DejaVu Sans embedded in the binary, so the
//! chart needs no system font.

use crate::training::RunResult;
use plotters::prelude::*;
use std::error::Error;
use std::path::Path;

/// DejaVu Sans (see `assets/fonts/README.md` and `assets/fonts/LICENSE`).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Chart width in pixels.
pub const WIDTH: u32 = 1280;
/// Chart height in pixels.
pub const HEIGHT: u32 = 540;

/// Line colours, one per run (cycled).
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// Registers the embedded font as plotters' `sans-serif`.
fn register_font() -> Result<(), Box<dyn Error>> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "the embedded DejaVu Sans font could not be parsed".into())
}

/// `(lo, hi)` covering `values`, widened by `pad` of the span (or by 0.05 when flat).
fn range(values: impl Iterator<Item = f32>, pad: f32) -> (f32, f32) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = (hi - lo).max(0.1);
    (lo - pad * span, hi + pad * span)
}

/// Draws the chart for `results` (with the majority-class accuracy as a reference line) and
/// writes it as a PNG to `path`.
///
/// # Errors
/// The font cannot be loaded, drawing fails, or the file cannot be written.
pub fn write_png(
    results: &[RunResult],
    majority_accuracy: f32,
    title: &str,
    path: &Path,
) -> Result<(), Box<dyn Error>> {
    register_font()?;
    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 22))?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let max_step = results
            .iter()
            .map(|r| r.last().step)
            .max()
            .unwrap_or(1)
            .max(1) as f32;

        let (lo, hi) = range(
            results
                .iter()
                .flat_map(|r| r.history.iter().map(|p| p.train_loss)),
            0.05,
        );
        let mut loss = ChartBuilder::on(&left)
            .caption(
                "training loss (cross-entropy, whole training set)",
                ("sans-serif", 17),
            )
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0f32..max_step, lo.max(0.0)..hi)?;
        loss.configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()?;
        for (i, run) in results.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            loss.draw_series(LineSeries::new(
                // A diverged run stops at its first non-finite loss.
                run.history
                    .iter()
                    .take_while(|p| p.train_loss.is_finite())
                    .map(|p| (p.step as f32, p.train_loss)),
                colour.stroke_width(2),
            ))?
            .label(legend_text(run))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(3))
            });
        }
        loss.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;

        let (lo, hi) = range(
            results
                .iter()
                .flat_map(|r| r.history.iter().map(|p| p.test_accuracy))
                .chain(std::iter::once(majority_accuracy)),
            0.08,
        );
        let mut acc = ChartBuilder::on(&right)
            .caption("test accuracy", ("sans-serif", 17))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0f32..max_step, lo.max(0.0)..hi.min(1.0))?;
        acc.configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("accuracy")
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()?;
        let grey = RGBColor(120, 120, 120);
        acc.draw_series(LineSeries::new(
            [(0.0, majority_accuracy), (max_step, majority_accuracy)],
            grey.stroke_width(1),
        ))?
        .label("always the majority class")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], grey.stroke_width(1)));
        for (i, run) in results.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            acc.draw_series(LineSeries::new(
                run.history.iter().map(|p| (p.step as f32, p.test_accuracy)),
                colour.stroke_width(2),
            ))?
            .label(legend_text(run))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(3))
            });
        }
        acc.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        root.present()?;
    }
    let file = std::fs::File::create(path)
        .map_err(|e| format!("cannot create the chart file {}: {e}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(())
}

/// A run's legend entry: its name and learning rate.
fn legend_text(run: &RunResult) -> String {
    format!("{} (lr {:e})", run.spec.name, run.spec.learning_rate)
}
