//! llama.cpp GGUF files: a bounds-checked reader (no allocation sized by an unchecked header
//! field), dequantisation of every type in `quants`, a writer with the reference quantisers
//! (for tests and export), and loading of `llama` / `qwen3` models with their tokenizer.

use super::tokenizer::Tok;
use crate::config::{ModelConfig, NormStyle};
use crate::model::params::{param_specs, ParamStore, Tensor};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

pub mod arch;
pub mod lazy;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Arr(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) if x >= 0 => Some(x as u64),
            Value::I16(x) if x >= 0 => Some(x as u64),
            Value::I32(x) if x >= 0 => Some(x as u64),
            Value::I64(x) if x >= 0 => Some(x as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

pub use super::quants::{dequantize, quantize, GgmlType};

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: dims[0] is the fastest-varying (columns).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub offset: u64,
    pub bytes: u64,
}

pub struct Gguf {
    pub path: String,
    data: crate::io::st::Bytes,
    pub version: u32,
    pub meta: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let n = usize::try_from(n).ok().filter(|&n| n <= self.b.len() - self.pos);
        let n = n.with_context(|| {
            format!(
                "{}: truncated at byte {} (header points past the end)",
                self.what, self.pos
            )
        })?;
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u64()?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .with_context(|| format!("{}: string at byte {} is not UTF-8", self.what, self.pos))
    }
    fn remaining(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.take(1)?[0]),
            1 => Value::I8(self.take(1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.str()?),
            9 => {
                if depth > 4 {
                    bail!("{}: arrays nested too deeply", self.what);
                }
                let ety = self.u32()?;
                let n = self.u64()?;
                // every element takes at least one byte: bound the count before allocating
                if n > self.remaining() {
                    bail!(
                        "{}: array of {n} elements cannot fit in the remaining {} bytes",
                        self.what,
                        self.remaining()
                    );
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Arr(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            t => bail!("{}: unknown metadata value type {t}", self.what),
        })
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        Self::from_bytes(&path.display().to_string(), crate::io::st::map_file(path)?)
    }

    /// Parse GGUF bytes (`name` is used in errors).
    pub fn from_bytes(name: &str, data: crate::io::st::Bytes) -> Result<Gguf> {
        let what = name.to_string();
        let mut c = Cursor {
            b: &data,
            pos: 0,
            what: &what,
        };
        if c.take(4).ok() != Some(b"GGUF".as_slice()) {
            bail!("{what}: not a GGUF file (bad magic)");
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            bail!("{what}: GGUF version {version} is not supported (2 or 3)");
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        if n_tensors > c.remaining() / 24 || n_kv > c.remaining() / 12 {
            bail!("{what}: header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold");
        }
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let k = c.str()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            meta.insert(k, v);
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.str()?;
            let nd = c.u32()?;
            if nd == 0 || nd > 4 {
                bail!("{what}: tensor '{name}' has {nd} dimensions (1 to 4 supported)");
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let tyn = c.u32()?;
            let ty = GgmlType::from_u32(tyn).with_context(|| {
                format!(
                    "{what}: tensor '{name}' has ggml type {tyn} (supported: {})",
                    GgmlType::names()
                )
            })?;
            let offset = c.u64()?;
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d).filter(|_| d > 0))
                .with_context(|| format!("{what}: tensor '{name}' has absurd dimensions {dims:?}"))?;
            let (be, bb) = ty.block();
            if dims[0] % be != 0 {
                bail!(
                    "{what}: tensor '{name}' row length {} is not a multiple of the {ty:?} block ({be})",
                    dims[0]
                );
            }
            let bytes = (numel / be)
                .checked_mul(bb)
                .with_context(|| format!("{what}: tensor '{name}' too large"))?;
            infos.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                bytes,
            });
        }
        let align = meta
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1);
        let data_start = (c.pos as u64).div_ceil(align) * align;
        let data_len = (data.len() as u64).saturating_sub(data_start);
        for t in &infos {
            if t.offset.checked_add(t.bytes).is_none_or(|end| end > data_len) {
                bail!(
                    "{what}: tensor '{}' (offset {}, {} bytes) lies past the end of the file",
                    t.name,
                    t.offset,
                    t.bytes
                );
            }
        }
        Ok(Gguf {
            path: what,
            data_start: data_start as usize,
            data,
            version,
            meta,
            tensors: infos,
        })
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Dequantised data (row-major, `dims` reversed = PyTorch shape).
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .info(name)
            .with_context(|| format!("{}: no tensor '{name}'", self.path))?;
        let start = self.data_start + t.offset as usize;
        let b = &self.data[start..start + t.bytes as usize];
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        Ok((shape, dequantize(t.ty, b)))
    }

    pub fn get(&self, key: &str) -> Result<&Value> {
        self.meta
            .get(key)
            .with_context(|| format!("{}: missing metadata '{key}'", self.path))
    }
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    let ty: u32 = match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Arr(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    };
    out.extend(ty.to_le_bytes());
    write_payload(out, v);
}

