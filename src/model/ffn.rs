//! The block's feed-forward part: a dense SwiGLU MLP, or a Mixture-of-Experts block (router,
//! top-k SwiGLU experts computed on their own tokens only, optional shared expert with a
//! sigmoid gate), forward and backward.

use super::ops::gelu::{geglu_bwd_fused, geglu_fwd_fused};
use super::ops::linear::{linear_bwd, linear_bwd_par, linear_fwd, linear_fwd_par};
use super::ops::router::{route, route_bwd, RouteSpec, RouterStats, Routing};
use super::ops::swiglu::{sigmoid, swiglu_bwd_fused, swiglu_fwd_fused};
use super::params::{FfnIndex, MoeIndex, ParamStore, SwigluIndex};
use crate::backend::cpu::{add_assign, Par};
use crate::config::{MlpActivation, MoeConfig};
use crate::real::Real;
use rayon::prelude::*;

fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![T::ZERO; n]
}

/// Saved activations of one SwiGLU MLP on `rows` inputs.
pub struct MlpCache<T> {
    /// `[gate; up]` weights stacked `[2f, d]` (built once in forward, reused in backward)
    wgu: Vec<T>,
    /// gate and up projections side by side, `[rows, 2f]`
    gu: Vec<T>,
    m: Vec<T>,
    act: MlpActivation,
}

/// `[gate; up]` stacked `[2f, d]`: one GEMM computes both projections (and one their input
/// gradient), which runs faster than two half-width ones.
fn stacked<T: Real>(wg: &[T], wu: &[T]) -> Vec<T> {
    let mut w = Vec::with_capacity(wg.len() + wu.len());
    w.extend_from_slice(wg);
    w.extend_from_slice(wu);
    w
}

/// `y = down(act(gate(x)) ⊙ up(x))` on `rows` rows of `x` (act: SiLU, or Gemma's GELU-tanh).
#[allow(clippy::too_many_arguments)]
fn mlp_fwd<T: Real>(
    p: &ParamStore<T>,
    ix: SwigluIndex,
    x: &[T],
    rows: usize,
    d: usize,
    y: &mut [T],
    par: Par,
    act: MlpActivation,
) -> MlpCache<T> {
    let f = p.tensors[ix.gate].shape[0];
    let wgu = stacked(&p.tensors[ix.gate].data, &p.tensors[ix.up].data);
    let (mut gu, mut m) = (zeros(rows * 2 * f), zeros(rows * f));
    linear_fwd_par(x, &wgu, rows, d, 2 * f, &mut gu, par);
    match act {
        MlpActivation::Silu => swiglu_fwd_fused(&gu, f, &mut m),
        MlpActivation::GeluTanh => geglu_fwd_fused(&gu, f, &mut m),
    }
    linear_fwd_par(&m, &p.tensors[ix.down].data, rows, f, d, y, par);
    MlpCache { wgu, gu, m, act }
}

/// Backward of `mlp_fwd` (`wd` the down projection; gate/up come stacked in the cache):
/// `dx (+)= …` (added when `acc`), weight gradients into `dw = [gate, up, down]`.
#[allow(clippy::too_many_arguments)]
fn mlp_bwd<T: Real>(
    wd: &[T],
    c: &MlpCache<T>,
    x: &[T],
    dy: &[T],
    rows: usize,
    d: usize,
    dx: (&mut [T], bool),
    dw: [&mut [T]; 3],
    par: Par,
) {
    let f = wd.len() / d;
    let [dwg, dwu, dwd] = dw;
    let mut dm = zeros(rows * f);
    linear_bwd_par(&c.m, wd, dy, rows, f, d, Some((&mut dm, false)), dwd, par);
    let mut dgu = zeros(rows * 2 * f);
    match c.act {
        MlpActivation::Silu => swiglu_bwd_fused(&c.gu, f, &dm, &mut dgu),
        MlpActivation::GeluTanh => geglu_bwd_fused(&c.gu, f, &dm, &mut dgu),
    }
    drop(dm);
    let mut dwgu = zeros(2 * f * d);
    linear_bwd_par(x, &c.wgu, &dgu, rows, d, 2 * f, Some(dx), &mut dwgu, par);
    add_assign(dwg, &dwgu[..f * d]);
    add_assign(dwu, &dwgu[f * d..]);
}

