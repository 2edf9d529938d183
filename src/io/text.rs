//! Text corpora: the embedded books and text files, plain or gzip.

use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;

/// The embedded default corpus (7 public-domain novels, see data/CORPUS.md).
static BOOKS_GZ: &[u8] = include_bytes!("../../data/books.txt.gz");

pub fn embedded_corpus() -> Result<Vec<String>> {
    Ok(vec![gunzip(BOOKS_GZ, "embedded books.txt.gz")?])
}

pub fn gunzip(bytes: &[u8], what: &str) -> Result<String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .with_context(|| format!("{what}: not valid gzip"))?;
    String::from_utf8(out)
        .map_err(|e| anyhow::anyhow!("{what}: not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
}

pub fn read_text(path: &Path) -> Result<String> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {what}"))?;
    if what.ends_with(".gz") {
        return gunzip(&bytes, &what);
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{what}: not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}
