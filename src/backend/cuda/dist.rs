//! Data parallelism: one process (or, for tests, one thread) per device, each running the
//! micro-batches of its rank; gradients are summed over ranks after the backward, so every
//! rank takes the same AdamW step and the weights stay identical without being exchanged.
//!
//! `Nccl` is the GPU implementation (NCCL all-reduce on the device buffers, one call per
//! tensor in a group); `HostAllReduce` sums through host memory across threads (the emulator's
//! ranks in tests, and a reference for NCCL). Launching: see README "Multi-GPU".

use super::runtime::{down_f32, write_f32, DBuf, Device};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};

pub trait GradAllReduce: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replace each f32 buffer (on `dev`, this rank's device) by its sum over all ranks. Every
    /// rank calls it with the same tensors in the same order.
    fn all_reduce_sum(&self, dev: &dyn Device, bufs: &mut [DBuf]) -> Result<()>;
}

/// The process's place in a data-parallel launch, from torchrun-style environment variables:
/// RANK, WORLD_SIZE, LOCAL_RANK (the device ordinal) and GATED_LM_NCCL_ID, a file path every
/// rank can read (rank 0 writes NCCL's unique id there).
#[derive(Clone, Debug, PartialEq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub id_file: PathBuf,
}

impl DistEnv {
    /// `None` outside a multi-process launch (WORLD_SIZE unset or 1).
    pub fn from_env() -> Result<Option<DistEnv>> {
        let var = |k: &str| std::env::var(k).ok();
        let num = |k: &str, v: String| -> Result<usize> {
            v.parse()
                .map_err(|_| anyhow!("environment variable {k}={v:?} is not a number"))
        };
        let world = match var("WORLD_SIZE") {
            None => return Ok(None),
            Some(w) => num("WORLD_SIZE", w)?,
        };
        if world <= 1 {
            return Ok(None);
        }
        let rank = num("RANK", var("RANK").context("WORLD_SIZE is set but RANK is not")?)?;
        let local_rank = match var("LOCAL_RANK") {
            Some(l) => num("LOCAL_RANK", l)?,
            None => rank,
        };
        if rank >= world {
            bail!("RANK {rank} is not below WORLD_SIZE {world}");
        }
        let id_file = var("GATED_LM_NCCL_ID")
            .context("a multi-process launch needs GATED_LM_NCCL_ID: a file path all ranks can read")?
            .into();
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank,
            id_file,
        }))
    }
}

/// Sums through host memory: ranks are threads of one process sharing this value.
pub struct HostAllReduce {
    world: usize,
    rank: usize,
    shared: Arc<(Mutex<Vec<Vec<f64>>>, Barrier)>,
}

impl HostAllReduce {
    /// One handle per rank of a `world`-thread group.
    pub fn group(world: usize) -> Vec<HostAllReduce> {
        let shared = Arc::new((Mutex::new(Vec::new()), Barrier::new(world)));
        (0..world)
            .map(|rank| HostAllReduce {
                world,
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl GradAllReduce for HostAllReduce {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, dev: &dyn Device, bufs: &mut [DBuf]) -> Result<()> {
        let (sums, barrier) = &*self.shared;
        let mine = bufs.iter().map(|b| down_f32(dev, b)).collect::<Result<Vec<_>>>()?;
        // ranks add in rank order (a deterministic sum), one at a time
        for r in 0..self.world {
            if r == self.rank {
                let mut s = sums.lock().unwrap_or_else(|e| e.into_inner());
                if s.is_empty() {
                    *s = mine.iter().map(|t| vec![0.0; t.len()]).collect();
                }
                for (acc, t) in s.iter_mut().zip(&mine) {
                    acc.iter_mut().zip(t).for_each(|(a, &x)| *a += x as f64);
                }
            }
            barrier.wait();
        }
        let total: Vec<Vec<f32>> = {
            let s = sums.lock().unwrap_or_else(|e| e.into_inner());
            s.iter().map(|t| t.iter().map(|&x| x as f32).collect()).collect()
        };
        for (b, t) in bufs.iter_mut().zip(&total) {
            write_f32(dev, b, t)?;
        }
        // everyone has read the sums before the next call may reset them
        if barrier.wait().is_leader() {
            sums.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        barrier.wait();
        Ok(())
    }
}

/// NCCL on this process's GPU.
pub struct Nccl {
    comm: cudarc::nccl::sys::ncclComm_t,
    stream: Arc<cudarc::driver::CudaStream>,
    rank: usize,
    world: usize,
}

// SAFETY: the communicator is used by one rank's calls at a time (the trainer is sequential)
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Join the group on GPU `env.local_rank` (the stream its `Gpu` works on): rank 0 creates
    /// the unique id and publishes it atomically at `id_file`; the others wait up to `wait` for it.
    pub fn init(env: &DistEnv, wait: std::time::Duration) -> Result<Nccl> {
        use cudarc::nccl::{result, sys};
        let stream = super::device::device_stream(env.local_rank)?;
        // SAFETY: only tries to dlopen the candidate library names
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "NCCL (libnccl.so) was not found: install it (e.g. `pip install nvidia-nccl-cu12`) for multi-GPU runs"
            );
        }
        let id = if env.rank == 0 {
            let id = result::get_uniqueid().map_err(|e| anyhow!("NCCL unique id: {e:?}"))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            crate::files::write_atomic(&env.id_file, &bytes)?;
            id
        } else {
            let t0 = std::time::Instant::now();
            let bytes = loop {
                match std::fs::read(&env.id_file) {
                    Ok(b) if b.len() == 128 => break b,
                    _ if t0.elapsed() > wait => bail!(
                        "rank {}: no NCCL id from rank 0 at {} after {:?}",
                        env.rank,
                        env.id_file.display(),
                        wait
                    ),
                    _ => std::thread::sleep(std::time::Duration::from_millis(100)),
                }
            };
            let mut internal = [0 as std::ffi::c_char; 128];
            internal
                .iter_mut()
                .zip(&bytes)
                .for_each(|(d, &b)| *d = b as std::ffi::c_char);
            sys::ncclUniqueId { internal }
        };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: comm_init_rank fills `comm` on success
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), env.world as i32, id, env.rank as i32)
                .map_err(|e| anyhow!("NCCL init of rank {} of {}: {e:?}", env.rank, env.world))?;
            comm.assume_init()
        };
        Ok(Nccl {
            comm,
            stream,
            rank: env.rank,
            world: env.world,
        })
    }
}

impl GradAllReduce for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, _dev: &dyn Device, bufs: &mut [DBuf]) -> Result<()> {
        use cudarc::nccl::{result, sys};
        result::group_start().map_err(|e| anyhow!("NCCL group: {e:?}"))?;
        for b in bufs.iter() {
            // SAFETY: in-place all-reduce over the buffer's own f32 elements on our stream
            unsafe {
                result::all_reduce(
                    b.ptr as *const std::ffi::c_void,
                    b.ptr as *mut std::ffi::c_void,
                    b.bytes / 4,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    self.stream.cu_stream() as _,
                )
            }
            .map_err(|e| anyhow!("NCCL all-reduce: {e:?}"))?;
        }
        result::group_end().map_err(|e| anyhow!("NCCL group: {e:?}"))?;
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: created in init, destroyed once
        let _ = unsafe { cudarc::nccl::result::comm_destroy(self.comm) };
    }
}
