//! PNG line charts for the benchmarks' results (plotters' bitmap backend). Text is drawn with
//! DejaVu Sans, embedded here (`assets/DejaVuSans.ttf`, Bitstream Vera licence in
//! `assets/DejaVuSans-LICENSE.txt`), so no system font library is needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const SIZE: (u32, u32) = (1000, 600);

/// One named curve.
pub struct Series {
    pub name: String,
    /// (x, y), in x order.
    pub points: Vec<(f64, f64)>,
}

/// The chart's title, axis descriptions and labels, and legend.
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    /// Labels of x values (e.g. `10^v` when x is a log10).
    pub x_label: &'a dyn Fn(&f64) -> String,
    /// Where the legend goes (where the curves are not).
    pub legend: SeriesLabelPosition,
}

/// Draws `series` as lines on one chart into the PNG `path`; the axes span every point.
pub fn lines(path: &Path, axes: &Axes<'_>, series: &[Series]) -> Result<()> {
    register_font();
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in all() {
        (x0, x1, y1) = (x0.min(x), x1.max(x), y1.max(y));
    }
    if !x0.is_finite() || x1 <= x0 {
        (x0, x1) = (0.0, 1.0);
    }
    let y1 = if y1 > 0.0 { y1 * 1.05 } else { 1.0 };
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let failed = |e: &dyn std::fmt::Display| anyhow!("draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(axes.title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|e| failed(&e))?;
    chart
        .configure_mesh()
        .x_desc(axes.x)
        .y_desc(axes.y)
        .x_label_formatter(axes.x_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| failed(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| failed(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(axes.legend.clone())
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| failed(&e))?;
    root.present().map_err(|e| failed(&e))?;
    Ok(())
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in: it parses, or every chart would be without text.
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            eprintln!("warning: the embedded font did not parse; charts have no text");
        }
    });
}
