//! The non-local block and the fused attention for [candle](https://github.com/huggingface/candle)
//! models (feature `candle`).
//!
//! Candle has no fused attention on the CPU (`candle_nn::ops::sdpa` is Metal-only,
//! `candle-flash-attn` CUDA-only), so attention written in candle forms the N×M matrix. This
//! module brings the crate's kernels to candle as custom ops with exact backward passes:
//!
//! - [`attention()`]: `softmax(s·Q·Kᵀ)·V` on (B, heads, N, d) tensors, the FlashAttention-style
//!   kernel forward and backward (from a saved log-sum-exp), O(N·d) memory per head;
//!   [`attention_plain`] is candle's own composition, for comparison;
//! - [`NonLocal`]: the whole block as a `candle_core::Module`, built from a
//!   [`NonLocalConfig`](crate::NonLocalConfig) and a `candle_nn::VarBuilder` under PyTorch's
//!   keys (AlexHex7 or mmcv, [`Naming`](crate::Naming)), on PyTorch's channels-first layouts,
//!   all four modes, trainable with candle's autograd and optimisers.
//!
//! On the CPU, f32 runs the kernels directly and BF16/F16 are converted to f32 for them (and
//! the result back), so half-precision models get f32 accuracy inside the block (outputs
//! rounded to the half type: a relative error of about 2⁻⁸ for BF16, 2⁻¹¹ for F16). Other
//! devices run the same computation in plain candle ops (the N×M path).
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use nonlocal::{candle::NonLocal, Mode, Naming, NonLocalConfig};
//!
//! // A trainable block inside a candle model: parameters in a VarMap.
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let config = NonLocalConfig::new(16).mode(Mode::EmbeddedGaussian).conv_dims(2);
//! let block = NonLocal::new(config, Naming::Mmcv, vb.pp("backbone.nl"))?;
//! let x = Tensor::randn(0f32, 1., (2, 16, 8, 8), &Device::Cpu)?; // (B, C, H, W)
//! let loss = block.forward(&x)?.sqr()?.sum_all()?;
//! let grads = loss.backward()?; // gradients of every parameter, O(N·C) memory
//! let theta = varmap.data().lock().unwrap()["backbone.nl.theta.conv.weight"].clone();
//! assert_eq!(grads.get(&theta).map(|g| g.dims().to_vec()), Some(vec![8, 16, 1, 1]));
//! # Ok::<(), candle_core::Error>(())
//! ```

mod attention;
mod block_op;
mod layer;
mod views;

pub use attention::{attention, attention_plain};
pub use layer::NonLocal;
