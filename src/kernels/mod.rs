//! The compute kernels behind [`NonLocalBlock`](crate::NonLocalBlock), each with a plain
//! reference in its tests.
//!
//! - the algorithms: [`attention`] (dispatch: which softmax-attention kernel runs),
//!   `flash` (packed online-softmax attention, forward and backward, generic over the
//!   instruction set), `sgemm_attention` (the same from sgemm calls, any CPU),
//!   `packed_gemm` (GEMM on packed operands), [`gemm`] (matrix views and the GEMM entry
//!   points), [`dot_product`], [`concat`](mod@concat), [`pool`], [`exp`];
//! - the instruction-set layer: [`simd`] (vector operations for AVX-512, AVX2 and portable
//!   code, and the run-time choice), `microkernel` (the packed register tile), `tiles`
//!   (tile sizes in one place), `query_chunks` (how queries are split between threads),
//!   `attention_shapes` (the attention kernels' shape checks).

pub mod attention;
pub(crate) mod attention_shapes;
pub mod concat;
pub mod dot_product;
pub mod exp;
pub(crate) mod flash;
pub mod gemm;
pub(crate) mod microkernel;
pub(crate) mod packed_gemm;
pub mod pool;
pub(crate) mod query_chunks;
pub(crate) mod sgemm_attention;
pub mod simd;
pub(crate) mod tiles;