fn write_payload(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::Str(s) => {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        Value::Arr(a) => {
            let mut probe = Vec::new();
            write_value(&mut probe, a.first().unwrap_or(&Value::U8(0)));
            out.extend(&probe[..4]);
            out.extend((a.len() as u64).to_le_bytes());
            a.iter().for_each(|x| write_payload(out, x));
        }
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
    }
}

/// Write a GGUF v3 file. Tensors: (name, PyTorch shape, type, f32 data to quantise).
pub fn write(path: &Path, meta: &[(&str, Value)], tensors: &[(String, Vec<usize>, GgmlType, Vec<f32>)]) -> Result<()> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        write_payload(&mut out, &Value::Str(k.to_string()));
        write_value(&mut out, v);
    }
    let blobs: Vec<Vec<u8>> = tensors.iter().map(|(_, _, ty, d)| quantize(*ty, d)).collect();
    let mut offset = 0u64;
    for ((name, shape, ty, _), blob) in tensors.iter().zip(&blobs) {
        write_payload(&mut out, &Value::Str(name.clone()));
        out.extend((shape.len() as u32).to_le_bytes());
        shape.iter().rev().for_each(|&d| out.extend((d as u64).to_le_bytes()));
        out.extend((*ty as u32).to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (blob.len() as u64).div_ceil(32) * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for blob in &blobs {
        out.extend(blob);
        out.resize(out.len().div_ceil(32) * 32, 0);
    }
    crate::io::write_atomic(path, &out)
}

/// Undo llama.cpp's q/k row permutation (HF rotate-half → interleaved RoPE): within each head,
/// GGUF row 2j + t holds HF row t·d/2 + j.
pub fn unpermute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let d = rows / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for j in 0..d / 2 {
            for t in 0..2 {
                let (src, dst) = (h * d + 2 * j + t, h * d + t * (d / 2) + j);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// HF tensor name → GGUF tensor name (weights `.weight`, Qwen2's q/k/v biases `.bias`).
pub fn gguf_name(hf: &str) -> String {
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (i, tail) = rest.split_once('.').unwrap();
        let (tail, suffix) = match tail.rsplit_once('.') {
            Some((t, s @ ("weight" | "bias"))) => (t, s),
            _ => (tail, "weight"),
        };
        let t = match tail {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "post_attention_layernorm" => "ffn_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            "mlp.gate" => "ffn_gate_inp",
            other => other,
        };
        return format!("blk.{i}.{t}.{suffix}");
    }
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        o => o.into(),
    }
}

/// For a per-expert tensor name, llama.cpp's 3-D tensor holding every expert's matrix
/// (`blk.N.ffn_{gate,up,down}_exps.weight`, `[E, rows, cols]`) and the expert.
fn expert_source(hf: &str) -> Option<(String, usize)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, tail) = rest.split_once(".mlp.experts.")?;
    let (e, proj) = tail.split_once('.')?;
    let kind = proj.strip_suffix("_proj.weight")?;
    Some((format!("blk.{i}.ffn_{kind}_exps.weight"), e.parse().ok()?))
}

