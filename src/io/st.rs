//! safetensors reading (memory-mapped; F32/F16/BF16/F64 → f32, integer ids → u32) and writing.

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// A dense f32 tensor read from a file.
#[derive(Clone, Debug, PartialEq)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The bytes behind a reader: a read-only file mapping, or a buffer (tests, fuzzing).
pub enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// Map a file read-only.
pub fn map_file(path: &Path) -> Result<Bytes> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only mapping; every reader validates lengths before reading through it.
    let m = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
    Ok(Bytes::Map(m))
}

/// An open safetensors file.
pub struct StFile {
    path: String,
    mmap: Bytes,
}

impl StFile {
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_bytes(&path.display().to_string(), map_file(path)?)
    }

    /// Validate and wrap bytes (`name` is used in errors).
    pub fn from_bytes(name: &str, bytes: Bytes) -> Result<Self> {
        let me = StFile {
            path: name.to_string(),
            mmap: bytes,
        };
        me.parse()?;
        Ok(me)
    }

    fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer
            | safetensors::SafeTensorError::InvalidHeaderLength
            | safetensors::SafeTensorError::HeaderTooSmall => anyhow::anyhow!(
                "{}: truncated or corrupt: its header describes more tensor data than the file's {} bytes hold",
                self.path,
                self.mmap.len()
            ),
            e => anyhow::anyhow!("{}: not a valid safetensors file: {e}", self.path),
        })
    }

    /// The tensor `name`, or an error naming the file and the tensor once.
    fn tensor<'a>(&self, st: &SafeTensors<'a>, name: &str) -> Result<safetensors::tensor::TensorView<'a>> {
        st.tensor(name)
            .map_err(|_| anyhow::anyhow!("{}: no tensor named '{name}'", self.path))
    }

    pub fn names(&self) -> Result<Vec<String>> {
        let mut n: Vec<String> = self.parse()?.names().into_iter().map(String::from).collect();
        n.sort();
        Ok(n)
    }

    pub fn has(&self, name: &str) -> bool {
        self.parse().map(|s| s.tensor(name).is_ok()).unwrap_or(false)
    }

    /// Read a floating-point tensor as f32.
    pub fn f32(&self, name: &str) -> Result<F32Tensor> {
        let st = self.parse()?;
        let t = self.tensor(&st, name)?;
        let b = t.data();
        let data: Vec<f32> = match t.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            other => bail!(
                "{}: tensor '{name}' has dtype {other:?}; expected F32, F16, BF16 or F64",
                self.path
            ),
        };
        Ok(F32Tensor {
            shape: t.shape().to_vec(),
            data,
        })
    }

    /// Read an integer tensor (token ids) as u32, rejecting negative or oversized values.
    pub fn ids(&self, name: &str) -> Result<(Vec<usize>, Vec<u32>)> {
        let st = self.parse()?;
        let t = self.tensor(&st, name)?;
        let b = t.data();
        let wide: Vec<i128> = match t.dtype() {
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i128)
                .collect(),
            Dtype::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i128)
                .collect(),
            Dtype::U32 => b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i128)
                .collect(),
            Dtype::U16 => b
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i128)
                .collect(),
            other => bail!(
                "{}: tensor '{name}' has dtype {other:?}; expected an integer type",
                self.path
            ),
        };
        let ids = wide
            .iter()
            .map(|&v| u32::try_from(v).ok().filter(|&x| x != u32::MAX))
            .collect::<Option<Vec<u32>>>()
            .with_context(|| format!("{}: tensor '{name}' holds a negative or out-of-range id", self.path))?;
        Ok((t.shape().to_vec(), ids))
    }
}

/// Tensors to write: name → (shape, f32 data).
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Serialise f32 tensors to safetensors bytes (with optional metadata).
pub fn serialize_f32(
    tensors: &TensorMap,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, (s, d))| (n.clone(), s.clone(), d.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, metadata)?)
}

/// Write f32 tensors atomically.
pub fn write_f32(path: &Path, tensors: &TensorMap) -> Result<()> {
    let bytes = serialize_f32(tensors, Some([("format".to_string(), "pt".to_string())].into()))
        .with_context(|| format!("cannot serialise tensors for {}", path.display()))?;
    super::write_atomic(path, &bytes)
}
