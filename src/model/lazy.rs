//! Lazily loaded weights (issue 16): a quantised file (a memory-mapped GGUF) stays quantised,
//! and each decoder layer's tensors are dequantised into a scratch store right before the layer
//! runs, then dropped, so at most one layer's f32 weights exist at a time. The tensors outside
//! the layers (embedding, final norm, LM head) are in the model's `params` as usual.
//!
//! Only forwards run on a lazy model (`forward`, `forward_loss`, `decode`); a backward refuses
//! (gradients need every weight), and `materialize` dequantises everything when the memory
//! estimate allows it.

use super::params::{ParamStore, Tensor};
use super::Model;
use crate::real::Real;
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where a lazy model's layer tensors come from.
pub trait TensorSource: Send + Sync {
    /// Dequantise the tensors `idx` (indices into the model's specs), handing each to `put`
    /// with its f32 data (row-major, exactly as the eager load would have stored it).
    fn load(&self, idx: &[usize], put: &mut dyn FnMut(usize, Vec<f32>)) -> Result<()>;
    /// The file, for messages.
    fn name(&self) -> &str;
    /// Bytes of the quantised tensors (memory-mapped: shared with the page cache).
    fn quantised_bytes(&self) -> u128;
}

/// The lazy part of a model: the source, each layer's tensor indices, and counters.
pub struct LazyWeights {
    pub src: Box<dyn TensorSource>,
    /// Spec indices of each layer's tensors (`model.layers.{l}.*`).
    pub layers: Vec<Vec<usize>>,
    /// Layers dequantised so far.
    pub loads: AtomicUsize,
    /// Most bytes of layer weights alive at once in any scratch (the bound the tests check).
    pub peak_bytes: AtomicUsize,
}

impl LazyWeights {
    pub fn new(src: Box<dyn TensorSource>, names: &[String], num_layers: usize) -> Self {
        let layers = (0..num_layers)
            .map(|l| {
                let prefix = format!("model.layers.{l}.");
                (0..names.len()).filter(|&i| names[i].starts_with(&prefix)).collect()
            })
            .collect();
        LazyWeights {
            src,
            layers,
            loads: AtomicUsize::new(0),
            peak_bytes: AtomicUsize::new(0),
        }
    }
}

/// The reusable store one forward dequantises its layers into.
pub struct Scratch<T> {
    store: Option<ParamStore<T>>,
    layer: Option<usize>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch {
            store: None,
            layer: None,
        }
    }
}

/// `Vec<f32>` as `Vec<T>`: moved when T is f32 (bit-identical, no copy), converted otherwise.
fn cast_vec<T: Real>(v: Vec<f32>) -> Vec<T> {
    let b: Box<dyn std::any::Any> = Box::new(v);
    match b.downcast::<Vec<T>>() {
        Ok(v) => *v,
        Err(b) => {
            let v = b.downcast::<Vec<f32>>().expect("a Vec<f32>");
            v.iter().map(|&x| T::from_f64(x as f64)).collect()
        }
    }
}

impl<T: Real> Model<T> {
    /// Whether this model's layer weights stay quantised and are dequantised per layer.
    pub fn is_lazy(&self) -> bool {
        self.lazy.is_some()
    }

    /// A model whose layer tensors (empty in `params`) come from `lazy`; the others must be
    /// in `params` with their data.
    pub fn from_lazy(cfg: crate::config::ModelConfig, params: ParamStore<T>, lazy: LazyWeights) -> Result<Self> {
        let in_layer: std::collections::BTreeSet<usize> = lazy.layers.iter().flatten().copied().collect();
        if let Some(&i) = in_layer.iter().find(|&&i| !params.tensors[i].data.is_empty()) {
            bail!("{}: lazy tensor {} already has data", lazy.src.name(), params.names[i]);
        }
        let mut m = Model::from_params_except(cfg, params, &in_layer)?;
        m.lazy = Some(lazy);
        Ok(m)
    }

    /// What a layer op reads its weights from: a quantised model's current layer as
    /// [`Self::layer_params`] dequantised it into `scratch`, else the model's parameters.
    pub(crate) fn params_for_layer<'s>(&'s self, scratch: &'s Scratch<T>) -> &'s ParamStore<T> {
        match (&self.lazy, &scratch.store) {
            (Some(_), Some(s)) => s,
            _ => &self.params,
        }
    }

