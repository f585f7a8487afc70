//! The criss-cross attention of one sample, backward: from ∂L/∂z to ∂L/∂[q | k | v] and
//! `Σ_i ∂L/∂z_i · y_i` (γ's gradient), recomputing the attention weights from the saved
//! log-sum-exp as FlashAttention-2 does: never the N × (H + W) attention.
//!
//! With `dy = γ·dz`, `a_ij = exp(q_i·k_j − L_i)` and `D_i = dy_i·y_i`:
//! `dv_j = Σ_i a_ij dy_i`, `ds_ij = a_ij (dy_i·v_j − D_i)`, `dq_i = Σ_j ds_ij k_j`,
//! `dk_j = Σ_i ds_ij q_i`, the sums over the pairs (i, j) of a row or a column. As in the
//! forward pass the row part runs per image row and the column part per image column, each a
//! few small products: `S = Q·Kᵀ`, `dA = γ·dZ·Vᵀ`, then `dQ = dS·K`, `dK = dSᵀ·Q`,
//! `dV = γ·Aᵀ·dZ`. The row part writes its rows of ∂[q | k | v], the column part writes a
//! column-major buffer that is then added to them, so each gradient element is the same two
//! sums in the same order whatever the thread count.

use rayon::prelude::*;

use super::projections::{Part, Projections};
use crate::error::Result;
use crate::kernels::exp::{exp_sum, sum_lanes, LANES};
use crate::kernels::gemm::gemm;
use crate::kernels::views::{MatMut, MatRef};
use crate::workspace::{Scratch, Workspace};

/// The saved forward results of one application: y (N × C) and the log-sum-exp (N).
#[derive(Clone, Copy)]
pub(crate) struct Forward<'a> {
    pub(crate) y: &'a [f32],
    pub(crate) lse: &'a [f32],
}

/// ∂L/∂[q | k | v] (N × (2·qk + C), a buffer from `workspace`) and `Σ_i dz_i·y_i`, given
/// `dz` = ∂L/∂z (N × C, row-major).
///
/// # Errors
/// [`Error::TooLarge`](crate::Error::TooLarge) when the scratch buffers cannot be allocated.
///
/// # Panics
/// If the shapes disagree (an internal error).
pub(crate) fn backward<'w>(
    p: Projections<'_>,
    saved: Forward<'_>,
    dz: &[f32],
    gamma: f32,
    workspace: &'w Workspace,
) -> Result<(Scratch<'w>, f64)> {
    let (h, w, c, width) = (p.h, p.w, p.c, p.width());
    let n = h * w;
    assert!(dz.len() == n * c && saved.y.len() == n * c && saved.lse.len() == n, "criss-cross backward: shapes");
    // D_i = γ·(dz_i·y_i), and Σ_i dz_i·y_i for ∂L/∂γ.
    let mut dots = workspace.take(n, "criss-cross dz·y")?;
    dots.par_chunks_mut(w).enumerate().for_each(|(row, out)| {
        for (j, o) in out.iter_mut().enumerate() {
            let i = row * w + j;
            *o = dot(&dz[i * c..][..c], &saved.y[i * c..][..c]);
        }
    });
    let dz_y: f64 = dots.iter().map(|&v| v as f64).sum();
    let delta: Vec<f32> = dots.iter().map(|&v| gamma * v).collect();
    drop(dots);
    let ctx = Context { p, lse: saved.lse, delta: &delta, dz, gamma };

    let mut dproj = workspace.take(n * width, "criss-cross projection gradients")?;
    dproj
        .par_chunks_mut(w * width)
        .enumerate()
        .for_each_init(|| GroupScratch::new(w), |scratch, (row, out)| ctx.group(Group::Row(row), scratch, out));
    let mut dcol = workspace.take(n * width, "criss-cross column gradients")?;
    if h == 1 {
        dcol.fill(0.0);
    } else {
        dcol.par_chunks_mut(h * width)
            .enumerate()
            .for_each_init(|| GroupScratch::new(h), |scratch, (col, out)| ctx.group(Group::Column(col), scratch, out));
    }
    dproj.par_chunks_mut(w * width).enumerate().for_each(|(row, out)| {
        for (j, dst) in out.chunks_mut(width).enumerate() {
            let src = &dcol[(j * h + row) * width..][..width];
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        }
    });
    Ok((dproj, dz_y))
}