/// The architectures `model_config` reads (llama.cpp's `general.architecture` names).
pub const SUPPORTED_ARCHS: [&str; 7] = ["llama", "qwen2", "qwen3", "qwen3moe", "phi3", "gemma2", "gemma3"];

/// The model config a GGUF of one of `SUPPORTED_ARCHS` describes.
pub fn model_config(g: &Gguf) -> Result<ModelConfig> {
    let arch = g.get("general.architecture")?.as_str().unwrap_or("").to_string();
    if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
        bail!(
            "{}: architecture '{arch}' is not supported ({})",
            g.path,
            SUPPORTED_ARCHS.join(", ")
        );
    }
    let u = |k: &str| -> Result<usize> {
        let key = format!("{arch}.{k}");
        g.get(&key)?
            .as_u64()
            .filter(|&x| x > 0 && x < 1 << 32)
            .map(|x| x as usize)
            .with_context(|| format!("{}: '{key}' must be a positive integer", g.path))
    };
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    let kv = u("attention.head_count_kv").unwrap_or(heads);
    let head_dim = u("attention.key_length").unwrap_or(hidden / heads);
    let vocab = g
        .info("token_embd.weight")
        .with_context(|| format!("{}: no token_embd.weight", g.path))?
        .dims[1] as usize;
    // llama.cpp's qwen3moe: every layer MoE, softmax top-k renormalised, no shared expert
    let moe = if arch == "qwen3moe" {
        Some(crate::config::MoeConfig::new(
            u("expert_count")?,
            u("expert_used_count")?,
            u("expert_feed_forward_length")?,
        ))
    } else {
        None
    };
    let ffn = match &moe {
        Some(m) => u("feed_forward_length").unwrap_or(m.moe_intermediate_size),
        None => u("feed_forward_length")?,
    };
    let mut cfg = ModelConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        num_layers: u("block_count")?,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        intermediate_size: ffn,
        rms_norm_eps: g
            .meta
            .get(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .and_then(Value::as_f64)
            .unwrap_or(1e-5),
        rope_theta: g
            .meta
            .get(&format!("{arch}.rope.freq_base"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0),
        partial_rotary_factor: 1.0,
        norm_style: NormStyle::Standard,
        tie_word_embeddings: g.info("output.weight").is_none(),
        max_position_embeddings: u("context_length").unwrap_or(4096).min(1 << 16),
        init_std: 0.02,
        rope_scaling: None,
        // llama.cpp: QK-norm in qwen3/qwen3moe; q/k/v biases (blk.N.attn_{q,k,v}.bias) in qwen2
        qk_norm: arch == "qwen3" || arch == "qwen3moe",
        attention_bias: arch == "qwen2",
        gate: None,
        moe,
        ..ModelConfig::dense(1, 1, 1, 1, 1, 1, 1, None)
    };
    arch::apply(g, &arch, &mut cfg)?;
    cfg.validate().with_context(|| g.path.clone())?;
    Ok(cfg)
}

