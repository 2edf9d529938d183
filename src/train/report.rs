//! `report.md` and PNG plots of a run, drawn from its metrics.jsonl.

use super::config::TrainConfig;
use super::metrics::{read_rows, series};
use super::RunSummary;
use anyhow::{Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, KeyPointWeight};
use plotters::coord::types::RangedCoordf64;
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
        (XAxis::Step, "cross-entropy (nats)"),
        &[("train", &train), ("validation", &val)],
        false,
    )?;
    let (fa, ma) = (series(&rows, "first_token_attn"), series(&rows, "m_act"));
    line_chart(
        &out.join("first_token_attn.png"),
        "Attention on the first token (F-Attn)",
        (XAxis::Step, "mean A[i,0]"),
        &[("first_token_attn", &fa)],
        false,
    )?;
    line_chart(
        &out.join("m_act.png"),
        "Massive activations (M-Act)",
        (XAxis::Step, "mean over layers of max |h|"),
        &[("m_act", &ma)],
        false,
    )?;
    let gm = series(&rows, "gate_mean");
    if !gm.is_empty() {
        line_chart(
            &out.join("gate_mean.png"),
            "Mean gate score",
            (XAxis::Step, "mean act(z)"),
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
        "| this run | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        fmt(s.final_train_loss),
        fmt(s.final_val_loss),
        fmt(s.stats.first_token_attn),
        fmt(s.stats.sink_rate),
        crate::analysis::fmt_magnitude(s.stats.m_act),
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
    r += &format!(
        "\nMeasured on validation windows of {} tokens (F-Attn depends on the length). ",
        cfg.train.seq_len
    );
    r += "F-Attn = mean attention of queries i ≥ 1 on the first token; sink rate = fraction of heads whose first-token importance exceeds ε = ";
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
