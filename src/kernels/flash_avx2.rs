//! The fused softmax attention of [`softmax_attention`](super::softmax_attention) for
//! AVX2+FMA, with every operand packed once for its micro-kernel instead of on every GEMM call.
//!
//! One 6×16 micro-kernel does both products, transposed so that its outputs land where the
//! next step wants them:
//! - `Sᵀ = K·Qᵀ` per (6 keys × 16 queries) tile, with K packed once per call in panels of 6
//!   keys and each query tile packed once in panels of 16 queries. The six output rows are
//!   keys, each 16 queries wide, so they are stored straight into `P` laid out as
//!   `[query panel][key][16 queries]`: exactly the packed B operand of the second product.
//! - the online softmax runs down the keys of that layout with the 16 queries in the lanes
//!   (per-query maximum, sum and rescaling are plain vector operations);
//! - `Oᵀ += Vᵀ·Pᵀ` per (6 value channels × 16 queries) tile, with V packed once per call in
//!   panels of 6 channels.
//!
//! Every sum runs in a fixed order (over d for a logit, over key tiles for an output), so the
//! results do not depend on how queries are split between threads.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::exp::{exp_lane, fmadd};
use super::gemm::MatRef;
use super::softmax_attention::over_query_chunks;

/// Keys (A rows) and value channels per micro-tile.
const MR: usize = 6;
/// Queries (B columns) per micro-tile.
const NR: usize = 16;
/// Queries per tile, at most (a multiple of NR).
const QUERY_TILE: usize = 256;
/// Keys per tile (a multiple of MR): fixes the order of the online-softmax updates.
const KEY_TILE: usize = 252;
/// Widest values this kernel is used for: beyond, Oᵀ (value channels × query tile) outgrows
/// L2 (measured at 784 queries, 1024 channels: 52% of the sgemm peak, against 90% through
/// sgemm).
pub const MAX_VALUE_CHANNELS: usize = 512;

/// Packs `src` (rows × depth) into `out` in panels of `width` rows: panel q holds `depth_pad`
/// groups of `width` values, group p being element p of rows q·width.. (zero past the last
/// row and past `depth`).
fn pack_panels(src: MatRef<'_>, width: usize, depth_pad: usize, out: &mut [f32]) {
    let (rows, depth) = (src.rows(), src.cols());
    debug_assert!(depth <= depth_pad && out.len() >= rows.div_ceil(width) * depth_pad * width);
    out.fill(0.0);
    let mut row = vec![0.0f32; depth];
    for r in 0..rows {
        src.copy_row(r, &mut row);
        let panel = &mut out[(r / width) * depth_pad * width..];
        for (p, &v) in row.iter().enumerate() {
            panel[p * width + r % width] = v;
        }
    }
}

/// [`pack_panels`] into a new buffer, in panels of MR rows.
fn pack_rows(src: MatRef<'_>, depth_pad: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; src.rows().div_ceil(MR) * depth_pad * MR];
    pack_panels(src, MR, depth_pad, &mut out);
    out
}

/// `C[0..6, 0..16] (+)= Σ_p a[p][0..6] ⊗ b[p][0..16]`, C rows `ldc` apart.
///
/// # Safety
/// AVX2 and FMA available; `a` readable for 6·kc floats, `b` for 16·kc, C writable for 6 rows
/// of 16 floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = _mm256_loadu_ps(b.add(p * NR));
        let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
        let ap = a.add(p * MR);
        for (r, row) in acc.iter_mut().enumerate() {
            let ar = _mm256_broadcast_ss(&*ap.add(r));
            row[0] = _mm256_fmadd_ps(ar, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ar, b1, row[1]);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (half, &v) in row.iter().enumerate() {
            let dst = c.add(r * ldc + half * 8);
            let out = if accumulate { _mm256_add_ps(_mm256_loadu_ps(dst), v) } else { v };
            _mm256_storeu_ps(dst, out);
        }
    }
}

