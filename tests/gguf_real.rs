//! GGUF files made by llama.cpp's own tools, not by our writer (tests/fixtures/gen_gguf_real.py,
//! tests/fixtures/gguf-models): `convert_hf_to_gguf.py` of tiny random transformers models per
//! architecture against transformers' float32 logits; `llama-quantize` K-quant / IQ4_XS / Q5_0 /
//! Q8_0 files against the `gguf` package's dequantisation and the float32 model's logits; the
//! dequantisers under arbitrary bytes (the `quants` fuzz target's body over a fixed corpus); and
//! malformed variants of these files, each a clear error naming the file and the problem.

use gated_lm::io::gguf::{load_gguf_model, model_config, tokenizer, GgmlType, Gguf, Value};
use gated_lm::io::st::{Bytes, StFile};
use std::path::Path;

mod ggufutil;
#[path = "../fuzz/fuzz_targets/quants_body.rs"]
mod quants_body;

use ggufutil::{compare, forward, fx};

const ARCHS: [&str; 4] = ["llama", "qwen2", "qwen3", "qwen3moe"];
const QUANTS: [&str; 8] = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS", "Q5_0", "Q8_0"];

/// transformers' input ids and float32 logits for model `m`: (ids, batch, seq, logits).
fn golden(m: &str) -> (Vec<u32>, usize, usize, Vec<f32>) {
    ggufutil::golden("golden.safetensors", m, &format!("logits.{m}"))
}

