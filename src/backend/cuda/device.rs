//! A CUDA device with the kernels loaded, and host-in/host-out wrappers of each kernel: the
//! GPU-vs-CPU op tests use these (the model's device-resident path builds on the same launches).

use super::{compile_all, SOURCES};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

pub struct Gpu {
    pub name: String,
    pub arch: &'static str,
    stream: Arc<CudaStream>,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
}

const THREADS: u32 = 256;

fn elems(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 65535) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows(r: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (r as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Gpu {
    /// Device `ordinal`, kernels compiled for its architecture. Errors say what is missing: the
    /// driver library, a device, or NVRTC.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only tries to dlopen the candidate library names
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("the CUDA driver (libcuda.so) was not found: no NVIDIA driver on this machine");
        }
        let count = CudaContext::device_count().map_err(|e| anyhow!("CUDA driver: {e:?}"))?;
        if ordinal as i32 >= count {
            bail!("no CUDA device {ordinal} ({count} found)");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cannot open CUDA device {ordinal}: {e:?}"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))?;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let mut modules = Vec::new();
        for (src, ptx) in compile_all(arch)? {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| anyhow!("loading kernels/{src}.cu on {name}: {e:?}"))?;
            modules.push((src, m));
        }
        Ok(Gpu {
            name,
            arch,
            stream: ctx.default_stream(),
            modules,
        })
    }

    fn func(&self, entry: &str) -> Result<CudaFunction> {
        let src = SOURCES
            .iter()
            .find(|(_, _, e)| e.contains(&entry))
            .map(|(s, _, _)| *s)
            .with_context(|| format!("no kernel {entry}"))?;
        let m = &self
            .modules
            .iter()
            .find(|(s, _)| *s == src)
            .expect("every source is loaded")
            .1;
        m.load_function(entry).map_err(|e| anyhow!("kernel {entry}: {e:?}"))
    }

    fn up(&self, x: &[f32]) -> Result<cudarc::driver::CudaSlice<f32>> {
        self.stream
            .clone_htod(x)
            .map_err(|e| anyhow!("host→device copy: {e:?}"))
    }

    fn down(&self, x: &cudarc::driver::CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream
            .clone_dtoh(x)
            .map_err(|e| anyhow!("device→host copy: {e:?}"))
    }

    /// `m = silu(g) ⊙ u`
    pub fn swiglu_fwd(&self, g: &[f32], u: &[f32]) -> Result<Vec<f32>> {
        let n = g.len();
        let (dg, du, mut dm) = (self.up(g)?, self.up(u)?, self.up(&vec![0.0; n])?);
        let f = self.func("swiglu_fwd")?;
        let mut b = self.stream.launch_builder(&f);
        let nn = n as i64;
        b.arg(&dg).arg(&du).arg(&mut dm).arg(&nn);
        // SAFETY: argument types and lengths match the kernel's signature
        unsafe { b.launch(elems(n)) }.map_err(|e| anyhow!("swiglu_fwd: {e:?}"))?;
        self.down(&dm)
    }

    /// `(dg, du)` of `swiglu_fwd`
    pub fn swiglu_bwd(&self, g: &[f32], u: &[f32], dm: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = g.len();
        let (a, b_, c) = (self.up(g)?, self.up(u)?, self.up(dm)?);
        let (mut dg, mut du) = (self.up(&vec![0.0; n])?, self.up(&vec![0.0; n])?);
        let f = self.func("swiglu_bwd")?;
        let mut b = self.stream.launch_builder(&f);
        let nn = n as i64;
        b.arg(&a).arg(&b_).arg(&c).arg(&mut dg).arg(&mut du).arg(&nn);
        // SAFETY: as above
        unsafe { b.launch(elems(n)) }.map_err(|e| anyhow!("swiglu_bwd: {e:?}"))?;
        Ok((self.down(&dg)?, self.down(&du)?))
    }

    /// RMSNorm of `rows` rows of width `d`: `(y, rstd)`.
    pub fn rmsnorm_fwd(
        &self,
        x: &[f32],
        w: &[f32],
        d: usize,
        eps: f32,
        zero_centered: bool,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let r = x.len() / d;
        let (dx, dw) = (self.up(x)?, self.up(w)?);
        let (mut y, mut rstd) = (self.up(&vec![0.0; x.len()])?, self.up(&vec![0.0; r])?);
        let f = self.func("rmsnorm_fwd")?;
        let mut b = self.stream.launch_builder(&f);
        let (di, zc) = (d as i32, zero_centered as i32);
        b.arg(&dx)
            .arg(&dw)
            .arg(&mut y)
            .arg(&mut rstd)
            .arg(&di)
            .arg(&eps)
            .arg(&zc);
        // SAFETY: as above
        unsafe { b.launch(rows(r)) }.map_err(|e| anyhow!("rmsnorm_fwd: {e:?}"))?;
        Ok((self.down(&y)?, self.down(&rstd)?))
    }

    /// G1 elementwise sigmoid gate: `y · sigmoid(z)`.
    pub fn gate_fwd(&self, y: &[f32], z: &[f32]) -> Result<Vec<f32>> {
        let n = y.len();
        let (mut dy, dz) = (self.up(y)?, self.up(z)?);
        let f = self.func("gate_sigmoid_mul_fwd")?;
        let mut b = self.stream.launch_builder(&f);
        let nn = n as i64;
        b.arg(&mut dy).arg(&dz).arg(&nn);
        // SAFETY: as above
        unsafe { b.launch(elems(n)) }.map_err(|e| anyhow!("gate fwd: {e:?}"))?;
        self.down(&dy)
    }

    /// Its backward: `(d(ungated), dz)` from the ungated input `o`, `z` and `dy`.
    pub fn gate_bwd(&self, o: &[f32], z: &[f32], dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = o.len();
        let (a, c, mut g) = (self.up(o)?, self.up(z)?, self.up(dy)?);
        let mut dz = self.up(&vec![0.0; n])?;
        let f = self.func("gate_sigmoid_mul_bwd")?;
        let mut b = self.stream.launch_builder(&f);
        let nn = n as i64;
        b.arg(&a).arg(&c).arg(&mut g).arg(&mut dz).arg(&nn);
        // SAFETY: as above
        unsafe { b.launch(elems(n)) }.map_err(|e| anyhow!("gate bwd: {e:?}"))?;
        Ok((self.down(&g)?, self.down(&dz)?))
    }

    /// Cross-entropy rows: per-row losses and the logits' gradient times `scale` (targets < 0:
    /// ignored rows).
    pub fn cross_entropy(
        &self,
        logits: &[f32],
        targets: &[i32],
        vocab: usize,
        scale: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let r = targets.len();
        let (mut l, t) = (
            self.up(logits)?,
            self.stream.clone_htod(targets).map_err(|e| anyhow!("{e:?}"))?,
        );
        let mut loss = self.up(&vec![0.0; r])?;
        let f = self.func("cross_entropy_fwd_bwd")?;
        let mut b = self.stream.launch_builder(&f);
        let v = vocab as i32;
        b.arg(&mut l).arg(&t).arg(&mut loss).arg(&v).arg(&scale);
        // SAFETY: as above
        unsafe { b.launch(rows(r)) }.map_err(|e| anyhow!("cross_entropy: {e:?}"))?;
        Ok((self.down(&loss)?, self.down(&l)?))
    }
}
