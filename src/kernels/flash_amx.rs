//! The packed softmax attention of `flash` with its bf16 products on AMX tiles (see
//! [`amx`](super::amx)): the same online softmax (`flash::softmax_panel`, NR = 32 queries in
//! the vector lanes) and the same transposed layouts, so that each product's output is the
//! next one's operand without a copy:
//! - `Sᵀ = K·Qᵀ` per 32 keys × 32 queries block: K as bf16 rows (keys × ⌈d/2⌉ pair words) in
//!   A tiles, the query panel in pair-row (VNNI) B tiles. For
//!   [`Precision::Bf16`](crate::Precision::Bf16), whose logits are not bf16 products, each
//!   operand is split into a bf16 high part and a bf16 low part (`x − hi`) and the logit is
//!   `q_hi·k_hi + q_hi·k_lo + q_lo·k_hi` — one product three times as deep, `[q_hi, q_hi,
//!   q_lo]·[k_hi, k_lo, k_hi]` (the "bf16×3" of oneDNN and XLA): each operand carries 16 bits
//!   of mantissa, the dropped `q_lo·k_lo` is below 2^-16 of |q_j·k_j|, and the tiles sum in f32
//!   — near f32 logits at three times the cost of bf16 ones, still 2–3× faster than the f32
//!   register tile on these CPUs;
//! - the softmax writes the weights as pair words `[key pair][32 queries]`: VNNI B tiles;
//! - `Oᵀ += Vᵀ·Pᵀ` per 32 value channels × 32 queries block, Vᵀ as bf16 rows (channels × key
//!   pairs) in A tiles, Oᵀ read and written by the tiles themselves.
//!
//! Every sum runs in a fixed order (key tiles of [`KEY_TILE`] in order), so the results do not
//! depend on how queries are split between threads.

use super::amx::{pack_panels, pack_rows, padded_groups, transpose16, Tiles, GROUP_STEP, PANEL};
use super::attention_common::{finish_rows, for_each_query_tile, Accumulated};
use super::attention_shapes::check_forward;
use super::bf16::round_to_bf16;
use super::flash::softmax_panel;
use super::microkernel::Word;
use super::simd::{Amx, Bf16Simd, Job, Simd};
use super::views::MatRef;
use crate::workspace::Workspace;

/// Keys per tile: whole 32-key blocks (it fixes the order of the online-softmax updates,
/// so it must not depend on the thread count).
pub(crate) const KEY_TILE: usize = 288;
/// Queries per panel (the lanes of the softmax, the columns of a B tile pair).
const NR: usize = PANEL;
/// 16-lane vectors per query panel (the softmax's).
const NV: usize = 2;

const _: () = assert!(KEY_TILE.is_multiple_of(32) && NR == NV * 16);

/// How the logits' operands enter the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Logits {
    /// Rounded to bf16 ([`Precision::Bf16Logits`](crate::Precision::Bf16Logits)).
    Rounded,
    /// Split into high and low bf16 parts, three products (see the module docs).
    Split,
}

/// The logits' operand `src` (rows × d) as f32 rows of `parts.len()` blocks of `2·groups`
/// columns: block i holds `src` itself (`false`: rounded to bf16 when packed, its high part)
/// or `src − bf16(src)` (`true`: its low part, exact in f32), zero past d.
fn split_parts(src: MatRef<'_>, groups: usize, parts: [bool; 3], out: &mut [f32]) {
    let (rows, d, width) = (src.rows(), src.cols(), 2 * groups);
    if width == 0 {
        return;
    }
    let mut row = vec![0.0f32; d];
    for (r, dst) in out.chunks_exact_mut(3 * width).take(rows).enumerate() {
        src.copy_row(r, &mut row);
        for (block, &low) in dst.chunks_exact_mut(width).zip(&parts) {
            for (o, &x) in block.iter_mut().zip(&row) {
                *o = if low { x - round_to_bf16(x) } else { x };
            }
            block[d..].fill(0.0);
        }
    }
}

