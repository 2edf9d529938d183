//! Inference: sampling, streamed generation with a KV cache, perplexity (sliding-window and
//! streaming with a bounded cache), and RULER-style long-context tasks.

pub mod ruler;

use crate::model::decode::KvCache;
use crate::model::observer::NoObserver;
use crate::model::ops::cross_entropy::{cross_entropy, IGNORE};
use crate::model::{Batch, Model};
use crate::rng::Rng;
use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// 0 = greedy
    pub temperature: f64,
    /// 0 = off
    pub top_k: usize,
    /// 1 = off
    pub top_p: f64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// Draw the next token from `logits` (one row).
pub fn sample(logits: &[f32], o: &SampleOptions, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32
    };
    if o.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if o.top_k > 0 {
        idx.truncate(o.top_k);
    }
    let m = logits[idx[0]] as f64;
    let mut p: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - m) / o.temperature).exp())
        .collect();
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);
    if o.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = p.iter().position(|&x| {
            acc += x;
            acc >= o.top_p
        });
        let keep = keep.map(|k| k + 1).unwrap_or(p.len());
        p.truncate(keep);
        idx.truncate(keep);
        let t: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= t);
    }
    let mut u = rng.uniform();
    for (k, &pk) in p.iter().enumerate() {
        if u < pk {
            return idx[k] as u32;
        }
        u -= pk;
    }
    idx[p.len() - 1] as u32
}

/// Generate up to `max_new` tokens after `prompt`; `on_token` sees each as it is produced.
/// Stops at `stop` (EOS) if given. Returns the generated ids.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Model<f32>,
    cache: &mut KvCache<f32>,
    prompt: &[u32],
    max_new: usize,
    o: &SampleOptions,
    seed: u64,
    stop: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("empty prompt");
    }
    let vocab = model.cfg.vocab_size;
    let mut rng = Rng::new(seed);
    // prefill in chunks that fit the window
    let chunk = cache
        .window
        .map(|w| (w - cache.sinks - 1).max(1))
        .unwrap_or(prompt.len());
    let mut logits = Vec::new();
    for c in prompt.chunks(chunk) {
        logits = model.decode(cache, c)?;
    }
    let mut last = logits[logits.len() - vocab..].to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let t = sample(&last, o, &mut rng);
        if Some(t) == stop {
            break;
        }
        out.push(t);
        on_token(t);
        last = model.decode(cache, &[t])?;
    }
    Ok(out)
}

/// Perplexity with overlapping windows of `context` tokens advanced by `stride` (each token is
/// scored once, with up to `context − 1` tokens of history). Returns (mean NLL, scored tokens).
pub fn perplexity_sliding(model: &Model<f32>, ids: &[u32], context: usize, stride: usize) -> Result<(f64, usize)> {
    if context < 2 || stride == 0 || stride > context {
        bail!("need context ≥ 2 and 0 < stride ≤ context");
    }
    if ids.len() < 2 {
        bail!("need at least 2 tokens");
    }
    let (mut nll, mut count, mut scored_to) = (0.0, 0usize, 0usize);
    let mut start = 0;
    loop {
        let end = (start + context).min(ids.len());
        let w = &ids[start..end];
        // targets: next token, scored only past what earlier windows already scored
        let mut tg = vec![IGNORE; w.len()];
        for i in 0..w.len() - 1 {
            if start + i + 1 > scored_to {
                tg[i] = w[i + 1];
            }
        }
        let n = tg.iter().filter(|&&t| t != IGNORE).count();
        if n > 0 {
            let loss = model.forward_loss(
                &Batch {
                    ids: w,
                    targets: &tg,
                    batch: 1,
                    seq: w.len(),
                },
                &mut NoObserver,
            )?;
            nll += loss * n as f64;
            count += n;
        }
        scored_to = end - 1;
        if end == ids.len() {
            break;
        }
        start += stride;
    }
    Ok((nll / count.max(1) as f64, count))
}

/// Perplexity feeding tokens one at a time through a bounded KV cache (`window`, keeping the
/// first `sinks`), as a streaming deployment would. Returns (mean NLL, scored tokens).
pub fn perplexity_streaming(
    model: &Model<f32>,
    ids: &[u32],
    window: Option<usize>,
    sinks: usize,
) -> Result<(f64, usize)> {
    if ids.len() < 2 {
        bail!("need at least 2 tokens");
    }
    let mut cache = KvCache::new(model, window, sinks)?;
    let vocab = model.cfg.vocab_size;
    let mut nll = 0.0;
    for i in 0..ids.len() - 1 {
        let mut l = model.decode(&mut cache, &ids[i..i + 1])?;
        nll += cross_entropy(&mut l, vocab, &ids[i + 1..i + 2], false);
    }
    Ok((nll / (ids.len() - 1) as f64, ids.len() - 1))
}
