//! Device memory of a training step, planned once per (batch, seq, precision): every
//! activation the backward reads, every activation gradient and every scratch buffer is a view
//! of one arena allocated when a shape is first seen and reused by every later step of that
//! shape. Nothing is allocated or zero-filled per step: each kernel overwrites its outputs (or
//! adds to a buffer that holds a real value, such as the residual gradient). To keep it so, a
//! new arena is filled with NaN once: a kernel that relied on a zeroed output would turn the
//! step's loss or gradients into NaN, which the device-vs-CPU tests catch.

use super::Precision;
use crate::backend::cuda::ops::{self, AttnScratch, Cols, DType, Operand};
use crate::backend::cuda::runtime::{DBuf, Device, Graph};
use crate::config::ModelConfig;
use crate::model::ops::cross_entropy::IGNORE;
use anyhow::{bail, Result};
use std::rc::Rc;

/// Buffers start on 256-byte boundaries (cuBLASLt and the vectorised kernels want 16).
const ALIGN: usize = 256;

/// Hands out consecutive views of an arena. The plan is written once ([`StepMemory::carve`])
/// and run twice: over a placeholder arena to learn its size, then over the real one.
struct Carver {
    arena: Rc<DBuf>,
    used: usize,
}

impl Carver {
    fn bytes(&mut self, bytes: usize) -> Result<DBuf> {
        let b = DBuf::view(&self.arena, self.used, bytes)?;
        self.used += bytes.div_ceil(ALIGN) * ALIGN;
        Ok(b)
    }
    fn f32(&mut self, n: usize) -> Result<DBuf> {
        self.bytes(4 * n)
    }
    fn i32(&mut self, n: usize) -> Result<DBuf> {
        self.bytes(4 * n)
    }
    fn bf16(&mut self, n: usize) -> Result<DBuf> {
        self.bytes(2 * n)
    }
    /// `bytes` bytes of the already carved buffer `of`, from `offset`: a second name for part
    /// of it (the LM head's row chunks of the final hidden states, their gradient, targets and
    /// losses).
    fn part(&self, of: &DBuf, offset: usize, bytes: usize) -> Result<DBuf> {
        if offset + bytes > of.bytes {
            anyhow::bail!("a part of {bytes} bytes at {offset} overruns a buffer of {}", of.bytes);
        }
        let start = (of.ptr - self.arena.ptr) as usize;
        DBuf::view(&self.arena, start + offset, bytes)
    }
    /// An activation only GEMMs read, in their operand type.
    fn gemm_in(&mut self, precision: Precision, n: usize) -> Result<GemmIn> {
        self.typed(gemm_type(precision), n)
    }
    /// Columns from `start` on of `of`, a row-major matrix `ld` elements wide.
    fn band(&self, of: &GemmIn, start: usize, ld: usize) -> Result<Band> {
        let skip = of.dtype.size() * start;
        let buf = self.part(&of.buf, skip, of.buf.bytes - skip)?;
        Ok(Band {
            buf,
            dtype: of.dtype,
            ld,
        })
    }
    /// `n` elements of `dtype`.
    fn typed(&mut self, dtype: DType, n: usize) -> Result<GemmIn> {
        let buf = self.bytes(dtype.size() * n)?;
        Ok(GemmIn { buf, dtype })
    }
    /// Rows `start..start + rows` (of width `width`) of `of`.
    fn rows_of(&self, of: &GemmIn, start: usize, rows: usize, width: usize) -> Result<GemmIn> {
        let size = of.dtype.size();
        let buf = self.part(&of.buf, size * start * width, size * rows * width)?;
        Ok(GemmIn { buf, dtype: of.dtype })
    }
    /// A second name for all of `of` (an activation several layers write in turn).
    fn alias(&self, of: &GemmIn) -> Result<GemmIn> {
        let buf = self.part(&of.buf, 0, of.buf.bytes)?;
        Ok(GemmIn { buf, dtype: of.dtype })
    }
    /// `n` elements of `dtype`: the layer's own buffer, or with `shared` a view of it (an
    /// activation the backward recomputes, so one buffer serves every layer).
    fn per_layer(&mut self, shared: Option<&GemmIn>, dtype: DType, n: usize) -> Result<GemmIn> {
        match shared {
            Some(s) => self.alias(s),
            None => self.typed(dtype, n),
        }
    }
    /// A bf16 shadow of an f32 activation that GEMMs read, in mixed precision only.
    fn shadow(&mut self, precision: Precision, n: usize) -> Result<Option<DBuf>> {
        match precision {
            Precision::F32 => Ok(None),
            Precision::Bf16 => Ok(Some(self.bf16(n)?)),
        }
    }
}