/// `out ← softmax(scale · q·kᵀ)·v`, `out` row-major N × dv, and, when asked, each row's
/// log-sum-exp `s·max + ln(sum)` in `lse` (N).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax_attention(
    q: MatRef<'_>,
    k: MatRef<'_>,
    v: MatRef<'_>,
    scale: f32,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    tile: usize,
) {
    let (n, m, d, dv) = (q.rows(), k.rows(), q.cols(), v.cols());
    debug_assert!(m > 0 && out.len() == n * dv);
    let m_pad = m.next_multiple_of(MR);
    let k_packed = pack_rows(k, d);
    let v_packed = pack_rows(v.t(), m_pad);
    let tile = tile.next_multiple_of(NR).min(QUERY_TILE);
    let work = |i: usize, out_tile: &mut [f32], lse_tile: Option<&mut [f32]>| {
        let start = i * tile;
        let end = (start + tile).min(n);
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe { attend_tile(q.rows_range(start, end), (&k_packed, m), (&v_packed, dv), d, scale, out_tile, lse_tile) };
    };
    match lse {
        Some(lse) => out
            .par_chunks_mut(tile * dv)
            .zip(lse.par_chunks_mut(tile))
            .enumerate()
            .for_each(|(i, (o, l))| work(i, o, Some(l))),
        None => out.par_chunks_mut(tile * dv).enumerate().for_each(|(i, o)| work(i, o, None)),
    }
}

/// One query tile against all keys.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_tile(
    q: MatRef<'_>,
    (k_packed, m): (&[f32], usize),
    (v_packed, dv): (&[f32], usize),
    d: usize,
    scale: f32,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) {
    let rows = q.rows();
    let qpanels = rows.div_ceil(NR);
    let width = qpanels * NR;
    let m_pad = m.next_multiple_of(MR);
    let dv_panels = dv.div_ceil(MR);
    let mut q_packed = vec![0.0f32; qpanels * d * NR];
    pack_panels(q, NR, d, &mut q_packed);
    // P: [query panel][KEY_TILE keys][16 queries]; Oᵀ: [dv_panels·6 channels][width queries].
    let mut p = vec![0.0f32; qpanels * KEY_TILE * NR];
    let mut o_t = vec![0.0f32; dv_panels * MR * width];
    let mut run_max = vec![f32::NEG_INFINITY; width];
    let mut run_sum = vec![0.0f32; width];
    // SAFETY (the pointer arithmetic below): `start` is a multiple of MR and
    // start + kpanels·MR ≤ m_pad, so every K panel read (d·MR floats) lies inside `k_packed`
    // (⌈m/MR⌉ panels) and every V read (kpanels·MR groups of MR from `start`) inside its
    // panel of m_pad groups; P tiles (MR·NR floats at kp·MR·NR, kp < kpanels ≤ KEY_TILE/MR)
    // stay inside their query panel of KEY_TILE·NR floats, and Oᵀ tiles (MR rows of NR at
    // vp·MR, qp·NR, row stride `width`) inside dv_panels·MR rows of `width`.
    let mut start = 0;
    while start < m {
        let end = (start + KEY_TILE).min(m);
        let keys = end - start;
        let kpanels = keys.div_ceil(MR);
        let first = start == 0;
        for qp in 0..qpanels {
            let b = q_packed.as_ptr().add(qp * d * NR);
            let p_panel = p.as_mut_ptr().add(qp * KEY_TILE * NR);
            for kp in 0..kpanels {
                let a = k_packed.as_ptr().add((start / MR + kp) * d * MR);
                micro_kernel(d, a, b, p_panel.add(kp * MR * NR), NR, false);
            }
            let panel = &mut p[qp * KEY_TILE * NR..(qp * KEY_TILE + kpanels * MR) * NR];
            let lanes = qp * NR..(qp + 1) * NR;
            let correction = softmax_panel(panel, keys, scale, &mut run_max[lanes.clone()], &mut run_sum[lanes], first);
            if let Some(corr) = correction {
                for ch in 0..dv {
                    let row = &mut o_t[ch * width + qp * NR..][..NR];
                    row.iter_mut().zip(&corr).for_each(|(o, c)| *o *= c);
                }
            }
        }
        // Value panels outer: each stays in L1 while the query panels of P pass by.
        for vp in 0..dv_panels {
            let a = v_packed.as_ptr().add(vp * m_pad * MR + start * MR);
            for qp in 0..qpanels {
                let b = p.as_ptr().add(qp * KEY_TILE * NR);
                let c = o_t.as_mut_ptr().add(vp * MR * width + qp * NR);
                micro_kernel(kpanels * MR, a, b, c, width, !first);
            }
        }
        start = end;
    }
    for r in 0..rows {
        let inv = 1.0 / run_sum[r];
        for ch in 0..dv {
            out[r * dv + ch] = o_t[ch * width + r] * inv;
        }
    }
    if let Some(lse) = lse {
        for r in 0..rows {
            lse[r] = scale * run_max[r] + run_sum[r].ln();
        }
    }
}

