//! The packed register tile every packed kernel is built on, for f32 and for bf16 operands
//! (the element type [`Elem`]), and the packing it reads.
//!
//! `C[MR × NR] (+)= A·B` over `groups` packed depth groups, with A packed as `groups` runs of MR
//! elements (one per row) and B as `groups` runs of NR = NV·LANES: per group NV vector loads of
//! B, MR broadcasts of A and MR·NV fused operations into registers. An f32 element is one
//! depth step ([`F32`]: `vfmadd`); a bf16 element is a 32-bit word of two depth steps, element
//! 2g in the low half and 2g+1 in the high half ([`Bf16`], [`Bf16Checked`]: `VDPBF16PS` or its
//! emulation, see [`bf16_simd`](super::bf16_simd)). An odd depth is padded with a zero in the
//! high half of the last pair, in A and in B alike.

use super::bf16::{f32_to_bf16, pair};
use super::simd::Bf16Simd;
use super::views::MatRef;
use crate::workspace::{Scratch, Workspace};

/// Floats of the largest register tile a kernel may use (for the partial-tile buffer).
const MAX_TILE: usize = 16 * 64;

/// What packed operands are made of: f32, or u32 words of two bf16. Both are 4-byte plain data,
/// so the workspace's f32 buffers hold either ([`Word::of_mut`]).
pub(crate) trait Word: Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static {
    /// `buf` seen as words of this type.
    fn of(buf: &[f32]) -> &[Self];
    /// `buf` seen as words of this type, mutably.
    fn of_mut(buf: &mut [f32]) -> &mut [Self];
}

impl Word for f32 {
    #[inline(always)]
    fn of(buf: &[f32]) -> &[f32] {
        buf
    }
    #[inline(always)]
    fn of_mut(buf: &mut [f32]) -> &mut [f32] {
        buf
    }
}

impl Word for u32 {
    #[inline(always)]
    fn of(buf: &[f32]) -> &[u32] {
        // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is a u32.
        unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u32, buf.len()) }
    }
    #[inline(always)]
    fn of_mut(buf: &mut [f32]) -> &mut [u32] {
        // SAFETY: as above; every u32 written is some f32 bit pattern, so the buffer stays
        // valid as f32.
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u32, buf.len()) }
    }
}

