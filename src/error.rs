//! The crate's error type.

use crate::checkpoint::CheckpointFormat;

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
    /// Writing a safetensors file failed. (Reading any checkpoint reports
    /// [`Error::NotACheckpoint`] or [`Error::BadCheckpoint`] instead.)
    #[error("cannot write the safetensors file: {reason}")]
    SaveFailed {
        /// What the serialiser found wrong, in words.
        reason: String,
    },
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
        format: CheckpointFormat,
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
    /// No weight of a block is under the key scheme and prefix asked for: the scheme or the
    /// prefix is wrong. `found` lists the blocks the file does have ([`find_blocks`](crate::find_blocks)).
    #[error(
        "no {naming} non-local block under prefix {prefix:?}{}",
        if found.is_empty() { "; the file holds no non-local block".to_string() } else { format!("; the file has: {}", found.join(", ")) }
    )]
    BlockNotFound {
        /// The key scheme asked for (`alexhex7`, `mmcv`, …).
        naming: &'static str,
        /// The prefix asked for.
        prefix: String,
        /// The blocks the file has, as `<naming> at "<prefix>"`.
        found: Vec<String>,
    },
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
    /// The input's rank is not the one its entry point takes: 5 (B, T, H, W, C) for
    /// `forward` and the other clip entry points, 4 (B, H, W, C) for `forward_images`, 3
    /// (B, L, C) for `forward_sequences`. The rank is never guessed.
    #[error("input has rank {actual} (shape {shape:?}), expected rank {expected}")]
    InputRank {
        /// The rank and axes the entry point takes, in words, and where other layouts go.
        expected: &'static str,
        /// The rank found.
        actual: usize,
        /// The input's shape.
        shape: Vec<usize>,
    },
    /// The input's last (channel) axis does not match `in_channels`. The message points out a
    /// channels-first tensor (PyTorch's layout) when another axis has the expected size.
    #[error(
        "input has {actual} channels in its last axis (shape {shape:?}), the block expects {expected}: \
         inputs are channels-last{}",
        channels_first_hint(shape, *expected)
    )]
    InputChannels {
        /// The block's `in_channels`.
        expected: usize,
        /// The channel count found (the last axis).
        actual: usize,
        /// The input's shape.
        shape: Vec<usize>,
    },
    /// The input spans more axes than the block's PyTorch module attends over: a block of
    /// rank d (`conv_dims` d, as `NonLocal1d/2d/3d`; the family blocks are 2-d) attends over
    /// the last d of (T, H, W), so the others must be 1.
    #[error(
        "the block is {conv_dims}-d (as its PyTorch module, e.g. NonLocal{conv_dims}d): it attends over the last \
         {conv_dims} of (T, H, W), but the input has (T, H, W) = {grid:?}; give image maps (B, H, W, C) to \
         forward_images (a non-local block also takes sequences (B, L, C) in forward_sequences, or a larger \
         conv_dims)"
    )]
    LayoutMismatch {
        /// The block's [`NonLocalConfig::conv_dims`](crate::NonLocalConfig::conv_dims).
        conv_dims: usize,
        /// The input's (T, H, W), images and sequences read as T = 1 and T = H = 1.
        grid: [usize; 3],
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
    /// The sizes involved would overflow `usize` (or `isize` bytes) when buffers are sized.
    #[error("sizes too large: {what} overflows usize")]
    TooLarge {
        /// Which product overflowed.
        what: &'static str,
    },
    /// A buffer of a size that fits could not be allocated (out of memory).
    #[error("cannot allocate {bytes} bytes for {what}")]
    AllocationFailed {
        /// What the buffer is for.
        what: &'static str,
        /// The size asked for, in bytes.
        bytes: usize,
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
    /// A (t, h, w) position asked of [`NonLocalBlock::query_index`](crate::NonLocalBlock::query_index)
    /// lies outside the input grid.
    #[error("position {position:?} is outside the input grid (T, H, W) = {grid:?}")]
    PositionOutOfRange {
        /// The requested (t, h, w).
        position: [usize; 3],
        /// The input's (T, H, W).
        grid: [usize; 3],
    },
    /// A key index asked of the attention conversions is out of range.
    #[error("key {index} is out of range: the input has {keys} key positions")]
    KeyOutOfRange {
        /// The requested key index.
        index: usize,
        /// The number of key positions M.
        keys: usize,
    },
}

/// For an input whose last axis is not the channel count: a pointer to the first axis after the
/// batch that is, as in a channels-first tensor, and the permutation that moves that axis last.
fn channels_first_hint(shape: &[usize], channels: usize) -> String {
    let rank = shape.len();
    let found = (1..rank.saturating_sub(1)).find(|&axis| shape[axis] == channels);
    match found {
        Some(axis) => {
            let order: Vec<usize> = (0..rank).filter(|&a| a != axis).chain([axis]).collect();
            let first = if axis == 1 { ", as in a channels-first tensor (PyTorch's (B, C, ...))" } else { "" };
            format!("; axis {axis} has {channels}{first}: move it last with .permuted_axes({order:?})")
        }
        None => String::new(),
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
