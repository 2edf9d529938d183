//! gated-lm: a transformer engine for gated-attention language models (Qiu et al., 2025).
//!
//! Layout: `config` → `model` (ops as forward/backward pairs, layers, observers) → `backend`
//! kernels (cpu) → `optim`, `io` (HF safetensors layouts), `cli`.

pub mod analysis;
pub mod backend;
pub mod cli;
pub mod config;
pub mod infer;
pub mod io;
pub mod model;
pub mod optim;
pub mod plot;
pub mod real;
pub mod rng;
pub mod train;
