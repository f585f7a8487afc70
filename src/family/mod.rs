//! The non-local family: blocks that descend from the non-local block, in the same slot of
//! the same models, each PyTorch-exact against its upstream module.
//!
//! - [`ContextBlock`] — GCNet's global context block (mmcv's `ContextBlock`, timm's
//!   `GlobalContext`): one query-independent attention map per sample.
//! - [`CrissCrossAttention`] — CCNet's criss-cross attention (mmcv's `CrissCrossAttention`):
//!   each position attends over its own row and column.
//! - [`DisentangledNonLocal`] — DNLNet's disentangled non-local block (mmsegmentation).
//!
//! [`find_all_blocks`] lists every block of the family a checkpoint holds, each with the
//! configuration its keys show.

mod context;
mod criss_cross;
mod disentangled;
mod found;

pub use context::{
    ContextBlock, ContextConfig, ContextGradients, ContextMlp, ContextParameterGradients, ContextParameters,
    ContextTrainContext, Pooling,
};
pub use criss_cross::{
    CrissCrossAttention, CrissCrossConfig, CrissCrossContext, CrissCrossGradients, CrissCrossParameterGradients,
    CrissCrossParameters,
};
pub use disentangled::{DisentangledConfig, DisentangledContext, DisentangledGradients, DisentangledNonLocal};
pub use found::{find_all_blocks, FoundBlock};
