#![no_main]
//! tokenizer.json loading (our wrapper over HF tokenizers) and use.
use gated_lm::io::tokenizer::Tok;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Tok::from_json contains the tokenizers crate's own panics and reports them as errors;
    // libfuzzer-sys's hook would abort on those caught panics, so restore a plain hook once.
    // A panic in our code still aborts: it reaches the extern "C" boundary uncaught.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    if let Ok(t) = Tok::from_json(data, "fuzz") {
        if let Ok(ids) = t.encode("The quick brown fox, 12 jumps.") {
            let _ = t.decode(&ids);
        }
    }
});
