#![no_main]
//! Dequantisers of every ggml type we read, on arbitrary bytes: directly and as a one-tensor GGUF
//! (body in quants_body.rs, also run by tests/gguf_real.rs over a fixed corpus). Seeds:
//! `cargo fuzz run quants tests/fixtures/fuzz/quants` (from the repository root).
use libfuzzer_sys::fuzz_target;

#[path = "quants_body.rs"]
mod quants_body;

fuzz_target!(|data: &[u8]| quants_body::run(data));
