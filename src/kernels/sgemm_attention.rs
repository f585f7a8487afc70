//! The sgemm-based softmax attention: `Y = softmax(s · Q·Kᵀ) · V`, row by row, without ever
//! holding the N×M matrix, on any CPU (the leaf under [`attention`](super::attention); the
//! packed kernels of [`flash`](super::flash) run instead where the CPU has AVX2 or AVX-512).
//!
//! Queries are processed in tiles; for each tile the keys stream by in tiles of
//! [`KEY_TILE`]. Per query row we keep the running maximum `m`, the running sum `l` of
//! `exp(s·(q·k) − s·m)` and the running weighted sum of values, rescaled by `exp(s·(m_old − m))`
//! whenever the maximum grows (the online softmax of FlashAttention). Both products are
//! single-threaded sgemm calls on the tile; rayon spreads the query tiles over threads. The
//! key tiling is fixed, so every output row is the same sum whatever the thread count.
//!
//! In bf16 (portable code's bf16 path) v is rounded to bf16 first and the weights per tile, as
//! the packed kernel does, and the value product runs in f32 on the rounded values: the same
//! rounding points, not the packed kernel's bits.

use super::attention_common::{
    add_key_partials, bf16_weight, finish_rows, for_each_query_tile, over_query_chunks, query_tile, row_dots,
    Accumulated,
};
use super::attention_shapes::{check_backward, check_forward};
use super::bf16::round_to_bf16;
use super::exp::{row_max, softmax_weights, WEIGHT_ARG_LOW};
use super::gemm::gemm;
use super::tiles::{KEY_TILE, QUERY_TILE};
use super::views::{MatMut, MatRef};
use crate::config::Precision;
use crate::workspace::{Scratch, Workspace};

/// `out ← softmax(scale · (q·kᵀ + bias))·v` (N × dv, row-major), `bias` one logit offset per
/// key (none: 0), and each row's log-sum-exp in `lse` when asked; in bf16 with v and the
/// weights rounded to bf16.
///
/// # Panics
/// If the shapes disagree (`q` N × d, `k` M × d with M ≥ 1, `v` M × dv, `bias` M).
pub(crate) fn attention(
    (q, k, v, scale): (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
    bias: Option<&[f32]>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    ws: &Workspace,
    precision: Precision,
) {
    check_forward((q, k, v), bias, out, lse.as_deref());
    let (n, dv) = (q.rows(), v.cols());
    let tile = query_tile(n);
    let bf16 = precision.bf16_values();
    let v_rounded = bf16.then(|| rounded(ws, v));
    let v = view(&v_rounded, v);
    // bf16 logits: q and k rounded once (the products of two bf16 values are exact in f32).
    let bf16_logits = precision.bf16_logits();
    let (q_rounded, k_rounded) = (bf16_logits.then(|| rounded(ws, q)), bf16_logits.then(|| rounded(ws, k)));
    let (q, k) = (view(&q_rounded, q), view(&k_rounded, k));
    for_each_query_tile(n, dv, tile, out, lse, |rows, out_tile, lse_tile| {
        attend_tile(q.rows_range(rows.start, rows.end), (k, bias), v, scale, (out_tile, lse_tile), ws, bf16);
    });
}

/// The rounded copy of `of` when there is one, else `of`.
fn view<'a>(rounded: &'a Option<Scratch<'_>>, of: MatRef<'a>) -> MatRef<'a> {
    match rounded {
        Some(m) => MatRef::new(m, 0, of.rows(), of.cols(), of.cols()),
        None => of,
    }
}

/// `m` rounded to bf16, row-major, in scratch from `ws`.
fn rounded<'w>(ws: &'w Workspace, m: MatRef<'_>) -> Scratch<'w> {
    let cols = m.cols();
    let mut out = ws.scratch(m.rows() * cols);
    for (i, row) in out.chunks_mut(cols.max(1)).enumerate().take(m.rows()) {
        m.copy_row(i, row);
        row.iter_mut().for_each(|v| *v = round_to_bf16(*v));
    }
    out
}

