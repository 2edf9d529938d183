//! Every chart the project draws, as PNG through plotters: the primitives (line, bar and
//! rectangle charts on exactly ticked axes, the vendored font) and the analysis pictures built on
//! them (attention heatmaps, per-layer bars, expert load, gate histograms). Training reports,
//! `analyze` and `report` all draw through here, so none of them imports another for its charts.

use anyhow::{Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, KeyPointWeight};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::ops::Range;
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

/// Register the vendored DejaVu Sans with plotters (no system fonts needed).
pub fn register_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        );
    });
}

/// A plotters error as an anyhow error.
pub fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// Ticks at the multiples of a 1-2-5 step that lie in `[lo, hi]`, at most about `max` of them.
/// The step is at least 1: steps, layers, tokens and bins are counts, never ticked at 0.5.
pub fn nice_ticks(lo: f64, hi: f64, max: usize) -> Vec<f64> {
    let raw = ((hi - lo) / (max.max(2) - 1) as f64).max(1.0);
    if !raw.is_finite() {
        return vec![lo];
    }
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag);
    let (first, last) = ((lo / step - 1e-9).ceil() as i64, (hi / step + 1e-9).floor() as i64);
    (first..=last).map(|k| k as f64 * step).collect()
}

/// An f64 axis ticked exactly at `ticks` and nowhere else. (plotters' own `with_key_points` gives
/// an f64 axis that cannot take a label formatter.)
pub struct TickedAxis {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

pub fn ticked(range: Range<f64>, ticks: Vec<f64>) -> TickedAxis {
    TickedAxis {
        inner: range.into(),
        ticks,
    }
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(v, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // bold points only: no light mesh lines between the ticks
        match hint.weight() {
            KeyPointWeight::Bold => self.ticks.clone(),
            KeyPointWeight::Any => vec![],
        }
    }

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }
}

/// A tick value without float noise (0.30000000000000004 → "0.3", 30.0 → "30").
pub fn tick_label(v: f64) -> String {
    format!("{}", (v * 1e6).round() / 1e6)
}

/// What a line chart's x axis counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    /// Optimizer steps.
    Step,
    /// Layer indices: integer ticks, one point per layer.
    Layer,
}

impl XAxis {
    fn label(self) -> &'static str {
        match self {
            XAxis::Step => "step",
            XAxis::Layer => "layer",
        }
    }

    /// The drawn x range: some room beyond the first and last point so that their markers are not
    /// cut in half by the plot's edge.
    fn range(self, x0: f64, x1: f64) -> Range<f64> {
        let pad = match self {
            XAxis::Step => 0.02 * (x1 - x0).max(1.0),
            XAxis::Layer => 0.5,
        };
        x0 - pad..x1 + pad
    }
}

/// Series with at most this many points get a marker on each: a curve of a few evaluation rows is
/// otherwise a bare segment that hides where (and how few) its measurements are.
const MARKERS_UP_TO: usize = 60;

/// Margin right of a plot: the last x tick's label is centred on its tick and needs half its width.
const RIGHT_MARGIN: u32 = 40;