/// The GEMMs' operand type.
fn gemm_type(precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::Bf16,
    }
}

/// An activation that only GEMMs read (forward and backward), or the tensor-core attention, or
/// kernels that read it in either type (SwiGLU's `gu`, QK-norm + RoPE's `q` and `k`): its
/// producer writes it in the GEMMs' operand type — bf16 in mixed precision, so it has no f32
/// copy and needs no cast.
pub(super) struct GemmIn {
    pub buf: DBuf,
    pub dtype: DType,
}

impl GemmIn {
    pub fn op(&self) -> Operand<'_> {
        Operand {
            buf: &self.buf,
            dtype: self.dtype,
        }
    }
}

/// A band of columns of a stacked row-major matrix: a view from its first column, written at
/// row stride `ld` (one projection's slice of the stacked `[dq | dk | dv | dz]` gradient).
pub(super) struct Band {
    pub buf: DBuf,
    pub dtype: DType,
    pub ld: usize,
}

impl Band {
    pub fn cols(&self) -> Cols<'_> {
        let out = Operand {
            buf: &self.buf,
            dtype: self.dtype,
        };
        Cols { out, ld: Some(self.ld) }
    }
}

/// What one layer's forward keeps for its backward (f32, and in mixed precision what the GEMMs
/// of both passes and the tensor-core attention read in bf16). Under [`Plan::recompute`] `h1`,
/// `h2`, `qr` and `kr` are views of buffers all layers share: the backward writes them again.
pub(super) struct LayerMem {
    /// the layer's input (the previous layer's output)
    pub x: DBuf,
    pub h1: GemmIn,
    pub rstd1: DBuf,
    /// the q and k projections' outputs (read by QK-norm + RoPE, forward and backward)
    pub q: GemmIn,
    pub k: GemmIn,
    pub rstd_q: DBuf,
    pub rstd_k: DBuf,
    /// the attention's inputs (rotated q and k, v): bf16 for the tensor-core attention (the
    /// backward reads the same values again), else f32
    pub qr: GemmIn,
    pub kr: GemmIn,
    pub v: GemmIn,
    /// the gate logits (the gate projection's output, read by the attention's forward and its
    /// backward's pre-pass) and the attention output before the gate (the backward's pre-pass
    /// reads it for D = rowsum(dO ⊙ o) and the gate's gradient): one type, bf16 for the
    /// tensor-core attention as under torch autocast, else f32
    pub z: Option<GemmIn>,
    pub o: GemmIn,
    pub lse: DBuf,
    pub y: GemmIn,
    pub x1: DBuf,
    pub h2: GemmIn,
    pub rstd2: DBuf,
    /// the stacked gate/up GEMM's output `[rows, 2·ff]`: each row's gate values, then its up
    /// values (only SwiGLU reads it: in the GEMMs' operand type)
    pub gu: GemmIn,
}

/// Gradient and scratch buffers of the backward, shared by the layers (one runs at a time).
pub(super) struct BackwardMem {
    /// d(loss)/d(residual stream), updated in place layer by layer
    pub dx: DBuf,
    pub dm: GemmIn,
    /// the gradient of `gu`, same layout
    pub dgu: GemmIn,
    pub dh2: DBuf,
    pub dy: DBuf,
    pub dqr: DBuf,
    pub dkr: DBuf,
    /// the q, k, v and gate projections' output gradients side by side, `[rows, q | k | v | z]`
    /// (the stacked `[q; k; v; gate]` weight's output gradient: one GEMM reads all four), in the
    /// GEMMs' operand type; `dq`, `dk`, `dv`, `dz` are its column bands, written by QK-norm +
    /// RoPE's backward and the attention's
    pub dqkvz: GemmIn,
    pub dq: Band,
    pub dk: Band,
    pub dv: Band,
    pub dz: Option<Band>,
    pub dh1: DBuf,
    pub attn: AttnScratch,
    /// a norm backward's gain-gradient sums, one row per block (`[blocks, width]`, the largest
    /// of the RMSNorms' and the QK-norms')
    pub norm_part: DBuf,
    /// the residual gradient's bf16 copy for the GEMMs, written beside it by the norms' backward
    pub dx_b: Option<DBuf>,
}

/// One row chunk of the LM head: views of the full buffers' rows `start..start + rows`.
pub(super) struct HeadChunk {
    pub rows: usize,
    pub hf: GemmIn,
    pub dhf: DBuf,
    pub targets: DBuf,
    pub loss_rows: DBuf,
}

