//! The compute kernels behind [`NonLocalBlock`](crate::NonLocalBlock), each with a plain
//! reference in its tests.

pub mod concat;
pub mod dot_product;
pub mod exp;
#[cfg(target_arch = "x86_64")]
pub mod flash_avx2;
pub mod gemm;
pub mod pool;
pub mod softmax_attention;
pub mod tiles;
