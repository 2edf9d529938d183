//! `SinkProbe`: accumulates, layer by layer as the forward streams past, everything the sink /
//! massive-activation / gate analyses need, without keeping attention maps.
//!
//! Definitions (README "Metrics"):
//! * `first_token_attn` = mean over layers, heads, batch and query positions i ≥ 1 of A[i, 0].
//! * `sink_rate` = fraction of (layer, head) whose key-0 importance — the mean over batch and
//!   queries i ≥ 1 of A[i, 0] — exceeds ε (Gu et al.; ε = 0.3 by default).
//! * `m_act` = mean over layers of max |h| of the layer's output.
//! * gate statistics over all gate scores act(z).

use crate::config::GateGeometry;
use crate::model::observer::{max_keeping_nan, GateTotals, LayerTotals, Observer, GATE_BINS, SMALL_OUTPUT};
use crate::model::ops::router::RouterStats;
use crate::real::Real;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug)]
pub struct SinkProbe {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub epsilon: f64,
    /// [layer][head] Σ A[i,0] over batch and i ≥ 1
    first_sum: Vec<Vec<f64>>,
    max_abs: Vec<f64>,
    gate_sum: Vec<f64>,
    gate_count: Vec<u64>,
    gate_hist: Vec<u64>,
    gate_low: u64,
    gate_high: u64,
    sparse_1e2: u64,
    sparse_1e3: u64,
    attn_out_count: u64,
    /// Per MoE layer: router statistics summed over the forwards seen, and how many.
    routers: Vec<Option<(RouterStats, usize)>>,
}

/// Router statistics of a MoE model (README "Metrics").
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MoeStats {
    /// Mean over MoE layers of the load-balancing loss E·Σ f_e·P_e (1 = balanced).
    pub lb_loss: f64,
    /// Mean over MoE layers of mean logsumexp(router logits)².
    pub z_loss: f64,
    /// Mean over MoE layers of (busiest expert's load) / (mean load).
    pub expert_imbalance: f64,
    /// Share of routed assignments dropped by the capacity limit.
    pub dropped_frac: f64,
    /// [MoE layer][expert]: share of the layer's routed assignments.
    pub expert_load: Vec<Vec<f64>>,
    /// Model layer index of each row of `expert_load`.
    pub moe_layers: Vec<usize>,
}

/// Summary of per-layer router statistics.
pub fn moe_stats(layers: &[(usize, &RouterStats)]) -> Option<MoeStats> {
    if layers.is_empty() {
        return None;
    }
    let n = layers.len() as f64;
    let total: usize = layers.iter().map(|(_, s)| s.load.iter().sum::<usize>()).sum();
    Some(MoeStats {
        lb_loss: layers.iter().map(|(_, s)| s.lb_loss).sum::<f64>() / n,
        z_loss: layers.iter().map(|(_, s)| s.z_loss).sum::<f64>() / n,
        expert_imbalance: layers.iter().map(|(_, s)| s.imbalance()).sum::<f64>() / n,
        dropped_frac: layers.iter().map(|(_, s)| s.dropped).sum::<usize>() as f64 / total.max(1) as f64,
        expert_load: layers
            .iter()
            .map(|(_, s)| {
                let t = s.load.iter().sum::<usize>().max(1) as f64;
                s.load.iter().map(|&c| c as f64 / t).collect()
            })
            .collect(),
        moe_layers: layers.iter().map(|(l, _)| *l).collect(),
    })
}

/// Deserialisable (missing fields default) so a finished run's summary can be read back from
/// its metrics.jsonl eval rows.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SinkStats {
    pub first_token_attn: f64,
    pub first_token_attn_per_layer: Vec<f64>,
    /// [layer][head]: key-0 importance
    pub first_token_attn_per_head: Vec<Vec<f64>>,
    pub sink_rate: f64,
    pub sink_epsilon: f64,
    pub m_act: f64,
    pub m_act_per_layer: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate_mean: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gate_mean_per_layer: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gate_histogram: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate_frac_below_0_1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate_frac_above_0_9: Option<f64>,
    /// Fraction of attention-block outputs (o_proj inputs) with |Y'| < 1e-2 and < 1e-3.
    pub attn_output_frac_below_1e_2: f64,
    pub attn_output_frac_below_1e_3: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeStats>,
}

impl SinkProbe {
    pub fn new(layers: usize, heads: usize, batch: usize, seq: usize, epsilon: f64) -> Self {
        SinkProbe {
            batch,
            seq,
            heads,
            epsilon,
            first_sum: vec![vec![0.0; heads]; layers],
            max_abs: vec![0.0; layers],
            gate_sum: vec![0.0; layers],
            gate_count: vec![0; layers],
            gate_hist: vec![0; GATE_BINS],
            gate_low: 0,
            gate_high: 0,
            sparse_1e2: 0,
            sparse_1e3: 0,
            attn_out_count: 0,
            routers: vec![None; layers],
        }
    }

    /// Record one layer's key-0 column `col0[b][h][i] = A[i, 0]` (`[batch, heads, seq]`).
    pub fn add_first_column(&mut self, layer: usize, col0: impl Fn(usize, usize, usize) -> f64) {
        let key0 = (0..self.heads)
            .map(|h| {
                (0..self.batch)
                    .map(|b| (1..self.seq).map(|i| col0(b, h, i)).sum::<f64>())
                    .sum()
            })
            .collect();
        self.add_totals(
            layer,
            &LayerTotals {
                key0,
                ..Default::default()
            },
        );
    }

