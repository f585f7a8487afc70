//! The criss-cross attention of one sample, forward: `y_i = Σ_j a_ij v_j` over the H + W − 1
//! positions j on the row and column of i, `a_i = softmax_j(q_i·k_j)`, and `z = x + γ·y`.
//!
//! # Design
//! Position (h, w) attends to the H positions of column w (itself excluded) and the W
//! positions of row h (itself included). Grouped by column, the column part of every query
//! in column w is one small attention among the H positions of that column, and grouped by
//! row, the row part of every query in row h is one among the W positions of that row: each
//! is two GEMM-shaped products (`E = Q·Kᵀ`, then `A·V`) with the keys and values shared by
//! all the queries of the group, so each value row is loaded once per group and used from
//! registers for a whole tile of queries: the products run at GEMM speed. A per-query streamed
//! loop (one online softmax over H + W keys and a C-wide accumulator per query) would load
//! every value row once per query instead, H or W times the traffic, and run at the speed of
//! its loads rather than of its multiply-adds.
//!
//! The two parts share one softmax. They are combined the way an online softmax combines two
//! key blocks:
//! 1. column pass, in parallel over columns: `E = Q_w·K_wᵀ` (H × H, the diagonal excluded),
//!    per query its maximum `m_c` and sum `s_c` of `exp(e − m_c)`, and the unnormalised column
//!    output `Σ_j exp(e_ij − m_c) v_j`, kept column-major;
//! 2. row pass, in parallel over rows: `E = Q_h·K_hᵀ` (W × W), per query `m_r`, `s_r`, the
//!    log-sum-exp `L` of both parts together, the row weights `exp(e − m_r)·e^{m_r − L}` and
//!    the column factor `e^{m_c − L}`; then `A_r·V_h` and, per position,
//!    `y = e^{m_c − L}·(column output) + (row output)`, `z = x + γ·y`.
//!
//! Every logit is computed once, the energies of one group at a time (H² or W² floats per
//! thread, never the N × (H + W) attention), and the only N-sized buffers are the projections,
//! the column outputs and 2N statistics. Each group's arithmetic is the same whichever thread
//! runs it, so the results do not depend on the thread count. The products are sgemm calls
//! (matrixmultiply, one thread each), which pack their operands themselves. A kernel of our
//! own on the crate's 12×32 AVX-512 register tile, packing only A and reading the values in
//! place, measured no faster (single-threaded at C = 512, H = 64, W = 128: 6% more CPU time
//! for the whole forward pass): the packing's cost is the cache misses of reading strided
//! values, which any kernel pays.

use rayon::prelude::*;

use super::projections::{Part, Projections};
use crate::error::Result;
use crate::kernels::exp::{exp_sum, row_max};
use crate::kernels::gemm::gemm;
use crate::kernels::views::{MatMut, MatRef};
use crate::workspace::Workspace;

/// What a training forward pass keeps of one application: y (N × C) and the log-sum-exp of
/// each position's logits (N).
pub(crate) struct Saved<'s> {
    pub(crate) y: &'s mut [f32],
    pub(crate) lse: &'s mut [f32],
}

/// The column part of every position, from the column pass: the unnormalised outputs (W × H
/// positions, column-major, C each) and per position the maximum logit and the sum of
/// `exp(e − max)`; a column of one position has no key (max −∞, sum 0, output 0).
struct ColumnPart<'a> {
    out: &'a [f32],
    max: &'a [f32],
    sum: &'a [f32],
}

/// `out ← x + γ·y` for one sample: `p` its projections, `x` its input (N × C). With `saved`,
/// y and the log-sum-exp are kept for the backward pass.
///
/// # Errors
/// [`Error::TooLarge`](crate::Error::TooLarge) when the scratch buffers cannot be allocated.
///
/// # Panics
/// If the shapes disagree (an internal error).
pub(crate) fn forward(
    p: Projections<'_>,
    x: MatRef<'_>,
    gamma: f32,
    workspace: &Workspace,
    out: &mut [f32],
    saved: Option<Saved<'_>>,
) -> Result<()> {
    let (n, c) = (p.h * p.w, p.c);
    assert!(x.rows() == n && x.cols() == c && out.len() == n * c, "criss-cross forward: shapes");
    let mut col_out = workspace.take(n * c, "criss-cross column outputs")?;
    let mut col_stats = workspace.take(2 * n, "criss-cross column statistics")?;
    let (col_max, col_sum) = col_stats.split_at_mut(n);
    column_pass(p, &mut col_out, col_max, col_sum);
    let columns = ColumnPart { out: &col_out, max: col_max, sum: col_sum };
    let row_len = p.w * c;
    let init = || RowScratch::new(p.w, c);
    match saved {
        Some(Saved { y, lse }) => {
            assert!(y.len() == n * c && lse.len() == n, "criss-cross forward: saved shapes");
            out.par_chunks_mut(row_len)
                .zip(y.par_chunks_mut(row_len))
                .zip(lse.par_chunks_mut(p.w))
                .enumerate()
                .for_each_init(init, |scratch, (h, ((out, y), lse))| {
                    attend_row(p, x, gamma, &columns, h, scratch, out, Some(y), Some(lse))
                })
        }
        None => out
            .par_chunks_mut(row_len)
            .enumerate()
            .for_each_init(init, |scratch, (h, out)| attend_row(p, x, gamma, &columns, h, scratch, out, None, None)),
    }
    Ok(())
}

