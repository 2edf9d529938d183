//! Analysis pictures: attention heatmaps, per-layer bars, gate histograms.

use crate::train::report::{bar_chart, nice_ticks, plot_err, rect_chart, register_font, tick_label, ticked};
use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

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