    /// Add one layer's sums (any part of them: the others neutral). Every route into the probe
    /// ends here: the host's tensors through [`Observer`], a device's totals as they are.
    pub fn add_totals(&mut self, layer: usize, t: &LayerTotals) {
        for (acc, s) in self.first_sum[layer].iter_mut().zip(&t.key0) {
            *acc += s;
        }
        self.max_abs[layer] = max_keeping_nan(self.max_abs[layer], t.max_abs);
        self.sparse_1e2 += t.small[0];
        self.sparse_1e3 += t.small[1];
        self.attn_out_count += t.outputs;
        if let Some(g) = &t.gate {
            self.gate_sum[layer] += g.sum;
            self.gate_hist.iter_mut().zip(&g.hist).for_each(|(a, b)| *a += b);
            self.gate_low += g.low;
            self.gate_high += g.high;
            self.gate_count[layer] += g.count;
        }
    }

    pub fn stats(&self) -> SinkStats {
        let denom = (self.batch * (self.seq.saturating_sub(1)).max(1)) as f64;
        let per_head: Vec<Vec<f64>> = self
            .first_sum
            .iter()
            .map(|l| l.iter().map(|s| s / denom).collect())
            .collect();
        let per_layer: Vec<f64> = per_head
            .iter()
            .map(|l| l.iter().sum::<f64>() / l.len() as f64)
            .collect();
        let all: Vec<f64> = per_head.iter().flatten().copied().collect();
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let gated = self.gate_count.iter().any(|&c| c > 0);
        let total: u64 = self.gate_count.iter().sum();
        SinkStats {
            first_token_attn: mean(&all),
            first_token_attn_per_layer: per_layer,
            sink_rate: all.iter().filter(|&&x| x > self.epsilon).count() as f64 / all.len().max(1) as f64,
            sink_epsilon: self.epsilon,
            first_token_attn_per_head: per_head,
            m_act: mean(&self.max_abs),
            m_act_per_layer: self.max_abs.clone(),
            gate_mean: gated.then(|| self.gate_sum.iter().sum::<f64>() / total as f64),
            gate_mean_per_layer: if gated {
                self.gate_sum
                    .iter()
                    .zip(&self.gate_count)
                    .map(|(s, &c)| s / c.max(1) as f64)
                    .collect()
            } else {
                vec![]
            },
            gate_histogram: if gated { self.gate_hist.clone() } else { vec![] },
            gate_frac_below_0_1: gated.then(|| self.gate_low as f64 / total as f64),
            gate_frac_above_0_9: gated.then(|| self.gate_high as f64 / total as f64),
            attn_output_frac_below_1e_2: self.sparse_1e2 as f64 / self.attn_out_count.max(1) as f64,
            attn_output_frac_below_1e_3: self.sparse_1e3 as f64 / self.attn_out_count.max(1) as f64,
            moe: {
                // per layer: loads and drops summed, the losses averaged over forwards
                let avg: Vec<(usize, RouterStats)> = self
                    .routers
                    .iter()
                    .enumerate()
                    .filter_map(|(l, r)| {
                        let (s, calls) = r.as_ref()?;
                        let mut s = s.clone();
                        s.lb_loss /= *calls as f64;
                        s.z_loss /= *calls as f64;
                        Some((l, s))
                    })
                    .collect();
                moe_stats(&avg.iter().map(|(l, s)| (*l, s)).collect::<Vec<_>>())
            },
        }
    }
}

impl<T: Real> Observer<T> for SinkProbe {
    fn wants_key0(&self, _layer: usize) -> bool {
        true
    }
    fn key0(&mut self, layer: usize, col: &[T]) {
        let (h, t) = (self.heads, self.seq);
        self.add_first_column(layer, |b, hh, i| col[(b * h + hh) * t + i].to_f64());
    }
    fn wants_attn_output(&self) -> bool {
        true
    }
    fn attn_output(&mut self, layer: usize, o: &[T]) {
        let count = |bound: f64| o.iter().filter(|v| v.to_f64().abs() < bound).count() as u64;
        let t = LayerTotals {
            small: SMALL_OUTPUT.map(count),
            outputs: o.len() as u64,
            ..Default::default()
        };
        self.add_totals(layer, &t);
    }
    fn wants_gate_scores(&self) -> bool {
        true
    }
    fn gate_scores(&mut self, layer: usize, scores: &[T], _geo: &GateGeometry) {
        let t = LayerTotals {
            gate: Some(GateTotals::of(scores.iter().map(|s| s.to_f64()))),
            ..Default::default()
        };
        self.add_totals(layer, &t);
    }
    fn layer_output(&mut self, layer: usize, x: &[T]) {
        let max_abs = x.iter().fold(0.0, |m, v| max_keeping_nan(m, v.to_f64().abs()));
        let t = LayerTotals {
            max_abs,
            ..Default::default()
        };
        self.add_totals(layer, &t);
    }
    fn takes_totals(&self) -> bool {
        true
    }
    fn layer_totals(&mut self, layer: usize, t: &LayerTotals) {
        self.add_totals(layer, t);
    }
    fn router(&mut self, layer: usize, st: &RouterStats) {
        match &mut self.routers[layer] {
            Some((acc, calls)) => {
                acc.tokens += st.tokens;
                acc.load.iter_mut().zip(&st.load).for_each(|(a, b)| *a += b);
                acc.dropped += st.dropped;
                acc.lb_loss += st.lb_loss;
                acc.z_loss += st.z_loss;
                *calls += 1;
            }
            slot => *slot = Some((st.clone(), 1)),
        }
    }
}
