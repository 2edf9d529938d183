//! Learning-rate schedules: linear warmup then constant, cosine, or warmup-stable-decay.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Schedule {
    /// "cosine", "wsd" or "constant"
    pub kind: String,
    pub warmup_steps: u64,
    /// Final LR as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// WSD: fraction of all steps spent in the final linear decay.
    pub decay_fraction: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            kind: "cosine".into(),
            warmup_steps: 100,
            min_lr_ratio: 0.1,
            decay_fraction: 0.2,
        }
    }
}

impl Schedule {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !["cosine", "wsd", "constant"].contains(&self.kind.as_str()) {
            anyhow::bail!("schedule.kind must be cosine, wsd or constant, got '{}'", self.kind);
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) || !(0.0..=1.0).contains(&self.decay_fraction) {
            anyhow::bail!("schedule.min_lr_ratio and schedule.decay_fraction must be in [0, 1]");
        }
        Ok(())
    }

    /// LR for 0-based `step` of `total` steps with peak `lr`.
    pub fn lr_at(&self, step: u64, total: u64, lr: f64) -> f64 {
        if step < self.warmup_steps {
            return lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let min = lr * self.min_lr_ratio;
        let after = (step - self.warmup_steps) as f64;
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        match self.kind.as_str() {
            "cosine" => {
                let p = (after / span).min(1.0);
                min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
            "wsd" => {
                let decay = (total as f64 * self.decay_fraction).max(1.0);
                let start = total as f64 - decay;
                let s = step as f64;
                if s < start {
                    lr
                } else {
                    lr - (lr - min) * ((s - start) / decay).min(1.0)
                }
            }
            _ => lr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_values() {
        let c = Schedule {
            kind: "cosine".into(),
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            decay_fraction: 0.2,
        };
        assert!((c.lr_at(0, 110, 1.0) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9, 110, 1.0) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10, 110, 1.0) - 1.0).abs() < 1e-12);
        assert!(
            (c.lr_at(60, 110, 1.0) - 0.55).abs() < 1e-12,
            "half-way: min + (1-min)/2"
        );
        assert!((c.lr_at(110, 110, 1.0) - 0.1).abs() < 1e-12);
        let w = Schedule {
            kind: "wsd".into(),
            warmup_steps: 10,
            min_lr_ratio: 0.0,
            decay_fraction: 0.2,
        };
        assert_eq!(w.lr_at(50, 100, 2.0), 2.0);
        assert_eq!(w.lr_at(79, 100, 2.0), 2.0);
        assert!((w.lr_at(90, 100, 2.0) - 1.0).abs() < 1e-12);
        assert!(w.lr_at(99, 100, 2.0) < 0.11);
        let k = Schedule {
            kind: "constant".into(),
            warmup_steps: 0,
            ..Default::default()
        };
        assert_eq!(k.lr_at(5, 10, 0.3), 0.3);
        assert!(Schedule {
            kind: "linear".into(),
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
