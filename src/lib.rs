//! Non-local blocks (Wang, Girshick, Gupta, He, [*Non-local Neural Networks*][paper], CVPR
//! 2018) on the CPU: every position of a video or image feature map attends to every other,
//!
//! ```text
//! y_i = 1/C(x) · Σ_j f(x_i, x_j) · g(x_j),        z_i = BN(W_z·y_i) + x_i
//! ```
//!
//! where θ, φ, g and `W_z` are 1x1x1 convolutions (θ, φ, g reduce C channels to C' = C/2 by
//! default) and `f`/`C` is one of four pairwise functions ([`Mode`]):
//!
//! | mode | f(x_i, x_j) | C(x) |
//! |---|---|---|
//! | embedded Gaussian | exp(θ(x_i)ᵀφ(x_j)), optionally scaled by 1/√C' | Σ_j f (a softmax over j) |
//! | Gaussian | exp(x_iᵀx_j) (no θ/φ) | Σ_j f |
//! | dot product | θ(x_i)ᵀφ(x_j) | M, the number of keys |
//! | concatenation | ReLU(w_fᵀ[θ(x_i); φ(x_j)]) | M |
//!
//! **Sub-sampling** ([`NonLocalConfig::sub_sample`]) max-pools φ and g (in Gaussian mode: the
//! keys x and g) with kernel = stride, 1x2x2 by default, floor on odd sizes like PyTorch, so
//! there are M = N/4 keys. `W_z` is followed by eval-mode BatchNorm, folded into `W_z` for
//! inference; a new block has it zeroed, so it starts as the identity.
//!
//! # Inputs
//! Inputs are f32 ndarrays, channels last and batch first, in any memory layout (views,
//! slices, permuted axes). Each layout has its entry points, and the rank is checked, never
//! guessed ([`Error::InputRank`]):
//!
//! | layout | PyTorch module | entry points |
//! |---|---|---|
//! | clips (B, T, H, W, C) | `NonLocal3d` on (B, C, T, H, W) | [`forward`], [`forward_into`], [`attention`], [`attention_rows`], [`forward_train`] |
//! | image maps (B, H, W, C) | `NonLocal2d` on (B, C, H, W) | [`forward_images`]; the others on `x.insert_axis(Axis(1))` |
//! | sequences (B, L, C) | `NonLocal1d` on (B, C, L) | [`forward_sequences`]; the others on (B, 1, 1, L, C) |
//!
//! An image map is read as a clip of one frame (T = 1), a sequence as a clip of one frame
//! and one row (T = H = 1). With [`NonLocalConfig::conv_dims`] d a block attends over the last
//! d of (T, H, W), as PyTorch's `NonLocal{d}d`, and the other axes must be 1: a 3-d block
//! takes all three layouts, a 2-d block image maps and sequences (and clips of one frame), a
//! 1-d block sequences; anything else is an [`Error::LayoutMismatch`], so frames are never
//! attended across by a 2-d block. A channel count that does not match
//! ([`Error::InputChannels`]) says so when the input looks channels-first.
//!
//! Query positions are numbered in (t, h, w) row-major order and keys likewise on the pooled
//! grid: [`NonLocalBlock::query_index`], [`NonLocalBlock::key_position`] and
//! [`NonLocalBlock::key_region`] convert.
//!
//! [`forward`]: NonLocalBlock::forward
//! [`forward_into`]: NonLocalBlock::forward_into
//! [`attention`]: NonLocalBlock::attention
//! [`attention_rows`]: NonLocalBlock::attention_rows
//! [`forward_train`]: NonLocalBlock::forward_train
//! [`forward_images`]: NonLocalBlock::forward_images
//! [`forward_sequences`]: NonLocalBlock::forward_sequences
//!
//! # Weights from PyTorch
//! [`NonLocalBlock::from_checkpoint_file`] loads a `state_dict` saved with safetensors, under
//! the keys of AlexHex7's `Non-local_pytorch` ([`Naming::AlexHex7`]: `theta.weight`,
//! `phi.0.weight`, `W.1.running_var`, …) or of mmcv's `NonLocal1d/2d/3d` ([`Naming::Mmcv`]:
//! `theta.conv.weight`, `g.0.conv.bias`, `conv_out.bn.weight`, …) or of timm's
//! `NonLocalAttn` ([`Naming::Timm`]: `t.weight`, `z.weight`, `norm.running_var`, …; see
//! [`NonLocalConfig::timm`]), optionally under a prefix inside a whole-model checkpoint. F32, F16, BF16 and F64 tensors are converted to f32.
//! Every mismatch is a typed [`Error`] naming the key and both shapes.
//!
//! `.pth`/`.pt` files load directly: [`TensorFile`] reads safetensors, the `torch.save` zip
//! archive and the legacy `torch.save` stream (told apart by content), finds the state dict
//! of a training checkpoint (`state_dict`, `model`, …), and never runs code, so checkpoints
//! that `torch.load(weights_only=True)` refuses load safely. [`find_blocks`] lists the
//! non-local blocks of a checkpoint and [`BlockInfo::config`] reads their configuration off
//! the keys; [`NonLocalBlock::from_checkpoint_file`] loads one. [`find_all_blocks`] lists
//! every block of the family ([`FoundBlock`]), in file order.
//!
//! # The family
//! Three relatives share the loaders, the kernels and the conventions (channels-last input,
//! typed errors, f64 references in the tests, forward and backward passes):
//!
//! | block | paper, PyTorch module | what it computes |
//! |---|---|---|
//! | [`ContextBlock`] | GCNet (Cao et al. 2019); mmcv `ContextBlock`, timm `GlobalContext` | one softmax-pooled context per image, a bottleneck transform, added or multiplied in |
//! | [`CrissCrossAttention`] | CCNet (Huang et al. 2019); mmcv `CrissCrossAttention` | each position attends over its row and column, one joint softmax |
//! | [`DisentangledNonLocal`] | DNL (Yin et al. 2020); mmseg `DisentangledNonLocal2d` | whitened pairwise term plus a unary softmax mask over the keys |
//!
//! Each has a config with presets for the library it comes from
//! ([`ContextConfig::mmcv`], [`ContextConfig::timm`], [`DisentangledConfig::mmseg`], …), a
//! `from_checkpoint_file` loader that checks every key and shape, and `forward` /
//! `forward_train` / `backward`.
//!
//! # Attention maps
//! [`NonLocalBlock::attention`] returns the normalised weights `f(x_i, x_j)/C(x)` for all
//! queries (PyTorch's `return_nl_map`); [`NonLocalBlock::attention_rows`] computes only the
//! rows you ask for, without the N×M matrix.
//!
//! # Training
//! [`NonLocalBlock::forward_train`] returns the output and a [`TrainContext`];
//! [`NonLocalBlock::backward`] turns ∂L/∂z into [`Gradients`] for the input and every
//! trainable parameter ([`ParameterGradients`], shaped like [`Parameters`]). BatchNorm is in
//! inference form (frozen running statistics), as when fine-tuning.
//! [`NonLocalBlock::update_parameters`] applies an optimiser step in place, each parameter
//! with its gradient by name. Memory stays O(N·C): the softmax modes recompute attention
//! tiles from a saved log-sum-exp (FlashAttention-2).
//! [`NonLocalBlock::save_safetensors`] writes the parameters back under the keys they were
//! loaded with, for PyTorch.
//!
//! # In candle models
//! With the `candle` feature, the module `nonlocal::candle` (candle-core and candle-nn 0.11)
//! has the block as a candle layer, `nonlocal::candle::NonLocal` (a `candle_core::Module`
//! built from a `candle_nn::VarBuilder` under the same PyTorch keys, channels-first like
//! PyTorch, with candle's autograd through it, in O(N·C) memory: its forward pass 1.01–1.18×
//! the native block's time, a training step 1.15–1.51× (measured on a shared 2-core machine
//! with [`keep_freed_memory`], which candle training wants; the README's "In candle models"
//! says where the time goes), and the fused attention as a candle op with a backward pass,
//! `nonlocal::candle::attention`.
//! [`NonLocalBlock::forward_channels_first`], [`NonLocalBlock::forward_train_channels_first`]
//! and [`NonLocalBlock::backward_channels_first`] run the native block in PyTorch's layout.
//!
//! # Precision
//! [`NonLocalConfig::precision`] chooses the forward pass's arithmetic. [`Precision::F32`], the
//! default, gives PyTorch's float32 results. [`Precision::Bf16`] multiplies bf16 operands with
//! f32 sums on the value side — the g projection (φ and g in dot product and concatenation),
//! the product of the attention weights (rounded to bf16 per key tile, as FlashAttention) with
//! the values, dot product's φᵀg — and keeps f32 what bf16 would make less accurate than
//! PyTorch's autocast: the logits and their projections, the softmax, `W_z` with the folded
//! BatchNorm, the residual and the output. Parameters are rounded once, when packed. It runs on
//! AMX tiles where the CPU has AMX-BF16 ([`Isa::Amx`]: there the f32 products above run as
//! near-f32 bf16×3 tile products, about 2⁻¹⁶ of `Σ|a||b|` off the exact product), on
//! `VDPBF16PS` where it has AVX512_BF16 ([`Isa::Avx512Bf16`]) and on an exact emulation of it
//! elsewhere (the same bits on every x86 CPU without AMX, at about the f32 speed). Accuracy contract,
//! tested on every PyTorch golden case: `max |z − z_ref| / max(1, max |z_ref|)` at most
//! `max(1.25 × e, 4e-3)`, `e` PyTorch's own error under bf16 autocast.
//! [`Precision::Bf16Logits`] also projects and multiplies the logits (and `W_z`, where it is
//! applied to the outputs) in bf16, as PyTorch's autocast and OpenVINO's bf16 default do:
//! faster (1.2–1.9× f32 on AVX512_BF16, 1.7–3.6× on AMX, measured), with an error in their class rather than
//! below it (tested: within `max(2 × e, 8e-3)` on the golden cases). Attention maps and
//! training run in f32 on any block, with the f32 block's bits. See the README's "bf16".
//!
//! # Speed and memory
//! The forward pass never builds the N×M matrix: the Gaussian modes use a fused online-softmax
//! kernel (as FlashAttention), dot product `θ·(φᵀg)/M` or, when the keys outnumber the
//! channels little, `(θφᵀ/M)·g` with the projections folded in, whichever costs fewer
//! multiply-adds; concatenation a sort and prefix sums. Work is spread over the current rayon
//! pool; results are bit-identical for any thread count. The kernels are chosen at run time
//! for the widest instruction set the CPU has — AVX-512 (with AMX or AVX512_BF16 for bf16),
//! AVX2+FMA or portable code ([`simd_path`]; `NONLOCAL_SIMD` forces one) — and layer weights are packed
//! once for them when the parameters are set. See the README for
//! figures.
//!
//! # Example
//! ```
//! use ndarray::Array5;
//! use nonlocal::{Mode, NonLocalBlock, NonLocalConfig};
//!
//! let config = NonLocalConfig::new(32).mode(Mode::EmbeddedGaussian).sub_sample(Some([1, 2, 2]));
//! let block = NonLocalBlock::new(config)?;
//! let x = Array5::<f32>::from_shape_fn((2, 4, 8, 8, 32), |(b, t, h, w, c)| {
//!     ((b + t * 3 + h * 5 + w * 7 + c) % 11) as f32 * 0.1
//! });
//! let z = block.forward(&x)?;
//! assert_eq!(z.shape(), x.shape());
//! // One query's attention over the 4·4·4 = 64 pooled keys sums to 1.
//! let a = block.attention_rows(&x, &[0])?;
//! assert_eq!(a.shape(), &[2, 1, 64]);
//! assert!((a.slice(ndarray::s![0, 0, ..]).sum() - 1.0).abs() < 1e-5);
//! # Ok::<(), nonlocal::Error>(())
//! ```
//!
//! [paper]: https://arxiv.org/abs/1711.07971

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

