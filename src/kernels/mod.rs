//! The compute kernels behind [`NonLocalBlock`](crate::NonLocalBlock), each with a plain
//! reference in its tests.
//!
//! - the algorithms: [`attention`] (dispatch: which softmax-attention kernel runs),
//!   `flash` (packed online-softmax attention, forward and backward, generic over the
//!   instruction set), `sgemm_attention` (the same from sgemm calls, any CPU), `attention_common`
//!   (what both share around their tiles: the query split, the last softmax step, the row sums
//!   and the reduction of the backward pass), `attention_shapes` (their shape checks), [`gemm`] (the
//!   GEMM entry points), `packed_gemm` (GEMM on packed operands), [`dot_product`],
//!   [`concat`](mod@concat), [`pool`], [`exp`] (scalar and vector `exp`, row max and sums);
//! - below them, the instruction-set layer: [`views`] (strided matrix views, and the start a
//!   product's sums begin from), [`simd`] (vector
//!   operations for AVX-512 with and without AVX512_BF16, AVX2 and portable code, the tokens
//!   that prove the CPU runs a path, AMX's among them, and the run-time choice), `bf16_simd` (the bf16 pair operations on each: `VDPBF16PS` or its exact
//!   emulation), `bf16` (the scalar model of the bf16 instructions, bit for bit),
//!   `microkernel` (the packed register tile for f32 and bf16 elements, and its packing),
//!   `tiles` (tile sizes in one place), `transpose` (position-major results written channel-major
//!   through register transposes).
//!
//! No kernel imports another for a type: every one takes [`views`] and [`simd`].

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
pub mod attention;
pub(crate) mod attention_common;
pub(crate) mod attention_shapes;
pub(crate) mod bf16;
pub(crate) mod bf16_simd;
pub mod concat;
pub mod dot_product;
pub mod exp;
pub(crate) mod flash;
#[cfg(target_arch = "x86_64")]
pub(crate) mod flash_amx;
pub mod gemm;
pub(crate) mod microkernel;
pub(crate) mod packed_gemm;
pub mod pool;
pub(crate) mod sgemm_attention;
pub mod simd;
pub(crate) mod tiles;
pub(crate) mod transpose;
pub mod views;