/// f32 logits of one LM-head chunk, at most (unless [`HEAD_CHUNK_MIN_ROWS`] are larger).
const HEAD_CHUNK_BYTES: usize = 256 << 20;

/// Rows per LM-head chunk, at least: each chunk's weight-gradient GEMM reads and writes the
/// head's whole f32 gradient (8·d·V bytes) for 2·rows·d·V FLOPs, so below ≈ 740 rows it is bound
/// by that traffic on an H200 (790 TFLOP/s over 4.3 TB/s, × 8 bytes / 2 FLOPs). At 1p7b
/// (vocabulary 151,936) the 256 MiB budget alone gives 384 rows: 43 chunks moving 107 GB.
const HEAD_CHUNK_MIN_ROWS: usize = 1024;

/// Rows per LM-head chunk: `forced` (tests), else as many as keep a chunk's f32 logits within
/// [`HEAD_CHUNK_BYTES`] but at least [`HEAD_CHUNK_MIN_ROWS`], a multiple of 64 rows (whole GEMM
/// tiles), and never more than `n`.
pub(super) fn head_chunk_rows(n: usize, vocab: usize, forced: Option<usize>) -> usize {
    let budget = HEAD_CHUNK_BYTES / (4 * vocab.max(1)) / 64 * 64;
    let rows = forced.unwrap_or(budget.max(HEAD_CHUNK_MIN_ROWS));
    rows.clamp(1, n.max(1))
}

/// What a step's memory plan depends on besides its shape and precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Plan {
    /// the attention runs on tensor cores: its inputs, o and z in bf16
    pub tc_attention: bool,
    /// rows per LM-head chunk
    pub head_rows: usize,
    /// The backward writes the norms' outputs (`h1`, `h2`) and the rotated q and k again
    /// instead of every layer keeping its own: bit for bit the forward's values (same kernels,
    /// same inputs), for one norm and one QK-norm + RoPE launch more per layer and pass.
    pub recompute: bool,
}

/// Everything a step of one shape uses on the device besides the parameters, gradients and
/// optimizer state (which live as long as the model).
pub(super) struct StepMemory {
    pub batch: usize,
    pub seq: usize,
    pub precision: Precision,
    pub plan: Plan,
    /// The batch's inputs, written by one host copy before the step's launches
    /// ([`Self::stage`]) at offsets fixed by the shape, so that a captured step reads each
    /// batch's values: its ids, targets (< 0: none), the loss scale (f32: 1 / the target
    /// count) and the embedding backward's index ([`ops::embed_bwd_index`]).
    pub inputs: DBuf,
    pub ids: DBuf,
    pub scale: DBuf,
    pub embed_index: DBuf,
    /// The step's launches captured once per pass (forward only, forward and backward) after
    /// a first eager run, and replayed by later steps of this shape.
    pub graphs: [Option<Graph>; 2],
    pub ran_eagerly: [bool; 2],
    pub layers: Vec<LayerMem>,
    /// SwiGLU's output `[rows, ff]`, the down projection's input, for one layer at a time: the
    /// forward writes it for the down GEMM, the backward writes it again (bit for bit, from the
    /// layer's `gu`) for the down weight's gradient, so no layer keeps its own
    pub m: GemmIn,
    /// the last layer's output
    pub x_last: DBuf,
    pub hf: GemmIn,
    pub rstd_f: DBuf,
    pub loss_rows: DBuf,
    pub dhf: DBuf,
    /// The LM head and cross-entropy run over row chunks of the final hidden states, so only
    /// one chunk's `[rows, vocab]` logits exist at a time (`logits`; their gradient in place, or
    /// in mixed precision written by the cross-entropy into `logits_b` in bf16 for the
    /// backward GEMMs).
    pub head_chunks: Vec<HeadChunk>,
    pub logits: DBuf,
    pub logits_b: Option<DBuf>,
    pub bwd: BackwardMem,
    /// Size of the arena, bytes.
    pub bytes: usize,
}

impl StepMemory {
    /// Allocate (once) and carve the memory of `batch × seq` steps of `cfg`, poisoned with NaN.
    pub fn new(
        dev: &dyn Device,
        cfg: &ModelConfig,
        (batch, seq): (usize, usize),
        precision: Precision,
        plan: Plan,
    ) -> Result<StepMemory> {
        let bytes = Self::planned_bytes(cfg, (batch, seq), precision, plan)?;
        let arena = Rc::new(dev.zeros(bytes)?);
        ops::fill(dev, &arena, f32::NAN, bytes / 4)?;
        let mut carver = Carver { arena, used: 0 };
        let mut mem = Self::carve(&mut carver, cfg, (batch, seq), precision, plan)?;
        mem.bytes = bytes;
        Ok(mem)
    }

