//! The checkpoint reader, a leaf of the crate: safetensors files, `torch.save` zip archives
//! and legacy `torch.save` streams, told apart by content ([`CheckpointFormat`]), read into
//! their state dict's entries without running anything.
//!
//! The pickle reader (`pickle.rs`, which lists the opcodes it accepts) records every global
//! and call as an inert object; tensors are rebuilt only from torch's `_rebuild_tensor_v2`
//! (`torch.rs`) and checked to stay inside their storage (`tensor.rs`). This module imports
//! nothing else of the crate: it reports failures in words ([`ReadFailure`]), and
//! [`TensorFile`](crate::TensorFile), above it, turns them into typed errors.

mod pickle;
mod safetensors;
mod tensor;
mod torch;

use std::collections::HashMap;
use std::fmt;

pub use tensor::DType;
pub(crate) use tensor::TensorLayout;
pub(crate) use torch::Entry;

/// Everything a checkpoint holds that the crate reads.
#[derive(Debug)]
pub(crate) struct Contents {
    pub format: CheckpointFormat,
    /// The state dict's entries in file order (duplicates not removed).
    pub entries: Vec<(String, Entry)>,
    /// The safetensors header's `__metadata__` (empty for torch files).
    pub metadata: HashMap<String, String>,
    /// Where the state dict was found in a torch checkpoint (`""`: the saved object itself).
    pub location: String,
}

/// Why bytes could not be read as a checkpoint.
#[derive(Debug)]
pub(crate) enum ReadFailure {
    /// None of the formats read: what the content is instead.
    NotACheckpoint(String),
    /// A format that is read, but broken or hostile: the format and what is wrong.
    Broken(CheckpointFormat, String),
}

/// Reads and checks checkpoint bytes of any format.
///
/// # Errors
/// [`ReadFailure`], in words.
pub(crate) fn read(bytes: &[u8]) -> Result<Contents, ReadFailure> {
    let format = CheckpointFormat::detect(bytes).map_err(ReadFailure::NotACheckpoint)?;
    let broken = |reason: String| ReadFailure::Broken(format, reason);
    let (entries, metadata, location) = match format {
        CheckpointFormat::Safetensors => {
            let (entries, metadata) = safetensors::read(bytes).map_err(broken)?;
            (entries, metadata, String::new())
        }
        CheckpointFormat::TorchZip | CheckpointFormat::TorchLegacy => {
            let dict = if format == CheckpointFormat::TorchZip {
                torch::read_zip(bytes)
            } else {
                torch::read_legacy(bytes).map_err(torch::ReadError::Broken)
            }
            .map_err(|e| match e {
                torch::ReadError::NotTorch(found) => ReadFailure::NotACheckpoint(found),
                torch::ReadError::Broken(reason) => broken(reason),
            })?;
            (dict.entries, HashMap::new(), dict.location)
        }
    };
    Ok(Contents { format, entries, metadata, location })
}

/// The container format of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CheckpointFormat {
    /// A safetensors file.
    Safetensors,
    /// A `torch.save` zip archive (torch ≥ 1.6): `<name>/data.pkl`, `<name>/data/<key>`.
    TorchZip,
    /// A legacy `torch.save` stream (torch < 1.6, or `_use_new_zipfile_serialization=False`).
    TorchLegacy,
}

impl CheckpointFormat {
    /// The format's name in messages: `safetensors`, `torch zip`, `legacy torch`.
    pub fn name(self) -> &'static str {
        match self {
            CheckpointFormat::Safetensors => "safetensors",
            CheckpointFormat::TorchZip => "torch zip",
            CheckpointFormat::TorchLegacy => "legacy torch",
        }
    }

    /// Tells the format from the first bytes, or says what the content is instead.
    ///
    /// A zip local-header or end-of-archive signature makes a torch zip (an unreadable or
    /// non-torch zip is then reported by the reader); a pickle starting with torch's magic
    /// number a legacy stream; an 8-byte length followed by `{` safetensors.
    pub(crate) fn detect(bytes: &[u8]) -> Result<Self, String> {
        if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            return Ok(CheckpointFormat::TorchZip);
        }
        if bytes.len() > 8 && bytes[8] == b'{' {
            return Ok(CheckpointFormat::Safetensors);
        }
        if torch::is_legacy(bytes) {
            return Ok(CheckpointFormat::TorchLegacy);
        }
        Err(match bytes {
            [] => "the file is empty".into(),
            [0x80, 2..=5, ..] => "a pickle, but not a torch.save stream (no torch magic number)".into(),
            _ if bytes.len() > 262 && &bytes[257..262] == b"ustar" => {
                "a tar archive (the tar format of torch < 0.4 is not read)".into()
            }
            _ if bytes.len() < 9 => format!("{} bytes, too short for any checkpoint", bytes.len()),
            _ => format!("unrecognised content starting with {:02x?}", &bytes[..8]),
        })
    }
}

impl fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
