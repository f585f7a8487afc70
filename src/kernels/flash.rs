//! The packed softmax attention, forward and backward, written once over the vector
//! operations of [`Simd`](super::simd::Simd) and a register tile of MR rows × NV vectors (see
//! [`microkernel`](super::microkernel)) and its element types: f32, or bf16 pairs for the
//! value product; [`attention`](super::attention) instantiates it for AVX-512 (12×32) and AVX2
//! (6×16; 4×16 for bf16), and the tests for portable vectors of those geometries.
//!
//! Every operand is packed once instead of on every GEMM call, and one micro-kernel does both
//! products, transposed so that its outputs land where the next step wants them:
//! - `Sᵀ = K·Qᵀ` per (MR keys × NR queries) tile, with K packed once per call in panels of MR
//!   keys and each query tile packed once in panels of NR queries. The MR output rows are keys,
//!   each NR queries wide, so they are stored straight into `P` laid out as
//!   `[query panel][key][NR queries]`: exactly the packed B operand of the second product;
//! - the online softmax runs down the keys of that layout with the NR queries in the vector
//!   lanes (per-query maximum, sum and rescaling are plain vector operations);
//! - `Oᵀ += Vᵀ·Pᵀ` per (MR value channels × NR queries) tile, with V packed once per call in
//!   panels of MR channels.
//!
//! Every sum runs in a fixed order (over d for a logit, over key tiles for an output), so the
//! results do not depend on how queries are split between threads.

use super::attention_common::MIN_WEIGHT_EXPONENT;
use super::attention_common::{
    add_key_partials, finish_rows, for_each_query_tile, over_query_chunks, row_dots, Accumulated,
};
use super::attention_shapes::{check_backward, check_forward};
use super::exp::{exp2_weight, weight_vector, LOG2E};
use super::microkernel::{packed_panels, tile, Elem, Word, F32};
use super::simd::Bf16Simd;
use super::simd::Job;
use super::tiles::{KEY_TILE, QUERY_TILE};
use super::views::MatRef;
use crate::workspace::{Scratch, Workspace};

/// `out ← softmax(scale · (q·kᵀ + bias))·v`, `out` row-major N × dv, `bias` one logit offset
/// per key (none: 0), and, when asked, each row's log-sum-exp `s·max + ln(sum)` in `lse` (N).
/// Query tiles of `tile` rows (rounded up to NR, at most [`QUERY_TILE`]) run in parallel;
/// packed operands and tile buffers come from `ws`.
///
/// The logits `Sᵀ = K·Qᵀ` multiply elements `QE` in MR × NR tiles, the value product
/// `Oᵀ += Vᵀ·Pᵀ` elements `VE` in MRV × NR tiles. With bf16 elements for a product
/// ([`Elem::DEPTH`] 2) its operands are rounded to bf16 as they are packed (the weights P per
/// tile, dropped below 2^-63 of the running maximum; the row sums add them unrounded); the
/// softmax is f32 whatever the elements, its f32 weights 0 below 2^-64 of the running maximum
/// ([`weight_vector`]: no subnormal products).
///
/// # Panics
/// If the shapes disagree: `q` N × d, `k` M × d with M ≥ 1, `v` M × dv, `bias` M, `out`
/// N·dv, `lse` N.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention<S: Bf16Simd, QE: Elem, VE: Elem, const MR: usize, const MRV: usize, const NV: usize>(
    s: S,
    (q, k, v, scale): (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
    bias: Option<&[f32]>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    tile: usize,
    ws: &Workspace,
) {
    let nr = NV * S::LANES;
    const {
        assert!(KEY_TILE.is_multiple_of(MR) && QUERY_TILE.is_multiple_of(NV * S::LANES));
        // The value product's depth, the keys padded to whole K panels, holds whole groups.
        assert!(MR.is_multiple_of(VE::DEPTH) && KEY_TILE.is_multiple_of(VE::DEPTH));
    };
    check_forward((q, k, v), bias, out, lse.as_deref());
    let (n, m, d, dv) = (q.rows(), k.rows(), q.cols(), v.cols());
    let m_pad = m.next_multiple_of(MR);
    let k_packed = packed_panels::<QE>(ws, k, MR, d.div_ceil(QE::DEPTH));
    let v_packed = packed_panels::<VE>(ws, v.t(), MRV, m_pad / VE::DEPTH);
    let floors =
        (QE::exponent_floor::<S>(QE::Packed::of(&k_packed)), VE::exponent_floor::<S>(VE::Packed::of(&v_packed)));
    let tile = tile.next_multiple_of(nr).min(QUERY_TILE);
    for_each_query_tile(n, dv, tile, out, lse, |rows, out, lse| {
        let q = q.rows_range(rows.start, rows.end);
        let (k, v) = ((QE::Packed::of(&k_packed), m), (VE::Packed::of(&v_packed), dv));
        s.vectorize(AttendTile::<QE, VE, MR, MRV, NV> { q, k, bias, v, floors, scale, out, lse, ws });
    });
}

