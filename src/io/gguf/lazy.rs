//! A GGUF loaded lazily (issue 16): the file stays memory-mapped and quantised; the tensors
//! outside the decoder layers (token embedding, final norm, output head) are dequantised at
//! load, and each layer's tensors when the forward reaches it (`model::lazy`), through the same
//! `Reader` as the eager load, so both give the same f32 values bit for bit.

use super::{model_config, tokenizer, Gguf, Reader};
use crate::config::ModelConfig;
use crate::io::tokenizer::Tok;
use crate::model::lazy::{LazyWeights, TensorSource};
use crate::model::params::{param_specs, ParamSpec, ParamStore, Tensor};
use crate::model::Model;
use anyhow::Result;
use std::path::Path;

struct GgufSource {
    g: Gguf,
    cfg: ModelConfig,
    specs: Vec<ParamSpec>,
}

impl TensorSource for GgufSource {
    fn load(&self, idx: &[usize], put: &mut dyn FnMut(usize, Vec<f32>)) -> Result<()> {
        let mut r = Reader::new(&self.g, &self.cfg)?;
        for &i in idx {
            put(i, r.read(&self.specs[i])?.data);
        }
        Ok(())
    }
    fn name(&self) -> &str {
        &self.g.path
    }
    fn quantised_bytes(&self) -> u128 {
        self.g.tensors.iter().map(|t| t.bytes as u128).sum()
    }
}

/// Load a GGUF with its layer weights left quantised in the mapped file (see the module doc),
/// and its tokenizer or why it cannot be built.
pub fn load_gguf_lazy(path: &Path) -> Result<(Model<f32>, Result<Tok>)> {
    let g = Gguf::open(path)?;
    let cfg = model_config(&g)?;
    let (specs, _) = param_specs(&cfg);
    let tok = tokenizer(&g);
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let mut params = ParamStore {
        names: names.clone(),
        tensors: specs
            .iter()
            .map(|s| Tensor {
                shape: s.shape.clone(),
                data: Vec::new(),
            })
            .collect(),
    };
    let layers = cfg.num_layers;
    let src = GgufSource {
        g,
        cfg: cfg.clone(),
        specs,
    };
    let lazy = LazyWeights::new(Box::new(src), &names, layers);
    let in_layer: std::collections::BTreeSet<usize> = lazy.layers.iter().flatten().copied().collect();
    let eager: Vec<usize> = (0..names.len()).filter(|i| !in_layer.contains(i)).collect();
    let t = &mut params.tensors;
    lazy.src.load(&eager, &mut |i, v| t[i].data = v)?;
    Ok((Model::from_lazy(cfg, params, lazy)?, tok))
}
