//! What the two softmax-attention kernels (`flash`, `sgemm_attention`) share around their
//! tiles, written once: how queries are split between threads (the same for every kernel, and
//! independent of the thread count where results depend on it), the last step of the online
//! softmax, the backward pass's row sums `D_i = y_i·dy_i`, and the reduction of its key-side
//! partial sums.

use std::ops::Range;

use rayon::prelude::*;

use super::tiles::QUERY_TILE;
use super::views::MatRef;

/// At most this many query chunks keep their key-side gradient partial sums apart in the
/// backward pass. The chunking is fixed by N alone (not the thread count), so the final sums
/// have one order; up to 64 chunks keep 64 threads busy on large maps.
pub(crate) const MAX_BACKWARD_QUERY_CHUNKS: usize = 64;

/// Forward query-tile height: about [`QUERY_TILE`], adjusted so the tiles divide evenly
/// between the threads (the tile height changes no result: each row's sums are the same in
/// any tile).
pub(crate) fn query_tile(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tiles = n.div_ceil(QUERY_TILE).next_multiple_of(threads);
    n.div_ceil(tiles).next_multiple_of(8).clamp(8, QUERY_TILE.max(8))
}

/// The query split of the backward passes: N queries in at most
/// [`MAX_BACKWARD_QUERY_CHUNKS`] chunks of whole tiles of `tile` rows, fixed by N alone.
/// Each chunk starts from `init()` and calls `per_tile(rows, dq rows, partials)` for its tiles
/// in order; then `absorb(partials)` is called on the caller's thread for every chunk, in chunk
/// order, so the key-side sums have one order whatever the thread count.
///
/// Chunks run in parallel in waves of one chunk per thread, each wave absorbed before the next
/// starts: at most one chunk's partials per thread are alive at once (the partials of the
/// key side can be several MB each).
pub(crate) fn over_query_chunks<P: Send>(
    n: usize,
    d: usize,
    tile: usize,
    dq: &mut [f32],
    init: impl Fn() -> P + Sync,
    per_tile: impl Fn(Range<usize>, &mut [f32], &mut P) + Sync,
    mut absorb: impl FnMut(&P),
) {
    let tiles = n.div_ceil(tile);
    let chunks = tiles.clamp(1, MAX_BACKWARD_QUERY_CHUNKS);
    let chunk_rows = tiles.div_ceil(chunks) * tile;
    let run_chunk = |c: usize, dq_chunk: &mut [f32]| {
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
    };
    let mut dq_chunks: Vec<(usize, &mut [f32])> = dq.chunks_mut((chunk_rows * d).max(1)).enumerate().collect();
    let wave = rayon::current_num_threads().max(1);
    for batch in dq_chunks.chunks_mut(wave) {
        let partials: Vec<P> = batch.par_iter_mut().map(|(c, dq_chunk)| run_chunk(*c, dq_chunk)).collect();
        partials.iter().for_each(&mut absorb);
    }
}

/// Runs `work(rows, out rows, lse rows)` on every query tile of `tile` rows in parallel: `out`
/// is N × `dv` row-major, `lse` (when asked) N.
pub(crate) fn for_each_query_tile(
    n: usize,
    dv: usize,
    tile: usize,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    work: impl Fn(Range<usize>, &mut [f32], Option<&mut [f32]>) + Sync,
) {
    let rows = |i: usize| i * tile..((i + 1) * tile).min(n);
    match lse {
        Some(lse) => out
            .par_chunks_mut(tile * dv)
            .zip(lse.par_chunks_mut(tile))
            .enumerate()
            .for_each(|(i, (o, l))| work(rows(i), o, Some(l))),
        None => out.par_chunks_mut(tile * dv).enumerate().for_each(|(i, o)| work(rows(i), o, None)),
    }
}

/// Where the unnormalised outputs `Σ_j exp(s·logit_ij − s·m_i)·v_j` of a query tile are.
pub(crate) enum Accumulated {
    /// In the output rows themselves.
    InPlace,
    /// Already normalised into the output rows by the caller (only the log-sum-exp is left).
    Done,
}

/// The online softmax's last step for a tile of queries, with running maxima `run_max` (of
/// the raw logits) and sums `run_sum` over all keys: `out_r ← acc_r / run_sum_r` (`out` rows ×
/// `dv`), and each row's log-sum-exp `scale·run_max_r + ln run_sum_r` into `lse` when asked.
pub(crate) fn finish_rows(
    acc: Accumulated,
    out: &mut [f32],
    dv: usize,
    (run_max, run_sum): (&[f32], &[f32]),
    scale: f32,
    lse: Option<&mut [f32]>,
) {
    match acc {
        Accumulated::Done => {}
        Accumulated::InPlace => {
            for (row, &sum) in out.chunks_mut(dv.max(1)).zip(run_sum) {
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|o| *o *= inv);
            }
        }
    }
    if let Some(lse) = lse {
        for (l, (&m, &sum)) in lse.iter_mut().zip(run_max.iter().zip(run_sum)) {
            *l = scale * m + sum.ln();
        }
    }
}