/// `out ← softmax(scale · (q·kᵀ + bias))·v` as `flash::attention`, the logits and the value
/// product on AMX tiles with operands rounded to bf16 (the logits' split per `logits`); the
/// softmax in f32. `lse` as there.
///
/// # Panics
/// If the shapes disagree (as `flash::attention`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    amx: Amx,
    logits: Logits,
    (q, k, v, scale): (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
    bias: Option<&[f32]>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    tile: usize,
    ws: &Workspace,
) {
    check_forward((q, k, v), bias, out, lse.as_deref());
    let (n, m, d, dv) = (q.rows(), k.rows(), q.cols(), v.cols());
    if n == 0 || dv == 0 {
        return;
    }
    let m_pad = m.next_multiple_of(32);
    // K as bf16 rows ([k_hi, k_lo, k_hi] when split) for the A tiles.
    let part_groups = padded_groups(d);
    let d_groups = if logits == Logits::Split { 3 * part_groups } else { part_groups };
    let mut k_packed = ws.scratch(m_pad * d_groups);
    match logits {
        Logits::Rounded => pack_rows(amx, k, d_groups, m_pad, u32::of_mut(&mut k_packed)),
        Logits::Split => {
            let mut parts = ws.scratch(m * 2 * d_groups);
            split_parts(k, part_groups, [false, true, false], &mut parts);
            let parts = MatRef::new(&parts, 0, m, 2 * d_groups, 2 * d_groups);
            pack_rows(amx, parts, d_groups, m_pad, u32::of_mut(&mut k_packed));
        }
    }
    // Vᵀ: value channels (padded to 32) as rows of key-pair words.
    let (dv_pad, v_groups) = (dv.next_multiple_of(32), m_pad / 2);
    let mut v_words = ws.scratch(dv_pad * v_groups);
    pack_rows(amx, v.t(), v_groups, dv_pad, u32::of_mut(&mut v_words));
    let tile = tile.next_multiple_of(NR).min(super::tiles::QUERY_TILE);
    for_each_query_tile(n, dv, tile, out, lse, |rows, out, lse| {
        let q = q.rows_range(rows.start, rows.end);
        amx.simd().vectorize(AttendTile {
            amx,
            logits,
            q,
            k: (u32::of(&k_packed), m, (part_groups, d_groups)),
            bias,
            v: (u32::of(&v_words), dv, v_groups),
            scale,
            out,
            lse,
            ws,
        });
    });
}

