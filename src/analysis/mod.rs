//! What the paper measures, as forward observers: attention sinks (first-token attention, sink
//! rate), massive activations (max |h| per layer), gate-score statistics; the `analyze` and
//! `report` commands built on them.
pub mod analyze;
pub mod compare;
pub mod probes;
pub mod reproduce;

/// A magnitude such as M-Act for people: one decimal while short, scientific notation once
/// huge (a diverged model's 3.1e30 is not printed as 31 digits).
pub fn fmt_magnitude(x: f64) -> String {
    if x.is_finite() && x.abs() < 1e6 {
        format!("{x:.1}")
    } else {
        format!("{x:.3e}")
    }
}

/// The paper's Tab. 4 numbers, for orientation: (model, F-Attn, M-Act, mean gate).
pub const PAPER_REFERENCE: [(&str, f64, f64, Option<f64>); 3] = [
    ("paper baseline", 0.467, 1053.0, None),
    ("paper G1 elementwise", 0.048, 94.0, Some(0.116)),
    ("paper G1 headwise", 0.073, 98.0, Some(0.172)),
];