/// Saved state of the FFN for backward.
pub enum FfnCache<T> {
    Dense(MlpCache<T>),
    Moe(Box<MoeCache<T>>),
}

pub struct MoeCache<T> {
    routing: Routing<T>,
    /// Row of each assignment `[n, k]` in the expert-sorted buffers (`u32::MAX`: dropped).
    pos: Vec<u32>,
    /// Start row of each expert in the sorted buffers (`E + 1` entries).
    offsets: Vec<usize>,
    /// Expert inputs gathered in expert order, `[A, d]`.
    xs: Vec<T>,
    /// Per-expert activations (rows `offsets[e]..offsets[e+1]`) and outputs `[A, d]`.
    experts: Vec<MlpCache<T>>,
    ys: Vec<T>,
    shared: Option<(MlpCache<T>, Vec<T>, Vec<T>)>,
}

/// Many small expert GEMMs: run experts in parallel with serial GEMMs when there are enough of
/// them, else one after another with threaded GEMMs. Results do not depend on the choice.
fn expert_par(experts: usize) -> bool {
    let threads = rayon::current_num_threads();
    threads > 1 && experts >= threads
}

#[allow(clippy::too_many_arguments)]
/// FFN forward on `h` `[n, d]` (the post-attention normed input). Returns `y` and the cache;
/// MoE router statistics go to `stats`.
pub fn ffn_fwd<T: Real>(
    p: &ParamStore<T>,
    ix: &FfnIndex,
    moe: Option<&MoeConfig>,
    h: &[T],
    n: usize,
    d: usize,
    act: MlpActivation,
) -> (Vec<T>, FfnCache<T>) {
    let mut y = zeros(n * d);
    match (ix, moe) {
        (FfnIndex::Dense(sw), _) => {
            let c = mlp_fwd(p, *sw, h, n, d, &mut y, Par::Threads, act);
            (y, FfnCache::Dense(c))
        }
        (FfnIndex::Moe(mi), Some(cfg)) => {
            let c = moe_fwd(p, mi, cfg, h, n, d, &mut y);
            (y, FfnCache::Moe(Box::new(c)))
        }
        (FfnIndex::Moe(_), None) => unreachable!("a MoE layer index always comes with its config"),
    }
}

fn route_spec(cfg: &MoeConfig) -> RouteSpec {
    RouteSpec {
        experts: cfg.num_experts,
        top_k: cfg.num_experts_per_tok,
        norm_topk: cfg.norm_topk_prob,
        capacity_factor: cfg.capacity_factor,
    }
}

