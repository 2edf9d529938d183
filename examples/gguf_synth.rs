//! A synthetic Llama-2-7B-shaped GGUF for the memory check of issue 16 (scripts/gguf-7b-check.sh):
//! every matrix in Q4_K, token_embd and output in Q6_K (as llama.cpp's Q4_K_M), norms in f32,
//! with random but valid blocks (f16 scales chosen so the weights are finite, |w| ≲ 0.1, mean
//! magnitude ~0.02), streamed to disk; and `input_ids` (random ids) as safetensors.
//!
//! cargo run --release --example gguf_synth -- OUT.gguf IDS.safetensors [TOKENS] [LAYERS]

use std::io::{BufWriter, Write};

const VOCAB: u64 = 32000;
const HIDDEN: u64 = 4096;
const HEADS: u64 = 32;
const FFN: u64 = 11008;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }
}

fn f16(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

fn s(out: &mut Vec<u8>, x: &str) {
    out.extend((x.len() as u64).to_le_bytes());
    out.extend(x.as_bytes());
}

/// One tensor's blocks: Q4_K (144 B per 256) or Q6_K (210 B per 256), or f32 ones.
fn blocks(w: &mut impl Write, rng: &mut Rng, ty: u32, numel: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    match ty {
        0 => {
            let one = 1f32.to_le_bytes();
            for _ in 0..numel {
                w.write_all(&one)?;
            }
        }
        12 | 14 => {
            let bb = if ty == 12 { 144 } else { 210 };
            let per = buf.len() / bb;
            let mut left = numel / 256;
            while left > 0 {
                let n = per.min(left as usize);
                let b = &mut buf[..n * bb];
                rng.fill(b);
                for c in b.chunks_mut(bb) {
                    if ty == 12 {
                        // w = d·sc·q − dmin·m, sc, m < 64, q < 16: dmin = 7.5·d centres it
                        c[0..2].copy_from_slice(&f16(1.0e-4));
                        c[2..4].copy_from_slice(&f16(7.5e-4));
                    } else {
                        // w = d·sc·(q − 32), sc an i8, q < 64
                        c[208..210].copy_from_slice(&f16(2.0e-5));
                    }
                }
                w.write_all(b)?;
                left -= n as u64;
            }
        }
        _ => unreachable!(),
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).expect("OUT.gguf");
    let ids_path = args.get(2).expect("IDS.safetensors");
    let tokens: usize = args.get(3).map_or(2048, |x| x.parse().unwrap());
    let layers: u64 = args.get(4).map_or(32, |x| x.parse().unwrap());

    // tensors: (name, ggml dims (fastest first), type)
    let mut t: Vec<(String, Vec<u64>, u32)> = vec![("token_embd.weight".into(), vec![HIDDEN, VOCAB], 14)];
    for l in 0..layers {
        let b = |n: &str| format!("blk.{l}.{n}.weight");
        t.push((b("attn_norm"), vec![HIDDEN], 0));
        for n in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            t.push((b(n), vec![HIDDEN, HIDDEN], 12));
        }
        t.push((b("ffn_norm"), vec![HIDDEN], 0));
        t.push((b("ffn_gate"), vec![HIDDEN, FFN], 12));
        t.push((b("ffn_up"), vec![HIDDEN, FFN], 12));
        t.push((b("ffn_down"), vec![FFN, HIDDEN], 12));
    }
    t.push(("output_norm.weight".into(), vec![HIDDEN], 0));
    t.push(("output.weight".into(), vec![HIDDEN, VOCAB], 14));
    let bytes = |dims: &[u64], ty: u32| -> u64 {
        let n: u64 = dims.iter().product();
        match ty {
            0 => n * 4,
            12 => n / 256 * 144,
            _ => n / 256 * 210,
        }
    };

    let mut h = Vec::new();
    h.extend(b"GGUF");
    h.extend(3u32.to_le_bytes());
    h.extend((t.len() as u64).to_le_bytes());
    let u32s = [
        ("llama.embedding_length", HIDDEN as u32),
        ("llama.attention.head_count", HEADS as u32),
        ("llama.attention.head_count_kv", HEADS as u32),
        ("llama.block_count", layers as u32),
        ("llama.feed_forward_length", FFN as u32),
        ("llama.context_length", 4096),
    ];
    h.extend((u32s.len() as u64 + 3).to_le_bytes());
    s(&mut h, "general.architecture");
    h.extend(8u32.to_le_bytes());
    s(&mut h, "llama");
    for (k, v) in u32s {
        s(&mut h, k);
        h.extend(4u32.to_le_bytes());
        h.extend(v.to_le_bytes());
    }
    for (k, v) in [
        ("llama.rope.freq_base", 10000f32),
        ("llama.attention.layer_norm_rms_epsilon", 1e-5),
    ] {
        s(&mut h, k);
        h.extend(6u32.to_le_bytes());
        h.extend(v.to_le_bytes());
    }
    let mut off = 0u64;
    for (name, dims, ty) in &t {
        s(&mut h, name);
        h.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| h.extend(d.to_le_bytes()));
        h.extend(ty.to_le_bytes());
        h.extend(off.to_le_bytes());
        off += bytes(dims, *ty).div_ceil(32) * 32;
    }
    h.resize(h.len().div_ceil(32) * 32, 0);
    let mut w = BufWriter::with_capacity(1 << 22, std::fs::File::create(out)?);
    w.write_all(&h)?;
    let mut rng = Rng(16);
    for (_, dims, ty) in &t {
        let n = bytes(dims, *ty);
        blocks(&mut w, &mut rng, *ty, dims.iter().product())?;
        w.write_all(&vec![0u8; (n.div_ceil(32) * 32 - n) as usize])?;
    }
    w.flush()?;

    let ids: Vec<u8> = (0..tokens).flat_map(|_| (rng.next() % VOCAB).to_le_bytes()).collect();
    let json = format!(
        r#"{{"input_ids":{{"dtype":"I64","shape":[1,{tokens}],"data_offsets":[0,{}]}}}}"#,
        ids.len()
    );
    let mut f = std::fs::File::create(ids_path)?;
    f.write_all(&(json.len() as u64).to_le_bytes())?;
    f.write_all(json.as_bytes())?;
    f.write_all(&ids)?;
    println!(
        "{out}: {layers} layers, {} bytes; {ids_path}: {tokens} ids",
        h.len() as u64 + off
    );
    Ok(())
}
