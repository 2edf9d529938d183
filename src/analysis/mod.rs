//! What the paper measures, as forward observers: attention sinks (first-token attention, sink
//! rate), massive activations (max |h| per layer), gate-score statistics; the `analyze` and
//! `report` commands built on them.
pub mod analyze;
pub mod compare;
pub mod plots;
pub mod probes;
