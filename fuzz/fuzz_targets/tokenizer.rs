#![no_main]
//! tokenizer.json loading (our wrapper over HF tokenizers) and use.
use gated_lm::train::tokenizer::Tok;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Tok::from_json(data, "fuzz") {
        if let Ok(ids) = t.encode("The quick brown fox, 12 jumps.") {
            let _ = t.decode(&ids);
        }
    }
});
