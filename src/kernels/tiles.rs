//! Tile sizes and register-tile geometries of the kernels, in one place.

/// Query rows per tile of the attention kernels (upper bound: the kernels shrink tiles so
/// they spread evenly over the threads). A multiple of every packed tile's width.
pub(crate) const QUERY_TILE: usize = 256;

/// Keys per tile of the attention kernels. It fixes the order of the online-softmax updates,
/// so it must not depend on the thread count. A multiple of every packed tile's height.
pub(crate) const KEY_TILE: usize = 252;

/// Rows of the AVX-512 register tile (keys, value channels or GEMM rows).
pub(crate) const AVX512_MR: usize = 12;
/// 16-lane vectors per row of the AVX-512 register tile: 12 × 32 floats, 24 of the 32 vector
/// registers (measured on an AVX-512 Xeon: 12×32 and 14×32 run at 104–108 GFLOP/s a core,
/// 6×32 at 71–73; on AMD Zen 5 every shape from 6×32 to 14×32 runs at ~260).
pub(crate) const AVX512_NV: usize = 2;

/// Rows of the AVX2 register tile.
pub(crate) const AVX2_MR: usize = 6;
/// 8-lane vectors per row of the AVX2 register tile: 6 × 16 floats, 12 of the 16 registers.
pub(crate) const AVX2_NV: usize = 2;

/// Rows of the AVX2 register tile for bf16 pairs (emulated): 4 × 16 floats, 8 accumulators,
/// 4 widened B halves and 2 A halves in the 16 registers (6×16 spills: measured at 0.3–0.4 of
/// 4×16 on Zen 5). bf16 on AVX-512 uses the f32 tile's 12×32.
pub(crate) const AVX2_BF16_MR: usize = 4;
/// 8-lane vectors per row of the AVX2 bf16 register tile.
pub(crate) const AVX2_BF16_NV: usize = 2;

const _: () = {
    assert!(KEY_TILE.is_multiple_of(AVX512_MR) && KEY_TILE.is_multiple_of(AVX2_MR));
    assert!(QUERY_TILE.is_multiple_of(AVX512_NV * 16) && QUERY_TILE.is_multiple_of(AVX2_NV * 8));
    // bf16 pairs two keys (the depth of the value product) in a word: key tiles and key panels
    // hold whole pairs.
    assert!(KEY_TILE.is_multiple_of(AVX2_BF16_MR) && AVX512_MR.is_multiple_of(2) && AVX2_BF16_MR.is_multiple_of(2));
    assert!(QUERY_TILE.is_multiple_of(AVX2_BF16_NV * 8));
};
