//! The CPU emulator as a [`Device`]: the kernel sources, `emu/cuda_emu.h` and a launch table
//! are compiled by the host C++ compiler (`$CXX`, else `g++`) into a shared library, cached in
//! the temp dir by content hash, and loaded with dlopen. Device pointers are host pointers.
//! It exists so that tests run every kernel on machines without a GPU (see cuda_emu.h for what
//! it does and does not model).

use super::ops::{COMMON, SOURCES};
use super::runtime::{Arg, Counted, DBuf, Device, Graph, Launch, MemCounter};
use anyhow::{anyhow, bail, Context, Result};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const HEADER: &str = include_str!("emu/cuda_emu.h");

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const c_uint,
    *const c_uint,
    c_uint,
    *const *const c_void,
    *const c_int,
    c_int,
) -> c_int;
type ErrorFn = unsafe extern "C" fn() -> *const c_char;

pub struct Emu {
    launch: LaunchFn,
    error: ErrorFn,
    lib: PathBuf,
    /// While capturing a graph: the launches recorded so far (nothing runs).
    recording: Mutex<Option<Vec<Recorded>>>,
    mem: std::sync::Arc<MemCounter>,
}

/// One launch of a captured graph, as given.
struct Recorded {
    kernel: String,
    cfg: Launch,
    args: Vec<Arg>,
}

// The emulator's state is global in the library: one launch at a time, process-wide.
static LAUNCH: Mutex<()> = Mutex::new(());

/// The translation unit: emulator, common helpers, every source, and a table from kernel name
/// to a launcher that checks the argument count and widths against the kernel's signature.
fn program() -> String {
    let mut s = String::from(HEADER);
    s.push_str(COMMON);
    for src in SOURCES {
        let (name, text) = (src.name, src.text);
        s.push_str(&format!("\n// ---- {name}.cu\n#line 1 \"{name}.cu\"\n{text}\n"));
    }
    s.push_str(
        r#"
namespace emu {
template <class... A>
bool check(const char* name, void (*)(A...), int n, const int* sizes) {
    const int want[] = {(int)sizeof(A)..., 0};
    if (n != (int)sizeof...(A)) {
        error = std::string(name) + ": " + std::to_string(n) + " arguments for " + std::to_string(sizeof...(A)) + " parameters";
        return false;
    }
    for (int i = 0; i < n; ++i)
        if (want[i] != sizes[i]) {
            error = std::string(name) + ": argument " + std::to_string(i) + " has " + std::to_string(sizes[i]) +
                    " bytes, the parameter " + std::to_string(want[i]);
            return false;
        }
    return true;
}
}  // namespace emu
extern "C" const char* emu_error() { return emu::error.c_str(); }
extern "C" int emu_launch(const char* name, const unsigned* g, const unsigned* b, unsigned smem, void** args,
                          const int* sizes, int n) {
    emu::args = args;
    dim3 grid{g[0], g[1], g[2]}, block{b[0], b[1], b[2]};
"#,
    );
    for src in SOURCES {
        for e in src.entries {
            s.push_str(&format!(
                "    if (!std::strcmp(name, \"{e}\")) return emu::check(name, {e}, n, sizes) && emu::launch(emu::trampoline<{e}>, grid, block, smem) ? 0 : 1;\n"
            ));
        }
    }
    s.push_str("    emu::error = std::string(\"no kernel \") + name;\n    return 1;\n}\n");
    s
}

fn build(dir: &Path, src: &str) -> Result<PathBuf> {
    // one build per process (temp names carry the pid); other processes race only on the rename
    static BUILD: Mutex<()> = Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let lib = dir.join("kernels.so");
    if lib.exists() {
        return Ok(lib);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cpp = dir.join(format!("emu-{}.cpp", std::process::id()));
    std::fs::write(&cpp, src).with_context(|| format!("writing {}", cpp.display()))?;
    let tmp = dir.join(format!("kernels-{}.so", std::process::id()));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let out = std::process::Command::new(&cxx)
        // no fortified longjmp: it refuses the jumps between fiber stacks; no strict aliasing:
        // kernels move bf16 data as 16-byte structs and read it back as bf16, as CUDA code does
        .args([
            "-std=c++20",
            "-O2",
            "-U_FORTIFY_SOURCE",
            "-fno-strict-aliasing",
            "-shared",
            "-fPIC",
            "-w",
            "-o",
        ])
        .arg(&tmp)
        .arg(&cpp)
        .output()
        .with_context(|| format!("running the C++ compiler `{cxx}` (set CXX to another)"))?;
    if !out.status.success() {
        bail!(
            "{cxx} could not build the CUDA emulator from {}:\n{}",
            cpp.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_file(&cpp);
    // atomic: a concurrent build by another process renames the same content
    std::fs::rename(&tmp, &lib).with_context(|| format!("installing {}", lib.display()))?;
    Ok(lib)
}

impl Emu {
    /// Builds (or reuses) the emulator library and loads it.
    pub fn open() -> Result<Emu> {
        let src = program();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        src.hash(&mut h);
        let dir = std::env::temp_dir().join(format!("gated-lm-cuda-emu-{:016x}", h.finish()));
        let lib = build(&dir, &src)?;
        let path = CString::new(lib.to_string_lossy().as_bytes())?;
        // SAFETY: loading a library we just built; its symbols are looked up by their C names
        // and typed as emitted by `program`
        unsafe {
            let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if h.is_null() {
                let e = CStr::from_ptr(libc::dlerror()).to_string_lossy().into_owned();
                bail!("loading {}: {e}", lib.display());
            }
            let sym = |n: &CStr| {
                let p = libc::dlsym(h, n.as_ptr());
                if p.is_null() {
                    Err(anyhow!("{}: no symbol {n:?}", lib.display()))
                } else {
                    Ok(p)
                }
            };
            let launch: LaunchFn = std::mem::transmute(sym(c"emu_launch")?);
            let error: ErrorFn = std::mem::transmute(sym(c"emu_error")?);
            Ok(Emu {
                launch,
                error,
                lib,
                recording: Mutex::new(None),
                mem: Default::default(),
            })
        }
    }
}

impl Device for Emu {
    fn describe(&self) -> String {
        format!("CPU emulator ({})", self.lib.display())
    }

    fn upload(&self, bytes: &[u8]) -> Result<DBuf> {
        self.not_capturing("upload")?;
        let b = self.zeros(bytes.len())?;
        // SAFETY: the buffer has at least bytes.len() bytes
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), b.ptr as *mut u8, bytes.len()) };
        Ok(b)
    }

    fn zeros(&self, bytes: usize) -> Result<DBuf> {
        self.not_capturing("zeros")?;
        // u128: 16-byte aligned like cudaMalloc's (at least) 256
        let v = vec![0u128; bytes.div_ceil(16).max(1)];
        Ok(DBuf {
            ptr: v.as_ptr() as u64,
            bytes,
            _keep: Box::new(Counted::new(v, bytes, &self.mem)),
        })
    }

    fn download(&self, buf: &DBuf) -> Result<Vec<u8>> {
        self.not_capturing("download")?;
        // SAFETY: buf owns `bytes` bytes at ptr
        Ok(unsafe { std::slice::from_raw_parts(buf.ptr as *const u8, buf.bytes) }.to_vec())
    }

    fn write(&self, buf: &mut DBuf, bytes: &[u8]) -> Result<()> {
        self.not_capturing("write")?;
        if bytes.len() > buf.bytes {
            bail!("writing {} bytes into a buffer of {}", bytes.len(), buf.bytes);
        }
        // SAFETY: checked to fit
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.ptr as *mut u8, bytes.len()) };
        Ok(())
    }

    fn launch(&self, kernel: &str, cfg: Launch, args: &[Arg]) -> Result<()> {
        if let Some(rec) = self.recording().as_mut() {
            let (kernel, args) = (kernel.to_string(), args.to_vec());
            rec.push(Recorded { kernel, cfg, args });
            return Ok(());
        }
        self.run(kernel, cfg, args)
    }

    fn capture(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<Option<Graph>> {
        if self.recording().replace(Vec::new()).is_some() {
            bail!("a graph capture inside another");
        }
        let done = body();
        let launches = self.recording().take().unwrap_or_default();
        done?;
        Ok(Some(Graph {
            launches: launches.len(),
            _keep: Box::new(launches),
        }))
    }

    fn memory(&self) -> Option<(usize, usize)> {
        Some(self.mem.get())
    }

    fn replay(&self, graph: &Graph) -> Result<()> {
        self.not_capturing("replay")?;
        let launches = graph
            ._keep
            .downcast_ref::<Vec<Recorded>>()
            .context("replaying a graph the emulator did not capture")?;
        launches.iter().try_for_each(|l| self.run(&l.kernel, l.cfg, &l.args))
    }
}

