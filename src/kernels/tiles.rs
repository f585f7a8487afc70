//! Tile sizes of the kernels, in one place.

/// Query rows per tile of the fused softmax kernel (upper bound: the kernel shrinks tiles so
/// they spread evenly over the threads).
pub const QUERY_TILE: usize = 256;

/// Keys per tile of the fused softmax kernel. It fixes the order of the online-softmax
/// updates, so it must not depend on the thread count.
pub const KEY_TILE: usize = 512;