/// What the register tile multiplies: the packed element, how many depth steps it holds, and
/// one fused depth group.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// A packed element of A or B (one row, one depth group).
    type Packed: Word;
    /// Depth steps per packed element.
    const DEPTH: usize;
    /// A broadcast A element, ready for [`Elem::madd`].
    type AV<S: Bf16Simd>: Copy;
    /// [`Simd::LANES`](super::simd::Simd::LANES) loaded B elements, ready for [`Elem::madd`].
    type BV<S: Bf16Simd>: Copy;

    /// Loads [`Simd::LANES`](super::simd::Simd::LANES) B elements.
    ///
    /// # Safety
    /// `ptr` readable for [`Simd::LANES`](super::simd::Simd::LANES) elements.
    unsafe fn load_b<S: Bf16Simd>(s: S, ptr: *const Self::Packed) -> Self::BV<S>;
    /// Broadcasts the A element at `ptr`.
    ///
    /// # Safety
    /// `ptr` readable for one element.
    unsafe fn splat_a<S: Bf16Simd>(s: S, ptr: *const Self::Packed) -> Self::AV<S>;
    /// `acc + Σ_d a_d·b_d` over the group's depth steps, per lane.
    fn madd<S: Bf16Simd>(s: S, acc: S::V, a: Self::AV<S>, b: Self::BV<S>) -> S::V;
    /// Packs `src` (rows × depth, depth ≤ `groups`·[`Elem::DEPTH`]) into `out` in panels of
    /// `width` rows, `groups` groups deep (see [`pack_panels`] and [`pack_pair_panels`]).
    fn pack(src: MatRef<'_>, width: usize, groups: usize, out: &mut [Self::Packed]);
    /// [`Elem::pack`] for panels of a compile-time height (faster on contiguous rows).
    fn pack_rows<const MR: usize>(src: MatRef<'_>, groups: usize, out: &mut [Self::Packed]);

    /// The element the tile must use instead on operands the instruction set cannot vouch for
    /// ([`Bf16Checked`] for [`Bf16`]; itself otherwise).
    type Checked: Elem<Packed = Self::Packed>;
    /// What [`Elem::checked`] needs to know of a packed operand: the least exponent of its
    /// bf16 ([`min_exponent`]), computed only on the emulations (`None` otherwise and for f32).
    #[inline(always)]
    fn exponent_floor<S: Bf16Simd>(_packed: &[Self::Packed]) -> Option<i32> {
        None
    }
    /// Whether a product of operands with these [`Elem::exponent_floor`]s must use
    /// [`Elem::Checked`] on `S` (an emulation meeting products below 2^-112).
    #[inline(always)]
    fn checked<S: Bf16Simd>(_a: Option<i32>, _b: Option<i32>) -> bool {
        false
    }
}

/// f32 operands: one `vfmadd` per depth step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct F32;

impl Elem for F32 {
    type Packed = f32;
    const DEPTH: usize = 1;
    type AV<S: Bf16Simd> = S::V;
    type BV<S: Bf16Simd> = S::V;

    #[inline(always)]
    unsafe fn load_b<S: Bf16Simd>(s: S, ptr: *const f32) -> S::V {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { s.load(ptr) }
    }
    #[inline(always)]
    unsafe fn splat_a<S: Bf16Simd>(s: S, ptr: *const f32) -> S::V {
        // SAFETY: the caller's guarantee.
        s.splat(unsafe { *ptr })
    }
    #[inline(always)]
    fn madd<S: Bf16Simd>(s: S, acc: S::V, a: S::V, b: S::V) -> S::V {
        s.fmadd(a, b, acc)
    }
    #[inline(always)]
    fn pack(src: MatRef<'_>, width: usize, groups: usize, out: &mut [f32]) {
        pack_panels(src, width, groups, out);
    }
    // Inlined, as the call it replaces was: the copies are vectorised for the kernel's
    // instruction set.
    #[inline(always)]
    fn pack_rows<const MR: usize>(src: MatRef<'_>, groups: usize, out: &mut [f32]) {
        pack_panels_of::<MR>(src, groups, out);
    }
    type Checked = F32;
}

/// bf16 pair operands, one `VDPBF16PS` per two depth steps; on the emulations two plain
/// `vfmadd`s, the instruction's bits for operands that pass [`normal_range_certified`] (use
/// [`Bf16Checked`] for the others).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bf16;

/// bf16 pair operands with the emulations' checks for tiny results: the instruction's bits for
/// any operands (on the instruction itself and the portable model, the same as [`Bf16`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bf16Checked;

macro_rules! bf16_elem {
    ($marker:ty, $dot:ident, $checked:ty, $watch:expr) => {
        impl Elem for $marker {
            type Packed = u32;
            const DEPTH: usize = 2;
            type AV<S: Bf16Simd> = S::Pairs;
            type BV<S: Bf16Simd> = S::Pairs;

            #[inline(always)]
            unsafe fn load_b<S: Bf16Simd>(s: S, ptr: *const u32) -> S::Pairs {
                // SAFETY: the caller's guarantee, passed on.
                unsafe { s.load_pairs(ptr) }
            }
            #[inline(always)]
            unsafe fn splat_a<S: Bf16Simd>(s: S, ptr: *const u32) -> S::Pairs {
                // SAFETY: the caller's guarantee, passed on.
                unsafe { s.splat_pair(ptr) }
            }
            #[inline(always)]
            fn madd<S: Bf16Simd>(s: S, acc: S::V, a: S::Pairs, b: S::Pairs) -> S::V {
                s.$dot(acc, a, b)
            }
            #[inline(always)]
            fn pack(src: MatRef<'_>, width: usize, groups: usize, out: &mut [u32]) {
                pack_pair_panels(src, width, groups, out);
            }
            #[inline(always)]
            fn pack_rows<const MR: usize>(src: MatRef<'_>, groups: usize, out: &mut [u32]) {
                pack_pair_rows::<MR>(src, groups, out);
            }
            type Checked = $checked;
            #[inline(always)]
            fn exponent_floor<S: Bf16Simd>(packed: &[u32]) -> Option<i32> {
                if $watch && S::EMULATED {
                    min_exponent(packed)
                } else {
                    None
                }
            }
            #[inline(always)]
            fn checked<S: Bf16Simd>(a: Option<i32>, b: Option<i32>) -> bool {
                $watch && S::EMULATED && !normal_range_certified(a, b)
            }
        }
    };
}
bf16_elem!(Bf16, dot_pairs_unchecked, Bf16Checked, true);
bf16_elem!(Bf16Checked, dot_pairs, Bf16Checked, false);

/// A loop body for [`unrolled`].
trait Body {
    /// Runs iteration `i`.
    fn run(&mut self, i: usize);
}

/// `body.run(0); …; body.run(N − 1)` written out (for N ≤ 16; a loop beyond), so that indices
/// are constants and the accumulators they index stay in registers. A trait, not a closure: a
/// closure is a function of its own, compiled without the caller's `#[target_feature]`, so the
/// intrinsics in it could become calls.
#[inline(always)]
fn unrolled<const N: usize>(body: &mut impl Body) {
    macro_rules! calls {
        ($($i:literal)*) => {{ $(body.run($i);)* }};
    }
    match N {
        0 => {}
        1 => calls!(0),
        2 => calls!(0 1),
        3 => calls!(0 1 2),
        4 => calls!(0 1 2 3),
        5 => calls!(0 1 2 3 4),
        6 => calls!(0 1 2 3 4 5),
        7 => calls!(0 1 2 3 4 5 6),
        8 => calls!(0 1 2 3 4 5 6 7),
        9 => calls!(0 1 2 3 4 5 6 7 8),
        10 => calls!(0 1 2 3 4 5 6 7 8 9),
        11 => calls!(0 1 2 3 4 5 6 7 8 9 10),
        12 => calls!(0 1 2 3 4 5 6 7 8 9 10 11),
        13 => calls!(0 1 2 3 4 5 6 7 8 9 10 11 12),
        14 => calls!(0 1 2 3 4 5 6 7 8 9 10 11 12 13),
        15 => calls!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14),
        16 => calls!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15),
        _ => {
            for i in 0..N {
                body.run(i);
            }
        }
    }
}