/// `D_r = y_r·dy_r` for every row r of `y` and `dy` (rows × dv) into `delta[r]`: the diagonal
/// correction of the softmax Jacobian, `dS = P ⊙ (dP − D)`.
pub(crate) fn row_dots(y: MatRef<'_>, dy: MatRef<'_>, delta: &mut [f32]) {
    let dv = y.cols();
    let (mut row_y, mut row_dy) = (vec![0.0f32; dv], vec![0.0f32; dv]);
    for (r, dr) in delta.iter_mut().enumerate().take(y.rows()) {
        y.copy_row(r, &mut row_y);
        dy.copy_row(r, &mut row_dy);
        *dr = row_y.iter().zip(&row_dy).map(|(a, b)| a * b).sum();
    }
}

/// Adds one chunk's key-side partial sums (from [`over_query_chunks`]) to the key-side
/// gradients `dk` (M × d) and `dv` (M × dv): the first M rows of `dk_part` (rows `d_stride`
/// apart) and of `dv_part` (rows `dv_stride` apart). Rows in parallel; each element is one
/// addition, so absorbing the chunks in order fixes every sum's order.
pub(crate) fn add_key_partials(
    (dk_part, dv_part): (&[f32], &[f32]),
    (dk, d, d_stride): (&mut [f32], usize, usize),
    (dv, dvc, dv_stride): (&mut [f32], usize, usize),
) {
    let add = |dst: &mut [f32], width: usize, src: &[f32], stride: usize| {
        dst.par_chunks_mut(width.max(1) * 64).enumerate().for_each(|(b, rows)| {
            for (r, row) in rows.chunks_mut(width.max(1)).enumerate() {
                let j = b * 64 + r;
                row.iter_mut().zip(&src[j * stride..][..width]).for_each(|(a, v)| *a += v);
            }
        });
    };
    add(dk, d, dk_part, d_stride);
    add(dv, dvc, dv_part, dv_stride);
}

/// bf16: attention weights below this (2 to the power −64, relative to the running maximum,
/// whose weight is 1) are dropped from the value product, so that every nonzero weight has an
/// exponent of at least [`MIN_WEIGHT_EXPONENT`] and the emulations' certificate can hold for
/// it. Their sum, at most M times that, is far below bf16's resolution of the total (≥ 1).
pub(crate) const MIN_WEIGHT: f32 = 5.421_011e-20;
/// The exponent of [`MIN_WEIGHT`].
pub(crate) const MIN_WEIGHT_EXPONENT: i32 = -64;
const _: () = assert!(MIN_WEIGHT == 1.0 / (1u64 << 63) as f32 / 2.0);

/// A weight as the bf16 value product takes it: rounded to bf16, zero below [`MIN_WEIGHT`]
/// (the scalar form of the packed kernel's vector rounding).
#[inline]
pub(crate) fn bf16_weight(w: f32) -> f32 {
    if w < MIN_WEIGHT {
        0.0
    } else {
        super::bf16::round_to_bf16(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `over_query_chunks` on n rows of tiles of `tile` rows, each tile adding
    /// `sin(row)` for its rows into a one-float partial and writing its dq rows; returns the
    /// order chunks were absorbed in (their first rows), the running sum's bits and dq.
    fn run(n: usize, tile: usize, threads: usize) -> (Vec<usize>, u32, Vec<f32>) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut dq = vec![f32::NAN; n * 2];
            let (mut order, mut total) = (Vec::new(), 0.0f32);
            over_query_chunks(
                n,
                2,
                tile,
                &mut dq,
                || (usize::MAX, 0.0f32),
                |rows, dq_rows, (first, sum)| {
                    *first = (*first).min(rows.start);
                    for r in rows.clone() {
                        *sum += (r as f32).sin();
                    }
                    dq_rows.iter_mut().enumerate().for_each(|(i, v)| *v = (rows.start * 2 + i) as f32);
                },
                |&(first, sum)| {
                    order.push(first);
                    total += sum;
                },
            );
            (order, total.to_bits(), dq)
        })
    }

    #[test]
    fn chunks_are_fixed_by_n_and_absorbed_in_order_for_any_thread_count() {
        // 200 tiles of one row: capped at 64 chunks of 4 rows (50 chunks).
        let (order, bits, dq) = run(200, 1, 1);
        assert_eq!(order, (0..50).map(|c| c * 4).collect::<Vec<_>>());
        assert_eq!(dq, (0..400).map(|i| i as f32).collect::<Vec<_>>(), "every dq row written once");
        for threads in [2, 3, 5, 8] {
            assert_eq!(run(200, 1, threads), (order.clone(), bits, dq.clone()), "{threads} threads");
        }
        // Fewer tiles than the cap: one chunk per tile; a last, shorter tile.
        let (order, ..) = run(10, 3, 2);
        assert_eq!(order, vec![0, 3, 6, 9]);
    }
}