// The layers, bottom to top: each imports only from those above it in this list.
mod allocator;

mod checkpoint;

mod error;

mod workspace;

mod input;

// Reached from outside only through the hidden `internal` module; its docs link freely
// between kernels, some of them private.
#[allow(rustdoc::private_intra_doc_links)]
mod kernels;

mod config;

mod params;

mod load;

mod plan;

mod block;

mod family;

#[cfg(feature = "candle")]
pub mod candle;

/// The ndarray version every signature of this crate uses (0.17), re-exported so a caller's
/// arrays are of the same crate.
pub use ndarray;

pub use allocator::{keep_freed_memory, KEEP_FREED_MEMORY_TUNABLES};
pub use block::{load_blocks, Gradients, NonLocalBlock, ParameterGradients, TrainContext};
pub use checkpoint::{CheckpointFormat, DType};
pub use kernels::simd::Isa;
pub use load::{detect_naming, find_blocks, BlockInfo, BlockKind, Naming, TensorFile, WeightKeys};

/// The instruction set the kernels run on in this process: the widest the CPU has, or the
/// one `NONLOCAL_SIMD=amx|avx512bf16|avx512|avx2|portable` asks for when the CPU has it (else
/// the widest, with a message on stderr). It decides the f32 kernels and the bf16 ones
/// ([`Isa`]: `amx` runs bf16 products on AMX tiles, `avx512bf16` on `VDPBF16PS`, `avx512` and
/// `avx2` on its exact emulation). See the README's "What runs where".
///
/// ```
/// let path = nonlocal::simd_path();
/// assert!(path.available());
/// println!("kernels: {path}"); // amx, avx512bf16, avx512, avx2 or portable
/// ```
pub fn simd_path() -> Isa {
    kernels::simd::isa()
}
pub use config::{Mode, NonLocalConfig, Precision};
pub use error::{Error, Result};
pub use family::{find_all_blocks, FoundBlock};
pub use family::{
    ContextBlock, ContextConfig, ContextGradients, ContextMlp, ContextParameterGradients, ContextParameters,
    ContextTrainContext, CrissCrossAttention, CrissCrossConfig, CrissCrossContext, CrissCrossGradients,
    CrissCrossParameterGradients, CrissCrossParameters, DisentangledConfig, DisentangledContext, DisentangledGradients,
    DisentangledNonLocal, Pooling,
};
pub use params::{BatchNorm, Conv1x1, Parameters};

/// Scaffolding for this crate's tests, benches and examples — not part of the API: no
/// stability promise, and it may panic on input the API would reject. (The test oracles, the
/// golden-file harness and the f64 reference, live outside the library in `tests/oracle/`.)
#[doc(hidden)]
pub mod internal {
    pub use crate::config::parse_sub_sample;

    /// The compute kernels, for the benches.
    pub mod kernels {
        pub use crate::kernels::{attention, concat, dot_product, exp, gemm, pool, simd, views};
    }
}

/// The README's code blocks, compiled and run by `cargo test`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