/// Step 1: the column part of every position (see the module docs).
fn column_pass(p: Projections<'_>, out: &mut [f32], max: &mut [f32], sum: &mut [f32]) {
    let (h, c) = (p.h, p.c);
    if h == 1 {
        // Each column holds only the query itself, which the column part leaves out.
        out.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        return;
    }
    out.par_chunks_mut(h * c).zip(max.par_chunks_mut(h)).zip(sum.par_chunks_mut(h)).enumerate().for_each_init(
        || vec![0.0f32; h * h],
        |e, (w, ((out, max), sum))| {
            let q = p.column(w, Part::Query);
            gemm(1.0, q, p.column(w, Part::Key).t(), 0.0, &mut MatMut::new(e, h, h, h));
            for (i, row) in e.chunks_mut(h).enumerate() {
                // The query itself is counted in the row part only (mmcv: −∞ on the diagonal).
                let m = max_nan(row_max(&row[..i]), row_max(&row[i + 1..]));
                row[i] = f32::NEG_INFINITY;
                sum[i] = exp_sum(row, 1.0, m);
                max[i] = m;
            }
            gemm(1.0, MatRef::new(e, 0, h, h, h), p.column(w, Part::Value), 0.0, &mut MatMut::new(out, h, c, c));
        },
    );
}

/// Per-thread buffers of the row pass.
struct RowScratch {
    /// The W × W energies, then weights, of one row.
    e: Vec<f32>,
    /// Per query of the row, the factor of its column part.
    column_factor: Vec<f32>,
    /// The log-sum-exp of the row's queries, when the caller does not keep it.
    lse: Vec<f32>,
    /// One input row, when the input's channels are not contiguous.
    x_row: Vec<f32>,
}

impl RowScratch {
    fn new(w: usize, c: usize) -> Self {
        RowScratch { e: vec![0.0; w * w], column_factor: vec![0.0; w], lse: vec![0.0; w], x_row: vec![0.0; c] }
    }
}

/// Step 2 for image row `h`: its W positions' row part, combined with their column part,
/// into `out` (W × C) and, when kept, `y` and `lse`.
#[allow(clippy::too_many_arguments)]
fn attend_row(
    p: Projections<'_>,
    x: MatRef<'_>,
    gamma: f32,
    columns: &ColumnPart<'_>,
    h: usize,
    scratch: &mut RowScratch,
    out: &mut [f32],
    y: Option<&mut [f32]>,
    lse: Option<&mut [f32]>,
) {
    let (w, c, height) = (p.w, p.c, p.h);
    let RowScratch { e, column_factor, lse: own_lse, x_row } = scratch;
    let lse = lse.unwrap_or(own_lse);
    gemm(1.0, p.row(h, Part::Query), p.row(h, Part::Key).t(), 0.0, &mut MatMut::new(e, w, w, w));
    for (j, row) in e.chunks_mut(w).enumerate() {
        let at = j * height + h;
        let m_r = row_max(row);
        let s_r = exp_sum(row, 1.0, m_r);
        let (m_c, s_c) = (columns.max[at], columns.sum[at]);
        let top = max_nan(m_r, m_c);
        let (e_r, e_c) = ((m_r - top).exp(), (m_c - top).exp());
        let total = s_r * e_r + s_c * e_c;
        let row_factor = e_r / total;
        row.iter_mut().for_each(|v| *v *= row_factor);
        column_factor[j] = e_c / total;
        lse[j] = top + total.ln();
    }
    let weights = MatRef::new(e, 0, w, w, w);
    let values = p.row(h, Part::Value);
    // y = (column factor)·(column output) + (row output); z = x + γ·y. The same arithmetic
    // whether y is kept or not, so training and inference outputs agree to the bit.
    let column = |j: usize| &columns.out[(j * height + h) * c..][..c];
    match y {
        Some(y) => {
            gemm(1.0, weights, values, 0.0, &mut MatMut::new(y, w, c, c));
            for (j, (y_row, z)) in y.chunks_mut(c).zip(out.chunks_mut(c)).enumerate() {
                let (col, factor, xr) = (column(j), column_factor[j], input_row(x, h * w + j, x_row));
                for ch in 0..c {
                    let yv = factor * col[ch] + y_row[ch];
                    y_row[ch] = yv;
                    z[ch] = xr[ch] + gamma * yv;
                }
            }
        }
        None => {
            gemm(1.0, weights, values, 0.0, &mut MatMut::new(out, w, c, c));
            for (j, z) in out.chunks_mut(c).enumerate() {
                let (col, factor, xr) = (column(j), column_factor[j], input_row(x, h * w + j, x_row));
                for ch in 0..c {
                    let yv = factor * col[ch] + z[ch];
                    z[ch] = xr[ch] + gamma * yv;
                }
            }
        }
    }
}

/// Row `i` of `x`: a view when its channels are contiguous, else a copy in `buf`.
pub(crate) fn input_row<'b>(x: MatRef<'b>, i: usize, buf: &'b mut [f32]) -> &'b [f32] {
    match x.row(i) {
        Some(row) => row,
        None => {
            x.copy_row(i, buf);
            buf
        }
    }
}

/// `if a > b { a } else { b }`, NaN when either is NaN (so a NaN logit poisons the softmax,
/// as in PyTorch).
pub(crate) fn max_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a > b {
        a
    } else {
        b
    }
}
