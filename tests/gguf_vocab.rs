//! GGUF tokenizers against llama.cpp: its own vocab test files (`tests/fixtures/gguf-real`, from
//! the llama-cpp-python 0.3.36 sdist, MIT) encode every test text to llama.cpp's expected ids,
//! one file per pre-tokenizer type that has one; the types without a file split text as their
//! llama.cpp regexes dictate.

use gated_lm::io::gguf::{tokenizer, write, Gguf, Value};
use gated_lm::io::pretok;
use gated_lm::io::tokenizer::{bytes_to_unicode, Tok};
use std::path::{Path, PathBuf};
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

fn real(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/gguf-real/ggml-vocab-{name}.gguf"))
}

/// llama.cpp's tokenizer test cases beside a vocab file: texts (`.inp`, each ended by a separator
/// line) and the expected ids (`.out`, one line per text).
fn vocab_cases(gguf: &Path) -> (Vec<String>, Vec<Vec<u32>>) {
    let inp = std::fs::read_to_string(gguf.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(gguf.with_extension("gguf.out")).unwrap();
    let mut texts: Vec<String> = inp.split("\n__ggml_vocab_test__\n").map(String::from).collect();
    assert_eq!(texts.pop().as_deref(), Some("")); // the last text ends with the separator too
    let want: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert!(
        texts.len() >= 30 && texts.len() == want.len(),
        "{} texts, {} outputs",
        texts.len(),
        want.len()
    );
    (texts, want)
}

/// The GGUF's embedded tokenizer encodes every test text of `cases` to llama.cpp's ids, and
/// decodes them back; the number of texts checked.
fn check(g: &Gguf, cases: &Path) -> usize {
    let tok = tokenizer(g).unwrap();
    let (texts, want) = vocab_cases(cases);
    let mut bad = vec![];
    for (t, w) in texts.iter().zip(&want) {
        let got = tok.encode(t).unwrap();
        if &got != w {
            bad.push(format!("{t:?}\n  llama.cpp {w:?}\n  ours      {got:?}"));
        }
        assert_eq!(tok.decode(w), **t);
    }
    assert!(
        bad.is_empty(),
        "{}: {} of {} texts differ:\n{}",
        g.path,
        bad.len(),
        texts.len(),
        bad.join("\n")
    );
    texts.len()
}

/// `name`'s vocab file has pre-tokenizer `pre` and its embedded tokenizer reproduces llama.cpp.
fn real_vocab(name: &str, pre: Option<&str>) {
    let g = Gguf::open(&real(name)).unwrap();
    assert_eq!(g.meta.get("tokenizer.ggml.pre").and_then(Value::as_str), pre);
    let n = check(&g, &real(name));
    eprintln!("{name}: {n} texts as llama.cpp");
}

#[test]
fn gpt2() {
    real_vocab("gpt-2", Some("gpt-2"));
}

#[test]
fn llama_bpe() {
    real_vocab("llama-bpe", Some("llama-bpe"));
    // Llama 3 prompts start with <|begin_of_text|> (llama.cpp's add_bos for llama3)
    let tok = tokenizer(&Gguf::open(&real("llama-bpe")).unwrap()).unwrap();
    let ids = tok.encode_for_model("Hello").unwrap();
    assert_eq!(ids, [128000, 9906]);
}

#[test]
fn qwen2() {
    real_vocab("qwen2", Some("qwen2"));
}

/// llama.cpp's qwen35 vocab file is its qwen2 file with `tokenizer.ggml.pre` = "qwen35" (byte for
/// byte otherwise): only its test texts are vendored, run on the qwen2 file so named.
#[test]
fn qwen35() {
    let mut g = Gguf::open(&real("qwen2")).unwrap();
    g.meta.insert("tokenizer.ggml.pre".into(), Value::Str("qwen35".into()));
    let n = check(&g, &real("qwen35"));
    eprintln!("qwen35: {n} texts as llama.cpp");
}

#[test]
fn deepseek_llm() {
    real_vocab("deepseek-llm", Some("deepseek-llm"));
}

#[test]
fn deepseek_coder() {
    real_vocab("deepseek-coder", Some("deepseek-coder"));
}

#[test]
fn falcon() {
    real_vocab("falcon", Some("falcon"));
}

#[test]
fn starcoder() {
    real_vocab("starcoder", Some("starcoder"));
}

#[test]
fn mpt() {
    real_vocab("mpt", Some("mpt"));
}

#[test]
fn refact() {
    real_vocab("refact", Some("refact"));
}

#[test]
fn command_r() {
    real_vocab("command-r", Some("command-r"));
}

/// llama.cpp's real SentencePiece (llama 1/2) vocab GGUF: dummy prefix, "▁" spaces, byte fallback.
#[test]
fn llama_spm() {
    real_vocab("llama-spm", Some("default"));
    // prompts and analysed text start with <s>, as the file's add_bos_token asks
    let tok = tokenizer(&Gguf::open(&real("llama-spm")).unwrap()).unwrap();
    assert_eq!(tok.encode_for_model("Hello world").unwrap(), [1, 15043, 3186]);
}

/// Phi-3's vocabulary is SentencePiece too (llama.cpp's `llama` model, pre "default").
#[test]
fn phi3() {
    let g = Gguf::open(&real("phi-3")).unwrap();
    assert_eq!(g.get("tokenizer.ggml.model").unwrap().as_str(), Some("llama"));
    real_vocab("phi-3", Some("default"));
}

/// How the GGUF tokenizer for pre-tokenizer `pre` splits `text`, from a tiny byte-level GGUF.
fn pieces(pre: &str, text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.gguf");
    let map = bytes_to_unicode();
    let mut tokens: Vec<Value> = (0..256).map(|b| Value::Str(map[b].to_string())).collect();
    tokens.push(Value::Str("<|endoftext|>".into()));
    let meta = [
        ("tokenizer.ggml.model", Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Value::Str(pre.into())),
        ("tokenizer.ggml.tokens", Value::Arr(tokens)),
        ("tokenizer.ggml.merges", Value::Arr(vec![])),
        ("tokenizer.ggml.eos_token_id", Value::U32(256)),
    ];
    write(&p, &meta, &[]).unwrap();
    let tok = tokenizer(&Gguf::open(&p).unwrap()).unwrap();
    let Tok::Hf { tok, .. } = tok else { unreachable!() };
    let mut s = PreTokenizedString::from(text);
    tok.get_pre_tokenizer().unwrap().pre_tokenize(&mut s).unwrap();
    let unmap = |piece: &str| {
        let bytes: Vec<u8> = piece
            .chars()
            .map(|c| map.iter().position(|&m| m == c).unwrap() as u8)
            .collect();
        String::from_utf8(bytes).unwrap()
    };
    s.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(piece, _, _)| unmap(piece))
        .collect()
}

