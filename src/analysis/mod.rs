//! What the paper measures, as forward observers: attention sinks (first-token attention, sink
//! rate), massive activations (max |h| per layer), gate-score statistics; the `analyze` and
//! `report` commands built on them.
pub mod analyze;
pub mod compare;
pub mod plots;
pub mod probes;

/// A magnitude such as M-Act for people: one decimal while short, scientific notation once
/// huge (a diverged model's 3.1e30 is not printed as 31 digits).
pub fn fmt_magnitude(x: f64) -> String {
    if x.is_finite() && x.abs() < 1e6 {
        format!("{x:.1}")
    } else {
        format!("{x:.3e}")
    }
}
