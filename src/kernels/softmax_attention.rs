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
/// `q`: N × d, `k`: M × d, `v`: M × dv, M ≥ 1. See [`softmax_attention_lse`] for the per-row
/// log-sum-exp as well.
///
/// On AVX2+FMA machines (without AVX-512) and up to
/// [`MAX_VALUE_CHANNELS`](super::flash_avx2::MAX_VALUE_CHANNELS) value channels this runs the
/// packed kernel of [`flash_avx2`](super::flash_avx2); otherwise the sgemm-based kernel of this
/// module.
pub fn softmax_attention(q: MatRef<'_>, k: MatRef<'_>, v: MatRef<'_>, scale: f32, out: &mut [f32]) {
    dispatch(q, k, v, scale, out, None);
}

/// Runs the packed AVX2 kernel where it applies, else the sgemm-based one.
fn dispatch(q: MatRef<'_>, k: MatRef<'_>, v: MatRef<'_>, scale: f32, out: &mut [f32], lse: Option<&mut [f32]>) {
    // The packed kernel keeps Oᵀ (dv × query tile) in L2; wider values (W_z folded into
    // them at video-res4) run faster through sgemm.
    #[cfg(target_arch = "x86_64")]
    if super::exp::simd() == super::exp::Simd::Avx2Fma && v.cols() <= super::flash_avx2::MAX_VALUE_CHANNELS {
        assert!(k.rows() > 0, "softmax attention needs at least one key");
        assert_eq!((q.cols(), v.rows(), out.len()), (k.cols(), k.rows(), q.rows() * v.cols()));
        assert!(lse.as_ref().is_none_or(|l| l.len() == q.rows()));
        // SAFETY: `simd()` detected AVX2 and FMA.
        unsafe { super::flash_avx2::softmax_attention(q, k, v, scale, out, lse, query_tile(q.rows())) };
        return;
    }
    softmax_attention_impl(q, k, v, scale, out, lse);
}

/// The sgemm-based kernel, whatever the CPU (for tests comparing the two).
pub fn softmax_attention_portable(q: MatRef<'_>, k: MatRef<'_>, v: MatRef<'_>, scale: f32, out: &mut [f32]) {
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
    dispatch(q, k, v, scale, out, Some(lse));
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

/// Number of query chunks whose key-side gradient partial sums are kept apart in the
/// backward pass: fixed (not the thread count), so the final sums have one order.
pub const BACKWARD_QUERY_CHUNKS: usize = 8;

/// Gradients of `Y = softmax(scale · Q·Kᵀ)·V` (the backward of [`softmax_attention_lse`]),
/// recomputing the attention tile by tile from the saved log-sum-exp, as FlashAttention-2.
/// Dispatched like [`softmax_attention`]: the packed AVX2 kernel of
/// [`flash_avx2`](super::flash_avx2) where it applies, else the sgemm-based one.
///
/// Inputs: `q` N × d, `k` M × d, `v` M × dv, `lse` (N) from the forward pass, `y` (N × dv,
/// the forward output) and `dy` (N × dv). Outputs, overwritten: `dq` N × d, `dk` M × d,
/// `dv` M × dv, all row-major.
///
/// Queries are split into at most [`BACKWARD_QUERY_CHUNKS`] chunks of whole query tiles;
/// each chunk sums its own key-side partials, and the partials are added in chunk order, so
/// the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn softmax_attention_backward(
    q: MatRef<'_>,
    k: MatRef<'_>,
    v: MatRef<'_>,
    scale: f32,
    lse: &[f32],
    y: MatRef<'_>,
    dy: MatRef<'_>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (n, m, d, dvc) = (q.rows(), k.rows(), q.cols(), v.cols());
    assert!(m > 0);
    assert_eq!((dq.len(), dk.len(), dv.len(), lse.len()), (n * d, m * d, m * dvc, n));
    assert_eq!((y.rows(), y.cols(), dy.rows(), dy.cols()), (n, dvc, n, dvc));
    #[cfg(target_arch = "x86_64")]
    if super::exp::simd() == super::exp::Simd::Avx2Fma && dvc <= super::flash_avx2::MAX_VALUE_CHANNELS {
        // SAFETY: `simd()` detected AVX2 and FMA.
        unsafe { super::flash_avx2::softmax_attention_backward((q, k, v, scale), lse, y, dy, QUERY_TILE, dq, dk, dv) };
        return;
    }
    softmax_attention_backward_portable(q, k, v, scale, lse, y, dy, dq, dk, dv);
}