/// The tokenizer embedded in a GGUF: a `llama` SentencePiece vocabulary, or a `gpt2`-style
/// byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names, as llama.cpp defines it
/// (`pretok`; llama.cpp's `default` when the key is absent).
pub fn tokenizer(g: &Gguf) -> Result<Tok> {
    let model = g.get("tokenizer.ggml.model")?.as_str().unwrap_or("");
    if model != "gpt2" && model != "llama" {
        bail!(
            "{}: tokenizer model '{model}' is not supported (gpt2 BPE, llama SentencePiece); analyse token ids instead: --tokens FILE.safetensors (an `input_ids` tensor)",
            g.path
        );
    }
    let strings = |k: &str| -> Result<Vec<String>> {
        match g.get(k)? {
            Value::Arr(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .with_context(|| format!("{}: '{k}' must hold strings", g.path))
                })
                .collect(),
            _ => bail!("{}: '{k}' must be an array", g.path),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let id = |k: &str| -> Result<u32> {
        g.get(k)?
            .as_u64()
            .map(|x| x as u32)
            .with_context(|| format!("{}: '{k}' must be a token id", g.path))
    };
    let eos = id("tokenizer.ggml.eos_token_id")?;
    if model == "llama" {
        let numbers = |k: &str| -> Result<Vec<f64>> {
            match g.get(k)? {
                Value::Arr(a) => a
                    .iter()
                    .map(|v| {
                        v.as_f64()
                            .with_context(|| format!("{}: '{k}' must hold numbers", g.path))
                    })
                    .collect(),
                _ => bail!("{}: '{k}' must be an array", g.path),
            }
        };
        let scores: Vec<f32> = numbers("tokenizer.ggml.scores")?
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let types: Vec<i32> = numbers("tokenizer.ggml.token_type")?
            .into_iter()
            .map(|x| x as i32)
            .collect();
        let unk = id("tokenizer.ggml.unknown_token_id").unwrap_or(0);
        // llama.cpp: a dummy "▁" prefix unless the file says otherwise (Gemma's converter does)
        let space_prefix = !matches!(g.meta.get("tokenizer.ggml.add_space_prefix"), Some(Value::Bool(false)));
        let tok =
            Tok::from_sentencepiece(tokens, &scores, &types, unk, eos, space_prefix).with_context(|| g.path.clone())?;
        return add_bos(g, tok, true);
    }
    let merges = strings("tokenizer.ggml.merges")?;
    // llama.cpp names the pre-tokenizer; a wrong one would tokenise silently differently
    let pre = match g.meta.get("tokenizer.ggml.pre") {
        None => "default",
        Some(v) => v.as_str().unwrap_or("?"),
    };
    let Some(p) = super::pretok::lookup(pre) else {
        bail!(
            "{}: pre-tokenizer '{pre}' is not supported (we implement {} of llama.cpp's names: gpt-2, llama-bpe, qwen2, tekken, gpt-4o, …); analyse token ids instead: --tokens FILE.safetensors (an `input_ids` tensor)",
            g.path,
            super::pretok::SUPPORTED.len()
        );
    };
    let splits: Vec<String> = p.regexes.iter().map(|r| super::pretok::for_engine(r)).collect();
    let splits: Vec<&str> = splits.iter().map(String::as_str).collect();
    // llama.cpp splits user-defined tokens (token type 4) out of the text first, whole
    const USER_DEFINED: u64 = 4;
    let user: Vec<String> = match g.meta.get("tokenizer.ggml.token_type") {
        // llama.cpp reads one type per token: another length is a broken file, not a vocabulary
        Some(Value::Arr(types)) if types.len() != tokens.len() => bail!(
            "{}: 'tokenizer.ggml.token_type' has {} entries for {} tokens",
            g.path,
            types.len(),
            tokens.len()
        ),
        Some(Value::Arr(types)) => tokens
            .iter()
            .zip(types)
            .filter(|(_, t)| t.as_u64() == Some(USER_DEFINED))
            .map(|(s, _)| s.clone())
            .collect(),
        _ => vec![],
    };
    let tok = Tok::from_vocab_merges_split(tokens, merges, eos, &splits, p.ignore_merges)
        .and_then(|t| t.with_user_defined(user))
        .with_context(|| format!("{}: pre-tokenizer '{pre}'", g.path))?;
    add_bos(g, tok, p.add_bos)
}

/// Prompts get the BOS token where the file asks for it (llama.cpp's default: SentencePiece yes,
/// BPE as the pre-tokenizer type says, e.g. llama3 and tekken yes).
fn add_bos(g: &Gguf, tok: Tok, default: bool) -> Result<Tok> {
    let wanted = match g.meta.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        _ => default,
    };
    match (
        wanted,
        g.meta.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64),
    ) {
        (true, Some(bos)) => tok.with_bos(bos as u32).with_context(|| g.path.clone()),
        _ => Ok(tok),
    }
}

