//! gated-lm: a transformer engine for gated-attention language models (Qiu et al., 2025).
//!
//! Layout, each module importing only those before it: `files`, `real`, `rng`, `config` →
//! `backend` (CPU kernels; the CUDA kernels, their launchers and the device runtime) → `model`
//! (the graph: parameter specs, ops as forward/backward pairs, layers, observers) → `optim` →
//! `engine` (where steps run: the CPU engine, the device-resident model) → `train`,
//! `analysis`, `infer`, `io`, `plot`, `cli`. See README "Architecture".

pub mod analysis;
pub mod backend;
pub mod cli;
pub mod config;
pub mod engine;
pub mod files;
pub mod infer;
pub mod io;
pub mod model;
pub mod optim;
pub mod plot;
pub mod real;
pub mod rng;
pub mod train;
