//! A CUDA device with the kernels loaded, as a [`Device`]: buffers are cudarc allocations
//! addressed by raw device pointers, launches go by kernel name on one stream.

use super::blas::{Blas, ColMajor};
use super::compile_all;
use super::ops::SOURCES;
use super::runtime::{Arg, Counted, DBuf, Device, Graph, KernelResources, Launch, MemCounter, Strided};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct Gpu {
    pub name: String,
    pub arch: &'static str,
    stream: Arc<CudaStream>,
    /// Every kernel, looked up once at open (a driver call per launch otherwise), so a kernel
    /// missing from its module fails `open`, not a run.
    functions: HashMap<&'static str, CudaFunction>,
    /// cuBLASLt when its library is present and `use_blas` is on; otherwise the portable GEMM
    /// kernel.
    blas: Option<Blas>,
    pub use_blas: bool,
    /// While capturing a graph: the launches and GEMMs recorded so far.
    capturing: Cell<Option<usize>>,
    mem: Arc<MemCounter>,
    /// The dynamic shared memory each kernel was opted in to past the 48 KB default (set once
    /// per size, at the eager first step, so never inside a capture).
    smem_opt_in: RefCell<HashMap<String, u32>>,
}

/// GPU buffers: a cudarc allocation, mutably borrowed only by writes and cuBLASLt outputs,
/// counted in its device's memory in use.
type Slice = Counted<RefCell<CudaSlice<u8>>>;

/// The stream every `Gpu` on device `ordinal` works on, one per device and process: kernels,
/// cuBLASLt, copies and NCCL (which joins it through this, without compiling the kernels a
/// second time) all run in its order. Not the legacy default stream, which cannot be captured
/// into a CUDA graph. With all work on one stream, cudarc's cross-stream events are not needed
/// (and an event recorded inside a capture would break it): tracking is off. Errors say what is
/// missing: the driver library or the device.
pub fn device_stream(ordinal: usize) -> Result<Arc<CudaStream>> {
    static STREAMS: Mutex<Vec<(usize, Arc<CudaStream>)>> = Mutex::new(Vec::new());
    let mut streams = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, s)) = streams.iter().find(|(o, _)| *o == ordinal) {
        return Ok(s.clone());
    }
    // SAFETY: only tries to dlopen the candidate library names
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("the CUDA driver (libcuda.so) was not found: no NVIDIA driver on this machine");
    }
    let count = CudaContext::device_count().map_err(|e| anyhow!("CUDA driver: {e:?}"))?;
    if ordinal as i32 >= count {
        bail!("no CUDA device {ordinal} ({count} found)");
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cannot open CUDA device {ordinal}: {e:?}"))?;
    // SAFETY: every use of every buffer is ordered by the one stream below
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx
        .new_stream()
        .map_err(|e| anyhow!("creating a stream on CUDA device {ordinal}: {e:?}"))?;
    streams.push((ordinal, stream.clone()));
    Ok(stream)
}