/// One query tile against all keys (with their logit offsets); `bf16`: the weights rounded for
/// the value product (v is already rounded).
fn attend_tile(
    q: MatRef<'_>,
    (k, bias): (MatRef<'_>, Option<&[f32]>),
    v: MatRef<'_>,
    scale: f32,
    (out, lse): (&mut [f32], Option<&mut [f32]>),
    ws: &Workspace,
    bf16: bool,
) {
    let (rows, m, dv) = (q.rows(), k.rows(), v.cols());
    let key_tile = KEY_TILE.min(m);
    // Written by each key tile's product before it is read.
    let mut scores = ws.scratch(rows * key_tile);
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
            if let Some(bias) = bias {
                row.iter_mut().zip(&bias[start..end]).for_each(|(s, b)| *s += b);
            }
            // The scale is not negative (the dispatch checks), so the max of the raw scores gives
            // the max of the logits.
            let tile_max = row_max(row);
            let old = run_max[r];
            let new = if tile_max > old || tile_max.is_nan() { tile_max } else { old };
            let sum = softmax_weights(row, scale, scale * new);
            if bf16 {
                row.iter_mut().for_each(|w| *w = bf16_weight(*w));
            }
            if first {
                run_sum[r] = sum;
            } else if new != old || new.is_nan() {
                // 0 below 2^-64, as the weights (see `softmax_weights`).
                let arg = scale * (old - new);
                let correction = if arg < WEIGHT_ARG_LOW { 0.0 } else { arg.exp() };
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
    finish_rows(Accumulated::InPlace, out, dv, (&run_max, &run_sum), scale, lse);
}

fn acc_row<'b>(acc: &'b mut MatMut<'_>, r: usize, dv: usize) -> &'b mut [f32] {
    &mut acc.data_mut()[r * dv..(r + 1) * dv]
}

/// The backward of [`attention`] from its log-sum-exp (see
/// [`softmax_attention_backward`](super::attention::softmax_attention_backward)), one sgemm
/// call per product on each (query tile, key tile).
///
/// # Panics
/// If the shapes disagree.
pub(crate) fn attention_backward(
    (q, k, v, scale): (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
    lse: &[f32],
    (y, dy): (MatRef<'_>, MatRef<'_>),
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    ws: &Workspace,
) {
    check_backward((q, k, v), lse, (y, dy), (dq, dk, dv));
    let (n, m, d, dvc) = (q.rows(), k.rows(), q.cols(), v.cols());
    dk.fill(0.0);
    dv.fill(0.0);
    over_query_chunks(
        n,
        d,
        QUERY_TILE,
        dq,
        || (ws.zeroed(m * d), ws.zeroed(m * dvc)),
        |rows, dq_tile, (dk_part, dv_part)| {
            backward_tile(
                (q.rows_range(rows.start, rows.end), k, v, scale),
                &lse[rows.clone()],
                (y.rows_range(rows.start, rows.end), dy.rows_range(rows.start, rows.end)),
                (dq_tile, dk_part, dv_part),
                ws,
            )
        },
        |(dk_part, dv_part)| add_key_partials((dk_part, dv_part), (dk, d, d), (dv, dvc, dvc)),
    );
}

/// One query tile against all keys: writes the tile's `dq` and adds to `dk`, `dv`.
fn backward_tile(
    (q, k, v, scale): (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
    lse: &[f32],
    (y, dy): (MatRef<'_>, MatRef<'_>),
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    ws: &Workspace,
) {
    let (rows, m, d, dvc) = (q.rows(), k.rows(), q.cols(), v.cols());
    let key_tile = KEY_TILE.min(m);
    // D_i as in the packed kernel: with every key in one key tile Σ_j P_ij·dP_ij, P
    // renormalised to sum to 1; else y_i·dy_i.
    let one_key_tile = m <= KEY_TILE;
    let mut delta = vec![0.0f32; rows];
    if !one_key_tile {
        row_dots(y, dy, &mut delta);
    }
    // Written by each key tile's products before they are read.
    let mut p = ws.scratch(rows * key_tile);
    let mut dp = ws.scratch(rows * key_tile);
    let mut start = 0;
    while start < m {
        let end = (start + key_tile).min(m);
        let width = end - start;
        let (k_t, v_t) = (k.rows_range(start, end), v.rows_range(start, end));
        gemm(1.0, q, k_t.t(), 0.0, &mut MatMut::new(&mut p, rows, width, width));
        for r in 0..rows {
            // P = exp(s·S − lse): the normalised weights (0 below 2^-64), as in the forward pass.
            let row = &mut p[r * width..(r + 1) * width];
            let sum = softmax_weights(row, scale, lse[r]);
            if one_key_tile && sum > 0.0 {
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|w| *w *= inv);
            }
        }
        gemm(1.0, dy, v_t.t(), 0.0, &mut MatMut::new(&mut dp, rows, width, width));
        let p_view = MatRef::new(&p, 0, rows, width, width);
        gemm(1.0, p_view.t(), dy, 1.0, &mut MatMut::new(&mut dv[start * dvc..end * dvc], width, dvc, dvc));
        if one_key_tile {
            row_dots(p_view, MatRef::new(&dp, 0, rows, width, width), &mut delta);
        }
        // dS = P ⊙ (dP − D), stored over dP; subnormal values to 0 (as the packed kernel).
        for r in 0..rows {
            let (pr, dpr) = (&p[r * width..(r + 1) * width], &mut dp[r * width..(r + 1) * width]);
            for (g, &w) in dpr.iter_mut().zip(pr) {
                let v = w * (*g - delta[r]);
                *g = if v.abs() < f32::MIN_POSITIVE { 0.0 } else { v };
            }
        }
        let ds = MatRef::new(&dp, 0, rows, width, width);
        gemm(scale, ds, k_t, if start == 0 { 0.0 } else { 1.0 }, &mut MatMut::new(dq, rows, d, d));
        gemm(scale, ds.t(), q, 1.0, &mut MatMut::new(&mut dk[start * d..end * d], width, d, d));
        start = end;
    }
}
