//! The decoder, written once: which ops run in which order, forward and backward, and what
//! each reads and writes. A backend implements [`DecoderOps`] at the granularity it fuses ops
//! (the CPU in `model::step`, a CUDA device in `engine::device`), so a new fusion changes one
//! op here and one implementation per backend, and the graph cannot drift between them.
//!
//! Every backend names the step's tensors alike (`[rows, width]`, rows = batch·seq):
//! - residual stream: `x` (a layer's input), `x1` (after attention), `out` (the layer's output)
//! - attention: `h1` = norm(x); projections `q`, `k`, `v` and the gate's logits `z`; `qr`, `kr`
//!   after QK-norm and RoPE; `o` = SDPA(qr, kr, v) with its log-sum-exp `lse`; `y` = the gated
//!   `o` (G1) that `o_proj` reads; `a` = o_proj(y)
//! - MLP: `h2` = norm(x1); `f` = ffn(h2)
//! - head: `hf` = norm(x_last); logits and loss, row chunk by row chunk
//! - gradients: `dx` (of the residual stream, updated in place from the head down to the
//!   embedding), and per layer `dh2`, `dy`, `dqr`, `dkr`, `dv`, `dz`, `dq`, `dk`, `dh1`.
//!
//! A feature a backend lacks is refused when that backend's model is built (the device:
//! `engine::device::unsupported`), never half-run here.

use anyhow::Result;

/// The ops of one decoder step. Forward ops read what the previous op wrote; backward ops
/// run in reverse and turn `dx` (d loss / d layer output) into d loss / d layer input,
/// accumulating the parameters' gradients. Each op's doc is its contract on every backend.
pub trait DecoderOps {
    /// `x` = embed(ids) (times √hidden where the model scales embeddings)
    fn embed(&mut self) -> Result<()>;
    /// Before layer `l`'s forward (the CPU loads a quantised layer's weights here)
    fn enter_layer(&mut self, _l: usize) -> Result<()> {
        Ok(())
    }
    /// After layer `l`'s forward: `out` becomes the next layer's `x` (observers, NaN checks)
    fn leave_layer(&mut self, _l: usize) -> Result<()> {
        Ok(())
    }

    /// `h1 = norm(x)` (input norm)
    fn input_norm(&mut self, l: usize) -> Result<()>;
    /// `q, k, v, z = h1·W` (plus q/k/v biases, and any gate at G2–G4 applied to v, k, q)
    fn qkv(&mut self, l: usize) -> Result<()>;
    /// `qr, kr = rope(qk_norm(q)), rope(qk_norm(k))`
    fn qk_norm_rope(&mut self, l: usize) -> Result<()>;
    /// `o = causal SDPA(qr, kr, v)`, `y = G1(o, z)` (y = o when the gate is elsewhere)
    fn attention(&mut self, l: usize) -> Result<()>;
    /// `a = post_norm(G5(y·Wo))` (Gemma's post-attention norm; the G5 gate). A backend whose
    /// `a` is the GEMM's output alone may add `x` right there (the device: `x1 = x + a` in the
    /// GEMM's epilogue), leaving [`Self::residual_norm`] only the norm.
    fn out_proj(&mut self, l: usize) -> Result<()>;
    /// `x1 = x + a`, `h2 = norm(x1)` (post-attention norm)
    fn residual_norm(&mut self, l: usize) -> Result<()>;
    /// `f = post_norm(ffn(h2))` (dense SwiGLU/GeGLU or MoE; Gemma's post-feedforward norm)
    fn mlp(&mut self, l: usize) -> Result<()>;
    /// `out = x1 + f` (on the device already written by [`Self::mlp`]'s down projection, which
    /// adds `x1` in its GEMM's epilogue)
    fn residual(&mut self, l: usize) -> Result<()>;

    /// `hf = norm(x)` after the last layer
    fn final_norm(&mut self) -> Result<()>;
    /// LM head and cross-entropy over row chunks; with `backward`, `dhf` and the head's weight
    /// gradient while each chunk's logits are at hand
    fn head_loss(&mut self, backward: bool) -> Result<()>;
    /// `dx = norm'(dhf)` (final norm)
    fn final_norm_bwd(&mut self) -> Result<()>;