impl Gpu {
    /// Device `ordinal`, kernels compiled for its architecture. Errors say what is missing: the
    /// driver library, a device, or NVRTC.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        let stream = device_stream(ordinal)?;
        let ctx = stream.context().clone();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))?;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let mut functions = HashMap::new();
        for ((src, ptx), source) in compile_all(arch)?.into_iter().zip(SOURCES) {
            let m: Arc<CudaModule> = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| anyhow!("loading {src}.cu on {name}: {e:?}"))?;
            for &entry in source.entries {
                let f = m
                    .load_function(entry)
                    .map_err(|e| anyhow!("kernel {entry} in {src}.cu on {name}: {e:?}"))?;
                functions.insert(entry, f);
            }
        }
        // allocations are stream-ordered; a new step shape frees one arena and allocates
        // another: keep freed memory in the pool instead of returning it to the driver at each
        // synchronisation (as torch's caching allocator does). Without async allocation
        // support this is moot.
        // SAFETY: the device is valid; the attribute takes a u64
        unsafe {
            use cudarc::driver::{result, sys};
            if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
                let mut keep = u64::MAX;
                let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
                let _ = result::mem_pool::set_attribute(pool, attr, &mut keep as *mut u64 as *mut _);
            }
        }
        // SAFETY: only tries to dlopen the candidate library names
        let blas = if unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            Some(Blas::new(stream.clone()).with_context(|| format!("on {name}"))?)
        } else {
            None
        };
        Ok(Gpu {
            name,
            arch,
            stream,
            functions,
            smem_opt_in: RefCell::new(HashMap::new()),
            use_blas: blas.is_some(),
            blas,
            capturing: Cell::new(None),
            mem: Default::default(),
        })
    }

    /// Copies, allocations and downloads cannot be part of a graph: refused while capturing
    /// (CUDA would invalidate the capture with a less telling error).
    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capturing.get().is_some() {
            bail!(
                "{what} on {} while capturing a graph: a captured step may only launch kernels",
                self.name
            );
        }
        Ok(())
    }

    /// Count a launch or GEMM into the graph being captured.
    fn recorded(&self) {
        if let Some(n) = self.capturing.get() {
            self.capturing.set(Some(n + 1));
        }
    }

    fn func(&self, entry: &str) -> Result<&CudaFunction> {
        self.functions.get(entry).with_context(|| format!("no kernel {entry}"))
    }

    /// Opts `kernel` in to `smem` bytes of dynamic shared memory where that is past the 48 KB
    /// default (up to 99 KB on sm_86/89, 163 KB on sm_80, 227 KB on sm_90): once per size, so at
    /// a step's eager first run and never inside a graph capture.
    fn opt_in_smem(&self, kernel: &str, f: &CudaFunction, smem: u32) -> Result<()> {
        if smem <= 48 << 10 {
            return Ok(()); // every launch but the hd128 attention's: no map lookup
        }
        let opted = self.smem_opt_in.borrow().get(kernel).copied().unwrap_or(48 << 10);
        if smem > opted {
            let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            f.set_attribute(attr, smem as i32).map_err(|e| {
                anyhow!(
                    "{kernel} on {}: {smem} bytes of dynamic shared memory refused ({e:?}): past this GPU's limit per block",
                    self.name
                )
            })?;
            self.smem_opt_in.borrow_mut().insert(kernel.to_string(), smem);
        }
        Ok(())
    }
}

impl Device for Gpu {
    fn describe(&self) -> String {
        let gemm = match (&self.blas, self.use_blas) {
            (Some(_), true) => "cuBLASLt GEMMs",
            (Some(_), false) => "portable GEMM kernel",
            (None, _) => "portable GEMM kernel: libcublasLt not found",
        };
        format!("{} ({}, {gemm})", self.name, self.arch)
    }

    fn upload(&self, bytes: &[u8]) -> Result<DBuf> {
        self.not_capturing("upload")?;
        let s = self
            .stream
            .clone_htod(bytes)
            .map_err(|e| anyhow!("host→device copy of {} bytes: {e:?}", bytes.len()))?;
        Ok(self.wrap(s, bytes.len()))
    }