/// The online-softmax step for one panel of 16 queries over `keys` keys (rows of 16):
/// updates the running maximum and sum, turns the logits into `exp(s·logit − s·max)` (zero for
/// the padding rows past `keys`), and returns the per-query rescaling of earlier sums when
/// the maximum grew.
#[inline(always)]
fn softmax_panel(
    panel: &mut [f32],
    keys: usize,
    scale: f32,
    run_max: &mut [f32],
    run_sum: &mut [f32],
    first: bool,
) -> Option<[f32; NR]> {
    let mut best = [f32::NEG_INFINITY; NR];
    // v·0 is NaN exactly when v is NaN or ±∞: such a query's softmax is NaN, as in PyTorch.
    let mut probe = [0.0f32; NR];
    for row in panel[..keys * NR].chunks_exact(NR) {
        for l in 0..NR {
            best[l] = if row[l] > best[l] { row[l] } else { best[l] };
            probe[l] += row[l] * 0.0;
        }
    }
    let mut new_max = [0.0f32; NR];
    let mut grew = false;
    for l in 0..NR {
        let tile_max = if probe[l].is_nan() { f32::NAN } else { best[l] };
        let old = run_max[l];
        new_max[l] = if tile_max > old || tile_max.is_nan() { tile_max } else { old };
        grew |= new_max[l] != old || new_max[l].is_nan();
    }
    let shift: [f32; NR] = std::array::from_fn(|l| scale * new_max[l]);
    let mut sums = [0.0f32; NR];
    for row in panel[..keys * NR].chunks_exact_mut(NR) {
        for l in 0..NR {
            let e = exp_lane::<true>(fmadd::<true>(row[l], scale, -shift[l]));
            row[l] = e;
            sums[l] += e;
        }
    }
    panel[keys * NR..].fill(0.0);
    let mut correction = None;
    if first {
        run_sum.copy_from_slice(&sums);
    } else if grew {
        let corr: [f32; NR] = std::array::from_fn(|l| (scale * (run_max[l] - new_max[l])).exp());
        for l in 0..NR {
            run_sum[l] = run_sum[l] * corr[l] + sums[l];
        }
        correction = Some(corr);
    } else {
        run_sum.iter_mut().zip(&sums).for_each(|(s, e)| *s += e);
    }
    run_max.copy_from_slice(&new_max);
    correction
}

/// The backward of [`softmax_attention`] (with its log-sum-exp), as
/// [`softmax_attention_backward`](super::softmax_attention::softmax_attention_backward):
/// writes `dq` (N × d), `dk` (M × d), `dv` (M × dv).
///
/// Per (query tile, key tile) the same micro-kernel computes `Sᵀ = K·Qᵀ` and
/// `dPᵀ = V·dYᵀ` (keys × queries, 16 queries in the lanes, where `P = exp(s·S − lse)` and
/// `dS = P ⊙ (dP − D)` are formed), `dQᵀ += Kᵀ·dSᵀ`, and, after P and dS are re-packed with
/// the queries as depth, `dV += P·dY` and `dK += dS·Q`. Queries are split into the same fixed
/// chunks as the sgemm-based kernel, key-side partial sums added in chunk order.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn softmax_attention_backward(
    (q, k, v, scale): (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
    lse: &[f32],
    y: MatRef<'_>,
    dy: MatRef<'_>,
    query_tile: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (n, m, d, dvc) = (q.rows(), k.rows(), q.cols(), v.cols());
    let m_pad = m.next_multiple_of(MR);
    let packed = BackwardPacked {
        k_rows: pack_rows(k, d),
        v_rows: pack_rows(v, dvc),
        k_cols: pack_rows(k.t(), m_pad),
        m,
        d_pad: d.next_multiple_of(NR),
        dv_pad: dvc.next_multiple_of(NR),
    };
    let d_pad = packed.d_pad;
    let dv_pad = packed.dv_pad;
    let partials = over_query_chunks(
        n,
        d,
        query_tile,
        dq,
        || (vec![0.0f32; m_pad * d_pad], vec![0.0f32; m_pad * dv_pad]),
        |rows, dq_tile, (dk_part, dv_part)| {
            // SAFETY: the caller guarantees AVX2 and FMA.
            unsafe {
                backward_tile(
                    &packed,
                    (q.rows_range(rows.start, rows.end), scale),
                    &lse[rows.clone()],
                    (y.rows_range(rows.start, rows.end), dy.rows_range(rows.start, rows.end)),
                    dq_tile,
                    dk_part,
                    dv_part,
                )
            }
        },
    );
    dk.fill(0.0);
    dv.fill(0.0);
    for (dk_part, dv_part) in &partials {
        for j in 0..m {
            let (src, dst) = (&dk_part[j * packed.d_pad..][..d], &mut dk[j * d..(j + 1) * d]);
            dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
            let (src, dst) = (&dv_part[j * packed.dv_pad..][..dvc], &mut dv[j * dvc..(j + 1) * dvc]);
            dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        }
    }
    dk.iter_mut().for_each(|v| *v *= scale);
}

