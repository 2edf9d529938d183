//! Corpus → token shards → random windows.
//!
//! Documents: a plain text file is one document (`.gz` is decompressed), a `.jsonl` file gives one
//! document per line's `text` field, a directory contributes its files in sorted order. Documents
//! are tokenized once, joined with EOS, split into train / validation (the last `val_fraction` of
//! tokens) and written as memory-mapped shards of u16 or u32 tokens.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub use crate::io::text::embedded_corpus;
use crate::io::text::read_text;

fn read_file_docs(path: &Path, docs: &mut Vec<String>) -> Result<()> {
    let text = read_text(path)?;
    let name = path.to_string_lossy();
    if name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") {
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{name}:{}: not valid JSON", i + 1))?;
            let t = v
                .get("text")
                .and_then(|t| t.as_str())
                .with_context(|| format!("{name}:{}: no string field 'text'", i + 1))?;
            if !t.is_empty() {
                docs.push(t.to_string());
            }
        }
    } else if !text.is_empty() {
        docs.push(text);
    }
    Ok(())
}

/// Documents from files and directories (recursively, sorted for determinism).
pub fn read_documents(paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files = Vec::new();
            collect_files(p, &mut files)?;
            files.sort();
            for f in files {
                read_file_docs(&f, &mut docs)?;
            }
        } else {
            read_file_docs(p, &mut docs)?;
        }
    }
    let total: usize = docs.iter().map(|d| d.len()).sum();
    if total == 0 {
        bail!(
            "empty corpus: no text in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(docs)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

const MAGIC: &[u8; 8] = b"GLMTOKS1";
const HEADER: usize = 24;

/// Write tokens as a shard: `GLMTOKS1`, u32 width (2|4), u32 reserved, u64 count, tokens (LE).
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    let width = if vocab_size <= 1 << 16 { 2usize } else { 4 };
    let mut bytes = Vec::with_capacity(HEADER + tokens.len() * width);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(width as u32).to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for &t in tokens {
        if width == 2 {
            bytes.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
    }
    crate::io::write_atomic(path, &bytes)
}

/// A memory-mapped token shard.
pub struct Shard {
    mmap: memmap2::Mmap,
    width: usize,
    len: usize,
}

impl Shard {
    pub fn open(path: &Path, vocab_size: usize) -> Result<Shard> {
        let what = path.display().to_string();
        let f = std::fs::File::open(path).with_context(|| format!("cannot open {what}"))?;
        // SAFETY: read-only map of a file we wrote; validated below before any token is read.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot map {what}"))?;
        if mmap.len() < HEADER || &mmap[..8] != MAGIC {
            bail!("{what}: not a token shard (bad header)");
        }
        let width = u32::from_le_bytes(mmap[8..12].try_into().unwrap()) as usize;
        let len = u64::from_le_bytes(mmap[16..24].try_into().unwrap());
        if width != 2 && width != 4 {
            bail!("{what}: bad token width {width}");
        }
        if Some(mmap.len() as u64) != len.checked_mul(width as u64).and_then(|b| b.checked_add(HEADER as u64)) {
            bail!(
                "{what}: truncated or oversized (header says {len} tokens of {width} bytes, file is {} bytes)",
                mmap.len()
            );
        }
        let s = Shard {
            mmap,
            width,
            len: len as usize,
        };
        if let Some(i) = (0..s.len).find(|&i| s.get(i) as usize >= vocab_size) {
            bail!(
                "{what}: token {} at {i} is outside the vocabulary ({vocab_size})",
                s.get(i)
            );
        }
        Ok(s)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let o = HEADER + i * self.width;
        if self.width == 2 {
            u16::from_le_bytes([self.mmap[o], self.mmap[o + 1]]) as u32
        } else {
            u32::from_le_bytes(self.mmap[o..o + 4].try_into().unwrap())
        }
    }

    /// Inputs and next-token targets of `seq` positions starting at `start` (needs seq+1 tokens).
    pub fn window(&self, start: usize, seq: usize, ids: &mut Vec<u32>, targets: &mut Vec<u32>) {
        ids.extend((start..start + seq).map(|i| self.get(i)));
        targets.extend((start + 1..start + seq + 1).map(|i| self.get(i)));
    }
}

/// Tokenize documents (EOS after each), split off validation and write both shards into `dir`.
/// Returns (train tokens, val tokens).
pub fn build_shards(
    docs: &[String],
    tok: &crate::io::tokenizer::Tok,
    val_fraction: f64,
    min_len: usize,
    dir: &Path,
) -> Result<(usize, usize)> {
    let mut all = Vec::new();
    for d in docs {
        all.extend(tok.encode(d)?);
        all.push(tok.eos());
    }
    let n_val = ((all.len() as f64 * val_fraction) as usize).max(min_len);
    if all.len() < n_val + min_len {
        bail!(
            "corpus too small: {} tokens, need at least {} for training and validation windows",
            all.len(),
            n_val + min_len
        );
    }
    let split = all.len() - n_val;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_shard(&dir.join("train.tokens"), &all[..split], tok.vocab_size())?;
    write_shard(&dir.join("val.tokens"), &all[split..], tok.vocab_size())?;
    Ok((split, n_val))
}

/// `count` evenly spaced window starts covering the shard (deterministic evaluation batches).
pub fn eval_starts(len: usize, seq: usize, count: usize) -> Vec<usize> {
    let span = len.saturating_sub(seq + 1);
    (0..count)
        .map(|i| if count <= 1 { 0 } else { span * i / (count - 1) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tokenizer::Tok;

    #[test]
    fn shards_round_trip_and_reject_damage() {
        let dir = tempfile::tempdir().unwrap();
        let toks: Vec<u32> = (0..1000).map(|i| (i * 7 % 257) as u32).collect();
        let p = dir.path().join("a.tokens");
        write_shard(&p, &toks, 257).unwrap();
        let s = Shard::open(&p, 257).unwrap();
        assert_eq!(s.len(), 1000);
        assert!((0..1000).all(|i| s.get(i) == toks[i]));
        let (mut ids, mut tg) = (vec![], vec![]);
        s.window(10, 5, &mut ids, &mut tg);
        assert_eq!(ids, toks[10..15]);
        assert_eq!(tg, toks[11..16]);
        // wide vocab → u32
        write_shard(&p, &[70000, 3], 100_000).unwrap();
        assert_eq!(Shard::open(&p, 100_000).unwrap().get(0), 70000);
        assert!(
            Shard::open(&p, 50_000).is_err(),
            "ids beyond the vocab must be rejected"
        );
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        assert!(format!("{:#}", Shard::open(&p, 100_000).err().unwrap()).contains("truncated"));
    }

    #[test]
    fn documents_from_text_jsonl_gz_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "hello world").unwrap();
        std::fs::write(
            dir.path().join("b.jsonl"),
            "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n",
        )
        .unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, b"zipped").unwrap();
        std::fs::write(dir.path().join("c.txt.gz"), gz.finish().unwrap()).unwrap();
        let docs = read_documents(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(docs, vec!["hello world", "one", "two", "zipped"]);
        let (tr, va) = build_shards(&docs, &Tok::Byte, 0.2, 3, dir.path()).unwrap();
        assert_eq!(tr + va, 11 + 1 + 3 + 1 + 3 + 1 + 6 + 1);
        let s = Shard::open(&dir.path().join("train.tokens"), 257).unwrap();
        assert_eq!(s.get(11), 256, "EOS after each document");
        // bad inputs
        std::fs::write(dir.path().join("bad.txt"), [0x66, 0xff, 0x66]).unwrap();
        let e = format!("{:#}", read_documents(&[dir.path().join("bad.txt")]).err().unwrap());
        assert!(e.contains("bad.txt") && e.contains("UTF-8"), "{e}");
        std::fs::write(dir.path().join("e.txt"), "").unwrap();
        assert!(format!("{:#}", read_documents(&[dir.path().join("e.txt")]).err().unwrap()).contains("empty corpus"));
        std::fs::write(dir.path().join("x.jsonl"), "{\"txt\": 1}\n").unwrap();
        assert!(format!("{:#}", read_documents(&[dir.path().join("x.jsonl")]).err().unwrap()).contains("x.jsonl:1"));
        assert!(embedded_corpus().unwrap()[0].len() > 7_000_000);
    }
}
