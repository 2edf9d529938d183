//! `gated-lm analyze`: the paper's measurements on any model we can load.

use super::probes::{SinkProbe, SinkStats};
use crate::io::load::Loaded;
use crate::model::observer::Observer;
use crate::model::{shifted_targets, Batch, Model};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Serialize, Debug)]
pub struct Analysis {
    pub model: String,
    pub gate: String,
    pub tokens: usize,
    pub loss: f64,
    pub perplexity: f64,
    #[serde(flatten)]
    pub stats: SinkStats,
}

/// Metrics over one sequence of ids (streamed layer by layer: no T×T maps are kept).
pub fn analyze(l: &Loaded, ids: &[u32], epsilon: f64) -> Result<Analysis> {
    let m = &l.model;
    let t = ids.len();
    if t < 2 {
        bail!("need at least 2 tokens to analyse, got {t}");
    }
    let tg = shifted_targets(ids, t);
    let mut probe = SinkProbe::new(m.cfg.num_layers, m.cfg.num_heads, 1, t, epsilon);
    let loss = m.forward_loss(
        &Batch {
            ids,
            targets: &tg,
            batch: 1,
            seq: t,
        },
        &mut probe,
    )?;
    Ok(Analysis {
        model: l.source.clone(),
        gate: m.cfg.gate.as_ref().map(|g| g.spec()).unwrap_or_else(|| "none".into()),
        tokens: t,
        loss,
        perplexity: loss.exp(),
        stats: probe.stats(),
    })
}

/// Keeps the attention maps of the chosen (layer, head) pairs.
struct MapProbe {
    want: Vec<(usize, usize)>,
    heads: usize,
    seq: usize,
    maps: Vec<(usize, usize, Vec<f32>)>,
}

impl Observer<f32> for MapProbe {
    fn wants_attn_probs(&self, layer: usize) -> bool {
        self.want.iter().any(|&(l, _)| l == layer)
    }
    fn attn_probs(&mut self, layer: usize, probs: &[f32]) {
        let tt = self.seq * self.seq;
        for &(l, h) in self.want.iter().filter(|(l, h)| *l == layer && *h < self.heads) {
            self.maps.push((l, h, probs[h * tt..(h + 1) * tt].to_vec()));
        }
    }
}

/// Attention maps over the first `n` tokens. Causal attention of positions < n depends only on
/// tokens < n, so a forward on the prefix gives exactly the top-left block of the full maps.
pub fn attention_maps(
    m: &Model<f32>,
    ids: &[u32],
    n: usize,
    want: Vec<(usize, usize)>,
) -> Result<Vec<(usize, usize, Vec<f32>)>> {
    let t = n.min(ids.len());
    let tg = shifted_targets(&ids[..t], t);
    let mut probe = MapProbe {
        want,
        heads: m.cfg.num_heads,
        seq: t,
        maps: vec![],
    };
    m.forward_loss(
        &Batch {
            ids: &ids[..t],
            targets: &tg,
            batch: 1,
            seq: t,
        },
        &mut probe,
    )?;
    Ok(probe.maps)
}

/// Token ids from `--tokens` (safetensors `input_ids`, first row), `--text`, `--prompt`, or the
/// embedded books.
pub fn input_ids(
    l: &Loaded,
    tokens: Option<&Path>,
    text: Option<&Path>,
    prompt: Option<&str>,
    max: usize,
) -> Result<Vec<u32>> {
    let mut ids = if let Some(p) = tokens {
        let st = crate::io::st::StFile::open(p)?;
        let (shape, ids) = st.ids("input_ids")?;
        let row = *shape.last().unwrap_or(&0);
        ids[..row.min(ids.len())].to_vec()
    } else {
        let tok = l.tokenizer()?;
        let s = match (text, prompt) {
            (Some(f), _) => {
                std::fs::read_to_string(f).with_context(|| format!("cannot read {} as UTF-8 text", f.display()))?
            }
            (None, Some(p)) => p.to_string(),
            // a window of the embedded books, well into the text (past the title pages)
            (None, None) => crate::io::text::embedded_corpus()?[0]
                .chars()
                .skip(200_000)
                .take(max * 8)
                .collect(),
        };
        tok.encode_for_model(&s)?
    };
    ids.truncate(max);
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= l.model.cfg.vocab_size) {
        bail!(
            "token id {bad} is outside the model's vocabulary ({})",
            l.model.cfg.vocab_size
        );
    }
    Ok(ids)
}