/// K and V packed once per backward call.
struct BackwardPacked {
    /// K in panels of MR keys, depth d (A of `Sᵀ = K·Qᵀ`).
    k_rows: Vec<f32>,
    /// V in panels of MR keys, depth dv (A of `dPᵀ = V·dYᵀ`).
    v_rows: Vec<f32>,
    /// Kᵀ in panels of MR channels, depth m_pad keys (A of `dQᵀ = Kᵀ·dSᵀ`).
    k_cols: Vec<f32>,
    m: usize,
    /// d and dv rounded up to NR: the row strides of the key-side partial sums.
    d_pad: usize,
    dv_pad: usize,
}

/// Repacks a `[query panel][key][NR queries]` tile (`keys` keys, `width` queries) into
/// `[key panel][query][MR keys]`, the A operand with the queries as depth.
fn repack_by_keys(src: &[f32], keys: usize, width: usize, out: &mut [f32]) {
    let kpanels = keys.div_ceil(MR);
    for kp in 0..kpanels {
        let panel = &mut out[kp * width * MR..(kp + 1) * width * MR];
        for qi in 0..width {
            let (qp, l) = (qi / NR, qi % NR);
            for r in 0..MR {
                panel[qi * MR + r] = src[(qp * KEY_TILE + kp * MR + r) * NR + l];
            }
        }
    }
}