/// The sgemm-based backward, whatever the CPU (for tests comparing the two).
#[allow(clippy::too_many_arguments)]
pub fn softmax_attention_backward_portable(
    q: MatRef<'_>,
    k: MatRef<'_>,
    v: MatRef<'_>,
    scale: f32,
    lse: &[f32],
    y: MatRef<'_>,
    dy: MatRef<'_>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (n, m, d, dvc) = (q.rows(), k.rows(), q.cols(), v.cols());
    let partials = over_query_chunks(
        n,
        d,
        QUERY_TILE,
        dq,
        || (vec![0.0f32; m * d], vec![0.0f32; m * dvc]),
        |rows, dq_tile, (dk_part, dv_part)| {
            backward_tile(
                (q.rows_range(rows.start, rows.end), k, v, scale),
                &lse[rows.clone()],
                y.rows_range(rows.start, rows.end),
                dy.rows_range(rows.start, rows.end),
                dq_tile,
                dk_part,
                dv_part,
            )
        },
    );
    dk.fill(0.0);
    dv.fill(0.0);
    for (dk_part, dv_part) in &partials {
        dk.iter_mut().zip(dk_part).for_each(|(a, b)| *a += b);
        dv.iter_mut().zip(dv_part).for_each(|(a, b)| *a += b);
    }
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

/// One query tile against all keys: writes the tile's `dq` and adds to `dk`, `dv`.
fn backward_tile(
    (q, k, v, scale): (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
    lse: &[f32],
    y: MatRef<'_>,
    dy: MatRef<'_>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (rows, m, d, dvc) = (q.rows(), k.rows(), q.cols(), v.cols());
    let key_tile = KEY_TILE.min(m);
    // D_i = dy_i · y_i: the softmax Jacobian's diagonal correction.
    let mut row_y = vec![0.0f32; dvc];
    let mut row_dy = vec![0.0f32; dvc];
    let delta: Vec<f32> = (0..rows)
        .map(|r| {
            y.copy_row(r, &mut row_y);
            dy.copy_row(r, &mut row_dy);
            row_y.iter().zip(&row_dy).map(|(a, b)| a * b).sum()
        })
        .collect();
    let mut p = vec![0.0f32; rows * key_tile];
    let mut dp = vec![0.0f32; rows * key_tile];
    let mut start = 0;
    while start < m {
        let end = (start + key_tile).min(m);
        let width = end - start;
        let (k_t, v_t) = (k.rows_range(start, end), v.rows_range(start, end));
        gemm(1.0, q, k_t.t(), 0.0, &mut MatMut::new(&mut p, rows, width, width));
        for r in 0..rows {
            // P = exp(s·S − lse): the normalised weights, exactly as in the forward pass.
            exp_sum(&mut p[r * width..(r + 1) * width], scale, lse[r]);
        }
        gemm(1.0, dy, v_t.t(), 0.0, &mut MatMut::new(&mut dp, rows, width, width));
        let p_view = MatRef::new(&p, 0, rows, width, width);
        gemm(1.0, p_view.t(), dy, 1.0, &mut MatMut::new(&mut dv[start * dvc..end * dvc], width, dvc, dvc));
        // dS = P ⊙ (dP − D), stored over dP.
        for r in 0..rows {
            let (pr, dpr) = (&p[r * width..(r + 1) * width], &mut dp[r * width..(r + 1) * width]);
            for (g, &w) in dpr.iter_mut().zip(pr) {
                *g = w * (*g - delta[r]);
            }
        }
        let ds = MatRef::new(&dp, 0, rows, width, width);
        gemm(scale, ds, k_t, if start == 0 { 0.0 } else { 1.0 }, &mut MatMut::new(dq, rows, d, d));
        gemm(scale, ds.t(), q, 1.0, &mut MatMut::new(&mut dk[start * d..end * d], width, d, d));
        start = end;
    }
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
            let (qm, km, vm) =
                (MatRef::new(&q, 0, n, d, d), MatRef::new(&k, 0, m, d, d), MatRef::new(&v, 0, m, dv, dv));
            let want = reference(&q, &k, &v, (n, m, d, dv), scale as f64);
            type Kernel = fn(MatRef<'_>, MatRef<'_>, MatRef<'_>, f32, &mut [f32]);
            for kernel in [softmax_attention as Kernel, softmax_attention_portable] {
                let mut out = vec![f32::NAN; n * dv];
                kernel(qm, km, vm, scale, &mut out);
                for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    assert!((g as f64 - w).abs() < 2e-5, "({n},{m},{d},{dv}) [{i}]: {g} vs {w}");
                }
            }
            // Both kernels with the log-sum-exp: the dispatched one and the sgemm-based one.
            for portable in [false, true] {
                let mut out = vec![f32::NAN; n * dv];
                let mut lse = vec![f32::NAN; n];
                if portable {
                    softmax_attention_impl(qm, km, vm, scale, &mut out, Some(&mut lse));
                } else {
                    softmax_attention_lse(qm, km, vm, scale, &mut out, &mut lse);
                }
                for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    assert!((g as f64 - w).abs() < 2e-5, "({n},{m},{d},{dv}) [{i}]: {g} vs {w}");
                }
                // The log-sum-exp recomputes each row's weights: they must sum to 1.
                for row in [0, n - 1] {
                    let total: f64 = (0..m)
                        .map(|j| {
                            let dot: f64 = (0..d).map(|c| q[row * d + c] as f64 * k[j * d + c] as f64).sum();
                            (scale as f64 * dot - lse[row] as f64).exp()
                        })
                        .sum();
                    assert!((total - 1.0).abs() < 1e-4, "lse of row {row} gives total weight {total}");
                }
            }
        }
    }

    type Backward =
        fn(MatRef<'_>, MatRef<'_>, MatRef<'_>, f32, &[f32], MatRef<'_>, MatRef<'_>, &mut [f32], &mut [f32], &mut [f32]);

    #[test]
    fn backward_matches_finite_differences_of_the_reference() {
        let (n, m, d, dv) = (300, 530, 5, 3);
        let scale = 0.7;
        let q = pseudo_random(n * d, 11, 1.5);
        let k = pseudo_random(m * d, 12, 1.5);
        let v = pseudo_random(m * dv, 13, 1.0);
        let dy = pseudo_random(n * dv, 14, 1.0);
        let (qm, km, vm) = (MatRef::new(&q, 0, n, d, d), MatRef::new(&k, 0, m, d, d), MatRef::new(&v, 0, m, dv, dv));
        let mut y = vec![0.0f32; n * dv];
        let mut lse = vec![0.0f32; n];
        softmax_attention_lse(qm, km, vm, scale, &mut y, &mut lse);
        let mut grads = Vec::new();
        for kernel in [softmax_attention_backward as Backward, softmax_attention_backward_portable] {
            let (mut dq, mut dk, mut dvv) = (vec![f32::NAN; n * d], vec![f32::NAN; m * d], vec![f32::NAN; m * dv]);
            kernel(
                qm,
                km,
                vm,
                scale,
                &lse,
                MatRef::new(&y, 0, n, dv, dv),
                MatRef::new(&dy, 0, n, dv, dv),
                &mut dq,
                &mut dk,
                &mut dvv,
            );
            grads.push((dq, dk, dvv));
        }
        // The two kernels agree closely everywhere; the finite differences check one of them.
        for (a, b) in [(&grads[0].0, &grads[1].0), (&grads[0].1, &grads[1].1), (&grads[0].2, &grads[1].2)] {
            for (x, y) in a.iter().zip(b.iter()) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "kernels disagree: {x} vs {y}");
            }
        }
        let (dq, dk, dvv) = grads.swap_remove(0);
        // L = Σ dy ⊙ Y in f64; central differences on a few entries of each input.
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let y = reference(q, k, v, (n, m, d, dv), scale as f64);
            y.iter().zip(&dy).map(|(a, &b)| a * b as f64).sum()
        };
        let h = 1e-2f32;
        let check = |which: usize, idx: usize, got: f32| {
            let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
            let target = [&mut q2, &mut k2, &mut v2];
            let t = target.into_iter().nth(which).unwrap();
            let orig = t[idx];
            t[idx] = orig + h;
            let up = loss(&q2, &k2, &v2);
            let (mut q3, mut k3, mut v3) = (q.clone(), k.clone(), v.clone());
            let t = [&mut q3, &mut k3, &mut v3].into_iter().nth(which).unwrap();
            t[idx] = orig - h;
            let down = loss(&q3, &k3, &v3);
            let fd = (up - down) / (2.0 * h as f64);
            assert!((fd - got as f64).abs() < 2e-3 * fd.abs().max(1.0), "input {which}[{idx}]: fd {fd} vs {got}");
        };
        for idx in [0, 7, n * d - 1] {
            check(0, idx, dq[idx]);
        }
        for idx in [0, 511 * d + 2, m * d - 1] {
            check(1, idx, dk[idx]);
        }
        for idx in [0, 515 * dv + 1, m * dv - 1] {
            check(2, idx, dvv[idx]);
        }
    }
}
