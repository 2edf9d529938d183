//! Analysis pictures: attention heatmaps, per-layer bars, gate histograms.

use crate::train::report::{bar_chart, register_font};
use anyhow::{Context, Result};
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

/// Heatmap of a `t × t` attention map (rows: queries, columns: keys).
pub fn heatmap(path: &Path, title: &str, map: &[f32], t: usize, log_scale: bool) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (720, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0..t, (0..t).into_segmented())
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    // rows are drawn top-down, so label y as query t-1-y
    let ylab = |v: &SegmentValue<usize>| match v {
        SegmentValue::Exact(y) | SegmentValue::CenterOf(y) if *y < t => (t - 1 - y).to_string(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("key")
        .y_desc("query")
        .y_label_formatter(&ylab)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let floor = 1e-4f64;
    let scale = |v: f32| -> f64 {
        if log_scale {
            ((v as f64).max(floor).log10() - floor.log10()) / -floor.log10()
        } else {
            v as f64
        }
    };
    let cells = (0..t).flat_map(|i| (0..t).map(move |j| (i, j)));
    chart
        .draw_series(cells.map(|(i, j)| {
            // row i drawn from the top
            let y = t - 1 - i;
            Rectangle::new(
                [(j, SegmentValue::Exact(y)), (j + 1, SegmentValue::Exact(y + 1))],
                colour(scale(map[i * t + j])).filled(),
            )
        }))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Per-layer bar chart.
pub fn per_layer(path: &Path, title: &str, values: &[f64]) -> Result<()> {
    let labels: Vec<String> = (0..values.len()).map(|i| i.to_string()).collect();
    bar_chart(path, title, "layer", &labels, values)
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
    bar_chart(path, title, "expert", &labels, load)
}

/// Gate-score histogram from bin counts over [0, 1].
pub fn gate_histogram(path: &Path, title: &str, counts: &[u64]) -> Result<()> {
    let total: u64 = counts.iter().sum::<u64>().max(1);
    let n = counts.len();
    let labels: Vec<String> = (0..n)
        .map(|i| {
            if i % 4 == 0 {
                format!("{:.1}", i as f64 / n as f64)
            } else {
                String::new()
            }
        })
        .collect();
    let frac: Vec<f64> = counts.iter().map(|&c| c as f64 / total as f64).collect();
    bar_chart(path, title, "score", &labels, &frac)
}
