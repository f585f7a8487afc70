//! The non-local family: attention blocks related to the non-local block, each in its own
//! module, PyTorch-exact against their upstream implementations.
//!
//! - [`criss_cross`]: CCNet's criss-cross attention (mmcv's `CrissCrossAttention`).

pub mod criss_cross;
