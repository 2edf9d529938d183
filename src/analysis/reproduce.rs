//! `gated-lm reproduce`: the paper's claims as rules over matched arms' measurements, each with
//! a verdict. Pure functions of the numbers, so every rule is tested on synthetic metrics.

use serde::{Deserialize, Serialize};

/// What one trained and measured arm gives the claims. `None` where the arm could not be
/// measured (a diverged arm has no saved model).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ArmMetrics {
    pub val_loss: Option<f64>,
    pub spikes: u64,
    pub diverged: bool,
    pub first_token_attn: Option<f64>,
    pub sink_rate: Option<f64>,
    pub m_act: Option<f64>,
    pub gate_mean: Option<f64>,
    pub gate_frac_below_0_1: Option<f64>,
    pub gate_frac_above_0_9: Option<f64>,
    /// Streaming loss (nats/token) with a sliding KV window and no sink tokens kept …
    pub stream_loss: Option<f64>,
    /// … and with the first tokens kept (StreamingLLM).
    pub stream_loss_sinks: Option<f64>,
    /// RULER accuracy averaged over the lengths beyond the training context, after the RoPE
    /// base change.
    pub ruler_extended: Option<f64>,
}

impl ArmMetrics {
    /// The loss a model pays when the first tokens leave the KV window.
    pub fn sink_dependence(&self) -> Option<f64> {
        Some(self.stream_loss? - self.stream_loss_sinks?)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Reproduced,
    NotVisible,
    Contradicted,
}

impl Verdict {
    pub fn text(self) -> &'static str {
        match self {
            Verdict::Reproduced => "reproduced",
            Verdict::NotVisible => "not visible at this scale",
            Verdict::Contradicted => "contradicted",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Claim {
    pub claim: &'static str,
    pub paper: &'static str,
    pub ours: String,
    pub rule: &'static str,
    pub verdict: Verdict,
}

/// Thresholds of the rules (README, "reproduce").
pub const LOSS_MARGIN: f64 = 0.01;
pub const RELATIVE_CUT: f64 = 0.5;
pub const SPARSE_GATE_MEAN: f64 = 0.25;
pub const SINK_PENALTY_MIN: f64 = 0.02;
pub const RULER_MARGIN: f64 = 0.05;
/// A baseline whose F-Attn is under twice the uniform level has no sink to remove.
pub const SINK_OVER_UNIFORM: f64 = 2.0;
/// Activations are "massive" an order of magnitude above the RMS-normalised scale of 1.
pub const MASSIVE_M_ACT: f64 = 10.0;

/// F-Attn of uniform causal attention over `seq` tokens: query i ≥ 1 gives 1/(i+1) to the first
/// token, averaged over the queries.
pub fn uniform_first_token_attn(seq: usize) -> f64 {
    if seq < 2 {
        return 1.0;
    }
    (1..seq).map(|i| 1.0 / (i + 1) as f64).sum::<f64>() / (seq - 1) as f64
}

/// "G1 lower by at least half": reproduced when `g1 ≤ cut·base`, contradicted when `g1 ≥ base`;
/// not visible unless the baseline shows the phenomenon (`base > floor`).
fn reduced(base: Option<f64>, g1: Option<f64>, floor: f64) -> Verdict {
    match (base, g1) {
        (Some(b), Some(g)) if b > floor && g <= RELATIVE_CUT * b => Verdict::Reproduced,
        (Some(b), Some(g)) if b > floor && g >= b => Verdict::Contradicted,
        _ => Verdict::NotVisible,
    }
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".into(), |v| {
        if v.abs() >= 1e5 {
            format!("{v:.2e}")
        } else {
            format!("{v:.digits$}")
        }
    })
}

/// Stability at a high learning rate: a divergence counts as more than any number of spikes.
fn instability(m: &ArmMetrics) -> u64 {
    if m.diverged {
        u64::MAX
    } else {
        m.spikes
    }
}

/// One row per claim of the paper. `base`/`g1` are the matched baseline and G1 elementwise
/// arms; `hi_base`/`hi_g1` the same at the raised learning rate; `seq` the measured length.
pub fn claims(base: &ArmMetrics, g1: &ArmMetrics, hi_base: &ArmMetrics, hi_g1: &ArmMetrics, seq: usize) -> Vec<Claim> {
    let mut out = Vec::new();
    let loss = match (base.val_loss, g1.val_loss) {
        (Some(b), Some(g)) if g <= b - LOSS_MARGIN => Verdict::Reproduced,
        (Some(b), Some(g)) if g >= b + LOSS_MARGIN => Verdict::Contradicted,
        _ => Verdict::NotVisible,
    };
    out.push(Claim {
        claim: "lower loss / perplexity (Tab. 1)",
        paper: "PPL 6.026 → 5.761 (−0.045 nats)",
        ours: format!("val loss {} → {}", num(base.val_loss, 4), num(g1.val_loss, 4)),
        rule: "G1 ≤ baseline − 0.01 nats; contradicted if ≥ baseline + 0.01",
        verdict: loss,
    });
    let (ib, ig) = (instability(hi_base), instability(hi_g1));
    let show = |m: &ArmMetrics| {
        if m.diverged {
            "diverged".to_string()
        } else {
            format!("{} spikes", m.spikes)
        }
    };
    out.push(Claim {
        claim: "fewer loss spikes, no divergence at a high LR (Tab. 2 / Fig. 1)",
        paper: "baseline spikes / diverges at the higher LR; G1 trains smoothly",
        ours: format!("high LR: baseline {}, G1 {}", show(hi_base), show(hi_g1)),
        rule: "G1 diverges less, or spikes less, than the baseline at the same raised LR; contradicted if more",
        verdict: match ig.cmp(&ib) {
            std::cmp::Ordering::Less => Verdict::Reproduced,
            std::cmp::Ordering::Equal => Verdict::NotVisible,
            std::cmp::Ordering::Greater => Verdict::Contradicted,
        },
    });
    out.push(Claim {
        claim: "first-token attention (Tab. 4)",
        paper: "F-Attn 0.467 → 0.048",
        ours: format!("{} → {}", num(base.first_token_attn, 4), num(g1.first_token_attn, 4)),
        rule: "G1 ≤ 50% of the baseline; contradicted if ≥ it; not visible unless the baseline is over 2× uniform attention's F-Attn",
        verdict: reduced(
            base.first_token_attn,
            g1.first_token_attn,
            SINK_OVER_UNIFORM * uniform_first_token_attn(seq),
        ),
    });
    out.push(Claim {
        claim: "attention-sink rate (Tab. 4)",
        paper: "sinks in most heads → few",
        ours: format!("{} → {}", num(base.sink_rate, 3), num(g1.sink_rate, 3)),
        rule: "G1 ≤ 50% of the baseline; contradicted if ≥ the baseline (not visible when the baseline has none)",
        verdict: reduced(base.sink_rate, g1.sink_rate, 0.0),
    });
    out.push(Claim {
        claim: "massive activations (Tab. 4)",
        paper: "M-Act 1053 → 94",
        ours: format!("{} → {}", num(base.m_act, 1), num(g1.m_act, 1)),
        rule: "G1 ≤ 50% of the baseline; contradicted if ≥ it; not visible unless the baseline's M-Act ≥ 10",
        verdict: reduced(base.m_act, g1.m_act, MASSIVE_M_ACT),
    });
    out.push(Claim {
        claim: "sparse gate scores (§4.3)",
        paper: "mean gate score 0.116, most near 0",
        ours: format!(
            "mean {}, below 0.1: {}, above 0.9: {}",
            num(g1.gate_mean, 3),
            num(g1.gate_frac_below_0_1, 3),
            num(g1.gate_frac_above_0_9, 3)
        ),
        rule: "mean ≤ 0.25 with more scores below 0.1 than above 0.9; contradicted if mean ≥ 0.5",
        verdict: match (g1.gate_mean, g1.gate_frac_below_0_1, g1.gate_frac_above_0_9) {
            (Some(m), Some(lo), Some(hi)) if m <= SPARSE_GATE_MEAN && lo > hi => Verdict::Reproduced,
            (Some(m), _, _) if m >= 0.5 => Verdict::Contradicted,
            _ => Verdict::NotVisible,
        },
    });
    let (pb, pg) = (base.sink_dependence(), g1.sink_dependence());
    out.push(Claim {
        claim: "sink-free streaming (§5)",
        paper: "the gated model needs no attention sink",
        ours: format!(
            "loss paid when the first tokens leave the window: baseline {}, G1 {}",
            num(pb, 4),
            num(pg, 4)
        ),
        rule: "baseline pays ≥ 0.02 nats and G1 ≤ 50% of that; contradicted if G1 pays as much; not visible if the baseline pays < 0.02",
        verdict: match (pb, pg) {
            (Some(b), Some(g)) if b >= SINK_PENALTY_MIN && g <= RELATIVE_CUT * b => Verdict::Reproduced,
            (Some(b), Some(g)) if b >= SINK_PENALTY_MIN && g >= b => Verdict::Contradicted,
            _ => Verdict::NotVisible,
        },
    });
    out.push(Claim {
        claim: "long context after extension (Tab. 5)",
        paper: "RULER 128k 31.7 → 58.8 (YaRN)",
        ours: format!(
            "RULER beyond the training context after a RoPE base change: {} → {}",
            num(base.ruler_extended, 3),
            num(g1.ruler_extended, 3)
        ),
        rule: "G1 ≥ baseline + 0.05 accuracy; contradicted if ≤ baseline − 0.05",
        verdict: match (base.ruler_extended, g1.ruler_extended) {
            (Some(b), Some(g)) if g >= b + RULER_MARGIN => Verdict::Reproduced,
            (Some(b), Some(g)) if g <= b - RULER_MARGIN => Verdict::Contradicted,
            _ => Verdict::NotVisible,
        },
    });
    out
}

/// The claims as a markdown table.
pub fn claims_table(claims: &[Claim]) -> String {
    let mut md = String::from("| claim | paper | ours | rule | verdict |\n|---|---|---|---|---|\n");
    for c in claims {
        md += &format!(
            "| {} | {} | {} | {} | **{}** |\n",
            c.claim,
            c.paper,
            c.ours,
            c.rule,
            c.verdict.text()
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(loss: f64, fa: f64, m_act: f64) -> ArmMetrics {
        ArmMetrics {
            val_loss: Some(loss),
            first_token_attn: Some(fa),
            sink_rate: Some(fa),
            m_act: Some(m_act),
            ..Default::default()
        }
    }

    fn verdict(c: &[Claim], prefix: &str) -> Verdict {
        c.iter().find(|c| c.claim.starts_with(prefix)).unwrap().verdict
    }

    #[test]
    fn each_rule_gives_each_verdict_at_its_thresholds() {
        let quiet = ArmMetrics::default();
        let base = arm(2.0, 0.40, 100.0);
        let claims = |b: &ArmMetrics, g: &ArmMetrics, hb: &ArmMetrics, hg: &ArmMetrics| claims(b, g, hb, hg, 64);
        // the paper's direction, clearly
        let c = claims(&base, &arm(1.95, 0.05, 10.0), &quiet, &quiet);
        assert_eq!(verdict(&c, "lower loss"), Verdict::Reproduced);
        assert_eq!(verdict(&c, "first-token"), Verdict::Reproduced);
        assert_eq!(verdict(&c, "massive"), Verdict::Reproduced);
        // within the margins
        let c = claims(&base, &arm(1.995, 0.30, 60.0), &quiet, &quiet);
        assert_eq!(verdict(&c, "lower loss"), Verdict::NotVisible);
        assert_eq!(verdict(&c, "first-token"), Verdict::NotVisible);
        // exactly half is still a reduction by half
        let c = claims(&base, &arm(1.985, 0.20, 50.0), &quiet, &quiet);
        assert_eq!(verdict(&c, "lower loss"), Verdict::Reproduced);
        assert_eq!(verdict(&c, "first-token"), Verdict::Reproduced);
        // the other way round
        let c = claims(&base, &arm(2.02, 0.40, 120.0), &quiet, &quiet);
        assert_eq!(verdict(&c, "lower loss"), Verdict::Contradicted);
        assert_eq!(verdict(&c, "first-token"), Verdict::Contradicted);
        assert_eq!(verdict(&c, "massive"), Verdict::Contradicted);
        // nothing measured (a diverged arm): not visible, never a verdict from missing data
        let c = claims(&quiet, &quiet, &quiet, &quiet);
        assert!(c.iter().all(|c| c.verdict == Verdict::NotVisible));
        assert_eq!(c.len(), 8);
        // a baseline without a sink (near-uniform attention) or without massive activations
        // cannot show their removal, whatever G1 does
        let flat = arm(2.0, 1.5 * uniform_first_token_attn(64), 5.0);
        let c = claims(&flat, &arm(2.0, 0.5, 50.0), &quiet, &quiet);
        assert_eq!(verdict(&c, "first-token"), Verdict::NotVisible);
        assert_eq!(verdict(&c, "massive"), Verdict::NotVisible);
    }

    #[test]
    fn uniform_attention_level() {
        // T = 2: the one query i = 1 gives 1/2 to the first token
        assert_eq!(uniform_first_token_attn(2), 0.5);
        let u = uniform_first_token_attn(64);
        assert!((u - 0.0590).abs() < 1e-3, "{u}");
    }

    #[test]
    fn stability_gate_streaming_and_ruler_rules() {
        let q = ArmMetrics::default();
        let claims = |b: &ArmMetrics, g: &ArmMetrics, hb: &ArmMetrics, hg: &ArmMetrics| claims(b, g, hb, hg, 64);
        let spiky = ArmMetrics { spikes: 3, ..q.clone() };
        let div = ArmMetrics {
            diverged: true,
            ..q.clone()
        };
        assert_eq!(verdict(&claims(&q, &q, &div, &spiky), "fewer"), Verdict::Reproduced);
        assert_eq!(verdict(&claims(&q, &q, &spiky, &spiky), "fewer"), Verdict::NotVisible);
        assert_eq!(verdict(&claims(&q, &q, &spiky, &div), "fewer"), Verdict::Contradicted);
        let gate = |m: f64, lo: f64, hi: f64| ArmMetrics {
            gate_mean: Some(m),
            gate_frac_below_0_1: Some(lo),
            gate_frac_above_0_9: Some(hi),
            ..q.clone()
        };
        assert_eq!(
            verdict(&claims(&q, &gate(0.12, 0.6, 0.01), &q, &q), "sparse"),
            Verdict::Reproduced
        );
        assert_eq!(
            verdict(&claims(&q, &gate(0.35, 0.1, 0.0), &q, &q), "sparse"),
            Verdict::NotVisible
        );
        assert_eq!(
            verdict(&claims(&q, &gate(0.6, 0.0, 0.2), &q, &q), "sparse"),
            Verdict::Contradicted
        );
        let stream = |plain: f64, sinks: f64, ruler: f64| ArmMetrics {
            stream_loss: Some(plain),
            stream_loss_sinks: Some(sinks),
            ruler_extended: Some(ruler),
            ..q.clone()
        };
        let base = stream(3.0, 2.5, 0.30);
        assert_eq!(
            verdict(&claims(&base, &stream(2.52, 2.5, 0.40), &q, &q), "sink-free"),
            Verdict::Reproduced
        );
        assert_eq!(
            verdict(&claims(&base, &stream(3.1, 2.5, 0.40), &q, &q), "sink-free"),
            Verdict::Contradicted
        );
        assert_eq!(
            verdict(
                &claims(&stream(2.51, 2.5, 0.3), &stream(2.5, 2.5, 0.3), &q, &q),
                "sink-free"
            ),
            Verdict::NotVisible
        );
        assert_eq!(
            verdict(&claims(&base, &stream(2.5, 2.5, 0.36), &q, &q), "long"),
            Verdict::Reproduced
        );
        assert_eq!(
            verdict(&claims(&base, &stream(2.5, 2.5, 0.33), &q, &q), "long"),
            Verdict::NotVisible
        );
        assert_eq!(
            verdict(&claims(&base, &stream(2.5, 2.5, 0.2), &q, &q), "long"),
            Verdict::Contradicted
        );
        let md = claims_table(&claims(&base, &base, &q, &q));
        assert_eq!(md.lines().count(), 2 + 8);
    }
}
