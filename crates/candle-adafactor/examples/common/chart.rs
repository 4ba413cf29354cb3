//! The training examples' chart: side-by-side panels of one line per run against step, drawn
//! with plotters into a PNG. Text uses DejaVu Sans embedded in the binary, so the chart needs no
//! system font.

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

/// One run's line: its legend entry and its `(step, value)` points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend entry.
    pub label: String,
    /// Points in step order; drawing stops at the first non-finite value (a diverged run).
    pub points: Vec<(f32, f32)>,
}

/// One panel: a caption, a y-axis name, one series per run (run `i` gets colour `i` in every
/// panel) and an optional grey reference line.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption above the panel.
    pub caption: String,
    /// Name of the y axis.
    pub y_desc: String,
    /// One series per run, in run order.
    pub series: Vec<Series>,
    /// A horizontal reference line: legend entry and value.
    pub reference: Option<(String, f32)>,
    /// Lowest and highest y the axis may show (for accuracies: 0 and 1).
    pub bounds: (f32, f32),
    /// Legend at the top (losses fall away from it) or at the bottom (accuracies rise).
    pub legend_on_top: bool,
}

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

/// Draws `panels` side by side under `title`, with `x_desc` on every x axis, and writes the
/// chart as a PNG to `path`.
///
/// # Errors
/// No panel, the font cannot be loaded, drawing fails, or the file cannot be written.
pub fn write_png(
    title: &str,
    x_desc: &str,
    panels: &[Panel],
    path: &Path,
) -> Result<(), Box<dyn Error>> {
    if panels.is_empty() {
        return Err("a chart needs at least one panel".into());
    }
    register_font()?;
    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 22))?;
        let areas = root.split_evenly((1, panels.len()));
        for (area, panel) in areas.iter().zip(panels) {
            draw_panel(area, x_desc, panel)?;
        }
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

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    x_desc: &str,
    panel: &Panel,
) -> Result<(), Box<dyn Error>> {
    let max_step = panel
        .series
        .iter()
        .filter_map(|s| s.points.last().map(|p| p.0))
        .fold(1f32, f32::max);
    let (lo, hi) = range(
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(panel.reference.iter().map(|r| r.1)),
        0.06,
    );
    let (lo, hi) = (lo.max(panel.bounds.0), hi.min(panel.bounds.1));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.caption, ("sans-serif", 17))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0f32..max_step, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(panel.y_desc.as_str())
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    if let Some((label, value)) = &panel.reference {
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(LineSeries::new(
                [(0.0, *value), (max_step, *value)],
                grey.stroke_width(1),
            ))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], grey.stroke_width(1))
            });
    }
    for (i, series) in panel.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                series
                    .points
                    .iter()
                    .take_while(|p| p.1.is_finite())
                    .copied(),
                colour.stroke_width(2),
            ))?
            .label(series.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(if panel.legend_on_top {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::LowerRight
        })
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}
