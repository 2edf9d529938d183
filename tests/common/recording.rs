//! A device wrapper for the CUDA tests that records what a device model asks of its device:
//! kernel launches, vendor GEMMs, allocations, uploads and the sources of bf16 casts. It does not
//! capture graphs, so a device model on it launches every kernel of every step.

use gated_lm::backend::cuda::runtime::{Arg, DBuf, Device, Launch, Strided};
use std::cell::RefCell;

/// A device that passes everything to `dev` and records what it was asked.
pub struct Recording<'a> {
    pub dev: &'a dyn Device,
    pub launches: RefCell<Vec<String>>,
    /// GEMMs the wrapped device ran through its vendor library (cuBLASLt on a GPU)
    pub vendor_gemms: std::cell::Cell<usize>,
    /// device allocations (`zeros` and `upload` calls)
    pub allocs: std::cell::Cell<usize>,
    /// addresses of the uploaded buffers (a device model's parameters among them)
    pub uploads: RefCell<Vec<u64>>,
    /// the source address of every `cast_f32_bf16` launch
    pub cast_sources: RefCell<Vec<u64>>,
}

impl<'a> Recording<'a> {
    pub fn new(dev: &'a dyn Device) -> Self {
        Recording {
            dev,
            launches: RefCell::new(Vec::new()),
            vendor_gemms: std::cell::Cell::new(0),
            allocs: std::cell::Cell::new(0),
            uploads: RefCell::new(Vec::new()),
            cast_sources: RefCell::new(Vec::new()),
        }
    }
    /// Launches of `kernel` since the last call, and forget them all.
    pub fn take(&self, kernel: &str) -> usize {
        self.take_where(|k| k == kernel)
    }
    /// Launches whose kernel name `is` accepts since the last call, and forget them all.
    /// Launches of each of `kernels` since the last call, and forget them all.
    pub fn take_each<const N: usize>(&self, kernels: [&str; N]) -> [usize; N] {
        let l = self.launches.take();
        kernels.map(|k| l.iter().filter(|x| *x == k).count())
    }
    pub fn take_where(&self, is: impl Fn(&str) -> bool) -> usize {
        self.launches.take().iter().filter(|k| is(k)).count()
    }
}

impl Device for Recording<'_> {
    fn describe(&self) -> String {
        self.dev.describe()
    }
    fn upload(&self, bytes: &[u8]) -> anyhow::Result<DBuf> {
        self.allocs.set(self.allocs.get() + 1);
        let b = self.dev.upload(bytes)?;
        self.uploads.borrow_mut().push(b.ptr);
        Ok(b)
    }
    fn zeros(&self, bytes: usize) -> anyhow::Result<DBuf> {
        self.allocs.set(self.allocs.get() + 1);
        self.dev.zeros(bytes)
    }
    fn download(&self, buf: &DBuf) -> anyhow::Result<Vec<u8>> {
        self.dev.download(buf)
    }
    fn write(&self, buf: &mut DBuf, bytes: &[u8]) -> anyhow::Result<()> {
        self.dev.write(buf, bytes)
    }
    fn launch(&self, kernel: &str, cfg: Launch, args: &[Arg]) -> anyhow::Result<()> {
        self.launches.borrow_mut().push(kernel.to_string());
        if let ("cast_f32_bf16", Some(Arg::Ptr(src))) = (kernel, args.first()) {
            self.cast_sources.borrow_mut().push(*src);
        }
        self.dev.launch(kernel, cfg, args)
    }
    #[allow(clippy::too_many_arguments)]
    fn vendor_gemm(
        &self,
        mnk: (usize, usize, usize),
        a: Strided,
        b: Strided,
        c: Strided,
        c_in: Option<&DBuf>,
        alpha: f32,
        beta: f32,
    ) -> Option<anyhow::Result<()>> {
        let done = self.dev.vendor_gemm(mnk, a, b, c, c_in, alpha, beta);
        self.vendor_gemms.set(self.vendor_gemms.get() + done.is_some() as usize);
        done
    }
}