/// Load a llama/qwen2/qwen3/qwen3moe GGUF as a model (weights dequantised to f32) with its tokenizer.
pub fn load_gguf_model(path: &Path) -> Result<(Model<f32>, Tok)> {
    let (model, tok) = load_gguf(path)?;
    Ok((model, tok?))
}

/// The model, and its tokenizer or why it cannot be built: a model whose pre-tokenizer we lack
/// still analyses from token ids (`--tokens`), so the tokenizer's error waits until text needs it.
pub fn load_gguf(path: &Path) -> Result<(Model<f32>, Result<Tok>)> {
    let g = Gguf::open(path)?;
    let cfg = model_config(&g)?;
    let (specs, _) = param_specs(&cfg);
    let mut store = ParamStore::<f32>::zeros_like(&specs);
    let mut r = Reader::new(&g, &cfg)?;
    for (i, s) in specs.iter().enumerate() {
        store.tensors[i] = r.read(s)?;
    }
    Ok((Model::from_params(cfg, store)?, tokenizer(&g)))
}

/// Reads our tensors from a GGUF one at a time, dequantised to f32 in our layout (HF rows,
/// fused tensors split, experts taken from their stacks), checked for shape and finiteness.
pub struct Reader<'a> {
    g: &'a Gguf,
    cfg: &'a ModelConfig,
    arch: String,
    /// Phi-3's fused tensors, dequantised once per layer.
    fused: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// A layer's experts share one 3-D tensor: dequantised once.
    stacked: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl<'a> Reader<'a> {
    pub fn new(g: &'a Gguf, cfg: &'a ModelConfig) -> Result<Self> {
        Ok(Reader {
            g,
            cfg,
            arch: g.get("general.architecture")?.as_str().unwrap_or("").to_string(),
            fused: BTreeMap::new(),
            stacked: BTreeMap::new(),
        })
    }

    pub fn read(&mut self, s: &crate::model::params::ParamSpec) -> Result<Tensor<f32>> {
        let (g, cfg) = (self.g, self.cfg);
        let permuted = self.arch == "llama";
        let (name, (shape, mut data)) = match expert_source(&s.name) {
            Some((src, e)) => {
                if !self.stacked.contains_key(&src) {
                    // keep only the current layer's three stacks
                    let layer = &src[..src.find(".ffn_").unwrap_or(0)];
                    self.stacked
                        .retain(|k, _| k.starts_with(layer) && k.as_bytes().get(layer.len()) == Some(&b'.'));
                    self.stacked.insert(src.clone(), g.f32(&src)?);
                }
                let (sh, all) = &self.stacked[&src];
                let t = super::expert_block(&src, sh, all, e, None).with_context(|| g.path.clone())?;
                (src.clone(), (t.shape, t.data))
            }
            None => arch::read(g, cfg, &self.arch, &s.name, &mut self.fused)?,
        };
        if shape != s.shape {
            bail!(
                "{}: tensor '{name}' has shape {shape:?}, the metadata implies {:?}",
                g.path,
                s.shape
            );
        }
        if permuted && name.ends_with("attn_q.weight") {
            data = unpermute_rows(&data, cfg.num_heads, cfg.hidden_size);
        } else if permuted && name.ends_with("attn_k.weight") {
            data = unpermute_rows(&data, cfg.num_kv_heads, cfg.hidden_size);
        }
        if data.iter().any(|x| !x.is_finite()) {
            bail!("{}: tensor '{name}' contains NaN or Inf", g.path);
        }
        Ok(Tensor { shape, data })
    }
}
