//! Loading by keys, above the checkpoint reader: a checkpoint's tensors on demand
//! ([`TensorFile`]), the key schemes of the PyTorch implementations ([`Naming`],
//! [`WeightKeys`]), a block's parameters read under them and checked against its
//! configuration, and the blocks a checkpoint holds with the configuration their keys show
//! ([`find_blocks`]).

mod file;
mod find;
mod keys;
mod params;

pub use file::TensorFile;
pub use find::{detect_naming, find_blocks, BlockInfo, BlockKind};
pub(crate) use keys::checkpoint_entry;
pub use keys::{Naming, WeightKeys};
pub(crate) use params::{export, load_parameters};
