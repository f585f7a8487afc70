//! Criss-cross attention (Huang et al., [*CCNet: Criss-Cross Attention for Semantic
//! Segmentation*](https://arxiv.org/abs/1811.11721), ICCV 2019), as mmcv's
//! `CrissCrossAttention`: each position of an image feature map attends to the H + W − 1
//! positions of its row and column (itself counted once) through one softmax, and the block
//! adds γ times the result to its input. See [`CrissCrossAttention`].
//!
//! - [`CrissCrossConfig`]: channels (q and k are C/8 wide, as mmcv) and the recurrence;
//! - [`CrissCrossParameters`]: `query_conv`, `key_conv`, `value_conv` and `gamma.scale`;
//! - [`CrissCrossAttention`]: the block: loading from mmcv checkpoints, `forward_images`
//!   on (B, H, W, C), `forward` on clips of one frame, training.
//!
//! The projections are one GEMM on weights packed when the parameters are set (most of the
//! work at C = 512: 2·N·C·(C + 2·C/8) FLOPs against 2·N·(H + W − 1)·(C + C/8) for the
//! attention at H = 64, W = 128). The attention runs per image column, then per image row, as
//! small GEMM-shaped attentions combined through one log-sum-exp (see the design notes in
//! `forward.rs`): O(N·C) memory, never the N × (H + W) attention, bit-identical results for
//! any thread count. Training recomputes the attention from the saved log-sum-exp.

mod backward;
mod block;
mod config;
mod forward;
mod input;
mod load;
mod params;
mod projections;
mod train;

pub use block::CrissCrossAttention;
pub use config::CrissCrossConfig;
pub use params::CrissCrossParameters;
pub use train::{CrissCrossContext, CrissCrossGradients, CrissCrossParameterGradients};