/// One query tile against all keys: `q` (rows × d) with K and V packed.
struct AttendTile<'a, QE: Elem, VE: Elem, const MR: usize, const MRV: usize, const NV: usize> {
    q: MatRef<'a>,
    /// K packed in panels of MR keys (⌈d / DEPTH⌉ groups deep), and M.
    k: (&'a [QE::Packed], usize),
    /// Per-key logit offsets (M), if any.
    bias: Option<&'a [f32]>,
    /// Vᵀ packed in panels of MRV channels (M rounded up to MR, over DEPTH, groups deep), and
    /// dv.
    v: (&'a [VE::Packed], usize),
    /// The exponent floors of K and V ([`Elem::exponent_floor`]).
    floors: (Option<i32>, Option<i32>),
    scale: f32,
    out: &'a mut [f32],
    lse: Option<&'a mut [f32]>,
    ws: &'a Workspace,
}

impl<QE: Elem, VE: Elem, const MR: usize, const MRV: usize, const NV: usize> Job
    for AttendTile<'_, QE, VE, MR, MRV, NV>
{
    type Out = ();

    #[inline(always)]
    fn run<S: Bf16Simd>(self, s: S) {
        let nr = NV * S::LANES;
        let q_packed = packed_panels::<QE>(self.ws, self.q, nr, self.q.cols().div_ceil(QE::DEPTH));
        let q_floor = QE::exponent_floor::<S>(QE::Packed::of(&q_packed));
        // The emulations need their checks unless both products' operands are certified (the
        // weights' exponents are at least MIN_WEIGHT_EXPONENT).
        let (k_floor, v_floor) = self.floors;
        if QE::checked::<S>(k_floor, q_floor) || VE::checked::<S>(v_floor, Some(MIN_WEIGHT_EXPONENT)) {
            self.attend::<S, QE::Checked, VE::Checked>(s, &q_packed);
        } else {
            self.attend::<S, QE, VE>(s, &q_packed);
        }
    }
}

impl<QE: Elem, VE: Elem, const MR: usize, const MRV: usize, const NV: usize> AttendTile<'_, QE, VE, MR, MRV, NV> {
    /// The tile's work with the register tiles on `TQ` and `TV` (the elements themselves, or
    /// their checked twins).
    #[inline(always)]
    fn attend<S: Bf16Simd, TQ: Elem<Packed = QE::Packed>, TV: Elem<Packed = VE::Packed>>(self, s: S, q_packed: &[f32]) {
        let AttendTile { q, k: (k_packed, m), bias, v: (v_packed, dv), scale, out, lse, ws, .. } = self;
        let q_packed = QE::Packed::of(q_packed);
        let nr = NV * S::LANES;
        let pairs = VE::DEPTH == 2;
        let (rows, d_groups) = (q.rows(), q.cols().div_ceil(QE::DEPTH));
        let qpanels = rows.div_ceil(nr);
        let width = qpanels * nr;
        let m_pad = m.next_multiple_of(MR);
        let dv_panels = dv.div_ceil(MRV);
        // P: [query panel][KEY_TILE keys][nr queries] logits, then (f32) the weights; bf16: the
        // weights as pair words [query panel][KEY_TILE / 2 key pairs][nr queries]. Oᵀ:
        // [dv_panels·MRV channels][width queries]. Each is written before it is read (P's used
        // rows by the tile, the words by the softmax, Oᵀ by the first key tile), so their
        // scratch needs no zeroing.
        let mut p = ws.scratch(qpanels * KEY_TILE * nr);
        // (None in f32: no buffer taken from the pool, whose other takers would then allocate.)
        let mut p_words = pairs.then(|| ws.scratch(qpanels * (KEY_TILE / 2) * nr));
        let mut o_t = ws.scratch(dv_panels * MRV * width);
        let mut run_max = vec![f32::NEG_INFINITY; width];
        let mut run_sum = vec![0.0f32; width];
        let mut correction = vec![1.0f32; nr];
        let (p_stride, v_groups) = (KEY_TILE / VE::DEPTH * nr, m_pad / VE::DEPTH);
        let mut start = 0;
        while start < m {
            let end = (start + KEY_TILE).min(m);
            let keys = end - start;
            let kpanels = keys.div_ceil(MR);
            let first = start == 0;
            for qp in 0..qpanels {
                let panel = &mut p[qp * KEY_TILE * nr..][..kpanels * MR * nr];
                for kp in 0..kpanels {
                    let a = &k_packed[(start / MR + kp) * d_groups * MR..][..d_groups * MR];
                    // SAFETY: `a` holds d_groups·MR elements, the query panel d_groups·nr, and
                    // the P tile is MR rows of nr inside `panel` (kp < kpanels).
                    unsafe {
                        tile::<S, TQ, MR, NV>(
                            s,
                            d_groups,
                            a.as_ptr(),
                            q_packed[qp * d_groups * nr..][..d_groups * nr].as_ptr(),
                            panel[kp * MR * nr..][..MR * nr].as_mut_ptr(),
                            nr,
                            false,
                        )
                    };
                }
                let lanes = qp * nr..(qp + 1) * nr;
                let words = p_words.as_mut().map(|w| &mut u32::of_mut(w)[qp * p_stride..][..kpanels * MR / 2 * nr]);
                let grew = softmax_panel::<S, NV>(
                    s,
                    panel,
                    (keys, bias.map(|b| &b[start..end])),
                    scale,
                    (&mut run_max[lanes.clone()], &mut run_sum[lanes]),
                    first,
                    &mut correction,
                    words,
                );
                if grew {
                    for ch in 0..dv {
                        let row = &mut o_t[ch * width + qp * nr..][..nr];
                        row.iter_mut().zip(&correction).for_each(|(o, c)| *o *= c);
                    }
                }
            }
            // Value panels outer: each stays in L1 while the query panels of P pass by.
            let weights = VE::Packed::of(p_words.as_deref().unwrap_or(&p));
            let groups = kpanels * MR / VE::DEPTH;
            for vp in 0..dv_panels {
                let a = &v_packed[vp * v_groups * MRV + start / VE::DEPTH * MRV..][..groups * MRV];
                for qp in 0..qpanels {
                    let b = &weights[qp * p_stride..][..groups * nr];
                    let c = &mut o_t[vp * MRV * width + qp * nr..][..(MRV - 1) * width + nr];
                    // SAFETY: `a` holds groups runs of MRV, `b` as many runs of nr, and `c` MRV
                    // rows of nr floats `width` apart.
                    unsafe { tile::<S, TV, MRV, NV>(s, groups, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), width, !first) };
                }
            }
            start = end;
        }
        normalised_rows(s, (&o_t, width), &run_sum[..rows], out, dv);
        finish_rows(Accumulated::Done, out, dv, (&run_max, &run_sum), scale, lse);
    }
}

