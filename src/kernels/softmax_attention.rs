//! Fused softmax attention for the (embedded) Gaussian modes:
//! `Y = softmax(s · Q·Kᵀ) · V`, row by row, without ever holding the N×M matrix.
//!
//! Queries are processed in tiles; for each tile the keys stream by in tiles of
//! [`KEY_TILE`]. Per query row we keep the running maximum `m`, the running sum `l` of
//! `exp(s·(q·k) − s·m)` and the running weighted sum of values, rescaled by `exp(s·(m_old − m))`
//! whenever the maximum grows (the online softmax of FlashAttention). Both products are
//! single-threaded sgemm calls on the tile; rayon spreads the query tiles over threads. The
//! key tiling is fixed, so every output row is the same sum whatever the thread count.

use rayon::prelude::*;

use super::exp::{exp_sum, row_max};
use super::gemm::{gemm, MatMut, MatRef};
use super::tiles::{KEY_TILE, QUERY_TILE};

/// `out ← softmax(scale · q·kᵀ)·v` with `out` row-major N × dv (row stride dv).
///
/// `q`: N × d, `k`: M × d, `v`: M × dv, M ≥ 1. Also returns nothing else; see
/// [`softmax_attention_lse`] for the per-row log-sum-exp.
pub fn softmax_attention(q: MatRef<'_>, k: MatRef<'_>, v: MatRef<'_>, scale: f32, out: &mut [f32]) {
    softmax_attention_impl(q, k, v, scale, out, None);
}

/// As [`softmax_attention`], and writes each row's log-sum-exp `s·m + ln l` into `lse` (N),
/// so the attention weights can be recomputed later as `exp(s·q·k − lse)`.
pub fn softmax_attention_lse(
    q: MatRef<'_>,
    k: MatRef<'_>,
    v: MatRef<'_>,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    softmax_attention_impl(q, k, v, scale, out, Some(lse));
}

fn softmax_attention_impl(
    q: MatRef<'_>,
    k: MatRef<'_>,
    v: MatRef<'_>,
    scale: f32,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) {
    let (n, m, dv) = (q.rows(), k.rows(), v.cols());
    assert_eq!(q.cols(), k.cols());
    assert_eq!(v.rows(), m);
    assert!(m > 0, "softmax attention needs at least one key");
    assert_eq!(out.len(), n * dv);
    let tile = query_tile(n);
    let work = |(i, out_tile): (usize, &mut [f32]), lse_tile: Option<&mut [f32]>| {
        let start = i * tile;
        let end = (start + tile).min(n);
        attend_tile(q.rows_range(start, end), k, v, scale, out_tile, lse_tile);
    };
    match lse {
        Some(lse) => {
            assert_eq!(lse.len(), n);
            out.par_chunks_mut(tile * dv)
                .zip(lse.par_chunks_mut(tile))
                .enumerate()
                .for_each(|(i, (o, l))| work((i, o), Some(l)));
        }
        None => out.par_chunks_mut(tile * dv).enumerate().for_each(|p| work(p, None)),
    }
}

/// Query-tile height: about [`QUERY_TILE`], adjusted so the tiles divide evenly between the
/// threads (the tile height changes no result: each row's sums are the same in any tile).
fn query_tile(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tiles = n.div_ceil(QUERY_TILE).next_multiple_of(threads);
    n.div_ceil(tiles).next_multiple_of(8).clamp(8, QUERY_TILE.max(8))
}