fn split(pre: &str, text: &str, want: &[&str]) {
    assert_eq!(pieces(pre, text), want, "{pre}: {text:?}");
}

#[test]
fn every_supported_pre_tokenizer_builds_and_splits_losslessly() {
    let text = "Hello World's 1234567 x  \n\n  café ÄÖ日本語 3.14 --> `a`\t!";
    for pre in pretok::SUPPORTED {
        let p = pieces(pre, text);
        assert_eq!(p.concat(), text, "{pre}");
        assert!(p.iter().all(|x| !x.is_empty()), "{pre}: {p:?}");
    }
}

#[test]
fn types_without_a_test_file_split_as_their_regexes_say() {
    // digits: one at a time (smollm, tekken, qwen2), up to three (llama3, gpt-4o, deepseek-v3),
    // every run (gpt-2, olmo), three from the left after runs (falcon), three from the right
    split("smollm", "12345", &["1", "2", "3", "4", "5"]);
    split("smollm", "a 12 b", &["a", " ", "1", "2", " b"]);
    split("tekken", "x 12345", &["x", " ", "1", "2", "3", "4", "5"]);
    split("gpt-4o", "12345", &["123", "45"]);
    split("llama3", "12345", &["123", "45"]);
    split("deepseek-v3", "12345", &["123", "45"]);
    split("olmo", "12345 x", &["12345", " x"]);
    split("superbpe", "1234567", &["1", "234", "567"]);
    split("minicpm5", "1234567", &["123", "456", "7"]);
    // camel case: gpt-4o and tekken split before a capital, contractions stay on (gpt-4o)
    split("gpt-4o", "HelloWorld's XMLHttp", &["Hello", "World's", " XMLHttp"]);
    split("tekken", "HelloWorld's", &["Hello", "World", "'s"]);
    // llama.cpp has no case outside ASCII: "éÉ" (lower, upper) is one word, "ÉtéCafé" splits at C
    split("gpt-4o", "éÉ", &["éÉ"]);
    split("gpt-4o", "ÉtéCafé", &["Été", "Café"]);
    // youtu's \p{Lu}/\p{Ll} are letters all alike on llama.cpp's engine: no camel-case split
    split("youtu", "HelloWorld's", &["HelloWorld's"]);
    // deepseek-v3: CJK runs apart, a punctuation mark leads an ASCII word
    split("deepseek-v3", "日本語abc.def", &["日本語", "abc", ".def"]);
    // olmo is GPT-2's regex: "'s" apart, spaces before a word stay on it
    split("olmo", "it's  ok", &["it", "'s", " ", " ok"]);
    // bloom/poro: words with their leading space, punctuation alone
    split("bloom", "Hi, there!", &["Hi", ",", " there", "!"]);
    // chameleon: punctuation isolated, digits one at a time
    split("chameleon", "a.b 12", &["a", ".", "b", " ", "1", "2"]);
    // exaone-moe: words joined by single spaces are one piece
    split("exaone-moe", "one two, 3", &["one two", ",", " ", "3"]);
    // laguna: lines first
    split("laguna", "a\n\nb", &["a", "\n\n", "b"]);
    // seed-coder: punctuation never takes a newline
    split("seed-coder", "x;\n", &["x", ";", "\n"]);
    // default (also a vocabulary without the key): punctuation runs and digit triples apart
    split("default", "a.b 12345", &["a", ".", "b", " ", "123", "45"]);
}

#[test]
fn an_unknown_or_unsupported_pre_tokenizer_is_a_clear_error() {
    for pre in ["some-new-pre", "kimi-k2", "gemma4"] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.gguf");
        let meta = [
            ("tokenizer.ggml.model", Value::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Value::Str(pre.into())),
            ("tokenizer.ggml.tokens", Value::Arr(vec![Value::Str("a".into())])),
            ("tokenizer.ggml.merges", Value::Arr(vec![])),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ];
        write(&p, &meta, &[]).unwrap();
        let e = format!("{:#}", tokenizer(&Gguf::open(&p).unwrap()).err().unwrap());
        assert!(e.contains(&format!("'{pre}'")) && e.contains("--tokens"), "{e}");
    }
}