/// `out[r][ch] ← o_t[ch·width + r] / sums[r]` for the `sums.len()` rows of `out` (`dv` wide):
/// the tile's outputs from their transposed sums, in LANES × LANES blocks through register
/// transposes ([`Simd::transpose`](super::simd::Simd::transpose); a wide tile's channels, read
/// row by row, would each miss), the edges of `dv` element by element. `o_t` holds at least
/// `dv` rows of `width ≥` rows rounded up to LANES.
#[inline(always)]
fn normalised_rows<S: Bf16Simd>(s: S, (o_t, width): (&[f32], usize), sums: &[f32], out: &mut [f32], dv: usize) {
    let lanes = S::LANES;
    let rows = sums.len();
    assert!(width >= rows.next_multiple_of(lanes) && o_t.len() >= dv * width && out.len() >= rows * dv);
    let full_dv = dv / lanes * lanes;
    let mut block = [0.0f32; 16 * 16];
    const { assert!(S::LANES <= 16) };
    for r0 in (0..rows).step_by(lanes) {
        let block_rows = (rows - r0).min(lanes);
        let inv: [f32; 16] = std::array::from_fn(|i| if i < block_rows { 1.0 / sums[r0 + i] } else { 0.0 });
        for c0 in (0..full_dv).step_by(lanes) {
            let src = &o_t[c0 * width + r0..][..(lanes - 1) * width + lanes];
            // SAFETY: `src` holds LANES rows of LANES floats `width` apart, `block` LANES².
            unsafe { s.transpose(src.as_ptr(), width, block.as_mut_ptr(), lanes) };
            for (i, &inv) in inv.iter().enumerate().take(block_rows) {
                let x = s.mul(s.load_slice(&block[i * lanes..]), s.splat(inv));
                s.store_slice(&mut out[(r0 + i) * dv + c0..][..lanes], x);
            }
        }
        for (i, &inv) in inv.iter().enumerate().take(block_rows) {
            for ch in full_dv..dv {
                out[(r0 + i) * dv + ch] = o_t[ch * width + r0 + i] * inv;
            }
        }
    }
}