    /// `dh2` from `dx` = d out = d f (the residual passes `dx` on to x1 unchanged)
    fn mlp_bwd(&mut self, l: usize) -> Result<()>;
    /// `dx += norm'(dh2)`: `dx` becomes d x1 = d a
    fn residual_norm_bwd(&mut self, l: usize) -> Result<()>;
    /// `dy` from `dx` = d a (and the G5 gate's part of `dz`)
    fn out_proj_bwd(&mut self, l: usize) -> Result<()>;
    /// `dqr, dkr, dv` from `dy` (and the G1 gate's part of `dz`)
    fn attention_bwd(&mut self, l: usize) -> Result<()>;
    /// `dq, dk` from `dqr, dkr`
    fn qk_norm_rope_bwd(&mut self, l: usize) -> Result<()>;
    /// `dh1` from `dq, dk, dv, dz` (G2–G4 gates' parts of `dz` first)
    fn qkv_bwd(&mut self, l: usize) -> Result<()>;
    /// `dx += norm'(dh1)`: `dx` becomes d x
    fn input_norm_bwd(&mut self, l: usize) -> Result<()>;
    /// embedding gradient from `dx`
    fn embed_bwd(&mut self) -> Result<()>;
}

/// One pre-norm decoder layer's forward: `x1 = x + attention(norm(x))`, `out = x1 + mlp(norm(x1))`.
pub fn layer_forward<O: DecoderOps + ?Sized>(o: &mut O, l: usize) -> Result<()> {
    o.input_norm(l)?;
    o.qkv(l)?;
    o.qk_norm_rope(l)?;
    o.attention(l)?;
    o.out_proj(l)?;
    o.residual_norm(l)?;
    o.mlp(l)?;
    o.residual(l)
}

/// Its backward, the same ops in reverse.
pub fn layer_backward<O: DecoderOps + ?Sized>(o: &mut O, l: usize) -> Result<()> {
    o.mlp_bwd(l)?;
    o.residual_norm_bwd(l)?;
    o.out_proj_bwd(l)?;
    o.attention_bwd(l)?;
    o.qk_norm_rope_bwd(l)?;
    o.qkv_bwd(l)?;
    o.input_norm_bwd(l)
}

/// Embedding, every layer and the final norm: `hf`.
pub fn forward<O: DecoderOps + ?Sized>(o: &mut O, layers: usize) -> Result<()> {
    o.embed()?;
    for l in 0..layers {
        o.enter_layer(l)?;
        layer_forward(o, l)?;
        o.leave_layer(l)?;
    }
    o.final_norm()
}

/// A training step's forward, loss and backward (gradients accumulated), or with `backward`
/// false only the loss.
pub fn step<O: DecoderOps + ?Sized>(o: &mut O, layers: usize, backward: bool) -> Result<()> {
    forward(o, layers)?;
    o.head_loss(backward)?;
    if backward {
        o.final_norm_bwd()?;
        for l in (0..layers).rev() {
            layer_backward(o, l)?;
        }
        o.embed_bwd()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the op sequence.
    #[derive(Default)]
    struct Trace(Vec<String>);

    macro_rules! ops {
        ($($name:ident),* ; $($lname:ident),*) => {
            impl DecoderOps for Trace {
                $(fn $name(&mut self) -> Result<()> { self.0.push(stringify!($name).into()); Ok(()) })*
                fn head_loss(&mut self, b: bool) -> Result<()> { self.0.push(format!("head_loss({b})")); Ok(()) }
                $(fn $lname(&mut self, l: usize) -> Result<()> { self.0.push(format!("{}{l}", stringify!($lname))); Ok(()) })*
            }
        };
    }
    ops!(embed, final_norm, final_norm_bwd, embed_bwd;
        input_norm, qkv, qk_norm_rope, attention, out_proj, residual_norm, mlp, residual,
        mlp_bwd, residual_norm_bwd, out_proj_bwd, attention_bwd, qk_norm_rope_bwd, qkv_bwd, input_norm_bwd);

    #[test]
    fn a_step_runs_the_layers_forward_then_backward_in_reverse() {
        let mut t = Trace::default();
        step(&mut t, 2, true).unwrap();
        let s = t.0.join(" ");
        let fwd = |l: usize| {
            format!("input_norm{l} qkv{l} qk_norm_rope{l} attention{l} out_proj{l} residual_norm{l} mlp{l} residual{l}")
        };
        let bwd = |l: usize| {
            format!("mlp_bwd{l} residual_norm_bwd{l} out_proj_bwd{l} attention_bwd{l} qk_norm_rope_bwd{l} qkv_bwd{l} input_norm_bwd{l}")
        };
        let want = format!(
            "embed {} {} final_norm head_loss(true) final_norm_bwd {} {} embed_bwd",
            fwd(0),
            fwd(1),
            bwd(1),
            bwd(0)
        );
        assert_eq!(s, want);
        let mut t = Trace::default();
        step(&mut t, 1, false).unwrap();
        assert_eq!(t.0.join(" "), format!("embed {} final_norm head_loss(false)", fwd(0)));
    }
}
