//! Memory-mapped safetensors checkpoints, single-file or sharded
//! (`model.safetensors.index.json`). Every check that can fail on a bad file happens
//! here and names the file and the tensor, so that loading never panics.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

/// Element types inferd loads. Others (int8, fp8, ...) are refused with a typed error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    BF16,
    F16,
    F32,
}

impl Dtype {
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// Widens little-endian elements of this dtype in `bytes` to f32 into `out`.
    pub fn write_f32(self, bytes: &[u8], out: &mut [f32]) {
        assert_eq!(bytes.len(), out.len() * self.size_bytes(), "write_f32: byte count");
        match self {
            Dtype::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::BF16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            Dtype::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        }
    }

    fn parse(s: &str) -> Option<Dtype> {
        match s {
            "BF16" => Some(Dtype::BF16),
            "F16" => Some(Dtype::F16),
            "F32" => Some(Dtype::F32),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error("{path}: file is truncated: tensor `{tensor}` ends at byte {end} but the data section holds {len} bytes")]
    Truncated {
        path: PathBuf,
        tensor: String,
        end: usize,
        len: usize,
    },
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; inferd loads BF16, F16 and F32")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: tensor `{tensor}` holds {bytes} bytes, but shape {shape:?} of {dtype:?} needs {needed}")]
    SizeMismatch {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
        dtype: Dtype,
        bytes: usize,
        needed: usize,
    },
    #[error("tensor `{tensor}` is missing from {path}")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
}

#[derive(Debug, Clone)]
struct TensorInfo {
    /// `Err(name)` for dtypes inferd does not load; reported only if the tensor is read.
    dtype: Result<Dtype, String>,
    shape: Vec<usize>,
    /// Byte range inside the file's data section.
    start: usize,
    end: usize,
}

/// One mapped `.safetensors` file with its validated header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Storage,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// A file's bytes: mapped from disk, or built in memory (dummy weights).
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// The bytes of a safetensors file holding `tensors` (name, dtype, shape, raw data).
pub fn encode_safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut raw = serde_json::to_vec(&header).unwrap_or_default();
    while !raw.len().is_multiple_of(8) {
        raw.push(b' ');
    }
    let mut file = (raw.len() as u64).to_le_bytes().to_vec();
    file.extend(raw);
    for (_, _, _, bytes) in tensors {
        file.extend(bytes);
    }
    file
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let io = |source| LoadError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; checkpoints are not expected to change while
        // loaded (the same assumption every safetensors loader makes).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Storage::Mapped(mmap))
    }

    fn parse(path: &Path, mmap: Storage) -> Result<Self, LoadError> {
        let bad = |reason: String| LoadError::BadHeader {
            path: path.to_owned(),
            reason,
        };
        if mmap.len() < 8 {
            return Err(bad(format!(
                "{} bytes, shorter than the 8-byte header length",
                mmap.len()
            )));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        let data_start = header_len
            .checked_add(8)
            .filter(|&end| end <= mmap.len())
            .ok_or_else(|| {
                bad(format!(
                    "header of {header_len} bytes runs past the end of the file ({} bytes)",
                    mmap.len()
                ))
            })?;
        let raw: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..data_start]).map_err(|e| bad(format!("header JSON: {e}")))?;
        let data_len = mmap.len() - data_start;
        let mut tensors = HashMap::with_capacity(raw.len());
        for (name, value) in raw {
            if name == "__metadata__" {
                continue;
            }
            let entry: HeaderEntry = serde_json::from_value(value).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            let dtype = Dtype::parse(&entry.dtype).ok_or_else(|| entry.dtype.clone());
            let [start, end] = entry.data_offsets;
            if start > end {
                return Err(bad(format!(
                    "tensor `{name}`: data_offsets [{start}, {end}] are reversed"
                )));
            }
            if end > data_len {
                return Err(LoadError::Truncated {
                    path: path.to_owned(),
                    tensor: name,
                    end,
                    len: data_len,
                });
            }
            if let Ok(dtype) = dtype {
                let needed = entry
                    .shape
                    .iter()
                    .try_fold(dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
                    .unwrap_or(usize::MAX);
                if needed != end - start {
                    return Err(LoadError::SizeMismatch {
                        path: path.to_owned(),
                        tensor: name,
                        shape: entry.shape,
                        dtype,
                        bytes: end - start,
                        needed,
                    });
                }
            }
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: entry.shape,
                    start,
                    end,
                },
            );
        }
        Ok(SafetensorsFile {
            path: path.to_owned(),
            mmap,
            data_start,
            tensors,
        })
    }
}

