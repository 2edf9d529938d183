//! Optional observers of the forward pass. Analysis, dumps and training-time probes are observers;
//! none of them re-implements the forward.

use super::ops::router::RouterStats;
use crate::config::GateGeometry;

pub trait Observer<T> {
    /// Whether layer `layer` should materialise its `[batch, heads, seq, seq]` probabilities.
    fn wants_attn_probs(&self, _layer: usize) -> bool {
        false
    }
    fn attn_probs(&mut self, _layer: usize, _probs: &[T]) {}
    /// Whether layer `layer` should report attention on key 0 (`[batch, heads, seq]`): the sink
    /// metrics need only this column, so long inputs never materialise T×T maps.
    fn wants_key0(&self, _layer: usize) -> bool {
        false
    }
    fn key0(&mut self, _layer: usize, _col: &[T]) {}
    /// The attention block's output before o_proj (SDPA output after a G1 gate), `[batch·seq, heads·d]`.
    fn wants_attn_output(&self) -> bool {
        false
    }
    fn attn_output(&mut self, _layer: usize, _o: &[T]) {}
    fn wants_gate_scores(&self) -> bool {
        false
    }
    /// Gate scores `act(z)`, `[batch·seq, geo.scores()]`.
    fn gate_scores(&mut self, _layer: usize, _scores: &[T], _geo: &GateGeometry) {}
    /// Residual stream after layer `layer`, `[batch·seq, hidden]`.
    fn layer_output(&mut self, _layer: usize, _x: &[T]) {}
    /// What a MoE layer's router did (load per expert, drops, auxiliary losses).
    fn router(&mut self, _layer: usize, _stats: &RouterStats) {}
}

/// Observes nothing.
pub struct NoObserver;
impl<T> Observer<T> for NoObserver {}

/// Keeps everything (used by `dump` and tests; small inputs only).
#[derive(Default)]
pub struct Recorder<T> {
    pub layer_out: Vec<Vec<T>>,
    pub attn_probs: Vec<Vec<T>>,
    pub gates: Vec<Vec<T>>,
    /// (layer, stats) of every MoE layer.
    pub routers: Vec<(usize, RouterStats)>,
}

impl<T: Clone> Observer<T> for Recorder<T> {
    fn wants_attn_probs(&self, _layer: usize) -> bool {
        true
    }
    fn attn_probs(&mut self, _layer: usize, probs: &[T]) {
        self.attn_probs.push(probs.to_vec());
    }
    fn wants_gate_scores(&self) -> bool {
        true
    }
    fn gate_scores(&mut self, _layer: usize, scores: &[T], _geo: &GateGeometry) {
        self.gates.push(scores.to_vec());
    }
    fn layer_output(&mut self, _layer: usize, x: &[T]) {
        self.layer_out.push(x.to_vec());
    }
    fn router(&mut self, layer: usize, stats: &RouterStats) {
        self.routers.push((layer, stats.clone()));
    }
}

/// Collects the router statistics of every MoE layer (training metrics, analysis).
#[derive(Default)]
pub struct RouterLog {
    pub stats: Vec<RouterStats>,
}

impl<T> Observer<T> for RouterLog {
    fn router(&mut self, _layer: usize, stats: &RouterStats) {
        self.stats.push(stats.clone());
    }
}
