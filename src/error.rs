//! The crate's error type.

/// Everything that can go wrong in this crate.
///
/// Each variant carries what a caller needs to act on it: the offending key, the expected and
/// the actual shape, the dimension that is wrong. The enum is `#[non_exhaustive]`, so new
/// kinds of error can be added without breaking matches that end in `_ =>`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration itself is invalid (zero channels, a zero pool kernel, …).
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong, in words.
        reason: String,
    },
    /// A mode name that is none of the four pairwise functions.
    #[error("unknown mode {name:?}: expected embedded_gaussian, gaussian, dot_product or concatenation")]
    UnknownMode {
        /// The name that was given.
        name: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file's path.
        path: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing safetensors failed. (Reading any checkpoint reports
    /// [`Error::NotACheckpoint`] or [`Error::BadCheckpoint`] instead.)
    #[error("invalid safetensors data: {0}")]
    Format(#[from] safetensors::SafeTensorError),
    /// The file is none of the checkpoint formats read.
    #[error(
        "{path} is not a checkpoint: {found}; the formats read are safetensors, the torch.save zip \
         archive (torch >= 1.6: .pth, .pt, pytorch_model.bin) and the legacy torch.save stream (torch < 1.6)"
    )]
    NotACheckpoint {
        /// The file's path (`(checkpoint bytes)` for bytes given in memory).
        path: String,
        /// What the content is instead (empty, too short, an unreadable zip, …).
        found: String,
    },
    /// A checkpoint in a format that is read, but broken or hostile: truncated, a damaged
    /// archive, a pickle the reader refuses, a tensor reaching outside its storage, a storage
    /// larger than the file. Nothing was allocated for the claimed sizes.
    #[error("{path}: invalid {format} checkpoint: {reason}")]
    BadCheckpoint {
        /// The file's path (`(checkpoint bytes)` for bytes given in memory).
        path: String,
        /// The format the content was recognised as.
        format: crate::checkpoint::CheckpointFormat,
        /// What is wrong, in words.
        reason: String,
    },
    /// A state-dict entry that is needed as a tensor holds something else: a number, a string,
    /// or an object of a class the reader never builds (it is never called either).
    #[error("{key} is not a tensor: it holds {found}")]
    NotATensor {
        /// The entry's key.
        key: String,
        /// What it holds, in words.
        found: String,
    },
    /// A tensor has another rank than the one asked for.
    #[error("{key}: expected a tensor of rank {expected}, found rank {actual}")]
    WrongRank {
        /// The tensor's key.
        key: String,
        /// The rank asked for.
        expected: usize,
        /// The tensor's rank.
        actual: usize,
    },
    /// An ndarray shape error, from building an array out of parts.
    #[error("shape error: {0}")]
    Shape(#[from] ndarray::ShapeError),
    /// A required parameter is not in the file.
    #[error("missing parameter {key:?}")]
    MissingKey {
        /// The full key that was looked for (prefix included).
        key: String,
    },
    /// A parameter or tensor has the wrong shape.
    #[error("{key}: expected shape {expected:?}, found {actual:?}")]
    WrongShape {
        /// The parameter's key (or its name, for tensors built in code).
        key: String,
        /// The shape the configuration asks for.
        expected: Vec<usize>,
        /// The shape that was found.
        actual: Vec<usize>,
    },
    /// A tensor is stored with a data type this crate does not convert to f32 (or, for
    /// [`TensorFile::tensor_i64`](crate::TensorFile::tensor_i64), to i64).
    #[error("{key}: unsupported dtype {dtype} (F32, F16, BF16 and F64 are read as floats, I64, I32, I16, I8, U8 and BOOL as integers)")]
    UnsupportedDtype {
        /// The tensor's key.
        key: String,
        /// The dtype found, as safetensors names it.
        dtype: String,
    },
    /// A parameter has values that cannot be used (NaN or negative running variance, …).
    #[error("{key}: invalid value: {reason}")]
    InvalidParameter {
        /// The parameter's key.
        key: String,
        /// What is wrong, in words.
        reason: String,
    },
    /// The weights and the configuration disagree (BN present or not, pooling, conv rank, …).
    #[error("configuration says {what} = {config}, but the weights have {weights}")]
    ConfigMismatch {
        /// Which setting disagrees.
        what: &'static str,
        /// The configuration's value.
        config: String,
        /// What the weights imply.
        weights: String,
    },
    /// The input tensor's rank is neither 4 (T, H, W, C) nor 5 (B, T, H, W, C).
    #[error("input must have rank {expected}, found rank {actual} (shape {shape:?})")]
    InputRank {
        /// The accepted rank(s), in words.
        expected: &'static str,
        /// The rank found.
        actual: usize,
        /// The input's shape.
        shape: Vec<usize>,
    },
    /// The input's channel dimension does not match `in_channels`.
    #[error("input has {actual} channels, the block expects {expected}")]
    InputChannels {
        /// The block's `in_channels`.
        expected: usize,
        /// The channel count found.
        actual: usize,
    },
    /// The input has a zero-sized dimension, so there is nothing to attend over.
    #[error("input dimension {axis} ({name}) is zero in shape {shape:?}")]
    EmptyInput {
        /// The index of the zero-sized axis.
        axis: usize,
        /// The axis' name (B, T, H, W or C).
        name: &'static str,
        /// The input's shape.
        shape: Vec<usize>,
    },
    /// The spatial size is smaller than the pool kernel, so no key position is left.
    #[error("input size (T, H, W) = {size:?} is smaller than the pool kernel {kernel:?}: no key positions")]
    NoKeys {
        /// The input's (T, H, W).
        size: [usize; 3],
        /// The pool kernel (kt, kh, kw).
        kernel: [usize; 3],
    },
    /// The sizes involved would overflow `usize` when buffers are sized.
    #[error("sizes too large: {what} overflows usize")]
    TooLarge {
        /// Which product overflowed.
        what: &'static str,
    },
    /// A training context was used with parameters other than those of its forward pass.
    #[error("the training context is stale: the block's parameters changed after forward_train")]
    StaleContext,
    /// A query position asked of the attention API is out of range.
    #[error("query position {index} is out of range: the input has {positions} positions")]
    QueryOutOfRange {
        /// The requested query index.
        index: usize,
        /// The number of query positions N = T·H·W.
        positions: usize,
    },
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