/// An image row or column: the queries of one product, and their keys.
#[derive(Clone, Copy, Debug)]
enum Group {
    Row(usize),
    Column(usize),
}

struct Context<'a> {
    p: Projections<'a>,
    lse: &'a [f32],
    delta: &'a [f32],
    /// ∂L/∂z, N × C row-major.
    dz: &'a [f32],
    gamma: f32,
}

/// Per-thread buffers: the attention weights and their gradient for one group.
struct GroupScratch {
    a: Vec<f32>,
    ds: Vec<f32>,
}

impl GroupScratch {
    fn new(len: usize) -> Self {
        GroupScratch { a: vec![0.0; len * len], ds: vec![0.0; len * len] }
    }
}

impl Context<'_> {
    /// The positions of a group: (first index, count, stride) into the N positions.
    fn positions(&self, group: Group) -> (usize, usize, usize) {
        let (h, w) = (self.p.h, self.p.w);
        match group {
            Group::Row(row) => (row * w, w, 1),
            Group::Column(col) => (col, h, w),
        }
    }

    fn view(&self, group: Group, part: Part) -> MatRef<'_> {
        match group {
            Group::Row(row) => self.p.row(row, part),
            Group::Column(col) => self.p.column(col, part),
        }
    }

    /// The group's part of ∂[q | k | v] into `out` (len rows of `2·qk + C`).
    fn group(&self, group: Group, scratch: &mut GroupScratch, out: &mut [f32]) {
        let (qk, c, width) = (self.p.qk, self.p.c, self.p.width());
        let (first, len, stride) = self.positions(group);
        let (q, k, v) = (self.view(group, Part::Query), self.view(group, Part::Key), self.view(group, Part::Value));
        let dz = MatRef::new(self.dz, first * c, len, c, stride * c);
        let (a, ds) = (&mut scratch.a[..len * len], &mut scratch.ds[..len * len]);
        // A = exp(Q·Kᵀ − L), the diagonal out of the column part.
        gemm(1.0, q, k.t(), 0.0, &mut MatMut::new(a, len, len, len));
        // One image row (H = 1) holds every key of its queries: there the weights are
        // renormalised to sum to 1 and D_i is Σ_j a_ij·dA_ij of these very products, as
        // PyTorch's softmax backward takes it (a single key: dS exactly 0), instead of
        // γ·dz_i·y_i, which differs from it by the rounding of y.
        let all_keys_here = self.p.h == 1;
        for (i, row) in a.chunks_mut(len).enumerate() {
            let sum = exp_sum(row, 1.0, self.lse[first + i * stride]);
            if matches!(group, Group::Column(_)) {
                row[i] = 0.0;
            } else if all_keys_here && sum > 0.0 {
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|w| *w *= inv);
            }
        }
        // dS = A ⊙ (γ·dZ·Vᵀ − D), subnormal values as 0 (as the block's attention backward:
        // as operands of the products below they cost a microcode assist each).
        gemm(self.gamma, dz, v.t(), 0.0, &mut MatMut::new(ds, len, len, len));
        for (i, (ds_row, a_row)) in ds.chunks_mut(len).zip(a.chunks(len)).enumerate() {
            let d = if all_keys_here { dot(a_row, ds_row) } else { self.delta[first + i * stride] };
            ds_row.iter_mut().zip(a_row).for_each(|(g, &w)| {
                let v = w * (*g - d);
                *g = if v.abs() < f32::MIN_POSITIVE { 0.0 } else { v };
            });
        }
        let (a, ds) = (MatRef::new(a, 0, len, len, len), MatRef::new(ds, 0, len, len, len));
        gemm(1.0, ds, k, 0.0, &mut MatMut::new(out, len, qk, width));
        gemm(1.0, ds.t(), q, 0.0, &mut MatMut::new(&mut out[qk..], len, qk, width));
        gemm(self.gamma, a.t(), dz, 0.0, &mut MatMut::new(&mut out[2 * qk..], len, c, width));
    }
}

/// `Σ a_i·b_i` in f32 over 16 partial sums added in a fixed order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    sum_lanes(acc)
}
