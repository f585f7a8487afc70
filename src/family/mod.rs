//! The non-local family: blocks that descend from the non-local block, in the same slot of
//! the same models, each PyTorch-exact against its upstream module.
//!
//! - [`DisentangledNonLocal`] — DNLNet's disentangled non-local block (mmsegmentation).

mod disentangled;

pub use disentangled::{DisentangledConfig, DisentangledContext, DisentangledGradients, DisentangledNonLocal};
