//! What the paper measures, as forward observers: attention sinks (first-token attention, sink
//! rate), massive activations (max |h| per layer) and gate-score statistics.
pub mod probes;