fn oracle() -> serde_json::Value {
    let p = fx("oracle.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

#[test]
fn converted_models_give_transformers_logits() {
    // The F16 files hold the checkpoints' weights exactly (the generator rounds them to f16 before
    // transformers runs): only float32 summation order differs, so the bound is the fixtures'
    // float32-engine bound (1e-4 of the largest logit); measured errors are ~1e-6.
    for arch in ARCHS {
        let (m, tok) = load_gguf_model(&fx(&format!("{arch}.gguf"))).unwrap();
        let (ids, b, t, want) = golden(arch);
        let got = forward(&m, &ids, b, t);
        let (err, agree) = compare(&got, &want, m.cfg.vocab_size);
        eprintln!("{arch}: max |logit error| {err:.2e} of the largest logit, argmax agreement {agree}");
        assert!(err < 1e-4, "{arch}: logits off by {err} of their scale");
        assert_eq!(agree, 1.0, "{arch}");
        // the embedded tokenizer (SentencePiece for llama, Qwen2 byte-level BPE otherwise) encodes
        // the sample text to the ids of the tokenizer convert read
        let o = &oracle()["models"][arch];
        let want: Vec<u32> = o["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(o["text"].as_str().unwrap()).unwrap();
        assert_eq!(got, want, "{arch}: tokenizer");
    }
}

#[test]
fn converted_model_configs_are_read() {
    for arch in ARCHS {
        let g = Gguf::open(&fx(&format!("{arch}.gguf"))).unwrap();
        let c = model_config(&g).unwrap();
        assert_eq!(
            (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
            (64, 2, 4, 2, 16),
            "{arch}"
        );
        assert_eq!(c.qk_norm, arch.starts_with("qwen3"), "{arch}");
        assert_eq!(c.attention_bias, arch == "qwen2", "{arch}");
        assert_eq!(c.moe.is_some(), arch == "qwen3moe", "{arch}");
        assert!((c.rms_norm_eps - 1e-6).abs() < 1e-12, "{arch}: eps {}", c.rms_norm_eps);
        // convert writes matrices F16, 1-D tensors (and the MoE router) F32
        for t in &g.tensors {
            let want = if t.dims.len() == 1 || t.name.ends_with("ffn_gate_inp.weight") {
                GgmlType::F32
            } else {
                GgmlType::F16
            };
            assert_eq!(t.ty, want, "{arch}: {}", t.name);
        }
    }
}

/// The position-weighted checksum of f32 bit patterns gen_gguf_real.py writes.
fn checksum(x: &[f32]) -> u64 {
    x.iter().enumerate().fold(0u64, |a, (i, v)| {
        a.wrapping_add((v.to_bits() as u64).wrapping_mul(2 * i as u64 + 1))
    })
}

#[test]
fn llama_quantize_files_dequantize_like_the_gguf_package() {
    let o = oracle();
    for q in QUANTS {
        let g = Gguf::open(&fx(&format!("q/qwen3-256.{q}.gguf"))).unwrap();
        let tensors = o["quants"][q].as_array().unwrap();
        assert_eq!(tensors.len(), g.tensors.len(), "{q}");
        let mut types = std::collections::BTreeSet::new();
        for t in tensors {
            let name = t["name"].as_str().unwrap();
            let info = g.info(name).unwrap_or_else(|| panic!("{q}: no {name}"));
            assert_eq!(format!("{:?}", info.ty), t["type"].as_str().unwrap(), "{q}: {name}");
            types.insert(format!("{:?}", info.ty));
            let dims: Vec<u64> = t["dims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            assert_eq!(info.dims, dims, "{q}: {name}");
            let (_, x) = g.f32(name).unwrap();
            assert_eq!(x.len() as u64, t["n"].as_u64().unwrap(), "{q}: {name}");
            let head: Vec<f32> = t["head"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(&x[..head.len()], &head[..], "{q}: {name}: first values");
            let want: u64 = t["checksum"].as_str().unwrap().parse().unwrap();
            assert_eq!(
                checksum(&x),
                want,
                "{q}: {name}: not bit for bit the gguf package's values"
            );
            let sum: f64 = x.iter().map(|&v| v as f64).sum();
            let ws = t["sum"].as_f64().unwrap();
            assert!(
                (sum - ws).abs() <= 1e-9 * (1.0 + ws.abs()),
                "{q}: {name}: sum {sum} vs {ws}"
            );
        }
        eprintln!("{q}: tensor types {types:?}");
    }
}

#[test]
fn quantised_models_give_transformers_logits_and_stay_near_the_f32_model() {
    let (ids, b, t, f32_logits) = golden("qwen3-256");
    let st = StFile::open(&fx("golden.safetensors")).unwrap();
    // Quantisation error: max |quantised − f32 logit| / max |f32 logit|, and argmax agreement over
    // the 24 positions. The bounds are 1.5x the errors measured (Q8_0 0.024, Q6_K 0.068, Q5_K_M
    // 0.124, Q5_0 0.194, Q4_K_M 0.233, IQ4_XS 0.230, Q3_K_M 0.420, Q2_K 0.858) and the agreement
    // ~0.15 under what was measured: a random model's logits are flat (many near-ties), so every
    // matrix's quantisation noise shows. The f32 model's logits are transformers' (the converted
    // f32 file is not kept: see gen_gguf_real.py). The exact check, first, pins the dequantisers.
    for (q, tol, min_agree) in [
        ("Q8_0", 0.036, 0.75),
        ("Q6_K", 0.10, 0.6),
        ("Q5_K_M", 0.19, 0.7),
        ("Q5_0", 0.29, 0.65),
        ("Q4_K_M", 0.35, 0.55),
        ("IQ4_XS", 0.35, 0.45),
        ("Q3_K_M", 0.63, 0.4),
        ("Q2_K", 1.3, 0.2),
    ] {
        let (m, _) = load_gguf_model(&fx(&format!("q/qwen3-256.{q}.gguf"))).unwrap();
        let got = forward(&m, &ids, b, t);
        // exact reference: transformers on the weights the gguf package dequantises from this file
        let exact = st.f32(&format!("logits.qwen3-256.{q}")).unwrap().data;
        let (e0, a0) = compare(&got, &exact, m.cfg.vocab_size);
        let (err, agree) = compare(&got, &f32_logits, m.cfg.vocab_size);
        let rms = |v: &[f32]| (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        let diff: Vec<f32> = got.iter().zip(&f32_logits).map(|(a, b)| a - b).collect();
        eprintln!(
            "{q}: vs transformers on the dequantised weights {e0:.2e}; quantisation error {err:.3e} of the largest logit (rms {:.3e} of the logits' rms), argmax agreement with f32 {agree:.3}",
            rms(&diff) / rms(&f32_logits)
        );
        assert!(e0 < 1e-4, "{q}: logits off the dequantised model's by {e0}");
        assert_eq!(a0, 1.0, "{q}");
        assert!(
            err <= tol,
            "{q}: logits off the f32 model's by {err} of their scale (bound {tol})"
        );
        assert!(
            agree >= min_agree,
            "{q}: argmax agrees with the f32 model at only {agree} of positions"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// the `quants` fuzz target's body over a fixed corpus

/// xorshift64*: deterministic bytes.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

#[test]
fn quants_fuzz_body_over_a_fixed_corpus() {
    use gated_lm::io::quants::SUPPORTED;
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    // the cargo-fuzz seeds (tests/fixtures/fuzz/quants: real blocks of every type)
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/quants");
    let mut names: Vec<_> = std::fs::read_dir(&seeds).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    assert_eq!(names.len(), SUPPORTED.len(), "one seed per type in {}", seeds.display());
    for p in &names {
        let s = std::fs::read(p).unwrap();
        // every prefix (ragged tails) and a few row counts (rows that do not divide: a clean error)
        for cut in 0..=s.len() {
            corpus.push(s[..cut].to_vec());
        }
        for rows in [0u8, 2, 3, 7, 8, 255] {
            let mut v = s.clone();
            v[1] = rows;
            corpus.push(v);
        }
    }
    // every type: zeros, all-ones (NaN scales), infinities, and noise, 1 to 3 blocks and ragged
    for (i, ty) in SUPPORTED.iter().enumerate() {
        let bytes = ty.block().1 as usize;
        for len in [bytes, 2 * bytes + 1, 3 * bytes] {
            for fill in [0x00u8, 0xFF, 0x7C, 0x80] {
                let mut v = vec![i as u8, 1];
                v.extend(std::iter::repeat_n(fill, len));
                corpus.push(v);
            }
            for seed in 0..8 {
                let mut v = vec![i as u8, seed as u8];
                v.extend(noise(seed * 31 + i as u64, len));
                corpus.push(v);
            }
        }
    }
    for input in &corpus {
        quants_body::run(input);
    }
    eprintln!("{} inputs", corpus.len());
}

// ---------------------------------------------------------------------------------------------
// malformed files: a clear error naming the file and the problem, never a panic

/// Where tensor `name`'s info lies in a GGUF header: the position of its dimension count.
fn info_pos(b: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend(name.as_bytes());
    let at = b.windows(key.len()).position(|w| w == key).unwrap();
    at + key.len()
}

/// (dims position, type position, offset position) of tensor `name`'s info.
fn info_fields(b: &[u8], name: &str) -> (usize, usize, usize) {
    let p = info_pos(b, name);
    let nd = u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as usize;
    (p + 4, p + 4 + 8 * nd, p + 8 + 8 * nd)
}

/// The start of the data section (alignment 32: llama.cpp's default, which these files keep).
fn data_start(b: &[u8], g: &Gguf) -> usize {
    let end = g.tensors.iter().map(|t| info_fields(b, &t.name).2 + 8).max().unwrap();
    end.div_ceil(32) * 32
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn err_of(name: &str, b: Vec<u8>) -> String {
    match Gguf::from_bytes(name, Bytes::Owned(b)) {
        Ok(_) => panic!("{name}: accepted"),
        Err(e) => format!("{e:#}"),
    }
}

fn q4km() -> (Vec<u8>, Gguf) {
    let p = fx("q/qwen3-256.Q4_K_M.gguf");
    (std::fs::read(&p).unwrap(), Gguf::open(&p).unwrap())
}

#[test]
fn truncated_k_quant_tensor_data_is_refused_by_name() {
    let (b, g) = q4km();
    let t = g
        .tensors
        .iter()
        .find(|t| t.ty == GgmlType::Q4_K)
        .expect("a Q4_K tensor");
    let end = data_start(&b, &g) + t.offset as usize + t.bytes as usize / 2;
    let e = err_of("cut.gguf", b[..end].to_vec());
    assert!(
        e.starts_with(&format!(
            "cut.gguf: tensor '{}' (offset {}, {} bytes) lies past the end of the file",
            t.name, t.offset, t.bytes
        )),
        "{e}"
    );
    // on disk too: the path is named
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.gguf");
    std::fs::write(&p, &b[..end]).unwrap();
    let e = format!("{:#}", load_gguf_model(&p).err().unwrap());
    assert!(
        e.contains(&p.display().to_string()) && e.contains("lies past the end of the file"),
        "{e}"
    );
}

#[test]
fn a_row_length_that_is_not_a_multiple_of_the_block_is_refused() {
    let (b, g) = q4km();
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
        let Some(t) = g.tensors.iter().find(|t| t.ty == ty && t.dims.len() == 2) else {
            continue;
        };
        let mut m = b.clone();
        let (dims, _, _) = info_fields(&m, &t.name);
        // same element count, rows of 128: half a super-block
        put_u64(&mut m, dims, t.dims[0] / 2);
        put_u64(&mut m, dims + 8, t.dims[1] * 2);
        let e = err_of("rows.gguf", m);
        let want = format!(
            "rows.gguf: tensor '{}' row length {} is not a multiple of the {ty:?} block (256)",
            t.name,
            t.dims[0] / 2
        );
        assert_eq!(e, want);
    }
}

#[test]
fn an_unknown_or_unsupported_ggml_type_is_refused_by_name() {
    let (b, g) = q4km();
    let t = &g.tensors[0];
    // 99: no such type; 16 (IQ2_XXS), 39 (MXFP4): real ggml types we do not read
    for id in [99u32, 16, 39, u32::MAX] {
        let mut m = b.clone();
        let (_, ty, _) = info_fields(&m, &t.name);
        m[ty..ty + 4].copy_from_slice(&id.to_le_bytes());
        let e = err_of("type.gguf", m);
        assert!(
            e.starts_with(&format!(
                "type.gguf: tensor '{}' has ggml type {id} (supported: F32, F16, BF16, Q4_0",
                t.name
            )),
            "{e}"
        );
    }
}

#[test]
fn a_tensor_whose_shape_contradicts_the_metadata_is_refused() {
    // qwen3.attention.head_count 4 → 2: blk.0.attn_q.weight [256, 256] no longer fits
    let p = fx("q/qwen3-256.Q8_0.gguf");
    let mut b = std::fs::read(&p).unwrap();
    let key = b"qwen3.attention.head_count";
    let at = b
        .windows(key.len() + 4)
        .position(|w| &w[..key.len()] == key && w[key.len()..] == 4u32.to_le_bytes())
        .unwrap();
    let v = at + key.len() + 4;
    assert_eq!(u32::from_le_bytes(b[v..v + 4].try_into().unwrap()), 4);
    b[v..v + 4].copy_from_slice(&2u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("heads.gguf");
    std::fs::write(&q, &b).unwrap();
    let e = format!("{:#}", load_gguf_model(&q).err().unwrap());
    assert!(
        e.starts_with(&format!(
            "{}: tensor 'blk.0.attn_q.weight' has shape [256, 256], the metadata implies [128, 256]",
            q.display()
        )),
        "{e}"
    );
}

#[test]
fn wrong_tokenizer_arrays_are_refused_by_name() {
    let arr = |g: &Gguf, k: &str| match g.meta.get(k) {
        Some(Value::Arr(a)) => a.clone(),
        _ => panic!("{k}"),
    };
    // SentencePiece (llama): one score short, one token type short
    for key in ["tokenizer.ggml.scores", "tokenizer.ggml.token_type"] {
        let mut g = Gguf::open(&fx("llama.gguf")).unwrap();
        let mut a = arr(&g, key);
        a.pop();
        g.meta.insert(key.into(), Value::Arr(a));
        let e = format!("{:#}", tokenizer(&g).err().unwrap());
        assert!(e.starts_with(&g.path) && e.contains("400 pieces but"), "{key}: {e}");
    }
    // byte-level BPE (qwen2): token types of another length than the tokens
    let mut g = Gguf::open(&fx("qwen2.gguf")).unwrap();
    let mut a = arr(&g, "tokenizer.ggml.token_type");
    a.truncate(100);
    g.meta.insert("tokenizer.ggml.token_type".into(), Value::Arr(a));
    let e = format!("{:#}", tokenizer(&g).err().unwrap());
    assert!(
        e.starts_with(&g.path) && e.contains("'tokenizer.ggml.token_type' has 100 entries for 320 tokens"),
        "{e}"
    );
    // a token that is not a string; an EOS id outside the vocabulary; a merge of unknown pieces
    let mut g = Gguf::open(&fx("qwen2.gguf")).unwrap();
    let mut a = arr(&g, "tokenizer.ggml.tokens");
    a[5] = Value::U32(5);
    g.meta.insert("tokenizer.ggml.tokens".into(), Value::Arr(a));
    let e = format!("{:#}", tokenizer(&g).err().unwrap());
    assert!(
        e.starts_with(&g.path) && e.contains("'tokenizer.ggml.tokens' must hold strings"),
        "{e}"
    );
    let mut g = Gguf::open(&fx("qwen2.gguf")).unwrap();
    g.meta.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(320));
    let e = format!("{:#}", tokenizer(&g).err().unwrap());
    assert!(e.starts_with(&g.path) && e.contains("320"), "{e}");
    let mut g = Gguf::open(&fx("qwen2.gguf")).unwrap();
    let mut a = arr(&g, "tokenizer.ggml.merges");
    a[0] = Value::Str("nosuch piece".into());
    g.meta.insert("tokenizer.ggml.merges".into(), Value::Arr(a));
    let e = format!("{:#}", tokenizer(&g).err().unwrap());
    assert!(e.starts_with(&g.path), "{e}");
}

/// The `gguf` fuzz target's body: parse, config, tokenizer, and every tensor (or the smallest).
fn read_everything(name: &str, b: Vec<u8>, all: bool) -> Result<(), String> {
    let g = Gguf::from_bytes(name, Bytes::Owned(b)).map_err(|e| format!("{e:#}"))?;
    let _ = model_config(&g);
    let _ = tokenizer(&g);
    let mut ts = g.tensors.clone();
    if !all {
        ts.sort_by_key(|t| t.bytes);
        ts.truncate(1);
    }
    for t in ts {
        g.f32(&t.name).map_err(|e| format!("{e:#}"))?;
    }
    Ok(())
}

#[test]
fn truncated_and_corrupted_real_files_never_panic() {
    for f in [
        "q/qwen3-256.Q2_K.gguf",
        "q/qwen3-256.IQ4_XS.gguf",
        "llama.gguf",
        "qwen3moe.gguf",
    ] {
        let b = std::fs::read(fx(f)).unwrap();
        let g = Gguf::from_bytes(f, Bytes::Owned(b.clone())).unwrap();
        let header = data_start(&b, &g);
        let need = header + g.tensors.iter().map(|t| (t.offset + t.bytes) as usize).max().unwrap();
        // every cut inside the header, and 64 spread over the tensor data
        let cuts = (0..header).chain((header..need).step_by((need - header) / 64 + 1));
        for cut in cuts {
            let e = read_everything(f, b[..cut].to_vec(), true).expect_err("a truncated file was accepted");
            assert!(e.starts_with(&format!("{f}: ")), "cut at {cut}: {e}");
        }
        // header bytes overwritten one at a time
        for at in (0..header).step_by(11) {
            for v in [0xFFu8, 0x00] {
                let mut m = b.clone();
                m[at] = v;
                if let Err(e) = read_everything(f, m, false) {
                    assert!(e.starts_with(&format!("{f}: ")), "byte {at} = {v:#x}: {e}");
                }
            }
        }
    }
}
