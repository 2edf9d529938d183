//! `report.md` and PNG plots of a run, drawn from its metrics.jsonl.

use super::config::TrainConfig;
use super::RunSummary;
use crate::analysis::PAPER_REFERENCE;
use crate::io::metrics::{read_rows, series};
use crate::plot::{gate_histogram, line_chart, XAxis};
use anyhow::Result;
use std::path::Path;

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
        gate_histogram(
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
