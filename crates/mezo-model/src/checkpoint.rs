//! Weights as a user has them from the HF hub cache: `model.safetensors`, sharded safetensors
//! (`model.safetensors.index.json`), `pytorch_model.bin` and its sharded form
//! (`pytorch_model.bin.index.json`). `.bin` files are read by [`crate::torch_bin`], which
//! interprets the pickle stream itself and never executes it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::error::{io_err, ModelError, Result};
use crate::torch_bin::{self, DType, RawTensor};

/// Every tensor of a checkpoint, with the file it came from (so a later shape or dtype complaint
/// can name it). Safetensors files are mapped, not read: a tensor's bytes are copied out when the
/// model takes it, and the model moves it to its device before taking the next, so loading a model
/// onto a GPU needs host memory for about one tensor (the mapped pages are the page cache's, which
/// the kernel may drop), not for the whole model (123 GiB for OPT-66B in fp16). A `.bin` file (a
/// pickle inside a zip) is read whole; a sharded checkpoint's shards are read one at a time, each
/// when its first tensor is taken.
pub struct Checkpoint {
    pub dir: PathBuf,
    tensors: HashMap<String, (Stored, PathBuf)>,
    /// A sharded checkpoint's tensors whose shard is not read yet: by normalised name, the shard
    /// and the index's own name for the tensor.
    unread: HashMap<String, (PathBuf, String)>,
    format: Format,
}

/// One tensor of a checkpoint: read, or still in its mapped file.
enum Stored {
    Loaded(Tensor),
    Mapped { map: Arc<memmap2::Mmap>, range: std::ops::Range<usize>, dtype: DType, shape: Vec<usize> },
}

impl Stored {
    fn shape(&self) -> Vec<i64> {
        match self {
            Stored::Loaded(t) => t.size(),
            Stored::Mapped { shape, .. } => shape.iter().map(|&d| d as i64).collect(),
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Stored::Loaded(t) => t.kind(),
            Stored::Mapped { dtype, .. } => kind_of(*dtype),
        }
    }

    /// The tensor on the CPU in its stored dtype (a copy of the file's bytes).
    fn read(self, path: &Path, name: &str) -> Result<Tensor> {
        match self {
            Stored::Loaded(t) => Ok(t),
            Stored::Mapped { map, range, dtype, shape } => {
                RawView { dtype, shape: &shape, data: &map[range] }.to_tensor(path, name)
            }
        }
    }
}

impl Checkpoint {
    /// Opens the weights of `dir`, preferring safetensors over `.bin`, single over sharded. A
    /// sharded checkpoint's shards are read (a `.bin`) or mapped (safetensors) when a tensor of
    /// theirs is first taken: the model takes its tensors layer by layer, as the shards hold them,
    /// so a `.bin` checkpoint needs host memory for about one shard at a time.
    pub fn load(dir: &Path) -> Result<Self> {
        let candidates: [(&str, Format, bool); 4] = [
            ("model.safetensors", Format::SafeTensors, false),
            ("model.safetensors.index.json", Format::SafeTensors, true),
            ("pytorch_model.bin", Format::TorchBin, false),
            ("pytorch_model.bin.index.json", Format::TorchBin, true),
        ];
        let Some((file, format, sharded)) = candidates.into_iter().find(|(f, _, _)| dir.join(f).is_file())
        else {
            return Err(ModelError::NoWeights { dir: dir.to_path_buf() });
        };
        let mut ckpt =
            Checkpoint { dir: dir.to_path_buf(), tensors: HashMap::new(), unread: HashMap::new(), format };
        let path = dir.join(file);
        if sharded {
            let map = read_index(&path)?;
            // Every shard must be there now: a missing one is reported before any work is done.
            let shards: BTreeSet<&String> = map.values().collect();
            for shard in shards {
                let p = dir.join(shard);
                std::fs::File::open(&p).map_err(io_err(&p))?;
            }
            for (name, shard) in map {
                ckpt.unread.insert(normalise(&name), (dir.join(shard), name));
            }
        } else {
            ckpt.load_file(&path)?;
        }
        Ok(ckpt)
    }

    fn load_file(&mut self, path: &Path) -> Result<()> {
        let loaded = match self.format {
            Format::SafeTensors => map_safetensors(path)?,
            Format::TorchBin => torch_bin::read_torch_bin(path)
                .map_err(|e| ModelError::CorruptWeights { path: path.to_path_buf(), message: e.to_string() })?
                .into_iter()
                .map(|(name, raw)| Ok((name.clone(), Stored::Loaded(raw_to_tensor(&raw, path, &name)?))))
                .collect::<Result<Vec<_>>>()?,
        };
        for (name, tensor) in loaded {
            self.tensors.insert(normalise(&name), (tensor, path.to_path_buf()));
        }
        Ok(())
    }

    /// Reads (or maps) a shard of a sharded checkpoint, which must hold every tensor the index
    /// places in it.
    fn read_shard(&mut self, shard: &Path) -> Result<()> {
        self.load_file(shard)?;
        let names: Vec<String> =
            self.unread.iter().filter(|(_, (s, _))| s == shard).map(|(n, _)| n.clone()).collect();
        for name in names {
            let (_, indexed) = self.unread.remove(&name).expect("listed above");
            if !self.tensors.contains_key(&name) {
                return Err(ModelError::MissingTensor { path: shard.to_path_buf(), tensor: indexed });
            }
        }
        Ok(())
    }

