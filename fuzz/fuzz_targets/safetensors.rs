#![no_main]
//! safetensors reader: header parsing, dtype conversion, id validation.
use gated_lm::io::st::{Bytes, StFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = StFile::from_bytes("fuzz", Bytes::Owned(data.to_vec())) {
        for n in f.names().unwrap_or_default() {
            let _ = f.f32(&n);
            let _ = f.ids(&n);
        }
    }
});
