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
    /// Whether the observer is content with each layer's [`LayerTotals`] instead of the tensors
    /// above: a backend whose activations are not in host memory (a device) reduces them where
    /// they are and reports only [`Self::layer_totals`].
    fn takes_totals(&self) -> bool {
        false
    }
    fn layer_totals(&mut self, _layer: usize, _totals: &LayerTotals) {}
}

/// Gate-score histogram bins over [0, 1] (scores outside are clamped into the end bins).
pub const GATE_BINS: usize = 20;
/// Gate scores counted as low (below the first) and high (above the second).
pub const GATE_LOW_HIGH: (f64, f64) = (0.1, 0.9);
/// Attention-block outputs counted as small: |y| below each.
pub const SMALL_OUTPUT: [f64; 2] = [1e-2, 1e-3];

/// The sink / massive-activation / gate metrics' sums over one layer of one forward (README
/// "Metrics"). Every field starts neutral (empty, 0, `None`), so a part of them adds alone.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerTotals {
    /// Per query head: Σ over the batch and the queries i ≥ 1 of the attention on key 0.
    pub key0: Vec<f64>,
    /// max |h| of the layer's output.
    pub max_abs: f64,
    /// Attention-block outputs (o_proj's input) with |y| below each of [`SMALL_OUTPUT`], and how
    /// many outputs there were.
    pub small: [u64; 2],
    pub outputs: u64,
    pub gate: Option<GateTotals>,
}

/// The larger of `m` and `v`, NaN once either is NaN: a blown-up activation shows as NaN in
/// the metrics instead of as the largest finite value beside it.
pub fn max_keeping_nan(m: f64, v: f64) -> f64 {
    if v > m || v.is_nan() {
        v
    } else {
        m
    }
}

/// Sums over a layer's gate scores `act(z)`.
#[derive(Clone, Debug, PartialEq)]
pub struct GateTotals {
    pub sum: f64,
    /// [`GATE_BINS`] bins over [0, 1]
    pub hist: Vec<u64>,
    /// below and above [`GATE_LOW_HIGH`]
    pub low: u64,
    pub high: u64,
    pub count: u64,
}

impl GateTotals {
    /// The bin of a score (NaN and values outside [0, 1] clamped into the end bins).
    pub fn bin(v: f64) -> usize {
        ((v * GATE_BINS as f64) as isize).clamp(0, GATE_BINS as isize - 1) as usize
    }

    /// The totals of `scores`.
    pub fn of(scores: impl Iterator<Item = f64>) -> Self {
        let mut t = GateTotals {
            sum: 0.0,
            hist: vec![0; GATE_BINS],
            low: 0,
            high: 0,
            count: 0,
        };
        for v in scores {
            t.sum += v;
            t.hist[Self::bin(v)] += 1;
            t.low += (v < GATE_LOW_HIGH.0) as u64;
            t.high += (v > GATE_LOW_HIGH.1) as u64;
            t.count += 1;
        }
        t
    }
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