/// One row of one depth group: `acc[r][v] = madd(acc[r][v], A[r], B[v])` for every v.
struct RowStep<'a, S: Bf16Simd, E: Elem, const MR: usize, const NV: usize> {
    s: S,
    acc: &'a mut [[S::V; NV]; MR],
    a: *const E::Packed,
    b: &'a [E::BV<S>; NV],
}

impl<S: Bf16Simd, E: Elem, const MR: usize, const NV: usize> Body for RowStep<'_, S, E, MR, NV> {
    #[inline(always)]
    fn run(&mut self, r: usize) {
        // SAFETY: `tile` guarantees MR readable A elements at `a`.
        let ar = unsafe { E::splat_a(self.s, self.a.add(r)) };
        for v in 0..NV {
            self.acc[r][v] = E::madd(self.s, self.acc[r][v], ar, self.b[v]);
        }
    }
}

/// `C[0..MR, 0..NR] ← (C +) Σ_g a[g·MR + r] · b[g·NR + j]` over `groups` packed depth groups,
/// NR = NV·LANES, C rows `ldc` apart; each element is one chain of [`Elem::madd`] over the
/// groups in order (for f32 one fused multiply-add chain over the depth), then added to C when
/// `accumulate`.
///
/// # Safety
/// `a` readable for `groups·MR` elements, `b` for `groups·NR`, and C readable and writable for
/// MR rows of NR floats, `ldc` apart.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile<S: Bf16Simd, E: Elem, const MR: usize, const NV: usize>(
    s: S,
    groups: usize,
    a: *const E::Packed,
    b: *const E::Packed,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let nr = NV * S::LANES;
    let mut acc = [[s.zero(); NV]; MR];
    // SAFETY: the caller guarantees every pointer range used below.
    unsafe {
        for g in 0..groups {
            let bp = b.add(g * nr);
            // A plain loop, not `array::from_fn` (a closure: see `unrolled`).
            let mut bv = [E::load_b(s, bp); NV];
            for (v, vector) in bv.iter_mut().enumerate().skip(1) {
                *vector = E::load_b(s, bp.add(v * S::LANES));
            }
            unrolled::<MR>(&mut RowStep::<S, E, MR, NV> { s, acc: &mut acc, a: a.add(g * MR), b: &bv });
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
pub(crate) unsafe fn edge_tile<S: Bf16Simd, E: Elem, const MR: usize, const NV: usize>(
    s: S,
    groups: usize,
    a: *const E::Packed,
    b: *const E::Packed,
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
        tile::<S, E, MR, NV>(s, groups, a, b, buf.as_mut_ptr(), nr, false);
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
/// The tiles' widths run through [`pack_panels_of`], whose copies of one group are as wide as
/// the compiler knows (a `memcpy` call per 12 or 32 floats, as a run-time width gets, cost more
/// than the copy: a tenth of a training step once).
///
/// # Panics
/// If `out` is shorter than ⌈rows/width⌉·depth_pad·width or `depth > depth_pad`.
pub(crate) fn pack_panels(src: MatRef<'_>, width: usize, depth_pad: usize, out: &mut [f32]) {
    match width {
        4 => pack_panels_of::<4>(src, depth_pad, out),
        6 => pack_panels_of::<6>(src, depth_pad, out),
        8 => pack_panels_of::<8>(src, depth_pad, out),
        12 => pack_panels_of::<12>(src, depth_pad, out),
        14 => pack_panels_of::<14>(src, depth_pad, out),
        16 => pack_panels_of::<16>(src, depth_pad, out),
        24 => pack_panels_of::<24>(src, depth_pad, out),
        32 => pack_panels_of::<32>(src, depth_pad, out),
        48 => pack_panels_of::<48>(src, depth_pad, out),
        _ => pack_panels_any(src, width, depth_pad, out),
    }
}

/// [`pack_panels`] for any width, element by element.
fn pack_panels_any(src: MatRef<'_>, width: usize, depth_pad: usize, out: &mut [f32]) {
    let (rows, depth) = (src.rows(), src.cols());
    assert!(depth <= depth_pad && out.len() >= rows.div_ceil(width) * depth_pad * width);
    out[..rows.div_ceil(width) * depth_pad * width].fill(0.0);
    let mut row = vec![0.0f32; depth];
    for r in 0..rows {
        src.copy_row(r, &mut row);
        let panel = &mut out[(r / width) * depth_pad * width..];
        for (p, &v) in row.iter().enumerate() {
            panel[p * width + r % width] = v;
        }
    }
}

/// [`pack_panels`] for panels of a compile-time width `W`: contiguous columns (a transposed
/// matrix) copy W-float runs of a column into each group; contiguous rows gather each group
/// from W row slices; other strides go element by element. Every word of the panels is
/// written once.
///
/// # Panics
/// As [`pack_panels`].
#[inline]
pub(crate) fn pack_panels_of<const W: usize>(src: MatRef<'_>, depth_pad: usize, out: &mut [f32]) {
    let (rows, depth) = (src.rows(), src.cols());
    let panels = rows.div_ceil(W);
    assert!(depth <= depth_pad && out.len() >= panels * depth_pad * W);
    let out = &mut out[..panels * depth_pad * W];
    if depth == 0 || rows == 0 {
        out.fill(0.0);
        return;
    }
    let (full, tail) = (rows / W, rows % W);
    if rows > 1 && src.row(0).is_none() && src.col(0).is_some() {
        for p in 0..depth {
            let col = src.col(p).expect("contiguous columns");
            for (q, run) in col.chunks_exact(W).enumerate() {
                out[(q * depth_pad + p) * W..][..W].copy_from_slice(run);
            }
            if tail > 0 {
                let group = &mut out[(full * depth_pad + p) * W..][..W];
                group[..tail].copy_from_slice(&col[full * W..]);
                group[tail..].fill(0.0);
            }
        }
        for panel in out.chunks_exact_mut(depth_pad * W) {
            panel[depth * W..].fill(0.0);
        }
        return;
    }
    if src.row(0).is_none() {
        return pack_panels_any(src, W, depth_pad, out);
    }
    for (q, panel) in out.chunks_exact_mut(depth_pad * W).enumerate() {
        let first = q * W;
        if q < full {
            let row: [&[f32]; W] = std::array::from_fn(|r| src.row(first + r).expect("contiguous rows"));
            for (p, group) in panel.chunks_exact_mut(W).take(depth).enumerate() {
                for (g, r) in group.iter_mut().zip(&row) {
                    *g = r[p];
                }
            }
        } else {
            let row: [Option<&[f32]>; W] =
                std::array::from_fn(|r| (r < tail).then(|| src.row(first + r).expect("contiguous rows")));
            for (p, group) in panel.chunks_exact_mut(W).take(depth).enumerate() {
                for (g, r) in group.iter_mut().zip(&row) {
                    *g = r.map_or(0.0, |r| r[p]);
                }
            }
        }
        panel[depth * W..].fill(0.0);
    }
}

/// [`Elem::pack`] into a scratch buffer of `ws` (its words seen through [`Word::of`]): `src`
/// in panels of `width` rows, `groups` groups deep.
pub(crate) fn packed_panels<'w, E: Elem>(
    ws: &'w Workspace,
    src: MatRef<'_>,
    width: usize,
    groups: usize,
) -> Scratch<'w> {
    let mut out = ws.scratch(src.rows().div_ceil(width) * groups * width);
    E::pack(src, width, groups, E::Packed::of_mut(&mut out));
    out
}

/// Packs `src` (rows × depth) into bf16 pair words in panels of `width` rows, rounding each
/// value with [`f32_to_bf16`]: panel q holds `groups` groups of `width` words, word (g, r)
/// holding elements 2g (low half) and 2g+1 (high half) of row q·width + r; zero past the last
/// row and past `depth` (an odd depth's last pair has a zero high half).
///
/// # Panics
/// If `out` is shorter than ⌈rows/width⌉·groups·width or `depth > 2·groups`.
pub(crate) fn pack_pair_panels(src: MatRef<'_>, width: usize, groups: usize, out: &mut [u32]) {
    let (rows, depth) = (src.rows(), src.cols());
    assert!(depth <= 2 * groups && out.len() >= rows.div_ceil(width) * groups * width);
    out.fill(0);
    if depth == 0 || rows == 0 {
        return;
    }
    let word = |even: f32, odd: Option<&f32>| pair(f32_to_bf16(even), odd.map_or(0, |&x| f32_to_bf16(x)));
    if rows > 1 && src.row(0).is_none() && src.col(0).is_some() {
        // Columns are contiguous (a transposed matrix): each group pairs two column runs.
        for g in 0..depth.div_ceil(2) {
            let even = src.col(2 * g).expect("contiguous columns");
            let odd = (2 * g + 1 < depth).then(|| src.col(2 * g + 1).expect("contiguous columns"));
            for (q, run) in even.chunks(width).enumerate() {
                let dst = &mut out[(q * groups + g) * width..][..run.len()];
                match odd {
                    Some(odd) => {
                        let odd = &odd[q * width..][..run.len()];
                        dst.iter_mut().zip(run.iter().zip(odd)).for_each(|(d, (&e, o))| *d = word(e, Some(o)));
                    }
                    None => dst.iter_mut().zip(run).for_each(|(d, &e)| *d = word(e, None)),
                }
            }
        }
        return;
    }
    // Rows: each row's words converted at once (a loop that vectorises), then spread over its
    // panel.
    let mut copy = vec![0.0f32; if src.row(0).is_some() { 0 } else { depth }];
    let mut words = vec![0u32; depth.div_ceil(2)];
    for r in 0..rows {
        let row = match src.row(r) {
            Some(row) => row,
            None => {
                src.copy_row(r, &mut copy);
                &copy[..]
            }
        };
        pair_words(row, &mut words);
        let panel = &mut out[(r / width) * groups * width..];
        for (g, &w) in words.iter().enumerate() {
            panel[g * width + r % width] = w;
        }
    }
}

/// The pair words of one row, word g holding its elements 2g (low half) and 2g+1 (high half,
/// zero past the end) rounded by [`f32_to_bf16`]: `out` has ⌈len/2⌉ words.
#[inline]
pub(crate) fn pair_words(row: &[f32], out: &mut [u32]) {
    debug_assert_eq!(out.len(), row.len().div_ceil(2));
    let pairs = row.chunks_exact(2);
    let last = pairs.remainder().first().copied();
    for (w, two) in out.iter_mut().zip(pairs) {
        *w = pair(f32_to_bf16(two[0]), f32_to_bf16(two[1]));
    }
    if let Some(even) = last {
        out[row.len() / 2] = pair(f32_to_bf16(even), 0);
    }
}

/// [`pack_pair_panels`] for panels of a compile-time height: the same layout, faster where rows
/// are contiguous (the MR rows of a panel converted to words row by row, a loop that
/// vectorises, then each group gathered from them).
///
/// # Panics
/// As [`pack_pair_panels`].
#[inline]
pub(crate) fn pack_pair_rows<const MR: usize>(src: MatRef<'_>, groups: usize, out: &mut [u32]) {
    let (rows, depth) = (src.rows(), src.cols());
    if rows == 0 || depth == 0 || src.row(0).is_none() || depth != 2 * groups {
        return pack_pair_panels(src, MR, groups, out);
    }
    assert!(out.len() >= rows.div_ceil(MR) * groups * MR);
    let mut words = vec![0u32; MR * groups];
    for (panel, dst) in out.chunks_exact_mut(groups * MR).take(rows.div_ceil(MR)).enumerate() {
        let first = panel * MR;
        if first + MR > rows {
            return pack_pair_panels(src.rows_range(first, rows), MR, groups, dst);
        }
        for (r, row_words) in words.chunks_exact_mut(groups).enumerate() {
            pair_words(src.row(first + r).expect("contiguous rows"), row_words);
        }
        for (g, group) in dst.chunks_exact_mut(MR).enumerate() {
            for (r, w) in group.iter_mut().enumerate() {
                *w = words[r * groups + g];
            }
        }
    }
}

/// The smallest exponent ⌊log2 |x|⌋ over the nonzero finite bf16 of packed pair words (`None`
/// when there are none). Packed words never hold subnormal bf16.
pub(crate) fn min_exponent(words: &[u32]) -> Option<i32> {
    // Per half the exponent field, with 0 (zero) and 255 (∞, NaN) moved out of the way; a
    // branch-free fold the compiler vectorises.
    let field = |h: u32| {
        let e = (h >> 7) & 0xFF;
        if e == 0 || e == 0xFF {
            0xFF
        } else {
            e
        }
    };
    let least = words.iter().fold(0xFFu32, |m, &w| m.min(field(w & 0xFFFF)).min(field(w >> 16)));
    (least != 0xFF).then(|| least as i32 - 127)
}

/// Whether a tile over pair operands whose nonzero finite bf16 have exponents of at least
/// `a` and `b` ([`min_exponent`]) never meets a tiny intermediate result, so that [`Bf16`]'s
/// unchecked emulation gives the instruction's bits ([`Bf16Checked`]'s).
///
/// The reason: a nonzero bf16 is m·2^(e−7) with an integer m < 2^8, so when the smallest
/// exponents of A and B sum to at least −112, every product is an integer multiple of 2^-126.
/// Sums of such multiples are multiples too, and rounding one to 24 bits keeps it a multiple
/// (a value below 2^-102 has at most 24 significant bits and is exact; above, the ulp is at
/// least 2^-126). So from a zero accumulator every partial result is 0 or at least 2^-126 in
/// magnitude: no flush can occur, and f32 FMAs round exactly as the instruction. (∞ and NaN
/// behave alike without the checks.)
pub(crate) fn normal_range_certified(a: Option<i32>, b: Option<i32>) -> bool {
    match (a, b) {
        (Some(ea), Some(eb)) => ea + eb >= -112,
        // No nonzero finite product at all.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16::{f32_to_bf16, pair};

    /// Word (g, r) of panel q from the definition: elements 2g and 2g+1 of row q·width + r.
    fn reference_pairs(src: MatRef<'_>, width: usize, groups: usize) -> Vec<u32> {
        let at = |i: usize, j: usize| if i < src.rows() && j < src.cols() { f32_to_bf16(src.at(i, j)) } else { 0 };
        let mut out = vec![0u32; src.rows().div_ceil(width) * groups * width];
        for (w, word) in out.iter_mut().enumerate() {
            let (q, g, r) = (w / (groups * width), w / width % groups, w % width);
            *word = pair(at(q * width + r, 2 * g), at(q * width + r, 2 * g + 1));
        }
        out
    }

    #[test]
    fn pair_packing_matches_its_definition_for_every_layout() {
        for (rows, depth, width, groups) in [
            (1, 1, 12, 1),
            (13, 7, 12, 4),
            (29, 16, 4, 9),
            (40, 33, 32, 17),
            (5, 0, 4, 0),
            (29, 18, 4, 9),
            (37, 24, 12, 12),
        ] {
            let data: Vec<f32> = (0..rows * depth * 2).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let row_major = MatRef::new(&data, 0, rows, depth, depth);
            let cols: Vec<f32> = (0..rows * depth).map(|i| data[(i % rows) * depth + i / rows]).collect();
            let transposed = MatRef::new(&cols, 0, depth, rows, rows).t();
            // SAFETY: rows·depth·2 floats, every other one read.
            let strided = unsafe { MatRef::from_raw(data.as_ptr(), rows, depth, 2 * depth as isize, 2) };
            for (what, src) in [("rows", row_major), ("columns", transposed), ("strided", strided)] {
                let want = reference_pairs(src, width, groups);
                let mut got = vec![7u32; want.len()];
                pack_pair_panels(src, width, groups, &mut got);
                assert_eq!(got, want, "{what} {rows}×{depth} in {width}-wide panels");
                if 2 * groups == depth {
                    let mut fast = vec![7u32; want.len()];
                    match width {
                        4 => pack_pair_rows::<4>(src, groups, &mut fast),
                        12 => pack_pair_rows::<12>(src, groups, &mut fast),
                        _ => continue,
                    }
                    assert_eq!(fast, want, "pack_pair_rows {what} {rows}×{depth} in {width}-wide panels");
                }
            }
        }
    }

    /// Value (q, p, r) of the panels from the definition: element p of row q·width + r.
    fn reference_panels(src: MatRef<'_>, width: usize, depth_pad: usize) -> Vec<f32> {
        let at = |i: usize, j: usize| if i < src.rows() && j < src.cols() { src.at(i, j) } else { 0.0 };
        let mut out = vec![0.0f32; src.rows().div_ceil(width) * depth_pad * width];
        for (w, v) in out.iter_mut().enumerate() {
            let (q, p, r) = (w / (depth_pad * width), w / width % depth_pad, w % width);
            *v = at(q * width + r, p);
        }
        out
    }

    #[test]
    fn f32_packing_matches_its_definition_for_every_layout_and_width() {
        let shapes = [(1, 1, 1), (13, 7, 9), (29, 16, 16), (40, 33, 40), (5, 0, 3), (64, 5, 5), (97, 12, 13)];
        for (rows, depth, depth_pad) in shapes {
            let data: Vec<f32> = (0..rows * depth * 2).map(|i| (i as f32 * 0.37).sin() * 3.0 + 0.5).collect();
            let row_major = MatRef::new(&data, 0, rows, depth, depth);
            let cols: Vec<f32> = (0..rows * depth).map(|i| data[(i % rows) * depth + i / rows]).collect();
            let transposed = MatRef::new(&cols, 0, depth, rows, rows).t();
            // SAFETY: rows·depth·2 floats, every other one read.
            let strided = unsafe { MatRef::from_raw(data.as_ptr(), rows, depth, 2 * depth as isize, 2) };
            for (what, src) in [("rows", row_major), ("columns", transposed), ("strided", strided)] {
                for width in [4, 5, 6, 8, 12, 14, 16, 24, 32, 48] {
                    let want = reference_panels(src, width, depth_pad);
                    let mut got = vec![f32::NAN; want.len() + 3];
                    pack_panels(src, width, depth_pad, &mut got);
                    assert_eq!(
                        &got[..want.len()],
                        &want[..],
                        "{what} {rows}×{depth} (pad {depth_pad}) in {width}-wide panels"
                    );
                    assert!(got[want.len()..].iter().all(|v| v.is_nan()), "past the panels is left alone");
                }
                let want = reference_panels(src, 12, depth_pad);
                let mut fast = vec![f32::NAN; want.len()];
                F32::pack_rows::<12>(src, depth_pad, &mut fast);
                assert_eq!(fast, want, "F32::pack_rows {what}");
            }
        }
    }

    #[test]
    fn the_certificate_reads_the_least_exponents() {
        let words = [pair(f32_to_bf16(3.0), f32_to_bf16(-0.0)), pair(f32_to_bf16(f32::INFINITY), f32_to_bf16(0.01))];
        assert_eq!(min_exponent(&words), Some(-7)); // 0.01 = 1.28·2^-7; 0 and ∞ do not count
        assert_eq!(min_exponent(&[0, pair(0x7FC0, 0x8000)]), None);
        assert!(normal_range_certified(Some(-56), Some(-56)) && !normal_range_certified(Some(-56), Some(-57)));
        assert!(normal_range_certified(None, Some(-126)));
    }
}