impl Emu {
    fn recording(&self) -> std::sync::MutexGuard<'_, Option<Vec<Recorded>>> {
        self.recording.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies, allocations and downloads cannot be part of a graph: refused while capturing,
    /// as a CUDA stream capture would.
    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.recording().is_some() {
            bail!("{what} on the emulator while capturing a graph: a captured step may only launch kernels");
        }
        Ok(())
    }

    fn run(&self, kernel: &str, cfg: Launch, args: &[Arg]) -> Result<()> {
        let vals: Vec<[u8; 8]> = args
            .iter()
            .map(|a| {
                let mut v = [0u8; 8];
                match *a {
                    Arg::Ptr(p) => v.copy_from_slice(&p.to_ne_bytes()),
                    Arg::I64(x) => v.copy_from_slice(&x.to_ne_bytes()),
                    Arg::I32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                    Arg::F32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                }
                v
            })
            .collect();
        let ptrs: Vec<*const c_void> = vals.iter().map(|v| v.as_ptr() as *const c_void).collect();
        let sizes: Vec<c_int> = args.iter().map(|a| a.size() as c_int).collect();
        let name = CString::new(kernel)?;
        let _one = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());

        // SAFETY: arrays outlive the call; the library checks count and widths of the arguments
        let rc = unsafe {
            (self.launch)(
                name.as_ptr(),
                cfg.grid.as_ptr(),
                cfg.block.as_ptr(),
                cfg.smem,
                ptrs.as_ptr(),
                sizes.as_ptr(),
                args.len() as c_int,
            )
        };
        if rc != 0 {
            // SAFETY: the library returns a NUL-terminated string it owns
            let e = unsafe { CStr::from_ptr((self.error)()) }.to_string_lossy().into_owned();
            bail!("{kernel} (emulated): {e}");
        }
        Ok(())
    }
}
