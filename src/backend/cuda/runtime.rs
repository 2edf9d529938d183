//! What the CUDA ops need from a device, so the same host code drives a real GPU
//! ([`super::device::Gpu`]) and the CPU emulator ([`super::emu::Emu`]) that lets CI run every
//! kernel without one: buffers addressed by raw device pointers, and launches by kernel name
//! with cuLaunchKernel-style arguments.

use anyhow::{bail, Result};
use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A kernel argument, passed by value as the kernel's parameter of the same width.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    pub fn size(&self) -> usize {
        match self {
            Arg::I32(_) | Arg::F32(_) => 4,
            Arg::Ptr(_) | Arg::I64(_) => 8,
        }
    }
}

/// Device memory: its address and size, and whatever keeps it alive.
pub struct DBuf {
    pub ptr: u64,
    pub bytes: usize,
    pub(crate) _keep: Box<dyn Any>,
}

impl DBuf {
    pub fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr)
    }

    /// `bytes` bytes of `arena` from `offset`: a buffer that keeps the arena alive, for memory
    /// allocated once and carved into many buffers.
    pub fn view(arena: &std::rc::Rc<DBuf>, offset: usize, bytes: usize) -> Result<DBuf> {
        if offset.checked_add(bytes).is_none_or(|end| end > arena.bytes) {
            bail!(
                "a view of {bytes} bytes at {offset} overruns an arena of {} bytes",
                arena.bytes
            );
        }
        Ok(DBuf {
            ptr: arena.ptr + offset as u64,
            bytes,
            _keep: Box::new(std::rc::Rc::clone(arena)),
        })
    }
}

/// Bytes of device memory a device's buffers hold, now and at most so far.
#[derive(Default)]
pub struct MemCounter {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl MemCounter {
    /// (in use, peak) bytes.
    pub fn get(&self) -> (usize, usize) {
        (self.live.load(Ordering::Relaxed), self.peak.load(Ordering::Relaxed))
    }
}

/// A device allocation (`inner`) whose `bytes` count in `counter` until it is dropped.
pub(crate) struct Counted<T> {
    pub inner: T,
    bytes: usize,
    counter: Arc<MemCounter>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, bytes: usize, counter: &Arc<MemCounter>) -> Self {
        let live = counter.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        counter.peak.fetch_max(live, Ordering::Relaxed);
        Counted {
            inner,
            bytes,
            counter: Arc::clone(counter),
        }
    }
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        self.counter.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A captured sequence of launches (a CUDA graph on a GPU), replayed as one by
/// [`Device::replay`]: the same kernels with the same arguments, reading whatever the buffers
/// hold at replay time.
pub struct Graph {
    /// Launches recorded (kernels and vendor GEMMs): what one replay runs.
    pub launches: usize,
    pub(crate) _keep: Box<dyn Any>,
}

/// Grid and block dimensions and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub smem: u32,
}

impl Launch {
    /// A 1-d grid of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: usize, threads: u32) -> Launch {
        Launch {
            grid: [blocks.max(1) as u32, 1, 1],
            block: [threads, 1, 1],
            smem: 0,
        }
    }
}

/// Element type of a GEMM operand or output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// A strided matrix operand: element (r, c) at `buf[r·rs + c·cs]`, of type `dtype`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub buf: &'a DBuf,
    pub dtype: DType,
    pub rs: usize,
    pub cs: usize,
}

/// What the GPU's compiler made of one kernel: the driver JIT-compiles our PTX when it loads a
/// module, so its registers and spills may differ from an offline ptxas's.
#[derive(Clone, Copy, Debug)]
pub struct KernelResources {
    pub registers: u32,
    /// Local memory per thread, bytes: register spills and stack (0 for a kernel that fits its
    /// registers).
    pub local_bytes: u32,
    pub static_smem: u32,
    /// Blocks resident per SM for a launch's block size and dynamic shared memory (occupancy).
    pub blocks_per_sm: u32,
}