/// The online-softmax step for one panel of NR queries over `keys` keys (rows of NR), each
/// row first offset by its key's `bias` when there is one: updates the running maximum and
/// sum, turns the logits into `exp(s·logit − s·max)` ([`weight_vector`]: 0 below 2^-64; zero
/// for the padding rows past `keys`)
/// and, when the maximum grew in some lane, writes the rescaling of earlier sums into
/// `correction` and returns true.
///
/// With `words` (bf16), the weights go there instead, zero below 2^-63 and rounded to
/// bf16, as pair words of consecutive keys, `[key pair][NR queries]`; the sums add them
/// unrounded.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmax_panel<S: Bf16Simd, const NV: usize>(
    s: S,
    panel: &mut [f32],
    (keys, bias): (usize, Option<&[f32]>),
    scale: f32,
    (run_max, run_sum): (&mut [f32], &mut [f32]),
    first: bool,
    correction: &mut [f32],
    mut words: Option<&mut [u32]>,
) -> bool {
    let (lanes, nr) = (S::LANES, NV * S::LANES);
    if let Some(bias) = bias {
        for (row, &b) in panel.chunks_exact_mut(nr).zip(&bias[..keys]) {
            for group in row.chunks_exact_mut(lanes) {
                let x = s.add(s.load_slice(group), s.splat(b));
                s.store_slice(group, x);
            }
        }
    }
    let mut grew = false;
    for v in 0..NV {
        let group = v * lanes..(v + 1) * lanes;
        let (mut best, mut probe) = (s.splat(f32::NEG_INFINITY), s.zero());
        let zero = s.zero();
        for key in 0..keys {
            let x = s.load_slice(&panel[key * nr + v * lanes..]);
            best = s.max(x, best);
            // x·0 is NaN exactly when x is NaN or ±∞: such a query's softmax is NaN (as in
            // PyTorch for NaN and +∞; a −∞ logit is not a mask here, its row is NaN too).
            probe = s.add(probe, s.mul(x, zero));
        }
        let tile_max = s.add(best, probe);
        let old = s.load_slice(&run_max[group.clone()]);
        // NaN in the tile wins; a NaN from earlier tiles already poisoned the sums.
        let new = s.max(old, tile_max);
        let shift = s.mul(s.splat(-scale), new);
        let vscale = s.splat(scale);
        let mut sum = s.zero();
        match words.as_deref_mut() {
            None => {
                for key in 0..keys {
                    let row = &mut panel[key * nr + v * lanes..][..lanes];
                    let e = logit_weight(s, row, vscale, shift);
                    s.store_slice(row, e);
                    sum = s.add(sum, e);
                }
            }
            Some(words) => {
                // The weights as 2^(s·log2(e)·(logit − max)).
                let scale2 = scale * LOG2E;
                let (vscale2, shift2) = (s.splat(scale2), s.mul(s.splat(-scale2), new));
                for pair in 0..keys.div_ceil(2) {
                    let at = |key: usize| key * nr + v * lanes;
                    let even = bf16_weight(s, s.load_slice(&panel[at(2 * pair)..]), vscale2, shift2);
                    let odd = match 2 * pair + 1 < keys {
                        true => bf16_weight(s, s.load_slice(&panel[at(2 * pair + 1)..]), vscale2, shift2),
                        false => s.zero(),
                    };
                    sum = s.add(s.add(sum, even), odd);
                    let dst = &mut words[pair * nr + v * lanes..][..lanes];
                    // SAFETY: `dst` holds LANES words.
                    unsafe { s.store_bf16_pairs(even, odd, dst.as_mut_ptr()) };
                }
            }
        }
        let run = s.load_slice(&run_sum[group.clone()]);
        let total = if first {
            sum
        } else {
            // 0 below 2^-64, as the weights: the earlier sums are then negligible, and kept they
            // would turn subnormal.
            let corr = weight_vector(s, s.mul(vscale, s.add(old, s.mul(new, s.splat(-1.0)))));
            s.store_slice(&mut correction[group.clone()], corr);
            grew |= correction[group.clone()].iter().any(|&c| c != 1.0);
            s.add(s.mul(run, corr), sum)
        };
        s.store_slice(&mut run_sum[group.clone()], total);
        s.store_slice(&mut run_max[group], new);
    }
    match words {
        None => panel[keys * nr..].fill(0.0),
        Some(words) => words[keys.div_ceil(2) * nr..].fill(0),
    }
    grew
}

