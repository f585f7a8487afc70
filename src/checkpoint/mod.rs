//! Reading checkpoints: safetensors, `torch.save` zip archives and legacy `torch.save`
//! streams, safely.
//!
//! - [`TensorFile`] opens any of the three, told apart by content; for torch files it finds
//!   the state dict (the saved dict, or under `state_dict`, `model`, … of a training
//!   checkpoint) and never runs code: the pickle reader records objects instead of calling
//!   anything (the opcodes it accepts are listed in `src/checkpoint/pickle.rs`).
//! - [`find_blocks`] lists the non-local blocks in a checkpoint, [`BlockInfo::config`] gives
//!   a configuration read off the keys, and [`load_blocks`] loads them all.

mod blocks;
mod file;
mod pickle;
mod tensor;
mod torch;

use std::fmt;

pub use blocks::{find_blocks, load_blocks, BlockInfo};
pub use file::TensorFile;
pub use tensor::DType;

/// The container format of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
