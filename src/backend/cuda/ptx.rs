//! Kernel sources to PTX by NVRTC, once: the sources compile in parallel (two of them take ≈ 5 s
//! each and the rest ≈ 2 s together, so in turn they took ≈ 13 s on every `Gpu::open`), each
//! process compiles an architecture at most once, and the PTX is kept in the temp dir under a
//! hash of everything that determines it (NVRTC's version, the compile options, the text), so
//! the next process, a bench run or a test binary on the GPU machine, reads it instead.
//! On a GPU the driver caches its own PTX → SASS step the same way (its compute cache).

use super::ops::{KernelSource, COMMON, SOURCES};
use anyhow::{anyhow, Context, Result};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// How to get NVRTC when it is missing.
const NVRTC_HINT: &str = "NVRTC (libnvrtc.so) was not found: install the CUDA toolkit, or \
`pip install nvidia-cuda-nvrtc-cu12` and add its `nvidia/cuda_nvrtc/lib` directory to LD_LIBRARY_PATH";

/// (source name, PTX text) of every source, in [`SOURCES`] order.
pub type Ptx = Vec<(&'static str, String)>;

/// Compile every kernel source to PTX for `arch` (e.g. `sm_90` for an H100/H200), or reuse
/// this process's or an earlier process's compile of the same texts by the same NVRTC.
pub fn compile_all(arch: &'static str) -> Result<Ptx> {
    // cudarc panics on first use when the library is missing: check first, with a hint
    // SAFETY: only tries to dlopen the candidate library names
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(anyhow!("{NVRTC_HINT}"));
    }
    static DONE: OnceLock<Mutex<HashMap<&'static str, Ptx>>> = OnceLock::new();
    let done = DONE.get_or_init(Default::default);
    // held while compiling: a second caller for the same arch waits and reuses the result
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = done.get(arch) {
        return Ok(p.clone());
    }
    let dir = std::env::temp_dir().join("gated-lm-ptx");
    let version = nvrtc_version()?;
    let ptx = std::thread::scope(|s| {
        let jobs: Vec<_> = SOURCES
            .iter()
            .map(|src| {
                let dir = &dir;
                s.spawn(move || compile_cached(src, arch, version, dir))
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Ptx>>()
    })?;
    done.insert(arch, ptx.clone());
    Ok(ptx)
}

/// NVRTC's (major, minor) version; the library must be present.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked by the caller); two out-parameters
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(anyhow!("nvrtcVersion failed: {r:?}"));
    }
    Ok((major, minor))
}

/// The options NVRTC compiles source `name` with for `arch`.
fn options(name: &str, arch: &'static str) -> cudarc::nvrtc::CompileOptions {
    cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(format!("{name}.cu")),
        ..Default::default()
    }
}

/// Where the PTX of `text` compiled by NVRTC `version` for `arch` is kept: a name that changes
/// with any of them, with the compile options (they are hashed themselves) and with [`COMMON`],
/// prepended to every source.
pub fn cache_path(dir: &Path, name: &str, text: &str, arch: &'static str, version: (i32, i32)) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (COMMON, text, version, options(name, arch)).hash(&mut h);
    dir.join(format!("{name}-{arch}-{:016x}.ptx", h.finish()))
}

fn compile_cached(
    src: &KernelSource,
    arch: &'static str,
    version: (i32, i32),
    dir: &Path,
) -> Result<(&'static str, String)> {
    let KernelSource { name, text, .. } = *src;
    let path = cache_path(dir, name, text, arch, version);
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        return Ok((name, ptx));
    }
    let full = format!("{COMMON}\n#line 1 \"{name}.cu\"\n{text}");
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(full, options(name, arch))
        .map_err(|e| anyhow!("NVRTC could not compile {name}.cu for {arch}: {e:?}"))?
        .to_src();
    // best effort: a cache that cannot be written only costs the next process a compile
    let _ = store(&path, &ptx);
    Ok((name, ptx))
}

/// Atomically: a reader sees the whole file or none (another process may store the same one).
fn store(path: &Path, ptx: &str) -> Result<()> {
    let dir = path.parent().context("cache path without a directory")?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}",
        std::process::id(),
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, ptx)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
