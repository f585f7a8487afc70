//! [`TensorFile`]: a checkpoint of any supported format, held in memory, its tensors read on
//! demand.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use ndarray::{Array, ArrayD, Dimension, IxDyn};

use crate::checkpoint::{self, CheckpointFormat, DType, Entry, ReadFailure, TensorLayout};
use crate::error::{Error, Result};

/// The name [`TensorFile::from_bytes`] gives its bytes in errors.
const IN_MEMORY: &str = "(checkpoint bytes)";

/// A checkpoint held in memory: safetensors, a `torch.save` zip archive (torch ≥ 1.6:
/// `.pth`, `.pt`, `pytorch_model.bin`) or a legacy `torch.save` stream (torch < 1.6), told
/// apart by content, not by extension.
///
/// Opening checks the container and every tensor's place in it; tensors are converted to f32
/// on demand. For a torch file, the tensors are those of its state dict: the saved dict itself,
/// or the dict under `state_dict`, `model`, … of a training checkpoint
/// ([`TensorFile::state_dict_location`]). Nothing in a torch file is ever executed: objects
/// of other classes (numpy arrays, optimizer or logger state, `eval`…) are kept as opaque
/// entries, an error only if a block needs one ([`Error::NotATensor`]).
///
/// # Example
/// ```
/// use nonlocal::{CheckpointFormat, TensorFile};
///
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pth/pth_alexhex7_zip.pth");
/// let file = TensorFile::open(path)?;
/// assert_eq!(file.format(), CheckpointFormat::TorchZip);
/// assert_eq!(file.shape("theta.weight")?, &[8, 16, 1, 1, 1]);
/// let theta: ndarray::Array5<f32> = file.tensor_as("theta.weight")?;
/// assert_eq!(theta.shape(), &[8, 16, 1, 1, 1]);
/// # Ok::<(), nonlocal::Error>(())
/// ```
pub struct TensorFile {
    bytes: Vec<u8>,
    format: CheckpointFormat,
    tensors: HashMap<String, TensorLayout>,
    /// State-dict entries that are not tensors, described.
    others: HashMap<String, String>,
    /// Every key, in the file's order.
    order: Vec<String>,
    metadata: HashMap<String, String>,
    location: String,
}