/// An attention weight for the bf16 value product from its logit: `2^(scale2·logit + shift2)`
/// ([`exp2_weight`]: zero below 2^-63, so of exponent at least [`MIN_WEIGHT_EXPONENT`]; rounded to
/// bf16 as it is stored). (A function, not a closure in the loop: a closure is compiled without
/// the kernel's instruction set.)
#[inline(always)]
fn bf16_weight<S: Bf16Simd>(s: S, logit: S::V, scale2: S::V, shift2: S::V) -> S::V {
    exp2_weight(s, s.fmadd(logit, scale2, shift2))
}

const _: () = assert!(super::exp::WEIGHT_LOW as i32 > MIN_WEIGHT_EXPONENT);

/// The backward of [`attention`] (with its log-sum-exp): writes `dq` (N × d), `dk` (M × d),
/// `dv` (M × dv) from the forward output `y` and its gradient `dy` (N × dv).
///
/// Per (query tile, key tile) the same micro-kernel computes `Sᵀ = K·Qᵀ` and `dPᵀ = V·dYᵀ`
/// (keys × queries, NR queries in the lanes, where `P = exp(s·S − lse)` and
/// `dS = P ⊙ (dP − D)` are formed), `dQᵀ += Kᵀ·dSᵀ`, and, after P and dS are re-packed with
/// the queries as depth, `dV += P·dY` and `dK += dS·Q`. Queries are split into fixed chunks
/// (see [`over_query_chunks`]), key-side partial sums added in chunk order.
///
/// # Panics
/// If the shapes disagree.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward<S: Bf16Simd, const MR: usize, const NV: usize>(
    s: S,
    (q, k, v, scale): (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
    lse: &[f32],
    (y, dy): (MatRef<'_>, MatRef<'_>),
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    ws: &Workspace,
) {
    let nr = NV * S::LANES;
    check_backward((q, k, v), lse, (y, dy), (dq, dk, dv));
    let (n, m, d, dvc) = (q.rows(), k.rows(), q.cols(), v.cols());
    let m_pad = m.next_multiple_of(MR);
    let packed = BackwardPacked {
        k_rows: packed_panels::<F32>(ws, k, MR, d),
        v_rows: packed_panels::<F32>(ws, v, MR, dvc),
        k_cols: packed_panels::<F32>(ws, k.t(), MR, m_pad),
        m,
        d_pad: d.next_multiple_of(nr),
        dv_pad: dvc.next_multiple_of(nr),
    };
    let (d_pad, dv_pad) = (packed.d_pad, packed.dv_pad);
    dk.fill(0.0);
    dv.fill(0.0);
    over_query_chunks(
        n,
        d,
        QUERY_TILE,
        dq,
        || (ws.zeroed(m_pad * d_pad), ws.zeroed(m_pad * dv_pad)),
        |rows, dq_tile, (dk_part, dv_part)| {
            let q = q.rows_range(rows.start, rows.end);
            let (y, dy) = (y.rows_range(rows.start, rows.end), dy.rows_range(rows.start, rows.end));
            let lse = &lse[rows];
            s.vectorize(BackwardTile::<MR, NV> {
                packed: &packed,
                q,
                scale,
                lse,
                y,
                dy,
                dq: dq_tile,
                dk: &mut dk_part[..],
                dv: &mut dv_part[..],
                ws,
            });
        },
        |(dk_part, dv_part)| add_key_partials((dk_part, dv_part), (dk, d, d_pad), (dv, dvc, dv_pad)),
    );
    dk.iter_mut().for_each(|v| *v *= scale);
}