    /// The store layer `l` reads its weights from: `params` itself, or (lazy) `scratch` with
    /// layer `l` dequantised into it after the previous layer's weights were dropped.
    pub(crate) fn layer_params<'a>(&'a self, l: usize, scratch: &'a mut Scratch<T>) -> Result<&'a ParamStore<T>> {
        let Some(lz) = &self.lazy else {
            return Ok(&self.params);
        };
        let s = scratch.store.get_or_insert_with(|| ParamStore {
            names: self.params.names.clone(),
            tensors: self
                .params
                .tensors
                .iter()
                .map(|t| Tensor {
                    shape: t.shape.clone(),
                    data: Vec::new(),
                })
                .collect(),
        });
        if scratch.layer != Some(l) {
            if let Some(prev) = scratch.layer.take() {
                for &i in &lz.layers[prev] {
                    s.tensors[i].data = Vec::new();
                }
            }
            let mut err = None;
            lz.src.load(&lz.layers[l], &mut |i, v| {
                if v.len() != s.tensors[i].shape.iter().product::<usize>() {
                    err = Some(format!("{} has {} values", s.names[i], v.len()));
                }
                s.tensors[i].data = cast_vec(v);
            })?;
            if let Some(e) = err {
                bail!("{}: {e}, not the shape the config implies", lz.src.name());
            }
            let live: usize = s
                .tensors
                .iter()
                .map(|t| t.data.capacity() * std::mem::size_of::<T>())
                .sum();
            lz.peak_bytes.fetch_max(live, Ordering::Relaxed);
            lz.loads.fetch_add(1, Ordering::Relaxed);
            scratch.layer = Some(l);
        }
        Ok(s)
    }

    /// Memory a forward over `tokens` positions needs (`memory::prefill`, or for a lazy model
    /// the quantised file plus one layer's f32 weights: `memory::prefill_lazy`).
    pub fn prefill_need(&self, tokens: usize) -> super::memory::Need {
        let Some(lz) = &self.lazy else {
            return super::memory::prefill(&self.cfg, tokens);
        };
        let numel = |i: usize| self.params.tensors[i].shape.iter().product::<usize>() as u128;
        let eager: u128 = (0..self.params.tensors.len())
            .filter(|&i| !self.params.tensors[i].data.is_empty())
            .map(numel)
            .sum();
        let layer = lz
            .layers
            .iter()
            .map(|l| l.iter().map(|&i| numel(i)).sum())
            .max()
            .unwrap_or(0);
        super::memory::prefill_lazy(&self.cfg, tokens, lz.src.quantised_bytes(), eager, layer)
    }

    /// Dequantise every layer into `params` (the model is no longer lazy), refusing when the
    /// f32 weights would not fit in memory.
    pub fn materialize(&mut self, what: &str) -> Result<()> {
        let Some(lz) = self.lazy.take() else {
            return Ok(());
        };
        let bytes = super::memory::param_count(&self.cfg) * std::mem::size_of::<T>() as u128;
        let need = super::memory::Need::default().add("all weights dequantised", bytes);
        if let Err(e) = super::memory::ensure_fits(what, &need) {
            self.lazy = Some(lz);
            return Err(e);
        }
        let t = &mut self.params.tensors;
        if let Err(e) = lz
            .layers
            .iter()
            .try_for_each(|idx| lz.src.load(idx, &mut |i, v| t[i].data = cast_vec(v)))
        {
            // a broken layer: back to lazy, no half-filled store
            lz.layers.iter().flatten().for_each(|&i| t[i].data = Vec::new());
            self.lazy = Some(lz);
            return Err(e);
        }
        Ok(())
    }

    /// Generation dequantises every layer per token when lazy: materialise instead when all
    /// weights take at most half the memory available; stay lazy otherwise.
    pub fn materialize_if_small(&mut self) -> Result<bool> {
        let Some(avail) = super::memory::available() else {
            return Ok(false);
        };
        let bytes = super::memory::param_count(&self.cfg) * std::mem::size_of::<T>() as u128;
        if self.lazy.is_none() || 2 * bytes > avail {
            return Ok(false);
        }
        self.materialize("dequantising all weights")?;
        Ok(true)
    }

    /// The same weights under another config (RoPE overrides): the lazy source carries over.
    pub fn reconfigure(&mut self, cfg: crate::config::ModelConfig) -> Result<()> {
        let params = std::mem::replace(
            &mut self.params,
            ParamStore {
                names: vec![],
                tensors: vec![],
            },
        );
        let check_finite = self.check_finite;
        *self = match self.lazy.take() {
            Some(lz) => Model::from_lazy(cfg, params, lz)?,
            None => Model::from_params(cfg, params)?,
        };
        self.check_finite = check_finite;
        Ok(())
    }

    /// A backward needs every weight: refuse on a lazy model, saying what to do.
    pub(crate) fn refuse_lazy_training(&self) -> Result<()> {
        if let Some(lz) = &self.lazy {
            bail!(
                "{}: this model's weights are memory-mapped and dequantised one layer at a time, for \
                 forwards only (analysis, evaluation, generation); training or a backward needs all \
                 weights in f32: call Model::materialize first (refused when they do not fit), or \
                 convert the file to a model directory",
                lz.src.name()
            );
        }
        Ok(())
    }
}
