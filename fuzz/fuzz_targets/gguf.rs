#![no_main]
//! GGUF reader: header, metadata, tensor infos, dequantisation, model config and tokenizer.
use gated_lm::io::gguf::{model_config, tokenizer, Gguf};
use gated_lm::io::st::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::from_bytes("fuzz", Bytes::Owned(data.to_vec())) {
        let _ = model_config(&g);
        let _ = tokenizer(&g);
        for t in g.tensors.clone() {
            let _ = g.f32(&t.name);
        }
    }
});