/// A line chart of several named series into `path`.
pub fn line_chart(
    path: &Path,
    title: &str,
    (x_axis, y_label): (XAxis, &str),
    lines: &[(&str, &[(f64, f64)])],
    log_y: bool,
) -> Result<()> {
    register_font();
    let pts: Vec<&(f64, f64)> = lines
        .iter()
        .flat_map(|(_, s)| s.iter())
        .filter(|p| p.1.is_finite())
        .collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 22))
        .margin(12)
        .margin_right(RIGHT_MARGIN)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let xr = ticked(x_axis.range(x0, x1), nice_ticks(x0, x1, 10));
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_axis.label())
                .y_desc(y_label)
                .x_label_formatter(&|x| tick_label(*x))
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(plot_err)?;
            for (i, (name, s)) in lines.iter().enumerate() {
                let c = colors[i % colors.len()];
                let finite = || s.iter().copied().filter(|p| p.1.is_finite());
                let marked = s.len() <= MARKERS_UP_TO;
                chart
                    .draw_series(LineSeries::new(finite(), c.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(*name)
                    .legend(move |(x, y)| {
                        let marker = if marked { 3 } else { 0 };
                        EmptyElement::at((x, y))
                            + PathElement::new(vec![(0, 0), (20, 0)], c.stroke_width(2))
                            + Circle::new((10, 0), marker, c.filled())
                    });
                if marked {
                    chart
                        .draw_series(finite().map(|p| Circle::new(p, 3, c.filled())))
                        .map_err(plot_err)?;
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(plot_err)?;
        }};
    }
    if log_y && y0 > 0.0 {
        draw!(b
            .build_cartesian_2d(xr, (y0 * 0.9..y1 * 1.1).log_scale())
            .map_err(plot_err)?);
    } else {
        draw!(b.build_cartesian_2d(xr, (y0 - pad)..(y1 + pad)).map_err(plot_err)?);
    }
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Filled rectangles `(x_start, x_end, height)` standing on 0, on a continuous x axis ticked only at
/// `ticks`: bars and histogram bins are drawn exactly where their ticks say (a segmented axis put
/// labels at slot centres and left an empty slot after the last bar).
pub fn rect_chart(
    path: &Path,
    title: &str,
    (x_label, y_label): (&str, &str),
    x_range: Range<f64>,
    ticks: Vec<f64>,
    label: &dyn Fn(&f64) -> String,
    rects: &[(f64, f64, f64)],
) -> Result<()> {
    register_font();
    if rects.is_empty() {
        return Ok(());
    }
    let ymax = rects.iter().map(|r| r.2).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let root = BitMapBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .margin_right(RIGHT_MARGIN)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(ticked(x_range, ticks), 0.0..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(label)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    let corners = |&(a, b, h): &(f64, f64, f64)| [(a, 0.0), (b, h)];
    chart
        .draw_series(rects.iter().map(|r| Rectangle::new(corners(r), BLUE.mix(0.6).filled())))
        .map_err(plot_err)?;
    // outlines keep adjacent histogram bins apart without shifting their edges
    chart
        .draw_series(rects.iter().map(|r| Rectangle::new(corners(r), BLUE.stroke_width(1))))
        .map_err(plot_err)?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A bar chart (one bar per value, centred on its integer tick) into `path`.
pub fn bar_chart(path: &Path, title: &str, axes: (&str, &str), labels: &[String], values: &[f64]) -> Result<()> {
    let n = values.len();
    let rects: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as f64 - 0.4, i as f64 + 0.4, v))
        .collect();
    let label = |x: &f64| labels.get(x.round() as usize).cloned().unwrap_or_default();
    let ticks = (0..n).map(|i| i as f64).collect();
    rect_chart(path, title, axes, -0.5..n as f64 - 0.5, ticks, &label, &rects)
}

/// Viridis-like colour for t in [0, 1].
fn colour(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68., 1., 84.),
        (59., 82., 139.),
        (33., 145., 140.),
        (94., 201., 98.),
        (253., 231., 37.),
    ];
    let x = t.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(
        (a.0 + (b.0 - a.0) * f) as u8,
        (a.1 + (b.1 - a.1) * f) as u8,
        (a.2 + (b.2 - a.2) * f) as u8,
    )
}

/// Smallest attention the logarithmic colour scale resolves; smaller values share its colour.
const LOG_FLOOR: f64 = 1e-4;

/// Where attention `v` sits on the colour scale [0, 1]: linearly, or by decades from LOG_FLOOR to 1.
fn colour_position(v: f64, log_scale: bool) -> f64 {
    if log_scale {
        (v.max(LOG_FLOOR).log10() - LOG_FLOOR.log10()) / -LOG_FLOOR.log10()
    } else {
        v
    }
}