fn moe_fwd<T: Real>(
    p: &ParamStore<T>,
    mi: &MoeIndex,
    cfg: &MoeConfig,
    h: &[T],
    n: usize,
    d: usize,
    y: &mut [T],
) -> MoeCache<T> {
    let (e, k) = (cfg.num_experts, cfg.num_experts_per_tok);
    let mut logits = zeros(n * e);
    linear_fwd(h, &p.tensors[mi.router].data, n, d, e, &mut logits);
    let routing = route(&logits, n, route_spec(cfg));
    drop(logits);

    // group the kept assignments by expert (tokens in order within an expert)
    let mut offsets = vec![0usize; e + 1];
    for (a, &x) in routing.experts.iter().enumerate() {
        if routing.kept[a] {
            offsets[x as usize + 1] += 1;
        }
    }
    for i in 0..e {
        offsets[i + 1] += offsets[i];
    }
    let rows = offsets[e];
    let mut fill = offsets.clone();
    let mut pos = vec![u32::MAX; n * k];
    let mut xs = zeros(rows * d);
    for (a, &x) in routing.experts.iter().enumerate() {
        if routing.kept[a] {
            let r = fill[x as usize];
            fill[x as usize] += 1;
            pos[a] = r as u32;
            xs[r * d..(r + 1) * d].copy_from_slice(&h[(a / k) * d..(a / k + 1) * d]);
        }
    }

    let mut ys = zeros(rows * d);
    let mut y_parts: Vec<&mut [T]> = Vec::with_capacity(e);
    let mut rest = &mut ys[..];
    for i in 0..e {
        let (a, b) = rest.split_at_mut((offsets[i + 1] - offsets[i]) * d);
        y_parts.push(a);
        rest = b;
    }
    let run = |(i, yi): (usize, &mut &mut [T]), par: Par| {
        let r = offsets[i + 1] - offsets[i];
        mlp_fwd(
            p,
            mi.experts[i],
            &xs[offsets[i] * d..offsets[i + 1] * d],
            r,
            d,
            yi,
            par,
            MlpActivation::Silu,
        )
    };
    let experts: Vec<MlpCache<T>> = if expert_par(e) {
        y_parts
            .par_iter_mut()
            .enumerate()
            .map(|a| run(a, Par::Serial))
            .collect()
    } else {
        y_parts.iter_mut().enumerate().map(|a| run(a, Par::Threads)).collect()
    };

    // combine: y[t] = Σ_s w[t,s] · ys[pos[t,s]], slots in order (deterministic)
    y.par_chunks_mut(d).enumerate().for_each(|(t, yt)| {
        for s in 0..k {
            let a = t * k + s;
            if pos[a] != u32::MAX {
                let (w, r) = (routing.weights[a], pos[a] as usize);
                yt.iter_mut()
                    .zip(&ys[r * d..(r + 1) * d])
                    .for_each(|(o, &v)| *o += w * v);
            }
        }
    });

    let shared = mi.shared.map(|(sw, gi)| {
        let mut ysh = zeros(n * d);
        let c = mlp_fwd(p, sw, h, n, d, &mut ysh, Par::Threads, MlpActivation::Silu);
        let mut gate = zeros(n);
        linear_fwd(h, &p.tensors[gi].data, n, d, 1, &mut gate);
        gate.iter_mut().for_each(|z| *z = sigmoid(*z));
        y.par_chunks_mut(d)
            .zip(ysh.par_chunks(d))
            .zip(gate.par_iter())
            .for_each(|((yt, st), &g)| {
                yt.iter_mut().zip(st).for_each(|(o, &v)| *o += g * v);
            });
        (c, ysh, gate)
    });
    MoeCache {
        routing,
        pos,
        offsets,
        xs,
        experts,
        ys,
        shared,
    }
}

/// The auxiliary part of the training objective from one forward's router statistics:
/// mean over MoE layers of `router_aux_loss_coef · lb + router_z_loss_coef · z`.
pub fn aux_objective(cfg: &crate::config::ModelConfig, stats: &[RouterStats]) -> f64 {
    let Some(m) = &cfg.moe else { return 0.0 };
    let sum: f64 = stats
        .iter()
        .map(|s| m.router_aux_loss_coef * s.lb_loss + m.router_z_loss_coef * s.z_loss)
        .sum();
    sum / stats.len().max(1) as f64
}

/// The router statistics of a forward, if the FFN is MoE.
pub fn router_stats<T>(c: &FfnCache<T>) -> Option<&RouterStats> {
    match c {
        FfnCache::Moe(m) => Some(&m.routing.stats),
        FfnCache::Dense(_) => None,
    }
}

/// Backward: `dy` `[n, d]` → `dh` (overwritten), parameter gradients added to `grads`.
/// `aux_scale` weights this layer's auxiliary losses (1 / number of MoE layers).
#[allow(clippy::too_many_arguments)]
pub fn ffn_bwd<T: Real>(
    p: &ParamStore<T>,
    ix: &FfnIndex,
    moe: Option<&MoeConfig>,
    c: &FfnCache<T>,
    h: &[T],
    dy: &[T],
    n: usize,
    d: usize,
    dh: &mut [T],
    grads: &mut ParamStore<T>,
    aux_scale: f64,
) {
    match (ix, c, moe) {
        (FfnIndex::Dense(sw), FfnCache::Dense(mc), _) => {
            let dw = three_mut(grads, *sw);
            mlp_bwd(&p.tensors[sw.down].data, mc, h, dy, n, d, (dh, false), dw, Par::Threads);
        }
        (FfnIndex::Moe(mi), FfnCache::Moe(mc), Some(cfg)) => moe_bwd(p, mi, cfg, mc, h, dy, n, d, dh, grads, aux_scale),
        _ => unreachable!("the cache comes from the same layer's forward"),
    }
}