/// One query tile of the backward pass against all keys.
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_tile(
    packed: &BackwardPacked,
    (q, scale): (MatRef<'_>, f32),
    lse: &[f32],
    (y, dy): (MatRef<'_>, MatRef<'_>),
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (rows, d, dvc, m) = (q.rows(), q.cols(), dy.cols(), packed.m);
    let qpanels = rows.div_ceil(NR);
    let width = qpanels * NR;
    let m_pad = m.next_multiple_of(MR);
    let d_panels6 = d.div_ceil(MR);
    // Per-query values in lanes; padding queries get lse = +∞ so their P (and dS) is 0.
    let mut lse_w = vec![f32::INFINITY; width];
    lse_w[..rows].copy_from_slice(lse);
    let mut delta = vec![0.0f32; width];
    let (mut row_y, mut row_dy) = (vec![0.0f32; dvc], vec![0.0f32; dvc]);
    for (r, dr) in delta.iter_mut().enumerate().take(rows) {
        y.copy_row(r, &mut row_y);
        dy.copy_row(r, &mut row_dy);
        *dr = row_y.iter().zip(&row_dy).map(|(a, b)| a * b).sum();
    }
    // B operands with d or dv as depth (queries in panels of NR) ...
    let mut q_by_d = vec![0.0f32; qpanels * d * NR];
    pack_panels(q, NR, d, &mut q_by_d);
    let mut dy_by_dv = vec![0.0f32; qpanels * dvc * NR];
    pack_panels(dy, NR, dvc, &mut dy_by_dv);
    // ... and with the queries as depth (channels in panels of NR).
    let mut q_by_query = vec![0.0f32; d.div_ceil(NR) * width * NR];
    pack_panels(q.t(), NR, width, &mut q_by_query);
    let mut dy_by_query = vec![0.0f32; dvc.div_ceil(NR) * width * NR];
    pack_panels(dy.t(), NR, width, &mut dy_by_query);
    let mut p = vec![0.0f32; qpanels * KEY_TILE * NR];
    let mut ds = vec![0.0f32; qpanels * KEY_TILE * NR];
    let mut p_by_key = vec![0.0f32; (KEY_TILE / MR) * width * MR];
    let mut ds_by_key = vec![0.0f32; (KEY_TILE / MR) * width * MR];
    let mut dq_t = vec![0.0f32; d_panels6 * MR * width];
    // SAFETY (pointer arithmetic below): as in `attend_tile`, `start` is a multiple of MR and
    // start + kpanels·MR ≤ m_pad; key-side outputs have m_pad rows of d_pad / dv_pad floats,
    // so MR rows of NR columns at (start + kp·MR, panel·NR) fit; dQᵀ has d_panels6·MR rows.
    let mut start = 0;
    while start < m {
        let end = (start + KEY_TILE).min(m);
        let keys = end - start;
        let kpanels = keys.div_ceil(MR);
        for qp in 0..qpanels {
            let lanes = qp * NR..(qp + 1) * NR;
            let (p_panel, ds_panel) = (p.as_mut_ptr().add(qp * KEY_TILE * NR), ds.as_mut_ptr().add(qp * KEY_TILE * NR));
            for kp in 0..kpanels {
                let key_panel = start / MR + kp;
                let kq = packed.k_rows.as_ptr().add(key_panel * d * MR);
                micro_kernel(d, kq, q_by_d.as_ptr().add(qp * d * NR), p_panel.add(kp * MR * NR), NR, false);
                let vq = packed.v_rows.as_ptr().add(key_panel * dvc * MR);
                micro_kernel(dvc, vq, dy_by_dv.as_ptr().add(qp * dvc * NR), ds_panel.add(kp * MR * NR), NR, false);
            }
            let p_rows = &mut p[qp * KEY_TILE * NR..][..kpanels * MR * NR];
            let ds_rows = &mut ds[qp * KEY_TILE * NR..][..kpanels * MR * NR];
            let (lse_l, delta_l) = (&lse_w[lanes.clone()], &delta[lanes]);
            for (key, (pr, dr)) in p_rows.chunks_exact_mut(NR).zip(ds_rows.chunks_exact_mut(NR)).enumerate() {
                if key >= keys {
                    pr.fill(0.0);
                    dr.fill(0.0);
                    continue;
                }
                for l in 0..NR {
                    let w = exp_lane::<true>(fmadd::<true>(pr[l], scale, -lse_l[l]));
                    pr[l] = w;
                    dr[l] = w * (dr[l] - delta_l[l]);
                }
            }
        }
        // dQᵀ += Kᵀ·dSᵀ (scaled at the end).
        for cp in 0..d_panels6 {
            let a = packed.k_cols.as_ptr().add(cp * m_pad * MR + start * MR);
            for qp in 0..qpanels {
                let c = dq_t.as_mut_ptr().add(cp * MR * width + qp * NR);
                micro_kernel(kpanels * MR, a, ds.as_ptr().add(qp * KEY_TILE * NR), c, width, start > 0);
            }
        }
        // dV += P·dY and dK += dS·Q, with the queries as depth.
        repack_by_keys(&p, keys, width, &mut p_by_key);
        repack_by_keys(&ds, keys, width, &mut ds_by_key);
        for kp in 0..kpanels {
            let row = start + kp * MR;
            let (pa, dsa) = (p_by_key.as_ptr().add(kp * width * MR), ds_by_key.as_ptr().add(kp * width * MR));
            for cp in 0..dvc.div_ceil(NR) {
                let c = dv.as_mut_ptr().add(row * packed.dv_pad + cp * NR);
                micro_kernel(width, pa, dy_by_query.as_ptr().add(cp * width * NR), c, packed.dv_pad, true);
            }
            for cp in 0..d.div_ceil(NR) {
                let c = dk.as_mut_ptr().add(row * packed.d_pad + cp * NR);
                micro_kernel(width, dsa, q_by_query.as_ptr().add(cp * width * NR), c, packed.d_pad, true);
            }
        }
        start = end;
    }
    for r in 0..rows {
        for ch in 0..d {
            dq[r * d + ch] = scale * dq_t[ch * width + r];
        }
    }
}