/// Colour-bar ticks as (position on the colour scale, attention value shown): on the log scale the
/// labels are the real values at each decade, not the scale's linear positions.
fn colour_ticks(log_scale: bool) -> Vec<(f64, f64)> {
    let values: &[f64] = if log_scale {
        &[1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    } else {
        &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    };
    values.iter().map(|&v| (colour_position(v, log_scale), v)).collect()
}

/// Heatmap of a `t × t` attention map (rows: queries from the top, columns: keys) with a colour bar.
pub fn heatmap(path: &Path, title: &str, map: &[f32], t: usize, log_scale: bool) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (840, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (cells_area, bar_area) = root
        .margin(10, 0, 0, 0)
        .titled(title, ("sans-serif", 20))
        .map_err(plot_err)?
        .split_horizontally(710);
    // cell (query q, key k) covers x ∈ [k, k+1], y ∈ [t-q-1, t-q]; ticks at cell centres
    let tf = t as f64;
    let idx = nice_ticks(0.0, tf - 1.0, 9);
    let mut chart = ChartBuilder::on(&cells_area)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(
            ticked(0.0..tf, idx.iter().map(|k| k + 0.5).collect()),
            ticked(0.0..tf, idx.iter().map(|q| tf - q - 0.5).collect()),
        )
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("key")
        .y_desc("query")
        .x_label_formatter(&|x| format!("{}", (x - 0.5).round() as i64))
        .y_label_formatter(&|y| format!("{}", (tf - 0.5 - y).round() as i64))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    let cells = (0..t).flat_map(|q| (0..t).map(move |k| (q, k)));
    chart
        .draw_series(cells.map(|(q, k)| {
            let (x, y) = (k as f64, (t - q) as f64);
            let c = colour(colour_position(map[q * t + k] as f64, log_scale));
            Rectangle::new([(x, y), (x + 1.0, y - 1.0)], c.filled())
        }))
        .map_err(plot_err)?;
    colour_bar(&bar_area, log_scale)?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The colour scale from bottom (0) to top (1), ticked with the attention values the colours mean.
/// Its margins match the heatmap's so that the bar spans the map's height.
fn colour_bar(area: &DrawingArea<BitMapBackend, Shift>, log_scale: bool) -> Result<()> {
    const STRIPES: usize = 200;
    let ticks = colour_ticks(log_scale);
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .margin_left(0)
        .x_label_area_size(40)
        .right_y_label_area_size(80)
        .build_cartesian_2d(0.0..1.0, ticked(0.0..1.0, ticks.iter().map(|t| t.0).collect()))
        .map_err(plot_err)?;
    let value_at = |p: &f64| {
        let tick = ticks.iter().find(|t| (t.0 - p).abs() < 1e-9);
        tick.map(|t| tick_label(t.1)).unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc(if log_scale {
            "attention (log scale)"
        } else {
            "attention"
        })
        .y_label_formatter(&value_at)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series((0..STRIPES).map(|i| {
            let (a, b) = (i as f64 / STRIPES as f64, (i + 1) as f64 / STRIPES as f64);
            Rectangle::new([(0.0, a), (1.0, b)], colour((a + b) / 2.0).filled())
        }))
        .map_err(plot_err)?;
    Ok(())
}

/// Per-layer bar chart.
pub fn per_layer(path: &Path, title: &str, y_label: &str, values: &[f64]) -> Result<()> {
    let labels: Vec<String> = (0..values.len()).map(|i| i.to_string()).collect();
    bar_chart(path, title, ("layer", y_label), &labels, values)
}

/// Share of a MoE layer's routed assignments per expert (uniform = 1/E).
pub fn expert_load(path: &Path, title: &str, load: &[f64]) -> Result<()> {
    let labels: Vec<String> = (0..load.len())
        .map(|i| {
            if load.len() <= 16 || i % 4 == 0 {
                i.to_string()
            } else {
                String::new()
            }
        })
        .collect();
    bar_chart(path, title, ("expert", "share of routed assignments"), &labels, load)
}

/// Histogram bins over [0, 1] as `(start, end, share of all counts)`.
fn bin_rects(counts: &[u64]) -> Vec<(f64, f64, f64)> {
    let total = counts.iter().sum::<u64>().max(1) as f64;
    let n = counts.len() as f64;
    let edge = |i: usize| i as f64 / n;
    counts
        .iter()
        .enumerate()
        .map(|(i, &c)| (edge(i), edge(i + 1), c as f64 / total))
        .collect()
}

/// Ticks on bin edges (every few bins): each labels the value where a bin starts or ends.
fn bin_edge_ticks(bins: usize) -> Vec<f64> {
    let n = bins as f64;
    nice_ticks(0.0, n, 11).into_iter().map(|i| i / n).collect()
}

/// Gate-score histogram from bin counts over [0, 1].
pub fn gate_histogram(path: &Path, title: &str, counts: &[u64]) -> Result<()> {
    let axes = ("gate score", "share of scores");
    let label = |x: &f64| tick_label(*x);
    rect_chart(
        path,
        title,
        axes,
        0.0..1.0,
        bin_edge_ticks(counts.len()),
        &label,
        &bin_rects(counts),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_fill_0_to_1_and_ticks_sit_on_bin_edges() {
        let bins = bin_rects(&[1; 20]);
        assert_eq!((bins[0].0, bins[19].1), (0.0, 1.0));
        assert!(bins.windows(2).all(|w| w[0].1 == w[1].0));
        let ticks = bin_edge_ticks(20);
        assert_eq!(ticks.len(), 11);
        for t in ticks {
            assert!(
                bins.iter().any(|b| (b.0 - t).abs() < 1e-12 || (b.1 - t).abs() < 1e-12),
                "tick {t}"
            );
        }
    }

    #[test]
    fn log_colour_bar_labels_decades_at_their_colours() {
        let ticks = colour_ticks(true);
        let at = |v: f64| ticks.iter().find(|t| t.1 == v).unwrap().0;
        assert!((at(1e-2) - 0.5).abs() < 1e-12, "0.01 is halfway from 1e-4 to 1");
        assert!((at(1e-4)).abs() < 1e-12 && (at(1.0) - 1.0).abs() < 1e-12);
        // a cell with attention 0.001 gets the colour the bar shows next to the label 0.001
        assert_eq!(colour(colour_position(1e-3, true)), colour(at(1e-3)));
        assert_eq!(tick_label(1e-3), "0.001");
    }

    #[test]
    fn layer_ticks_are_integers() {
        assert_eq!(nice_ticks(0.0, 3.0, 16), vec![0.0, 1.0, 2.0, 3.0]);
        assert!(nice_ticks(0.0, 47.0, 10).iter().all(|x| x.fract() == 0.0));
        assert_eq!(nice_ticks(1.0, 30.0, 10), vec![5.0, 10.0, 15.0, 20.0, 25.0, 30.0]);
    }
}