/// One query tile against all keys.
struct AttendTile<'a> {
    amx: Amx,
    logits: Logits,
    q: MatRef<'a>,
    /// K as bf16 rows (M padded to 32), M, and the groups of one part and of a row.
    k: (&'a [u32], usize, (usize, usize)),
    bias: Option<&'a [f32]>,
    /// Vᵀ as bf16 rows, dv, and the rows' groups (M padded to 32, halved).
    v: (&'a [u32], usize, usize),
    scale: f32,
    out: &'a mut [f32],
    lse: Option<&'a mut [f32]>,
    ws: &'a Workspace,
}

impl Job for AttendTile<'_> {
    type Out = ();

    #[inline(always)]
    fn run<S: Bf16Simd>(self, s: S) {
        let AttendTile {
            amx,
            logits,
            q,
            k: (k_words, m, (part_groups, d_groups)),
            bias,
            v: (v_words, dv, v_groups),
            ..
        } = self;
        let (scale, ws) = (self.scale, self.ws);
        assert_eq!(S::LANES * NV, NR, "flash_amx: 16-lane vectors");
        let rows = q.rows();
        let qpanels = rows.div_ceil(NR);
        let width = qpanels * NR;
        let dv_blocks = dv.div_ceil(32);
        // The query panels in pair rows ([q_hi, q_hi, q_lo] when split) for the B tiles.
        let mut q_packed = ws.scratch(qpanels * d_groups * NR);
        match logits {
            Logits::Rounded => pack_panels(amx, q, d_groups, u32::of_mut(&mut q_packed)),
            Logits::Split => {
                let mut parts = ws.scratch(rows * 2 * d_groups);
                split_parts(q, part_groups, [false, false, true], &mut parts);
                let parts = MatRef::new(&parts, 0, rows, 2 * d_groups, 2 * d_groups);
                pack_panels(amx, parts, d_groups, u32::of_mut(&mut q_packed));
            }
        }
        let q_words = u32::of(&q_packed);
        // P: [query panel][KEY_TILE keys][NR queries] logits; the weights as pair words
        // [query panel][KEY_TILE / 2][NR]; Oᵀ: [dv padded to 32][width queries]. Each is
        // written before it is read.
        let mut p = ws.scratch(qpanels * KEY_TILE * NR);
        let mut p_words = ws.scratch(qpanels * (KEY_TILE / 2) * NR);
        let p_words = u32::of_mut(&mut p_words);
        let mut o_t = ws.scratch(dv_blocks * 32 * width);
        let mut run_max = vec![f32::NEG_INFINITY; width];
        let mut run_sum = vec![0.0f32; width];
        let mut correction = vec![1.0f32; NR];
        let tiles = Tiles::configure(amx);
        let mut start = 0;
        while start < m {
            let end = (start + KEY_TILE).min(m);
            let keys = end - start;
            let blocks = keys.div_ceil(32);
            let first = start == 0;
            for qp in 0..qpanels {
                let panel = &mut p[qp * KEY_TILE * NR..][..KEY_TILE * NR];
                if d_groups == 0 {
                    // No depth: every logit is 0.
                    panel[..blocks * 32 * NR].fill(0.0);
                } else {
                    let q_panel = &q_words[qp * d_groups * NR..][..d_groups * NR];
                    for kb in 0..blocks {
                        let a = &k_words[(start + kb * 32) * d_groups..][..32 * d_groups];
                        let c = &mut panel[kb * 32 * NR..][..32 * NR];
                        // SAFETY: A is a whole block of 32 keys, d_groups words deep (K is padded
                        // to 32 keys), B d_groups rows of NR words, C 32 rows of NR floats.
                        unsafe {
                            let steps = d_groups / GROUP_STEP;
                            tiles.block(steps, a.as_ptr(), q_panel.as_ptr(), 4 * NR, c.as_mut_ptr(), 4 * NR, None)
                        };
                    }
                }
                let lanes = qp * NR..(qp + 1) * NR;
                let words = &mut p_words[qp * (KEY_TILE / 2) * NR..][..blocks * 16 * NR];
                let grew = softmax_panel::<S, NV>(
                    s,
                    panel,
                    (keys, bias.map(|b| &b[start..end])),
                    scale,
                    (&mut run_max[lanes.clone()], &mut run_sum[lanes]),
                    first,
                    &mut correction,
                    Some(words),
                );
                if grew {
                    for ch in 0..dv {
                        let row = &mut o_t[ch * width + qp * NR..][..NR];
                        row.iter_mut().zip(&correction).for_each(|(o, c)| *o *= c);
                    }
                }
            }
            for cb in 0..dv_blocks {
                // The block of 32 channels from the step of this key tile's first key (a
                // multiple of 32: KEY_TILE is).
                let a = &v_words[cb * 32 * v_groups + (start / 32) * 32 * GROUP_STEP..][..blocks * 32 * GROUP_STEP];
                for qp in 0..qpanels {
                    let b = &p_words[qp * (KEY_TILE / 2) * NR..][..blocks * 16 * NR];
                    let c = &mut o_t[cb * 32 * width + qp * NR..][..31 * width + NR];
                    // SAFETY: A holds `blocks` steps of its channel block (Vᵀ's rows are M
                    // padded to 32, halved, long), B `blocks · 16` rows of NR words, C 32 rows
                    // of NR floats `width` apart.
                    let (ptr, ld) = (c.as_mut_ptr(), 4 * width);
                    let init = (!first).then_some((ptr as *const f32, ld));
                    unsafe { tiles.block(blocks, a.as_ptr(), b.as_ptr(), 4 * NR, ptr, ld, init) };
                }
            }
            start = end;
        }
        drop(tiles);
        // Whole 16 × 16 blocks of Oᵀ transposed in registers, scaled by 1 / sum; the edges
        // (and the log-sum-exp) by `finish_rows`.
        let out = self.out;
        let inv: Vec<f32> = run_sum[..rows].iter().map(|&sum| 1.0 / sum).collect();
        let (whole_rows, whole_channels) = (rows / 16 * 16, dv / 16 * 16);
        for r0 in (0..whole_rows).step_by(16) {
            let scale: &[f32; 16] = inv[r0..r0 + 16].try_into().expect("16 rows");
            for c0 in (0..whole_channels).step_by(16) {
                // SAFETY: channels c0..c0 + 16 of Oᵀ hold queries r0..r0 + 16 (rows `width`
                // apart), and output rows r0..r0 + 16 hold channels c0..c0 + 16 (`dv` apart).
                unsafe {
                    transpose16(
                        amx,
                        o_t[c0 * width + r0..].as_ptr(),
                        width,
                        out[r0 * dv + c0..].as_mut_ptr(),
                        dv,
                        Some(scale),
                    )
                };
            }
        }
        for (r, &inv) in inv.iter().enumerate() {
            let channels = if r < whole_rows { whole_channels } else { 0 };
            for (ch, o) in out[r * dv..][..dv].iter_mut().enumerate().skip(channels) {
                *o = o_t[ch * width + r] * inv;
            }
        }
        finish_rows(Accumulated::Done, &mut [], dv, (&run_max, &run_sum), scale, self.lse);
    }
}
