//! How the attention kernels split queries between threads, the same for every kernel and
//! independent of the thread count where results depend on it.

use rayon::prelude::*;

use super::tiles::QUERY_TILE;

/// Number of query chunks whose key-side gradient partial sums are kept apart in the
/// backward pass: fixed (not the thread count), so the final sums have one order.
pub(crate) const BACKWARD_QUERY_CHUNKS: usize = 8;

/// Forward query-tile height: about [`QUERY_TILE`], adjusted so the tiles divide evenly
/// between the threads (the tile height changes no result: each row's sums are the same in
/// any tile).
pub(crate) fn query_tile(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tiles = n.div_ceil(QUERY_TILE).next_multiple_of(threads);
    n.div_ceil(tiles).next_multiple_of(8).clamp(8, QUERY_TILE.max(8))
}

/// The query split of the backward passes: N queries in at most [`BACKWARD_QUERY_CHUNKS`]
/// chunks of whole tiles of `tile` rows (fixed by N alone, not the thread count). Chunks run
/// in parallel, each starting from `init()` and calling `per_tile(rows, dq rows, partials)`
/// for its tiles in order; the partials come back in chunk order, to be added in that order.
pub(crate) fn over_query_chunks<P: Send>(
    n: usize,
    d: usize,
    tile: usize,
    dq: &mut [f32],
    init: impl Fn() -> P + Sync,
    per_tile: impl Fn(std::ops::Range<usize>, &mut [f32], &mut P) + Sync,
) -> Vec<P> {
    let tiles = n.div_ceil(tile);
    let chunks = tiles.clamp(1, BACKWARD_QUERY_CHUNKS);
    let chunk_rows = tiles.div_ceil(chunks) * tile;
    dq.par_chunks_mut(chunk_rows * d)
        .enumerate()
        .map(|(c, dq_chunk)| {
            let start = c * chunk_rows;
            let end = (start + chunk_rows).min(n);
            let mut partials = init();
            let mut tile_start = start;
            while tile_start < end {
                let tile_end = (tile_start + tile).min(end);
                let local = (tile_start - start) * d..(tile_end - start) * d;
                per_tile(tile_start..tile_end, &mut dq_chunk[local], &mut partials);
                tile_start = tile_end;
            }
            partials
        })
        .collect()
}
