//! Ops: each a forward/backward pair with its tests beside it.
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod gate;
pub mod gelu;
pub mod linear;
pub mod rmsnorm;
pub mod rope;
pub mod router;
pub mod softcap;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod testutil {
    use crate::rng::Rng;

    pub fn randn(n: usize, seed: u64, std: f64) -> Vec<f64> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal() * std).collect()
    }

    /// Central differences on a sample of coordinates (at most 40, spread over the tensor).
    pub fn check_grad(x: &[f64], grad: &[f64], f: impl Fn(&[f64]) -> f64, tol: f64) {
        assert_eq!(x.len(), grad.len());
        let h = 1e-6;
        let step = (x.len() / 40).max(1);
        let mut xp = x.to_vec();
        for i in (0..x.len()).step_by(step) {
            let orig = xp[i];
            xp[i] = orig + h;
            let fp = f(&xp);
            xp[i] = orig - h;
            let fm = f(&xp);
            xp[i] = orig;
            let num = (fp - fm) / (2.0 * h);
            let err = (num - grad[i]).abs() / (1.0f64).max(num.abs());
            assert!(err < tol, "coord {i}: numeric {num} vs analytic {}", grad[i]);
        }
    }
}