    /// Bytes of the arena [`Self::new`] allocates, measured without allocating.
    pub fn planned_bytes(
        cfg: &ModelConfig,
        (batch, seq): (usize, usize),
        precision: Precision,
        plan: Plan,
    ) -> Result<usize> {
        // the placeholder is never launched with: its views only measure the plan
        let placeholder = Rc::new(DBuf {
            ptr: 0,
            bytes: usize::MAX / 2,
            _keep: Box::new(()),
        });
        let mut sizing = Carver {
            arena: placeholder,
            used: 0,
        };
        Self::carve(&mut sizing, cfg, (batch, seq), precision, plan)?;
        Ok(sizing.used.max(ALIGN))
    }

    fn carve(
        c: &mut Carver,
        cfg: &ModelConfig,
        (batch, seq): (usize, usize),
        precision: Precision,
        plan: Plan,
    ) -> Result<StepMemory> {
        let head_rows = plan.head_rows;
        let n = batch * seq;
        let (dm, qd, kvd, ff, vocab) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
        let scores = cfg.gate_geometry().map(|g| g.scores());
        // the attention's inputs, and the output and gate logits it saves for the backward:
        // bf16 for the tensor-core kernels (mixed precision only), f32 for the f32 ones
        let attn_in = if plan.tc_attention { DType::Bf16 } else { DType::F32 };
        let gemm_type = gemm_type(precision);
        // what the backward recomputes, in one buffer for all layers: h1 and h2 share one
        // (each is read only between its norm and the GEMMs right after it, in both passes)
        let mut shared = |dtype, len| plan.recompute.then(|| c.typed(dtype, len)).transpose();
        let (h, qr, kr) = (
            shared(gemm_type, n * dm)?,
            shared(attn_in, n * qd)?,
            shared(attn_in, n * kvd)?,
        );
        let (h, qr, kr) = (h.as_ref(), qr.as_ref(), kr.as_ref());
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            layers.push(LayerMem {
                x: c.f32(n * dm)?,
                h1: c.per_layer(h, gemm_type, n * dm)?,
                rstd1: c.f32(n)?,
                q: c.gemm_in(precision, n * qd)?,
                k: c.gemm_in(precision, n * kvd)?,
                rstd_q: c.f32(n * heads)?,
                rstd_k: c.f32(n * kv_heads)?,
                qr: c.per_layer(qr, attn_in, n * qd)?,
                kr: c.per_layer(kr, attn_in, n * kvd)?,
                v: c.typed(attn_in, n * kvd)?,
                z: scores.map(|s| c.typed(attn_in, n * s)).transpose()?,
                o: c.typed(attn_in, n * qd)?,
                lse: c.f32(n * heads)?,
                y: c.gemm_in(precision, n * qd)?,
                x1: c.f32(n * dm)?,
                h2: c.per_layer(h, gemm_type, n * dm)?,
                rstd2: c.f32(n)?,
                gu: c.gemm_in(precision, n * 2 * ff)?,
            });
        }
        let width = qd + 2 * kvd + scores.unwrap_or(0);
        let dqkvz = c.gemm_in(precision, n * width)?;
        let bwd = BackwardMem {
            dx: c.f32(n * dm)?,
            dm: c.gemm_in(precision, n * ff)?,
            dgu: c.gemm_in(precision, n * 2 * ff)?,
            dh2: c.f32(n * dm)?,
            dy: c.f32(n * qd)?,
            dqr: c.f32(n * qd)?,
            dkr: c.f32(n * kvd)?,
            dq: c.band(&dqkvz, 0, width)?,
            dk: c.band(&dqkvz, qd, width)?,
            dv: c.band(&dqkvz, qd + kvd, width)?,
            dz: scores.map(|_| c.band(&dqkvz, qd + 2 * kvd, width)).transpose()?,
            dqkvz,
            dh1: c.f32(n * dm)?,
            attn: AttnScratch {
                // dO in the attention's input type: bf16 is all the tensor-core backward reads
                dout: c.bytes(attn_in.size() * n * qd)?,
                delta: c.f32(n * heads)?,
            },
            norm_part: c.f32(
                [(n, dm), (n * heads, cfg.head_dim), (n * kv_heads, cfg.head_dim)]
                    .map(|(rows, d)| ops::norm_bwd_scratch_len(rows, d))
                    .into_iter()
                    .max()
                    .unwrap_or(0),
            )?,
            dx_b: c.shadow(precision, n * dm)?,
        };
        let m = c.gemm_in(precision, n * ff)?;
        let inputs = c.i32(2 * n + 1 + ops::embed_bwd_index_len(n))?;
        let (ids, targets) = (c.part(&inputs, 0, 4 * n)?, c.part(&inputs, 4 * n, 4 * n)?);
        let scale = c.part(&inputs, 8 * n, 4)?;
        let embed_index = c.part(&inputs, 8 * n + 4, 4 * ops::embed_bwd_index_len(n))?;
        let x_last = c.f32(n * dm)?;
        let (hf, rstd_f) = (c.gemm_in(precision, n * dm)?, c.f32(n)?);
        let (loss_rows, dhf) = (c.f32(n)?, c.f32(n * dm)?);
        let mut head_chunks = Vec::new();
        for start in (0..n).step_by(head_rows) {
            let rows = head_rows.min(n - start);
            head_chunks.push(HeadChunk {
                rows,
                hf: c.rows_of(&hf, start, rows, dm)?,
                dhf: c.part(&dhf, 4 * start * dm, 4 * rows * dm)?,
                targets: c.part(&targets, 4 * start, 4 * rows)?,
                loss_rows: c.part(&loss_rows, 4 * start, 4 * rows)?,
            });
        }
        Ok(StepMemory {
            batch,
            seq,
            precision,
            plan,
            inputs,
            ids,
            scale,
            embed_index,
            graphs: [None, None],
            ran_eagerly: [false; 2],
            layers,
            m,
            x_last,
            hf,
            rstd_f,
            loss_rows,
            dhf,
            head_chunks,
            logits: c.f32(head_rows * vocab)?,
            logits_b: c.shadow(precision, head_rows * vocab)?,
            bwd,
            bytes: 0,
        })
    }

    /// Write a batch's ids and targets (`IGNORE`: none), the loss scale and, for a backward
    /// step, the embedding backward's index into [`Self::inputs`] with one host copy. Returns
    /// the number of targets.
    pub fn stage(
        &mut self,
        dev: &dyn Device,
        ids: &[u32],
        targets: &[u32],
        backward: bool,
        vocab: usize,
    ) -> Result<usize> {
        let n = self.batch * self.seq;
        if ids.len() != n || targets.len() != n {
            bail!(
                "{} ids and {} targets for a step of {n} tokens",
                ids.len(),
                targets.len()
            );
        }
        let mut words: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        words.extend(targets.iter().map(|&t| if t == IGNORE { -1 } else { t as i32 }));
        let count = words[n..].iter().filter(|&&t| t >= 0).count();
        let scale = if count > 0 { 1.0 / count as f32 } else { 0.0 };
        words.push(scale.to_bits() as i32);
        if backward {
            words.extend(ops::embed_bwd_index(ids, vocab)?);
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        dev.write(&mut self.inputs, &bytes)?;
        Ok(count)
    }

    /// The input of layer `i` (the embedding output for layer 0), and where layer `i` writes
    /// its output.
    pub fn layer_io(&self, i: usize) -> (&DBuf, &DBuf) {
        let out = self.layers.get(i + 1).map_or(&self.x_last, |l| &l.x);
        (&self.layers[i].x, out)
    }

    /// The embedding output: layer 0's input (or the final norm's, without layers).
    pub fn embed_out(&self) -> &DBuf {
        self.layers.first().map_or(&self.x_last, |l| &l.x)
    }
}

#[cfg(test)]
mod tests {
    use super::head_chunk_rows;

    /// The LM head's chunks: within the logits budget where that leaves enough rows for the
    /// weight gradient's GEMM to be bound by its FLOPs, else 1,024 rows; never more than the
    /// step's rows; a forced size (tests) as given.
    #[test]
    fn head_chunks_keep_the_weight_gradient_gemm_compute_bound() {
        // small: 256 MiB of f32 logits is 2,048 rows of 32,768
        assert_eq!(head_chunk_rows(32 * 1024, 32_768, None), 2048);
        // 1p7b: the budget alone would give 384 rows of 151,936
        assert_eq!(head_chunk_rows(8 * 2048, 151_936, None), 1024);
        assert_eq!(head_chunk_rows(80, 151_936, None), 80);
        assert_eq!(head_chunk_rows(80, 256, Some(16)), 16);
        assert_eq!(head_chunk_rows(80, 256, Some(0)), 1);
    }
}