/// A borrowed tensor straight out of the mapping.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl TensorView<'_> {
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn expect_shape(&self, expected: &[usize]) -> Result<(), LoadError> {
        if self.shape == expected {
            Ok(())
        } else {
            Err(LoadError::ShapeMismatch {
                path: self.path.to_owned(),
                tensor: self.name.to_owned(),
                got: self.shape.to_vec(),
                expected: expected.to_vec(),
            })
        }
    }

    /// Converts the (little-endian) elements to f32 into `out`, which must hold
    /// `num_elements()` values.
    pub fn write_f32(&self, out: &mut [f32]) {
        self.dtype.write_f32(self.bytes, out);
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.num_elements()];
        self.write_f32(&mut out);
        out
    }
}

/// All weight files of one model folder, addressed by tensor name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or every shard listed in
    /// `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.is_file() {
            let text = std::fs::read(&index_path).map_err(|source| LoadError::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: ShardIndex = serde_json::from_slice(&text).map_err(|e| LoadError::BadHeader {
                path: index_path.clone(),
                reason: format!("shard index: {e}"),
            })?;
            let mut names: Vec<String> = index.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            for name in &names {
                if name.contains('/') || name.contains("..") {
                    return Err(LoadError::BadHeader {
                        path: index_path.clone(),
                        reason: format!("shard name `{name}` is not a plain file name"),
                    });
                }
            }
            names
        } else if single.is_file() {
            vec!["model.safetensors".to_owned()]
        } else {
            return Err(LoadError::NoWeights { dir: dir.to_owned() });
        };
        let mut files = Vec::with_capacity(shard_names.len());
        let mut index = HashMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let file = SafetensorsFile::open(&dir.join(name))?;
            for tensor in file.tensors.keys() {
                index.insert(tensor.clone(), i);
            }
            files.push(file);
        }
        Ok(Checkpoint {
            dir: dir.to_owned(),
            files,
            index,
        })
    }

    /// A checkpoint held in memory: `bytes` of one safetensors file, named `label` in
    /// errors.
    pub fn from_bytes(label: &Path, bytes: Vec<u8>) -> Result<Self, LoadError> {
        let file = SafetensorsFile::parse(label, Storage::Owned(bytes))?;
        let index = file.tensors.keys().map(|t| (t.clone(), 0)).collect();
        Ok(Checkpoint {
            dir: label.to_owned(),
            files: vec![file],
            index,
        })
    }

    pub fn num_tensors(&self) -> usize {
        self.index.len()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, LoadError> {
        let Some(&i) = self.index.get(name) else {
            let path = match self.files.as_slice() {
                [only] => only.path.clone(),
                _ => self.dir.clone(),
            };
            return Err(LoadError::MissingTensor {
                path,
                tensor: name.to_owned(),
            });
        };
        let file = &self.files[i];
        let (key, info) = file.tensors.get_key_value(name).expect("index and file agree");
        let dtype = info.dtype.clone().map_err(|dtype| LoadError::UnsupportedDtype {
            path: file.path.clone(),
            tensor: name.to_owned(),
            dtype,
        })?;
        Ok(TensorView {
            name: key,
            path: &file.path,
            dtype,
            shape: &info.shape,
            bytes: &file.mmap[file.data_start + info.start..file.data_start + info.end],
        })
    }
}