impl fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorFile")
            .field("format", &self.format)
            .field("bytes", &self.bytes.len())
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl TensorFile {
    /// Reads and checks a checkpoint.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::NotACheckpoint`] when it is none
    /// of the formats read, [`Error::BadCheckpoint`] when it is one but broken (truncated,
    /// a damaged archive or pickle, a tensor outside its storage…); both name the path.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| Error::Io { path: shown.clone(), source })?;
        Self::read(bytes, &shown)
    }

    /// Checks checkpoint bytes (any format) and keeps them.
    ///
    /// # Errors
    /// As [`TensorFile::open`], the path shown as `(checkpoint bytes)`.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::read(bytes, IN_MEMORY)
    }

    fn read(bytes: Vec<u8>, path: &str) -> Result<Self> {
        let contents = checkpoint::read(&bytes).map_err(|failure| match failure {
            ReadFailure::NotACheckpoint(found) => Error::NotACheckpoint { path: path.to_string(), found },
            ReadFailure::Broken(format, reason) => Error::BadCheckpoint { path: path.to_string(), format, reason },
        })?;
        let checkpoint::Contents { format, entries, metadata, location } = contents;
        let mut file = TensorFile {
            bytes,
            format,
            tensors: HashMap::new(),
            others: HashMap::new(),
            order: Vec::new(),
            metadata,
            location,
        };
        for (key, entry) in entries {
            if file.tensors.contains_key(&key) || file.others.contains_key(&key) {
                continue;
            }
            file.order.push(key.clone());
            match entry {
                Entry::Tensor(t) => {
                    file.tensors.insert(key, t);
                }
                Entry::Other(what) => {
                    file.others.insert(key, what);
                }
            }
        }
        Ok(file)
    }

    /// The file's format.
    pub fn format(&self) -> CheckpointFormat {
        self.format
    }

    /// Where the tensors were found inside a torch checkpoint: `""` when the saved object is
    /// the state dict itself, else its key path, such as `state_dict` or `model`. Always `""`
    /// for safetensors.
    pub fn state_dict_location(&self) -> &str {
        &self.location
    }

    /// The safetensors header's `__metadata__` strings (empty when it has none, and for
    /// torch files).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Whether the file holds a tensor under `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Whether the state dict has an entry under `key`, a tensor or anything else.
    pub(crate) fn has_entry(&self, key: &str) -> bool {
        self.tensors.contains_key(key) || self.others.contains_key(key)
    }

    /// The tensor names, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    /// Every state-dict key in the file's own order, tensors or not.
    pub fn keys_in_order(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }

    /// The shape of the tensor under `key`.
    ///
    /// # Errors
    /// [`Error::MissingKey`] when there is no such entry, [`Error::NotATensor`] when the entry
    /// holds something else.
    pub fn shape(&self, key: &str) -> Result<&[usize]> {
        Ok(&self.layout(key)?.shape)
    }

    /// The element type of the tensor under `key`.
    ///
    /// # Errors
    /// As [`TensorFile::shape`].
    pub fn dtype(&self, key: &str) -> Result<&DType> {
        Ok(&self.layout(key)?.dtype)
    }

    fn layout(&self, key: &str) -> Result<&TensorLayout> {
        self.tensors.get(key).ok_or_else(|| match self.others.get(key) {
            Some(found) => Error::NotATensor { key: key.into(), found: found.clone() },
            None => Error::MissingKey { key: key.into() },
        })
    }

    /// The tensor under `key`, converted to f32 (from F32, F16, BF16 or F64), in its own
    /// shape and row-major order whatever its strides in the file.
    ///
    /// # Errors
    /// [`Error::MissingKey`], [`Error::NotATensor`] or [`Error::UnsupportedDtype`].
    pub fn tensor(&self, key: &str) -> Result<ArrayD<f32>> {
        self.decode(key, TensorLayout::read_f32)
    }

    /// The tensor under `key`, its elements decoded by `decode` (`None`: not that kind).
    fn decode<T>(&self, key: &str, decode: impl Fn(&TensorLayout, &[u8]) -> Option<Vec<T>>) -> Result<ArrayD<T>> {
        let t = self.layout(key)?;
        let values = decode(t, &self.bytes)
            .ok_or_else(|| Error::UnsupportedDtype { key: key.into(), dtype: t.dtype.to_string() })?;
        Ok(ArrayD::from_shape_vec(IxDyn(&t.shape), values)?)
    }

    /// The tensor under `key` as f32 with a fixed rank: `file.tensor_as::<Ix5>("input")?`, or
    /// with the type annotated, `let w: Array2<f32> = file.tensor_as(key)?`.
    ///
    /// # Errors
    /// As [`TensorFile::tensor`], and [`Error::WrongRank`] when the tensor has another rank.
    pub fn tensor_as<D: Dimension>(&self, key: &str) -> Result<Array<f32, D>> {
        let t = self.tensor(key)?;
        let rank = t.ndim();
        t.into_dimensionality::<D>().map_err(|_| Error::WrongRank {
            key: key.into(),
            expected: D::NDIM.unwrap_or(rank),
            actual: rank,
        })
    }

    /// The integer tensor under `key` (I64, I32, I16, I8, U8 or BOOL) as i64, such as
    /// BatchNorm's `num_batches_tracked`.
    ///
    /// # Errors
    /// [`Error::MissingKey`], [`Error::NotATensor`], or [`Error::UnsupportedDtype`] for a
    /// float tensor.
    pub fn tensor_i64(&self, key: &str) -> Result<ArrayD<i64>> {
        self.decode(key, TensorLayout::read_i64)
    }
}
