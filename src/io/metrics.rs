//! metrics.jsonl: one JSON object per line, appended during a run and read back by `report`,
//! `compare` and resume. A killed or disk-full run can leave a torn last line; readers drop that
//! one and reject anything else malformed, naming the file and line.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Metrics {
    path: PathBuf,
}

impl Metrics {
    /// On resume, drop rows after the checkpoint's step (they belong to the lost tail). The
    /// rows kept are kept byte for byte: a parse and re-print would round their floats.
    pub fn open(path: PathBuf, keep_up_to: Option<u64>) -> Result<Metrics> {
        match keep_up_to {
            Some(step) if path.exists() => {
                let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                let mut kept = Vec::with_capacity(bytes.len());
                for (line, v) in parse_rows(&path, &bytes)? {
                    if v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s <= step) {
                        kept.extend_from_slice(line);
                        kept.push(b'\n');
                    }
                }
                if kept != bytes {
                    crate::io::write_atomic(&path, &kept)?;
                }
            }
            _ => crate::io::write_atomic(&path, b"")?,
        }
        Ok(Metrics { path })
    }

    pub fn row(&self, v: Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        writeln!(f, "{v}").with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Every row of a metrics file. Each must be a JSON object with a numeric `step`; only an
/// unterminated last line (a write cut short) may be unreadable, and it is dropped.
pub fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(parse_rows(path, &bytes)?.into_iter().map(|(_, v)| v).collect())
}

/// The rows of a metrics file's `bytes` (`path` for errors), each with its line as written:
/// blank lines skipped, a torn last line dropped, any other bad line an error naming it.
fn parse_rows<'b>(path: &Path, bytes: &'b [u8]) -> Result<Vec<(&'b [u8], Value)>> {
    let torn_tail = !bytes.is_empty() && !bytes.ends_with(b"\n");
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if !torn_tail {
        lines.pop(); // after the final newline (or of an empty file)
    }
    let mut rows = Vec::with_capacity(lines.len());
    for (i, &raw) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let parsed = std::str::from_utf8(raw)
            .map_err(|_| "not valid UTF-8".to_string())
            .and_then(|line| {
                if line.trim().is_empty() {
                    return Ok(None);
                }
                let v = serde_json::from_str::<Value>(line).map_err(|e| format!("not a metrics row: {e}"))?;
                match v.get("step").and_then(|s| s.as_f64()) {
                    Some(_) if v.is_object() => Ok(Some(v)),
                    _ => Err("not a metrics row: a row without a numeric \"step\"".into()),
                }
            });
        match parsed {
            Ok(v) => rows.extend(v.map(|v| (raw, v))),
            Err(_) if last && torn_tail => {} // the write was cut short
            Err(e) => bail!("{}:{}: {e}", path.display(), i + 1),
        }
    }
    Ok(rows)
}

/// (step, value) pairs of `key` over the rows that have it.
pub fn series(rows: &[Value], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics.jsonl");
        std::fs::write(&p, bytes).unwrap();
        (d, p)
    }

    #[test]
    fn reads_rows_and_drops_only_a_torn_last_line() {
        let (_d, p) = write(b"{\"step\":1,\"loss\":2.5}\n{\"step\":2,\"loss\":2.0}\n{\"step\":3,\"lo");
        let rows = read_rows(&p).unwrap();
        assert_eq!(series(&rows, "loss"), vec![(1.0, 2.5), (2.0, 2.0)]);
        // the same bad line terminated (so not a cut-short write) is an error naming file and line
        let (_d, p) = write(b"{\"step\":1,\"loss\":2.5}\n{\"step\":3,\"lo\n{\"step\":4}\n");
        let e = format!("{:#}", read_rows(&p).unwrap_err());
        assert!(e.contains("metrics.jsonl:2: not a metrics row"), "{e}");
    }

    #[test]
    fn rejects_rows_without_step_and_non_utf8() {
        let (_d, p) = write(b"{\"step\":1}\n[1,2]\n");
        let e = format!("{:#}", read_rows(&p).unwrap_err());
        assert!(e.contains(":2:") && e.contains("step"), "{e}");
        let (_d, p) = write(b"{\"step\":1,\"note\":\"\xff\xfe\"}\n");
        let e = format!("{:#}", read_rows(&p).unwrap_err());
        assert!(e.contains(":1: not valid UTF-8"), "{e}");
        assert!(read_rows(&p.with_file_name("missing.jsonl")).is_err());
    }

    #[test]
    fn resume_keeps_rows_up_to_the_checkpoint() {
        let (_d, p) = write(b"{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"st");
        let m = Metrics::open(p.clone(), Some(2)).unwrap();
        m.row(serde_json::json!({"step": 3, "loss": 1.0})).unwrap();
        let steps: Vec<f64> = read_rows(&p)
            .unwrap()
            .iter()
            .map(|v| v["step"].as_f64().unwrap())
            .collect();
        assert_eq!(steps, vec![1.0, 2.0, 3.0]);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap().lines().last(),
            Some("{\"loss\":1.0,\"step\":3}")
        );
    }
}
