//! Seed corpora for the fuzzers: small llama GGUFs (byte-level BPE and SentencePiece
//! vocabularies) and a tokenizer.json.
use gated_lm::io::gguf::{write, GgmlType, Value};
use std::path::Path;

fn main() {
    let out = std::env::args().nth(1).expect("usage: make_fuzz_seeds OUT_DIR");
    let out = Path::new(&out);
    let map = gated_lm::io::tokenizer::bytes_to_unicode();
    let mut tokens: Vec<Value> = (0..256).map(|b| Value::Str(map[b].to_string())).collect();
    tokens.push(Value::Str("<|endoftext|>".into()));
    let meta = vec![
        ("general.architecture", Value::Str("llama".into())),
        ("llama.block_count", Value::U32(1)),
        ("llama.embedding_length", Value::U32(32)),
        ("llama.feed_forward_length", Value::U32(64)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("tokenizer.ggml.model", Value::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Arr(tokens)),
        ("tokenizer.ggml.merges", Value::Arr(vec![])),
        ("tokenizer.ggml.eos_token_id", Value::U32(256)),
    ];
    let t = |name: &str, shape: Vec<usize>, ty| {
        (
            name.to_string(),
            shape.clone(),
            ty,
            vec![0.25f32; shape.iter().product()],
        )
    };
    let tensors = vec![
        t("token_embd.weight", vec![257, 32], GgmlType::Q8_0),
        t("output_norm.weight", vec![32], GgmlType::F32),
        t("blk.0.attn_norm.weight", vec![32], GgmlType::F32),
        t("blk.0.attn_q.weight", vec![32, 32], GgmlType::Q4_0),
        t("blk.0.attn_k.weight", vec![16, 32], GgmlType::Q4_1),
        t("blk.0.attn_v.weight", vec![16, 32], GgmlType::F16),
        t("blk.0.attn_output.weight", vec![32, 32], GgmlType::BF16),
        t("blk.0.ffn_norm.weight", vec![32], GgmlType::F32),
        t("blk.0.ffn_gate.weight", vec![64, 32], GgmlType::Q8_0),
        t("blk.0.ffn_up.weight", vec![64, 32], GgmlType::Q8_0),
        t("blk.0.ffn_down.weight", vec![32, 64], GgmlType::Q8_0),
    ];
    std::fs::create_dir_all(out.join("gguf")).unwrap();
    write(&out.join("gguf/seed.gguf"), &meta, &tensors).unwrap();
    // the same model with a SentencePiece vocabulary: byte pieces, two merged pieces, BOS
    let mut pieces = vec![
        Value::Str("<unk>".into()),
        Value::Str("<s>".into()),
        Value::Str("</s>".into()),
    ];
    pieces.extend((0..=255u8).map(|b| Value::Str(format!("<0x{b:02X}>"))));
    pieces.extend(["▁", "a", "b", "▁a", "ab"].map(|p| Value::Str(p.into())));
    let n = pieces.len();
    let types = (0..n).map(|i| {
        Value::I32(if i < 3 {
            3
        } else if i < 259 {
            6
        } else {
            1
        })
    });
    let scores = (0..n).map(|i| Value::F32(-(i as f32)));
    let mut spm = meta[..6].to_vec();
    spm.extend([
        ("tokenizer.ggml.model", Value::Str("llama".into())),
        ("tokenizer.ggml.tokens", Value::Arr(pieces)),
        ("tokenizer.ggml.scores", Value::Arr(scores.collect())),
        ("tokenizer.ggml.token_type", Value::Arr(types.collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ]);
    let mut spm_tensors = tensors.clone();
    spm_tensors[0].1 = vec![n, 32];
    spm_tensors[0].3 = vec![0.25f32; n * 32];
    write(&out.join("gguf/seed-spm.gguf"), &spm, &spm_tensors).unwrap();
    std::fs::create_dir_all(out.join("tokenizer")).unwrap();
    gated_lm::io::tokenizer::Tok::Byte.save(&out.join("tokenizer")).unwrap();
}
