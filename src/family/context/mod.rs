//! The global context block of GCNet (Cao, Xu, Lin, Wei, Hu, [*GCNet: Non-local Networks
//! Meet Squeeze-Excitation Networks and Beyond*][paper], 2019), as mmcv's `ContextBlock` and
//! timm's `GlobalContext` compute it:
//!
//! ```text
//! context = Σ_j softmax_j(w·x_j + b)·x_j   (attention pooling)   or   (1/N)·Σ_j x_j   (average)
//! MLP(c)  = W2·ReLU(LayerNorm(W1·c + b1)) + b2          (C → planes → C, 1x1 convs)
//! out_j   = x_j ⊙ sigmoid(MLP_mul(context)) + MLP_add(context)
//! ```
//!
//! with either fusion optional ([`ContextConfig`]). The non-local block's N×N attention
//! collapses to one map per sample, so the block costs two reads of x and one write:
//! see the `kernels` module for how the passes stream.
//!
//! [paper]: https://arxiv.org/abs/1904.11492

mod block;
mod config;
mod input;
mod kernels;
mod keys;
mod names;
mod params;
mod train;

pub use block::ContextBlock;
pub use config::{ContextConfig, Pooling};
pub use params::{ContextMlp, ContextParameters};
pub use train::{ContextGradients, ContextParameterGradients, ContextTrainContext};
