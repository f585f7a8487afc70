//! The packed register tile every packed kernel is built on, and the packing it reads.
//!
//! `C[MR × NR] (+)= A·B` over a depth `kc`, with A packed as `kc` groups of MR values (one
//! element of each of MR rows) and B as `kc` groups of NR = NV·LANES values: per depth step
//! NV vector loads of B, MR broadcasts of A and MR·NV fused multiply-adds into registers.

use super::simd::Simd;
use super::views::MatRef;
use crate::workspace::{Scratch, Workspace};

/// Floats of the largest register tile a kernel may use (for the partial-tile buffer).
const MAX_TILE: usize = 16 * 64;

/// `C[0..MR, 0..NR] ← (C +) Σ_p a[p·MR + r] · b[p·NR + j]` with NR = NV·LANES, C rows `ldc`
/// apart; each element is one fused multiply-add chain over p in order.
///
/// # Safety
/// `a` readable for `kc·MR` floats, `b` for `kc·NR`, and C readable and writable for MR rows
/// of NR floats, `ldc` apart.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile<S: Simd, const MR: usize, const NV: usize>(
    s: S,
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let nr = NV * S::LANES;
    let mut acc = [[s.zero(); NV]; MR];
    // SAFETY: the caller guarantees every pointer range used below.
    unsafe {
        for p in 0..kc {
            let bp = b.add(p * nr);
            let bv: [S::V; NV] = std::array::from_fn(|v| s.load(bp.add(v * S::LANES)));
            let ap = a.add(p * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let ar = s.splat(*ap.add(r));
                for (v, cell) in row.iter_mut().enumerate() {
                    *cell = s.fmadd(ar, bv[v], *cell);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, &cell) in row.iter().enumerate() {
                let dst = c.add(r * ldc + v * S::LANES);
                let out = if accumulate { s.add(s.load(dst), cell) } else { cell };
                s.store(dst, out);
            }
        }
    }
}

/// [`tile`] into the top-left `rows × cols` corner of C only (an edge tile): the full tile is
/// computed into a buffer and the corner copied (or added) out.
///
/// # Safety
/// As [`tile`] for `a` and `b`; C readable and writable for `rows` rows of `cols` floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn edge_tile<S: Simd, const MR: usize, const NV: usize>(
    s: S,
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    (rows, cols): (usize, usize),
) {
    let nr = NV * S::LANES;
    const { assert!(MR * NV * S::LANES <= MAX_TILE) };
    let mut buf = [0.0f32; MAX_TILE];
    // SAFETY: `buf` holds MR rows of nr floats; the caller guarantees the rest.
    unsafe {
        tile::<S, MR, NV>(s, kc, a, b, buf.as_mut_ptr(), nr, false);
        for r in 0..rows.min(MR) {
            let src = &buf[r * nr..r * nr + cols.min(nr)];
            let dst = std::slice::from_raw_parts_mut(c.add(r * ldc), src.len());
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, v)| *d += v);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// Packs `src` (rows × depth) into `out` in panels of `width` rows: panel q holds `depth_pad`
/// groups of `width` values, group p being element p of rows q·width.. (zero past the last
/// row and past `depth`).
///
/// # Panics
/// If `out` is shorter than ⌈rows/width⌉·depth_pad·width or `depth > depth_pad`.
pub(crate) fn pack_panels(src: MatRef<'_>, width: usize, depth_pad: usize, out: &mut [f32]) {
    let (rows, depth) = (src.rows(), src.cols());
    assert!(depth <= depth_pad && out.len() >= rows.div_ceil(width) * depth_pad * width);
    out.fill(0.0);
    if depth == 0 {
        return;
    }
    if rows > 1 && depth > 0 && src.row(0).is_none() && src.col(0).is_some() {
        // Columns are contiguous (a transposed matrix): each group is a run of one column.
        for p in 0..depth {
            let col = src.col(p).expect("contiguous columns");
            for (q, run) in col.chunks(width).enumerate() {
                out[(q * depth_pad + p) * width..][..run.len()].copy_from_slice(run);
            }
        }
        return;
    }
    let mut row = vec![0.0f32; depth];
    for r in 0..rows {
        src.copy_row(r, &mut row);
        let panel = &mut out[(r / width) * depth_pad * width..];
        for (p, &v) in row.iter().enumerate() {
            panel[p * width + r % width] = v;
        }
    }
}

/// [`pack_panels`] for panels of a compile-time height: the same layout, faster where rows are
/// contiguous (each depth step writes MR neighbouring floats read from MR row slices).
///
/// # Panics
/// As [`pack_panels`].
pub(crate) fn pack_rows<const MR: usize>(src: MatRef<'_>, depth_pad: usize, out: &mut [f32]) {
    let (rows, depth) = (src.rows(), src.cols());
    if rows == 0 || src.row(0).is_none() || depth != depth_pad {
        return pack_panels(src, MR, depth_pad, out);
    }
    assert!(out.len() >= rows.div_ceil(MR) * depth * MR);
    for (panel, dst) in out.chunks_exact_mut(depth * MR).take(rows.div_ceil(MR)).enumerate() {
        let first = panel * MR;
        if first + MR > rows {
            return pack_panels(src.rows_range(first, rows), MR, depth, dst);
        }
        let row: [&[f32]; MR] = std::array::from_fn(|r| src.row(first + r).expect("contiguous rows"));
        for (p, group) in dst.chunks_exact_mut(MR).enumerate() {
            for (g, r) in group.iter_mut().zip(&row) {
                *g = r[p];
            }
        }
    }
}

/// [`pack_panels`] into a scratch buffer of `ws`.
pub(crate) fn packed_panels<'w>(ws: &'w Workspace, src: MatRef<'_>, width: usize, depth_pad: usize) -> Scratch<'w> {
    let mut out = ws.scratch(src.rows().div_ceil(width) * depth_pad * width);
    pack_panels(src, width, depth_pad, &mut out);
    out
}