    /// Takes a tensor out by its HF name, checking its shape against what config.json implies.
    pub fn take(&mut self, name: &str, expected: &[i64]) -> Result<Tensor> {
        if let Some((shard, _)) = self.unread.get(name).filter(|_| !self.tensors.contains_key(name)) {
            self.read_shard(&shard.clone())?;
        }
        let Some((stored, path)) = self.tensors.remove(name) else {
            return Err(ModelError::MissingTensor { path: self.weights_path(), tensor: name.into() });
        };
        let actual = stored.shape();
        if actual != expected {
            return Err(ModelError::ShapeMismatch {
                path,
                tensor: name.into(),
                expected: expected.to_vec(),
                actual,
            });
        }
        if !matches!(stored.kind(), Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            return Err(ModelError::UnsupportedDType {
                path,
                tensor: name.into(),
                dtype: format!("{:?}", stored.kind()),
            });
        }
        stored.read(&path, name)
    }

    /// Every tensor not yet taken, by name, with its shape (sorted by name); reads the shards not
    /// read yet.
    pub fn shapes(&mut self) -> Result<Vec<(String, Vec<i64>)>> {
        let shards: BTreeSet<PathBuf> = self.unread.values().map(|(s, _)| s.clone()).collect();
        for shard in shards {
            self.read_shard(&shard)?;
        }
        let mut v: Vec<_> = self.tensors.iter().map(|(n, (t, _))| (n.clone(), t.shape())).collect();
        v.sort();
        Ok(v)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.unread.contains_key(name)
    }

    /// The file a message about a tensor that is absent everywhere should point at.
    fn weights_path(&self) -> PathBuf {
        let mut files: Vec<&PathBuf> =
            self.tensors.values().map(|(_, p)| p).chain(self.unread.values().map(|(s, _)| s)).collect();
        files.sort();
        files.dedup();
        match files.as_slice() {
            [one] => (*one).clone(),
            _ => self.dir.clone(),
        }
    }
}

#[derive(Clone, Copy)]
enum Format {
    SafeTensors,
    TorchBin,
}

/// HF saves `OPTForCausalLM` as `model.decoder.*` but bare `OPTModel` checkpoints (as some
/// facebook/opt-* repos ship) as `decoder.*`; both load.
fn normalise(name: &str) -> String {
    if name.starts_with("decoder.") {
        format!("model.{name}")
    } else {
        name.to_string()
    }
}

fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Config {
        path: path.to_path_buf(),
        field: "weight_map".into(),
        message: "missing or not an object of tensor name -> shard file".into(),
    })?;
    map.iter()
        .map(|(k, v)| match v.as_str() {
            Some(file) if !file.contains("..") && !file.starts_with('/') => Ok((k.clone(), file.to_string())),
            _ => Err(ModelError::Config {
                path: path.to_path_buf(),
                field: format!("weight_map.{k}"),
                message: format!("{v} is not a shard file name in this directory"),
            }),
        })
        .collect()
}

/// A safetensors file's tensors, mapped: the header is parsed and checked (offsets inside the
/// file, sizes that match the shapes) and no tensor is read yet.
fn map_safetensors(path: &Path) -> Result<Vec<(String, Stored)>> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: the map is read-only. It lives as long as the checkpoint; a checkpoint truncated by
    // another process meanwhile is outside what we defend against (as for any mapped file).
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?);
    let corrupt = |message: String| ModelError::CorruptWeights { path: path.to_path_buf(), message };
    let (header, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| corrupt(e.to_string()))?;
    let data_start = 8 + header;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        use safetensors::Dtype as S;
        let dtype = match info.dtype {
            S::F64 => DType::F64,
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I16 => DType::I16,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::BOOL => DType::Bool,
            other => {
                return Err(ModelError::UnsupportedDType {
                    path: path.to_path_buf(),
                    tensor: name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (start, end) = info.data_offsets;
        let range = data_start + start..data_start + end;
        if range.end > map.len() {
            return Err(corrupt(format!("tensor `{name}` ends past the end of the file")));
        }
        let shape = info.shape.clone();
        out.push((name, Stored::Mapped { map: map.clone(), range, dtype, shape }));
    }
    Ok(out)
}

fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

struct RawView<'a> {
    dtype: DType,
    shape: &'a [usize],
    data: &'a [u8],
}

impl RawView<'_> {
    fn to_tensor(&self, path: &Path, name: &str) -> Result<Tensor> {
        let kind = kind_of(self.dtype);
        let shape: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        let numel: usize = self.shape.iter().product();
        if numel * self.dtype.size_in_bytes() != self.data.len() {
            return Err(ModelError::CorruptWeights {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{name}`: {} bytes for shape {shape:?} of {:?}",
                    self.data.len(),
                    self.dtype
                ),
            });
        }
        Ok(Tensor::f_from_data_size(self.data, &shape, kind)?)
    }
}

fn raw_to_tensor(raw: &RawTensor, path: &Path, name: &str) -> Result<Tensor> {
    RawView { dtype: raw.dtype, shape: &raw.shape, data: &raw.data }.to_tensor(path, name)
}