/// K and V packed once per backward call.
struct BackwardPacked<'w> {
    /// K in panels of MR keys, depth d (A of `Sᵀ = K·Qᵀ`).
    k_rows: Scratch<'w>,
    /// V in panels of MR keys, depth dv (A of `dPᵀ = V·dYᵀ`).
    v_rows: Scratch<'w>,
    /// Kᵀ in panels of MR channels, depth m_pad keys (A of `dQᵀ = Kᵀ·dSᵀ`).
    k_cols: Scratch<'w>,
    m: usize,
    /// d and dv rounded up to NR: the row strides of the key-side partial sums.
    d_pad: usize,
    dv_pad: usize,
}

/// One query tile of the backward pass against all keys: writes the tile's `dq`, adds to the
/// key-side partials `dk`, `dv` (rows `d_pad`, `dv_pad` apart).
struct BackwardTile<'a, const MR: usize, const NV: usize> {
    packed: &'a BackwardPacked<'a>,
    q: MatRef<'a>,
    scale: f32,
    lse: &'a [f32],
    y: MatRef<'a>,
    dy: MatRef<'a>,
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
    ws: &'a Workspace,
}

impl<const MR: usize, const NV: usize> Job for BackwardTile<'_, MR, NV> {
    type Out = ();

    #[inline(always)]
    fn run<S: Bf16Simd>(self, s: S) {
        let BackwardTile { packed, q, scale, lse, y, dy, dq, dk, dv, ws } = self;
        let (lanes, nr) = (S::LANES, NV * S::LANES);
        let (rows, d, dvc, m) = (q.rows(), q.cols(), dy.cols(), packed.m);
        let qpanels = rows.div_ceil(nr);
        let width = qpanels * nr;
        let m_pad = m.next_multiple_of(MR);
        let d_panels = d.div_ceil(MR);
        // Per-query values in lanes; padding queries get lse = +∞ so their P (and dS) is 0.
        let mut lse_w = vec![f32::INFINITY; width];
        lse_w[..rows].copy_from_slice(lse);
        // D_i = Σ_j P_ij·dP_ij, the diagonal of the softmax Jacobian. With every key in one key
        // tile it comes from this pass's own P and dP, P renormalised to sum to 1 (the forward
        // pass's log-sum-exp may come from differently rounded logits, as with θ folded into
        // the keys): each row of dS then sums to 0 up to rounding (one key: exactly 0), as in
        // PyTorch's softmax backward. With more key tiles, y_i·dy_i from the forward pass's y
        // (FlashAttention-2), which differs from it by the rounding of y.
        let one_key_tile = m <= KEY_TILE;
        let mut delta = vec![0.0f32; width];
        if !one_key_tile {
            row_dots(y, dy, &mut delta);
        }
        // B operands with d or dv as depth (queries in panels of NR) ...
        let q_by_d = packed_panels::<F32>(ws, q, nr, d);
        let dy_by_dv = packed_panels::<F32>(ws, dy, nr, dvc);
        // ... and with the queries as depth (channels in panels of NR).
        let q_by_query = packed_panels::<F32>(ws, q.t(), nr, width);
        let dy_by_query = packed_panels::<F32>(ws, dy.t(), nr, width);
        // Each written before it is read: P and dS by the tiles (their used rows), their
        // re-packings by `repack_by_keys`, dQᵀ by the first key tile.
        let mut p = ws.scratch(qpanels * KEY_TILE * nr);
        let mut ds = ws.scratch(qpanels * KEY_TILE * nr);
        let mut p_by_key = ws.scratch((KEY_TILE / MR) * width * MR);
        let mut ds_by_key = ws.scratch((KEY_TILE / MR) * width * MR);
        let mut dq_t = ws.scratch(d_panels * MR * width);
        let vscale = s.splat(scale);
        let normal = s.splat(f32::MIN_POSITIVE);
        let mut start = 0;
        while start < m {
            let end = (start + KEY_TILE).min(m);
            let keys = end - start;
            let kpanels = keys.div_ceil(MR);
            for qp in 0..qpanels {
                let p_panel = &mut p[qp * KEY_TILE * nr..][..kpanels * MR * nr];
                let ds_panel = &mut ds[qp * KEY_TILE * nr..][..kpanels * MR * nr];
                for kp in 0..kpanels {
                    let key_panel = start / MR + kp;
                    let kq = &packed.k_rows[key_panel * d * MR..][..d * MR];
                    let vq = &packed.v_rows[key_panel * dvc * MR..][..dvc * MR];
                    let (qb, dyb) = (&q_by_d[qp * d * nr..][..d * nr], &dy_by_dv[qp * dvc * nr..][..dvc * nr]);
                    // SAFETY: each operand slice holds what the tile reads; the outputs are MR
                    // rows of nr inside the panels (kp < kpanels).
                    unsafe {
                        tile::<S, F32, MR, NV>(
                            s,
                            d,
                            kq.as_ptr(),
                            qb.as_ptr(),
                            p_panel[kp * MR * nr..].as_mut_ptr(),
                            nr,
                            false,
                        );
                        tile::<S, F32, MR, NV>(
                            s,
                            dvc,
                            vq.as_ptr(),
                            dyb.as_ptr(),
                            ds_panel[kp * MR * nr..].as_mut_ptr(),
                            nr,
                            false,
                        );
                    }
                }
                for v in 0..NV {
                    let lanes_at = qp * nr + v * lanes;
                    let neg_lse = s.mul(s.splat(-1.0), s.load_slice(&lse_w[lanes_at..]));
                    let (neg_delta, renormalise) = if one_key_tile {
                        let (mut sum, mut dot) = (s.zero(), s.zero());
                        for key in 0..keys {
                            let at = key * nr + v * lanes;
                            let w = logit_weight(s, &p_panel[at..], vscale, neg_lse);
                            s.store_slice(&mut p_panel[at..], w);
                            sum = s.add(sum, w);
                            dot = s.fmadd(w, s.load_slice(&ds_panel[at..]), dot);
                        }
                        // 1/Σ_j P_ij per lane (0 for the padding queries, whose P is 0).
                        let (mut inv, mut d) = ([0.0f32; 16], [0.0f32; 16]);
                        s.store_slice(&mut inv, sum);
                        s.store_slice(&mut d, dot);
                        for (i, d) in inv.iter_mut().zip(&mut d).take(lanes) {
                            *i = if *i > 0.0 { 1.0 / *i } else { 0.0 };
                            *d = -(*d * *i);
                        }
                        (s.load_slice(&d), Some(s.load_slice(&inv)))
                    } else {
                        (s.mul(s.splat(-1.0), s.load_slice(&delta[lanes_at..])), None)
                    };
                    for key in 0..keys {
                        let at = key * nr + v * lanes;
                        let w = match renormalise {
                            Some(inv) => s.mul(s.load_slice(&p_panel[at..]), inv),
                            None => logit_weight(s, &p_panel[at..], vscale, neg_lse),
                        };
                        s.store_slice(&mut p_panel[at..], w);
                        let g = s.mul(w, s.add(s.load_slice(&ds_panel[at..]), neg_delta));
                        // Subnormal dS (tiny weights, as Gaussian's unscaled logits make) to 0:
                        // as operands they cost a microcode assist per multiply-add.
                        let magnitude = s.max(g, s.mul(s.splat(-1.0), g));
                        let g = s.zero_below(magnitude, normal, g);
                        s.store_slice(&mut ds_panel[at..], g);
                    }
                }
                p_panel[keys * nr..].fill(0.0);
                ds_panel[keys * nr..].fill(0.0);
            }
            // dQᵀ += Kᵀ·dSᵀ (scaled at the end).
            for cp in 0..d_panels {
                let a = &packed.k_cols[cp * m_pad * MR + start * MR..][..kpanels * MR * MR];
                for qp in 0..qpanels {
                    let b = &ds[qp * KEY_TILE * nr..][..kpanels * MR * nr];
                    let c = &mut dq_t[cp * MR * width + qp * nr..][..(MR - 1) * width + nr];
                    // SAFETY: as in the forward pass.
                    unsafe {
                        tile::<S, F32, MR, NV>(
                            s,
                            kpanels * MR,
                            a.as_ptr(),
                            b.as_ptr(),
                            c.as_mut_ptr(),
                            width,
                            start > 0,
                        )
                    };
                }
            }
            // dV += P·dY and dK += dS·Q, with the queries as depth.
            repack_by_keys::<MR>(&p, keys, (width, nr), &mut p_by_key);
            repack_by_keys::<MR>(&ds, keys, (width, nr), &mut ds_by_key);
            for kp in 0..kpanels {
                let row = start + kp * MR;
                let pa = &p_by_key[kp * width * MR..][..width * MR];
                let dsa = &ds_by_key[kp * width * MR..][..width * MR];
                for cp in 0..dvc.div_ceil(nr) {
                    let b = &dy_by_query[cp * width * nr..][..width * nr];
                    let c = &mut dv[row * packed.dv_pad + cp * nr..][..(MR - 1) * packed.dv_pad + nr];
                    // SAFETY: `pa` holds width groups of MR, `b` width groups of nr, `c` MR rows
                    // of nr floats dv_pad apart (row + MR ≤ m_pad rows of the partials).
                    unsafe {
                        tile::<S, F32, MR, NV>(s, width, pa.as_ptr(), b.as_ptr(), c.as_mut_ptr(), packed.dv_pad, true)
                    };
                }
                for cp in 0..d.div_ceil(nr) {
                    let b = &q_by_query[cp * width * nr..][..width * nr];
                    let c = &mut dk[row * packed.d_pad + cp * nr..][..(MR - 1) * packed.d_pad + nr];
                    // SAFETY: as above, with d_pad.
                    unsafe {
                        tile::<S, F32, MR, NV>(s, width, dsa.as_ptr(), b.as_ptr(), c.as_mut_ptr(), packed.d_pad, true)
                    };
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
}

/// `exp(scale·logit + shift)` per lane from a row of logits, 0 below 2^-64 (`weight_vector`):
/// the forward pass's weights (shift −scale·max) and the backward's normalised P (shift −lse).
/// A function rather than a closure in the tile loops: a closure is compiled apart from the
/// `#[target_feature]` function the job is inlined into, and where it is not inlined its
/// intrinsics become calls (the AVX2 backward spent ~15% of a training step in them).
#[inline(always)]
fn logit_weight<S: Bf16Simd>(s: S, logits: &[f32], scale: S::V, shift: S::V) -> S::V {
    weight_vector(s, s.fmadd(s.load_slice(logits), scale, shift))
}

/// Repacks a `[query panel][key][nr queries]` tile (`keys` keys, `width` queries) into
/// `[key panel][query][MR keys]`, the A operand with the queries as depth.
fn repack_by_keys<const MR: usize>(src: &[f32], keys: usize, (width, nr): (usize, usize), out: &mut [f32]) {
    for kp in 0..keys.div_ceil(MR) {
        let panel = &mut out[kp * width * MR..(kp + 1) * width * MR];
        for qi in 0..width {
            let (qp, l) = (qi / nr, qi % nr);
            for r in 0..MR {
                panel[qi * MR + r] = src[(qp * KEY_TILE + kp * MR + r) * nr + l];
            }
        }
    }
}