/// Disjoint mutable gradient slices of one MLP's three matrices.
fn three_mut<T>(grads: &mut ParamStore<T>, sw: SwigluIndex) -> [&mut [T]; 3] {
    let mut slots: Vec<Option<&mut Vec<T>>> = grads.tensors.iter_mut().map(|t| Some(&mut t.data)).collect();
    let mut take = |i: usize| -> &mut [T] { slots[i].take().expect("distinct tensors") };
    [take(sw.gate), take(sw.up), take(sw.down)]
}

#[allow(clippy::too_many_arguments)]
fn moe_bwd<T: Real>(
    p: &ParamStore<T>,
    mi: &MoeIndex,
    cfg: &MoeConfig,
    c: &MoeCache<T>,
    h: &[T],
    dy: &[T],
    n: usize,
    d: usize,
    dh: &mut [T],
    grads: &mut ParamStore<T>,
    aux_scale: f64,
) {
    let (e, k) = (cfg.num_experts, cfg.num_experts_per_tok);
    let r = &c.routing;
    let rows = c.offsets[e];
    // combine backward: dw[t,s] = dy[t]·ys[pos], dys[pos] = w[t,s]·dy[t]
    let mut dweights = zeros(n * k);
    let mut dys = zeros(rows * d);
    for (a, (dwa, &row)) in dweights.iter_mut().zip(&c.pos).enumerate() {
        if row != u32::MAX {
            let (t, row) = (a / k, row as usize);
            let (dyt, yr) = (&dy[t * d..(t + 1) * d], &c.ys[row * d..(row + 1) * d]);
            *dwa = dyt.iter().zip(yr).fold(T::ZERO, |acc, (&x, &y)| acc + x * y);
            let w = r.weights[a];
            dys[row * d..(row + 1) * d]
                .iter_mut()
                .zip(dyt)
                .for_each(|(o, &x)| *o = w * x);
        }
    }

    // experts: each on its own rows, with its own gradient tensors
    let mut dxs = zeros(rows * d);
    {
        let mut slots: Vec<Option<&mut Vec<T>>> = grads.tensors.iter_mut().map(|t| Some(&mut t.data)).collect();
        let mut jobs = Vec::with_capacity(e);
        let mut rest = &mut dxs[..];
        for (i, sw) in mi.experts.iter().enumerate() {
            let (part, tail) = rest.split_at_mut((c.offsets[i + 1] - c.offsets[i]) * d);
            rest = tail;
            let mut take = |j: usize| -> &mut [T] { slots[j].take().expect("distinct tensors") };
            jobs.push((i, *sw, part, [take(sw.gate), take(sw.up), take(sw.down)]));
        }
        let run = |(i, sw, dx, dw): (usize, SwigluIndex, &mut [T], [&mut [T]; 3]), par: Par| {
            let (r0, r1) = (c.offsets[i], c.offsets[i + 1]);
            let wd = &p.tensors[sw.down].data;
            let (x, g) = (&c.xs[r0 * d..r1 * d], &dys[r0 * d..r1 * d]);
            mlp_bwd(wd, &c.experts[i], x, g, r1 - r0, d, (dx, false), dw, par);
        };
        if expert_par(e) {
            jobs.into_par_iter().for_each(|j| run(j, Par::Serial));
        } else {
            jobs.into_iter().for_each(|j| run(j, Par::Threads));
        }
    }
    // scatter the expert input gradients back to their tokens, slots in order
    dh.par_chunks_mut(d).enumerate().for_each(|(t, dht)| {
        dht.fill(T::ZERO);
        for s in 0..k {
            let a = t * k + s;
            if c.pos[a] != u32::MAX {
                let row = c.pos[a] as usize;
                add_assign(dht, &dxs[row * d..(row + 1) * d]);
            }
        }
    });
    drop(dxs);

    // router
    let dlogits = route_bwd(
        r,
        route_spec(cfg),
        &dweights,
        cfg.router_aux_loss_coef * aux_scale,
        cfg.router_z_loss_coef * aux_scale,
    );
    linear_bwd(
        h,
        &p.tensors[mi.router].data,
        &dlogits,
        n,
        d,
        e,
        Some((dh, true)),
        &mut grads.tensors[mi.router].data,
    );

    // shared expert: y += σ(h·w_g) · mlp(h)
    if let (Some((sw, gi)), Some((sc, ysh, gate))) = (mi.shared, &c.shared) {
        let mut dgate = zeros(n);
        let mut dysh = zeros(n * d);
        dgate
            .par_iter_mut()
            .zip(dysh.par_chunks_mut(d))
            .enumerate()
            .for_each(|(t, (dg, ds))| {
                let (dyt, st, g) = (&dy[t * d..(t + 1) * d], &ysh[t * d..(t + 1) * d], gate[t]);
                let dot = dyt.iter().zip(st).fold(T::ZERO, |acc, (&x, &y)| acc + x * y);
                *dg = dot * g * (T::ONE - g);
                ds.iter_mut().zip(dyt).for_each(|(o, &x)| *o = g * x);
            });
        let dw = three_mut(grads, sw);
        mlp_bwd(
            &p.tensors[sw.down].data,
            sc,
            h,
            &dysh,
            n,
            d,
            (&mut *dh, true),
            dw,
            Par::Threads,
        );
        linear_bwd(
            h,
            &p.tensors[gi].data,
            &dgate,
            n,
            d,
            1,
            Some((dh, true)),
            &mut grads.tensors[gi].data,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, MoeConfig};
    use crate::model::params::{init_params, param_specs};

    fn naive_mlp(p: &ParamStore<f64>, ix: SwigluIndex, x: &[f64]) -> Vec<f64> {
        let mv = |w: &[f64], v: &[f64]| -> Vec<f64> {
            w.chunks(v.len())
                .map(|r| r.iter().zip(v).map(|(a, b)| a * b).sum())
                .collect()
        };
        let g = mv(&p.tensors[ix.gate].data, x);
        let u = mv(&p.tensors[ix.up].data, x);
        let m: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
        mv(&p.tensors[ix.down].data, &m)
    }

    /// The grouped MoE forward against a token-by-token reference written from the definition.
    #[test]
    fn moe_forward_matches_a_per_token_reference() {
        for (norm, shared) in [(true, 7), (false, 0)] {
            let mut cfg = ModelConfig::preset("micro", None).unwrap();
            let mut m = MoeConfig::new(5, 2, 9);
            m.norm_topk_prob = norm;
            m.shared_expert_intermediate_size = shared;
            cfg.moe = Some(m.clone());
            let (specs, index) = param_specs(&cfg);
            let mut specs = specs;
            specs.iter_mut().for_each(|s| {
                if let crate::model::params::Init::Normal(_) = s.init {
                    s.init = crate::model::params::Init::Normal(0.3)
                }
            });
            let p: ParamStore<f64> = init_params(&specs, 11);
            let FfnIndex::Moe(mi) = &index.layers[0].ffn else {
                panic!("layer 0 is MoE")
            };
            let (n, d) = (13, cfg.hidden_size);
            let h: Vec<f64> = init_params::<f64>(&specs[..1], 3).tensors[0].data[..n * d].to_vec();
            let (y, _) = ffn_fwd(&p, &index.layers[0].ffn, cfg.moe.as_ref(), &h, n, d, cfg.mlp_activation);
            for t in 0..n {
                let x = &h[t * d..(t + 1) * d];
                let logits: Vec<f64> = p.tensors[mi.router]
                    .data
                    .chunks(d)
                    .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
                    .collect();
                let z: f64 = logits.iter().map(|l| l.exp()).sum();
                let probs: Vec<f64> = logits.iter().map(|l| l.exp() / z).collect();
                let mut order: Vec<usize> = (0..5).collect();
                order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
                let top = &order[..2];
                let s: f64 = top.iter().map(|&e| probs[e]).sum();
                let mut want = vec![0.0; d];
                for &e in top {
                    let w = if norm { probs[e] / s } else { probs[e] };
                    naive_mlp(&p, mi.experts[e], x)
                        .iter()
                        .zip(want.iter_mut())
                        .for_each(|(v, o)| *o += w * v);
                }
                if let Some((sw, gi)) = mi.shared {
                    let g: f64 = p.tensors[gi].data.iter().zip(x).map(|(a, b)| a * b).sum();
                    let sg = 1.0 / (1.0 + (-g).exp());
                    naive_mlp(&p, sw, x)
                        .iter()
                        .zip(want.iter_mut())
                        .for_each(|(v, o)| *o += sg * v);
                }
                for (a, b) in y[t * d..(t + 1) * d].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-12, "token {t}: {a} vs {b}");
                }
            }
        }
    }
}
