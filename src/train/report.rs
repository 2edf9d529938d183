//! `report.md` and PNG plots of a run, drawn from its metrics.jsonl.

use super::config::TrainConfig;
use super::metrics::{read_rows, series};
use super::RunSummary;
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

/// Register the vendored DejaVu Sans with plotters (no system fonts needed).
pub fn register_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../assets/DejaVuSans.ttf"),
        );
    });
}

/// The paper's Tab. 4 numbers, for orientation: (model, F-Attn, M-Act, mean gate).
pub const PAPER_REFERENCE: [(&str, f64, f64, Option<f64>); 3] = [
    ("paper baseline", 0.467, 1053.0, None),
    ("paper G1 elementwise", 0.048, 94.0, Some(0.116)),
    ("paper G1 headwise", 0.073, 98.0, Some(0.172)),
];

/// A line chart of several named series into `path`.
pub fn line_chart(path: &Path, title: &str, y_label: &str, lines: &[(&str, &[(f64, f64)])], log_y: bool) -> Result<()> {
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
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(y_label)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
            for (i, (name, s)) in lines.iter().enumerate() {
                let c = colors[i % colors.len()];
                chart
                    .draw_series(LineSeries::new(
                        s.iter().copied().filter(|p| p.1.is_finite()),
                        c.stroke_width(2),
                    ))
                    .map_err(|e| anyhow::anyhow!("plot: {e}"))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        }};
    }
    let xr = x0..x1.max(x0 + 1.0);
    if log_y && y0 > 0.0 {
        draw!(b
            .build_cartesian_2d(xr, (y0 * 0.9..y1 * 1.1).log_scale())
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?);
    } else {
        draw!(b
            .build_cartesian_2d(xr, (y0 - pad)..(y1 + pad))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?);
    }
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A bar chart (one bar per value) into `path`.
pub fn bar_chart(path: &Path, title: &str, x_label: &str, labels: &[String], values: &[f64]) -> Result<()> {
    register_font();
    if values.is_empty() {
        return Ok(());
    }
    let ymax = values.iter().cloned().fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let root = BitMapBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let n = values.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..ymax)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let fmt = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels.get(*i).cloned().unwrap_or_default(),
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_label_formatter(&fmt)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style(BLUE.mix(0.7).filled())
                .margin(3)
                .data(values.iter().enumerate().map(|(i, v)| (i, *v))),
        )
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn fmt(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "–".into()
    }
}

pub fn write(out: &Path, cfg: &TrainConfig, s: &RunSummary) -> Result<()> {
    let rows = read_rows(&out.join("metrics.jsonl"))?;
    let (train, val) = (series(&rows, "loss"), series(&rows, "val_loss"));
    line_chart(
        &out.join("loss.png"),
        "Loss",
        "cross-entropy (nats)",
        &[("train", &train), ("validation", &val)],
        false,
    )?;
    let (fa, ma) = (series(&rows, "first_token_attn"), series(&rows, "m_act"));
    line_chart(
        &out.join("first_token_attn.png"),
        "Attention on the first token (F-Attn)",
        "mean A[i,0]",
        &[("first_token_attn", &fa)],
        false,
    )?;
    line_chart(
        &out.join("m_act.png"),
        "Massive activations (M-Act)",
        "mean over layers of max |h|",
        &[("m_act", &ma)],
        false,
    )?;
    let gm = series(&rows, "gate_mean");
    if !gm.is_empty() {
        line_chart(
            &out.join("gate_mean.png"),
            "Mean gate score",
            "mean act(z)",
            &[("gate_mean", &gm)],
            false,
        )?;
        crate::analysis::plots::gate_histogram(
            &out.join("gate_hist.png"),
            "Gate scores (final evaluation)",
            &s.stats.gate_histogram,
        )?;
    }
    let gate = cfg
        .model
        .gate
        .as_ref()
        .map(|g| g.spec())
        .unwrap_or_else(|| "none".into());
    let mut r = String::new();
    r += &format!("# Training report: `{}`\n\n", out.display());
    r += &format!(
        "Preset `{}`, gate `{gate}`, {} layers, d={}, {}/{} heads × {}, vocab {}, {} parameters.\n\n",
        cfg.preset,
        cfg.model.num_layers,
        cfg.model.hidden_size,
        cfg.model.num_heads,
        cfg.model.num_kv_heads,
        cfg.model.head_dim,
        cfg.model.vocab_size,
        crate::model::params::param_specs(&cfg.model)
            .0
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum::<usize>()
    );
    r += &format!(
        "Steps {} (batch {} × seq {} × accum {}), peak LR {}, {} schedule; {:.0} tokens/s.\n\n",
        s.steps,
        cfg.train.batch_size,
        cfg.train.seq_len,
        cfg.train.grad_accum,
        cfg.optim.adamw.lr,
        cfg.schedule.kind,
        s.tokens_per_s
    );
    r += "| model | train loss | val loss | F-Attn | sink rate | M-Act | mean gate | gate <0.1 | spikes | skipped | diverged |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    r += &format!(
        "| this run | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} |\n",
        fmt(s.final_train_loss),
        fmt(s.final_val_loss),
        fmt(s.stats.first_token_attn),
        fmt(s.stats.sink_rate),
        s.stats.m_act,
        s.stats.gate_mean.map(fmt).unwrap_or("–".into()),
        s.stats.gate_frac_below_0_1.map(fmt).unwrap_or("–".into()),
        s.spikes,
        s.skipped,
        if s.diverged { "yes" } else { "no" }
    );
    for (name, fa, ma, g) in PAPER_REFERENCE {
        r += &format!(
            "| {name} (1.7B–15B, 3.5T tokens) | | | {fa} | | {ma} | {} | | | | |\n",
            g.map(|g| g.to_string()).unwrap_or("–".into())
        );
    }
    r += "\nF-Attn = mean attention of queries i ≥ 1 on the first token; sink rate = fraction of heads whose first-token importance exceeds ε = ";
    r += &format!("{}; M-Act = mean over layers of max |hidden|. Paper rows are Tab. 4 of Qiu et al. (2025), for orientation only: our models are far smaller.\n\n", cfg.train.sink_epsilon);
    r += "Per layer at the end: F-Attn ";
    r += &s
        .stats
        .first_token_attn_per_layer
        .iter()
        .map(|x| format!("{x:.3}"))
        .collect::<Vec<_>>()
        .join(", ");
    r += "; M-Act ";
    r += &s
        .stats
        .m_act_per_layer
        .iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(", ");
    r += ".\n\n![loss](loss.png)\n\n![first-token attention](first_token_attn.png)\n\n![massive activations](m_act.png)\n";
    if !gm.is_empty() {
        r += "\n![mean gate](gate_mean.png)\n\n![gate histogram](gate_hist.png)\n";
    }
    crate::io::write_atomic(&out.join("report.md"), r.as_bytes())
}
