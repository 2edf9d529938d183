//! Wall-clock time per named section, for `gated-lm bench --profile`. Off by default: a disabled
//! scope costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());

pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn reset() {
    TABLE.lock().unwrap().clear();
}

/// Times until dropped. Sections must not nest within one thread (times would double-count).
pub struct Scope(Option<(&'static str, Instant)>);

pub fn scope(name: &'static str) -> Scope {
    Scope(ENABLED.load(Ordering::Relaxed).then(|| (name, Instant::now())))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((name, t0)) = self.0.take() {
            let dt = t0.elapsed().as_secs_f64();
            let mut t = TABLE.lock().unwrap();
            match t.iter_mut().find(|e| e.0 == name) {
                Some(e) => {
                    e.1 += dt;
                    e.2 += 1;
                }
                None => t.push((name, dt, 1)),
            }
        }
    }
}

/// Sections sorted by total time: (name, seconds, calls).
pub fn snapshot() -> Vec<(&'static str, f64, u64)> {
    let mut v = TABLE.lock().unwrap().clone();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