/// One query tile against all keys.
fn attend_tile(q: MatRef<'_>, k: MatRef<'_>, v: MatRef<'_>, scale: f32, out: &mut [f32], lse: Option<&mut [f32]>) {
    let (rows, m, dv) = (q.rows(), k.rows(), v.cols());
    let key_tile = KEY_TILE.min(m);
    let mut scores = vec![0.0f32; rows * key_tile];
    let mut run_max = vec![f32::NEG_INFINITY; rows];
    let mut run_sum = vec![0.0f32; rows];
    let mut acc = MatMut::new(out, rows, dv, dv);
    let mut start = 0;
    while start < m {
        let end = (start + key_tile).min(m);
        let width = end - start;
        let mut s = MatMut::new(&mut scores, rows, width, width);
        gemm(1.0, q, k.rows_range(start, end).t(), 0.0, &mut s);
        let first = start == 0;
        for r in 0..rows {
            let row = &mut scores[r * width..(r + 1) * width];
            // Scale is positive, so the max of the raw scores gives the max of the logits.
            let tile_max = row_max(row);
            let old = run_max[r];
            let new = if tile_max > old || tile_max.is_nan() { tile_max } else { old };
            let sum = exp_sum(row, scale, scale * new);
            if first {
                run_sum[r] = sum;
            } else if new != old || new.is_nan() {
                let correction = (scale * (old - new)).exp();
                run_sum[r] = run_sum[r] * correction + sum;
                for a in &mut acc_row(&mut acc, r, dv)[..] {
                    *a *= correction;
                }
            } else {
                run_sum[r] += sum;
            }
            run_max[r] = new;
        }
        let p = MatRef::new(&scores, 0, rows, width, width);
        gemm(1.0, p, v.rows_range(start, end), if first { 0.0 } else { 1.0 }, &mut acc);
        start = end;
    }
    for r in 0..rows {
        let inv = 1.0 / run_sum[r];
        for a in &mut out[r * dv..(r + 1) * dv] {
            *a *= inv;
        }
    }
    if let Some(lse) = lse {
        for r in 0..rows {
            lse[r] = scale * run_max[r] + run_sum[r].ln();
        }
    }
}

fn acc_row<'b>(acc: &'b mut MatMut<'_>, r: usize, dv: usize) -> &'b mut [f32] {
    &mut acc.data_mut()[r * dv..(r + 1) * dv]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax attention in f64, straight from the definition.
    fn reference(q: &[f32], k: &[f32], v: &[f32], (n, m, d, dv): (usize, usize, usize, usize), scale: f64) -> Vec<f64> {
        let mut out = vec![0.0; n * dv];
        for i in 0..n {
            let logits: Vec<f64> = (0..m)
                .map(|j| scale * (0..d).map(|c| q[i * d + c] as f64 * k[j * d + c] as f64).sum::<f64>())
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = w.iter().sum();
            for j in 0..m {
                for c in 0..dv {
                    out[i * dv + c] += w[j] / total * v[j * dv + c] as f64;
                }
            }
        }
        out
    }

    fn pseudo_random(len: usize, seed: u32, amp: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    #[test]
    fn matches_reference_across_tiles_and_odd_sizes() {
        // m > KEY_TILE exercises the running-max rescaling; n > QUERY_TILE several tiles.
        for &(n, m, d, dv, amp, scale) in
            &[(1, 1, 1, 1, 1.0, 1.0), (7, 3, 5, 2, 1.0, 0.5), (300, 1100, 9, 6, 2.0, 1.0), (33, 700, 16, 8, 6.0, 0.25)]
        {
            let q = pseudo_random(n * d, 1, amp);
            let k = pseudo_random(m * d, 2, amp);
            let v = pseudo_random(m * dv, 3, 1.0);
            let mut out = vec![f32::NAN; n * dv];
            let mut lse = vec![f32::NAN; n];
            softmax_attention_lse(
                MatRef::new(&q, 0, n, d, d),
                MatRef::new(&k, 0, m, d, d),
                MatRef::new(&v, 0, m, dv, dv),
                scale,
                &mut out,
                &mut lse,
            );
            let want = reference(&q, &k, &v, (n, m, d, dv), scale as f64);
            for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() < 2e-5, "({n},{m},{d},{dv}) [{i}]: {g} vs {w}");
            }
            // The log-sum-exp recomputes row 0's weights: they must sum to 1.
            let total: f64 = (0..m)
                .map(|j| {
                    let dot: f64 = (0..d).map(|c| q[c] as f64 * k[j * d + c] as f64).sum();
                    (scale as f64 * dot - lse[0] as f64).exp()
                })
                .sum();
            assert!((total - 1.0).abs() < 1e-4, "lse gives total weight {total}");
        }
    }
}