    fn zeros(&self, bytes: usize) -> Result<DBuf> {
        self.not_capturing("zeros")?;
        let s = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| anyhow!("allocating {bytes} bytes on {}: {e:?}", self.name))?;
        Ok(self.wrap(s, bytes))
    }

    fn download(&self, buf: &DBuf) -> Result<Vec<u8>> {
        self.not_capturing("download")?;
        let s = slice(buf)?.inner.borrow();
        let mut v = self
            .stream
            .clone_dtoh(&*s)
            .map_err(|e| anyhow!("device→host copy: {e:?}"))?;
        v.truncate(buf.bytes);
        Ok(v)
    }

    fn write(&self, buf: &mut DBuf, bytes: &[u8]) -> Result<()> {
        self.not_capturing("write")?;
        if bytes.len() > buf.bytes {
            bail!("writing {} bytes into a buffer of {}", bytes.len(), buf.bytes);
        }
        let mut s = slice(buf)?.inner.borrow_mut();
        let mut view = s.slice_mut(..bytes.len());
        self.stream
            .memcpy_htod(bytes, &mut view)
            .map_err(|e| anyhow!("host→device copy: {e:?}"))
    }

    #[allow(clippy::too_many_arguments)]
    fn vendor_gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Strided,
        b: Strided,
        c: Strided,
        c_in: Option<&DBuf>,
        alpha: f32,
        beta: f32,
    ) -> Option<Result<()>> {
        let blas = self.blas.as_ref().filter(|_| self.use_blas)?;
        // C row-major: its row stride is cuBLAS's ldc
        let ldc = match c.cs {
            1 => c.rs,
            _ => return None,
        };
        // Row-major C (m×n) is column-major Cᵀ (n×m, ld = ldc) = Bᵀ·Aᵀ: B is cuBLAS's first
        // operand and A its second; each must have one unit stride.
        let (transa, lda) = match (b.cs, b.rs) {
            (1, ld) => (false, ld),
            (ld, 1) => (true, ld),
            _ => return None,
        };
        let (transb, ldb) = match (a.cs, a.rs) {
            (1, ld) => (false, ld),
            (ld, 1) => (true, ld),
            _ => return None,
        };
        let g = ColMajor {
            dtype: a.dtype,
            c_dtype: c.dtype,
            transa,
            transb,
            m: n,
            n: m,
            k,
            a: b.buf.ptr,
            lda,
            b: a.buf.ptr,
            ldb,
            c: c.buf.ptr,
            c_in: c_in.map_or(c.buf.ptr, |b| b.ptr),
            ldc,
            alpha,
            beta,
        };
        self.recorded();
        // SAFETY: ops::gemm checked that the strided spans fit in their buffers
        Some(unsafe { blas.matmul(&g) }.with_context(|| format!("GEMM {m}×{n}×{k} on {}", self.name)))
    }

    fn launch(&self, kernel: &str, cfg: Launch, args: &[Arg]) -> Result<()> {
        let f = self.func(kernel)?;
        self.opt_in_smem(kernel, f, cfg.smem)?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(x) => b.arg(x),
                Arg::I64(x) => b.arg(x),
                Arg::F32(x) => b.arg(x),
            };
        }
        let lc = LaunchConfig {
            grid_dim: (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
            block_dim: (cfg.block[0], cfg.block[1], cfg.block[2]),
            shared_mem_bytes: cfg.smem,
        };
        // SAFETY: the ops in `ops` pass arguments matching each kernel's signature; the emulator
        // checks the same calls' counts and widths in CI
        unsafe { b.launch(lc) }.map_err(|e| anyhow!("{kernel} on {}: {e:?}", self.name))?;
        self.recorded();
        Ok(())
    }

    fn capture(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<Option<Graph>> {
        if self.capturing.get().is_some() {
            bail!("a graph capture inside another on {}", self.name);
        }
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        let begun = self.stream.begin_capture(mode);
        begun.map_err(|e| anyhow!("starting a graph capture on {}: {e:?}", self.name))?;
        self.capturing.set(Some(0));
        let done = body();
        let launches = self.capturing.take().unwrap_or(0);
        // the capture ends whatever the body did, or the stream stays in capture mode
        let graph = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        done?;
        let graph: CudaGraph = graph
            .map_err(|e| anyhow!("ending a graph capture on {}: {e:?}", self.name))?
            .with_context(|| format!("an empty graph captured on {}", self.name))?;
        graph
            .upload()
            .map_err(|e| anyhow!("uploading a graph to {}: {e:?}", self.name))?;
        Ok(Some(Graph {
            launches,
            _keep: Box::new(graph),
        }))
    }

    fn memory(&self) -> Option<(usize, usize)> {
        Some(self.mem.get())
    }

    fn kernel_resources(&self, kernel: &str, cfg: Launch) -> Result<Option<KernelResources>> {
        use sys::CUfunction_attribute as A;
        let f = self.func(kernel)?;
        self.opt_in_smem(kernel, f, cfg.smem)?;
        let err = |e| anyhow!("attributes of {kernel} on {}: {e:?}", self.name);
        let get = |a| f.get_attribute(a).map(|v| v as u32).map_err(err);
        let threads = cfg.block.iter().product();
        let blocks = f.occupancy_max_active_blocks_per_multiprocessor(threads, cfg.smem as usize, None);
        Ok(Some(KernelResources {
            registers: get(A::CU_FUNC_ATTRIBUTE_NUM_REGS)?,
            local_bytes: get(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?,
            static_smem: get(A::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?,
            blocks_per_sm: blocks.map_err(err)?,
        }))
    }

    fn replay(&self, graph: &Graph) -> Result<()> {
        self.not_capturing("replay")?;
        let g = graph
            ._keep
            .downcast_ref::<CudaGraph>()
            .with_context(|| format!("replaying a graph not captured on {}", self.name))?;
        g.launch()
            .map_err(|e| anyhow!("replaying a graph on {}: {e:?}", self.name))
    }
}

fn slice(buf: &DBuf) -> Result<&Slice> {
    buf._keep.downcast_ref::<Slice>().context("not a buffer of this GPU")
}

impl Gpu {
    fn wrap(&self, s: CudaSlice<u8>, bytes: usize) -> DBuf {
        let ptr = {
            let (p, _sync) = s.device_ptr(&self.stream);
            p
        };
        DBuf {
            ptr,
            bytes,
            _keep: Box::new(Counted::new(RefCell::new(s), bytes, &self.mem)),
        }
    }
}