pub trait Device {
    /// What this device is, for messages.
    fn describe(&self) -> String;
    fn upload(&self, bytes: &[u8]) -> Result<DBuf>;
    /// `bytes` zero bytes.
    fn zeros(&self, bytes: usize) -> Result<DBuf>;
    fn download(&self, buf: &DBuf) -> Result<Vec<u8>>;
    /// Overwrite the start of `buf` with `bytes`.
    fn write(&self, buf: &mut DBuf, bytes: &[u8]) -> Result<()>;
    /// Launch `kernel` on the device's stream (in order; errors of the asynchronous execution
    /// surface at the next download).
    fn launch(&self, kernel: &str, cfg: Launch, args: &[Arg]) -> Result<()>;
    /// `C = alpha·A·B + beta·C` (`C` f32, or bf16 from bf16 operands) through a vendor
    /// library, when the device has one and the layout suits it; `None` leaves it to the
    /// portable GEMM kernel. With `c_in` the `C` that beta scales is read from there (same
    /// layout and type) instead of from the output.
    #[allow(clippy::too_many_arguments)]
    fn vendor_gemm(
        &self,
        _mnk: (usize, usize, usize),
        _a: Strided,
        _b: Strided,
        _c: Strided,
        _c_in: Option<&DBuf>,
        _alpha: f32,
        _beta: f32,
    ) -> Option<Result<()>> {
        None
    }
    /// Record the launches `body` makes into a [`Graph`] instead of running them. Inside, only
    /// launches and vendor GEMMs are allowed (a copy, allocation or download fails, as it would
    /// break a CUDA stream capture), so the body's inputs must already be on the device.
    /// `Ok(None)`: this device does not capture, and `body` did not run.
    fn capture(&self, _body: &mut dyn FnMut() -> Result<()>) -> Result<Option<Graph>> {
        Ok(None)
    }
    /// Bytes held by the buffers this device allocated: (in use, peak), as torch's
    /// `memory_allocated` / `max_memory_allocated` count them (not the context or library
    /// workspaces). `None`: not counted.
    fn memory(&self) -> Option<(usize, usize)> {
        None
    }
    /// [`KernelResources`] of `kernel` launched with `cfg`'s block and dynamic shared memory.
    /// `None`: a device without a compiler's view (the emulator).
    fn kernel_resources(&self, _kernel: &str, _cfg: Launch) -> Result<Option<KernelResources>> {
        Ok(None)
    }
    /// Run the launches of a graph this device captured, in order, on its stream.
    fn replay(&self, _graph: &Graph) -> Result<()> {
        bail!("{} does not replay graphs", self.describe())
    }
}

pub fn up_f32(dev: &dyn Device, x: &[f32]) -> Result<DBuf> {
    dev.upload(&f32_bytes(x))
}

pub fn up_i32(dev: &dyn Device, x: &[i32]) -> Result<DBuf> {
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_ne_bytes()).collect();
    dev.upload(&bytes)
}

/// Overwrite `buf` with the f32 values `x`.
pub fn write_f32(dev: &dyn Device, buf: &mut DBuf, x: &[f32]) -> Result<()> {
    dev.write(buf, &f32_bytes(x))
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

pub fn zeros_f32(dev: &dyn Device, n: usize) -> Result<DBuf> {
    dev.zeros(n * 4)
}

pub fn down_f32(dev: &dyn Device, buf: &DBuf) -> Result<Vec<f32>> {
    let b = dev.download(buf)?;
    if b.len() % 4 != 0 {
        bail!("device buffer of {} bytes is not f32", b.len());
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

pub fn down_u16(dev: &dyn Device, buf: &DBuf) -> Result<Vec<u16>> {
    let b = dev.download(buf)?;
    Ok(b.chunks_exact(2).map(|c| u16::from_ne_bytes([c[0], c[1]])).collect())
}

pub fn up_u16(dev: &dyn Device, x: &[u16]) -> Result<DBuf> {
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_ne_bytes()).collect();
    dev.upload(&bytes)
}
