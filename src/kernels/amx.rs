//! Intel AMX tiles for the bf16 products: `TDPBF16PS` multiplies a 16 × 32 bf16 tile by a
//! 32 × 16 one into a 16 × 16 f32 tile, 8192 multiply-adds an instruction (measured on a
//! Xeon with AMX, one core: 1.35 TFLOP/s with operands in tiles, against 0.10–0.17 for the
//! `VDPBF16PS` and f32 register tiles there).
//!
//! One register plan serves every product: a 32 × 32 block of C in four accumulator tiles,
//! A as two 16-row tiles of 32 depth steps read row-major (a row's bf16 pairs one after the
//! other: [`Tiles::block`]), B as two 16-column tiles in the pair ("VNNI") layout the packed
//! kernels already use (`groups` rows of pair words, a panel of 32 columns per row:
//! [`pack_pair_panels`] with width 32). Depths are padded to whole tiles (32 steps, 16 pair
//! rows) with zeros.
//!
//! The instructions are written with `asm!` (Rust has no stable AMX intrinsics). Linux hands a
//! process the tile registers only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), made once
//! by [`Amx::detect`]; other systems do not get this path.
//!
//! Operands are rounded to bf16 exactly as on the other paths; the tile unit accumulates each
//! element in f32 in its own order (and flushes subnormals), so results are not the bits of the
//! `VDPBF16PS` kernels, but they are the same bits for any thread count.

use rayon::prelude::*;

use super::bf16::{f32_to_bf16, pair, round_to_bf16};
#[cfg(not(target_arch = "x86_64"))]
use super::microkernel::pair_words;
use super::microkernel::{pack_pair_panels, Word};
use super::simd::{Amx, Bf16Simd, Job, Simd};
use super::views::{MatMut, MatRef, Start};
use crate::workspace::Workspace;

/// Columns of a B panel (two tiles of 16).
pub(crate) const PANEL: usize = 32;
/// Pair rows of B per tile step (32 depth steps).
pub(crate) const GROUP_STEP: usize = 16;
/// Rows of C per parallel block, at most.
const MAX_ROW_BLOCK: usize = 256;

/// The tile configuration (palette 1): all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// The tile registers configured on this thread for the 32 × 32 block; released when dropped.
/// Not `Send`: the configuration belongs to the thread that loaded it.
pub(crate) struct Tiles {
    _thread: std::marker::PhantomData<*const ()>,
}

impl Tiles {
    /// Loads the configuration on this thread.
    pub(crate) fn configure(_amx: Amx) -> Tiles {
        let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        config.colsb[..8].fill(64);
        config.rows[..8].fill(16);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the token proves the CPU has AMX and the process may use it; the
        // configuration is a valid palette-1 one, 64 bytes, read only.
        unsafe {
            std::arch::asm!("ldtilecfg [{0}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
        }
        Tiles { _thread: std::marker::PhantomData }
    }

    /// `C[32 × 32] (+)= A·B` over `steps` steps of 32 depth: A blocked ([`pack_rows`]: per
    /// step 2 KiB, its two 16-row tiles one after the other, rows 64 bytes apart), the step 4
    /// ahead prefetched into L1 as the tiles multiply; B's two 16-column tiles at `b` and
    /// `b + 64` (`ldb` bytes a pair row), 16 pair rows further each step; C 32 rows `ldc` bytes
    /// apart, started from zero or, with `init = Some((src, ld))`, from the 32 × 32 floats at
    /// `src`, rows `ld` bytes apart (`(c, ldc)`: C itself; `(bias, 0)`: one row repeated).
    ///
    /// # Safety
    /// The `steps · 2` KiB of A from `a`, the `16 · steps` rows of 128 bytes of B, the 32
    /// rows of 128 bytes of C and those of `init` must be readable (C writable). (The prefetches may run past A:
    /// they never fault.)
    ///
    /// # Panics
    /// If `steps` is 0 (the loop would not end).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn block(
        &self,
        steps: usize,
        a: *const u32,
        b: *const u32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        init: Option<(*const f32, usize)>,
    ) {
        assert!(steps >= 1, "amx: a product of no depth");
        let (src, src_ld) = init.unwrap_or((c, 0));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's guarantees; the tiles were configured on this thread (`self`).
        unsafe {
            std::arch::asm!(
                "test {acc:e}, {acc:e}",
                "jz 3f",
                "tileloadd tmm0, [{src} + {src_ld}*1]",
                "tileloadd tmm1, [{src} + {src_ld}*1 + 64]",
                "tileloadd tmm2, [{src2} + {src_ld}*1]",
                "tileloadd tmm3, [{src2} + {src_ld}*1 + 64]",
                "jmp 4f",
                "3:",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "4:",
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a} + {lda}*1 + 1024]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "prefetcht0 [{a} + 8192]",
                "prefetcht0 [{a} + 8256]",
                "prefetcht0 [{a} + 8320]",
                "prefetcht0 [{a} + 8384]",
                "prefetcht0 [{a} + 8448]",
                "prefetcht0 [{a} + 8512]",
                "prefetcht0 [{a} + 8576]",
                "prefetcht0 [{a} + 8640]",
                "prefetcht0 [{a} + 8704]",
                "prefetcht0 [{a} + 8768]",
                "prefetcht0 [{a} + 8832]",
                "prefetcht0 [{a} + 8896]",
                "prefetcht0 [{a} + 8960]",
                "prefetcht0 [{a} + 9024]",
                "prefetcht0 [{a} + 9088]",
                "prefetcht0 [{a} + 9152]",
                "prefetcht0 [{a} + 9216]",
                "prefetcht0 [{a} + 9280]",
                "prefetcht0 [{a} + 9344]",
                "prefetcht0 [{a} + 9408]",
                "prefetcht0 [{a} + 9472]",
                "prefetcht0 [{a} + 9536]",
                "prefetcht0 [{a} + 9600]",
                "prefetcht0 [{a} + 9664]",
                "prefetcht0 [{a} + 9728]",
                "prefetcht0 [{a} + 9792]",
                "prefetcht0 [{a} + 9856]",
                "prefetcht0 [{a} + 9920]",
                "prefetcht0 [{a} + 9984]",
                "prefetcht0 [{a} + 10048]",
                "prefetcht0 [{a} + 10112]",
                "prefetcht0 [{a} + 10176]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a}, 2048",
                "add {b}, {bstep}",
                "dec {steps}",
                "jnz 4b",
                "tilestored [{c} + {ldc}*1], tmm0",
                "tilestored [{c} + {ldc}*1 + 64], tmm1",
                "tilestored [{c2} + {ldc}*1], tmm2",
                "tilestored [{c2} + {ldc}*1 + 64], tmm3",
                acc = in(reg) init.is_some() as u32,
                src = in(reg) src,
                src2 = in(reg) src.byte_add(16 * src_ld),
                src_ld = in(reg) src_ld,
                a = inout(reg) a => _,
                lda = in(reg) 64usize,
                b = inout(reg) b => _,
                ldb = in(reg) ldb,
                bstep = in(reg) 16 * ldb,
                c = in(reg) c,
                c2 = in(reg) c.byte_add(16 * ldc),
                ldc = in(reg) ldc,
                steps = inout(reg) steps => _,
                options(nostack),
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (steps, a, b, ldb, c, ldc, src, src_ld);
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: releases the tile state this thread configured.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

/// Pair groups of a depth `k`, padded to whole tile steps.
pub(crate) fn padded_groups(k: usize) -> usize {
    k.div_ceil(2).next_multiple_of(GROUP_STEP)
}

/// Where word g of row r of an A operand lies in the blocked layout the tiles read
/// ([`Tiles::block`]): blocks of 32 rows, `groups` words deep (a multiple of 16), each a run
/// of steps of 32 rows × 16 words.
#[inline(always)]
fn blocked(r: usize, g: usize, groups: usize) -> usize {
    (r / 32) * 32 * groups + (g / GROUP_STEP) * 32 * GROUP_STEP + (r % 32) * GROUP_STEP + g % GROUP_STEP
}

/// Writes row r's words (`groups` of them, a multiple of 16) into the blocked layout.
#[inline(always)]
fn scatter_row(r: usize, words: &[u32], out: &mut [u32]) {
    let groups = words.len();
    for (step, run) in words.chunks_exact(GROUP_STEP).enumerate() {
        out[blocked(r, step * GROUP_STEP, groups)..][..GROUP_STEP].copy_from_slice(run);
    }
}

/// Writes the rows of `src` as bf16 pair words into `out` in the blocked layout of A operands
/// (see [`blocked`]; `groups` a multiple of 16, each row's words past its depth zero), and
/// zeroes the rows from `src.rows()` to `rows_pad` (a multiple of 32). Rows with contiguous
/// elements convert 32 at a time (`VCVTNE2PS2BF16`, the bits of
/// [`f32_to_bf16`]); a matrix with contiguous columns (a transposed
/// view) is read a pair of columns at a time.
pub(crate) fn pack_rows(amx: Amx, src: MatRef<'_>, groups: usize, rows_pad: usize, out: &mut [u32]) {
    let (rows, depth) = (src.rows(), src.cols());
    let used = depth.div_ceil(2);
    assert!(used <= groups && groups.is_multiple_of(GROUP_STEP) && rows <= rows_pad && rows_pad.is_multiple_of(32));
    assert!(out.len() >= rows_pad * groups);
    if groups == 0 {
        return;
    }
    if rows > 1 && src.row(0).is_none() && src.col(0).is_some() {
        return pack_columns(src, groups, rows_pad, out);
    }
    let mut copy = vec![0.0f32; if rows > 0 && src.row(0).is_none() { depth } else { 0 }];
    let mut words = vec![0u32; groups];
    for r in 0..rows_pad {
        match r < rows {
            true => {
                let row = match src.row(r) {
                    Some(row) => row,
                    None => {
                        src.copy_row(r, &mut copy);
                        &copy[..]
                    }
                };
                row_to_pairs(amx, row, &mut words[..used]);
            }
            false => words.fill(0),
        }
        scatter_row(r, &words, out);
    }
}

/// [`pack_pair_panels`] with width [`PANEL`] (the pair-row layout of B tiles: panel q holds
/// `groups` rows of [`PANEL`] words, word (g, r) pairing elements 2g, 2g+1 of row q·32 + r),
/// rows converted 32 floats at a time when contiguous.
pub(crate) fn pack_panels(amx: Amx, src: MatRef<'_>, groups: usize, out: &mut [u32]) {
    let (rows, depth) = (src.rows(), src.cols());
    if rows == 0 || depth == 0 || src.row(0).is_none() || !groups.is_multiple_of(16) {
        return pack_pair_panels(src, PANEL, groups, out);
    }
    let used = depth.div_ceil(2);
    assert!(used <= groups && out.len() >= rows.div_ceil(PANEL) * groups * PANEL);
    // Each half panel (16 rows) converted into row-major words, then transposed 16 × 16 at a
    // time into the panel's pair rows.
    let mut words = vec![0u32; 16 * groups];
    for (q, panel) in out.chunks_exact_mut(groups * PANEL).take(rows.div_ceil(PANEL)).enumerate() {
        for half in 0..2 {
            for r in 0..16 {
                let row = q * PANEL + half * 16 + r;
                let dst = &mut words[r * groups..][..groups];
                match row < rows {
                    true => {
                        row_to_pairs(amx, src.row(row).expect("contiguous rows"), &mut dst[..used]);
                        dst[used..].fill(0);
                    }
                    false => dst.fill(0),
                }
            }
            for g0 in (0..groups).step_by(16) {
                // SAFETY: a 16 × 16 block of `words` (rows `groups` apart) into 16 rows of 16
                // words of the panel (rows 32 apart), both inside their slices.
                unsafe {
                    transpose16(
                        amx,
                        words[g0..].as_ptr() as *const f32,
                        groups,
                        panel[g0 * PANEL + half * 16..].as_mut_ptr() as *mut f32,
                        PANEL,
                        None,
                    )
                };
            }
        }
    }
}

/// `dst[j][i] = src[i][j] · scale[j]` (no scaling without `scale`) for a 16 × 16 block, rows
/// `src_ld` and `dst_ld` floats apart (any 32-bit data when unscaled).
///
/// # Safety
/// The 16 rows of 16 floats at `src` readable, at `dst` writable.
#[inline]
pub(crate) unsafe fn transpose16(
    amx: Amx,
    src: *const f32,
    src_ld: usize,
    dst: *mut f32,
    dst_ld: usize,
    scale: Option<&[f32; 16]>,
) {
    let _ = amx;
    // SAFETY: the token proves AVX-512F; the caller guarantees the blocks.
    unsafe { super::simd::transpose16(src, src_ld, dst, dst_ld, scale) }
}

/// [`pack_rows`] of a matrix whose columns are contiguous: row r's word g pairs elements
/// (r, 2g) and (r, 2g + 1), read from two columns; the writes walk the blocks' lines, which
/// stay in L1 across consecutive groups.
fn pack_columns(src: MatRef<'_>, groups: usize, rows_pad: usize, out: &mut [u32]) {
    let (rows, depth) = (src.rows(), src.cols());
    out[..rows_pad * groups].fill(0);
    for g in 0..depth.div_ceil(2) {
        let even = src.col(2 * g).expect("contiguous columns");
        let odd = (2 * g + 1 < depth).then(|| src.col(2 * g + 1).expect("contiguous columns"));
        for r in 0..rows {
            let high = odd.map_or(0, |odd| f32_to_bf16(odd[r]));
            out[blocked(r, g, groups)] = pair(f32_to_bf16(even[r]), high);
        }
    }
}

/// The pair words of `row` (⌈len/2⌉ of them in `out`, a zero high half past an odd end).
fn row_to_pairs(amx: Amx, row: &[f32], out: &mut [u32]) {
    assert_eq!(out.len(), row.len().div_ceil(2));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the token proves AVX512_BF16 and AVX-512BW; the lengths are checked above.
    unsafe {
        let _ = amx;
        row_to_pairs_avx512(row, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = amx;
        pair_words(row, out)
    }
}

/// # Safety
/// The CPU has AVX512_BF16 and AVX-512BW; `out.len() == ⌈row.len() / 2⌉`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn row_to_pairs_avx512(row: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    let whole = row.len() / 32;
    for i in 0..whole {
        // SAFETY: 32 floats from 32·i and 16 words from 16·i are inside the slices.
        unsafe {
            let lo = _mm512_loadu_ps(row.as_ptr().add(32 * i));
            let hi = _mm512_loadu_ps(row.as_ptr().add(32 * i + 16));
            // The second source fills halves 0..16: 32 consecutive bf16, i.e. 16 pair words.
            let words = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(16 * i) as *mut __m512i, words);
        }
    }
    let done = 32 * whole;
    if done < row.len() {
        let rest = row.len() - done;
        let (lo_n, hi_n) = (rest.min(16), rest.saturating_sub(16));
        // SAFETY: masked loads read only the `rest` floats left, the masked store only the
        // ⌈rest/2⌉ words left.
        unsafe {
            let lo = _mm512_maskz_loadu_ps(((1u32 << lo_n) - 1) as u16, row.as_ptr().add(done));
            let hi = _mm512_maskz_loadu_ps(((1u32 << hi_n) - 1) as u16, row.as_ptr().add(done + 16));
            let words = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            let n_words = rest.div_ceil(2);
            _mm512_mask_storeu_epi32(
                out.as_mut_ptr().add(16 * whole) as *mut i32,
                ((1u32 << n_words) - 1) as u16,
                words,
            );
        }
    }
}

/// B (K × N) rounded to bf16 for the AMX product: panels of [`PANEL`] columns, each
/// [`padded_groups`]`(K)` pair rows of [`PANEL`] words (zero past N and past K).
#[derive(Clone, Debug)]
pub(crate) struct AmxB {
    data: Vec<u32>,
    k: usize,
    n: usize,
    groups: usize,
    /// Packed by [`AmxB::split`]: A's rows enter as `[a_hi, a_hi, a_lo]`.
    split: bool,
}

impl AmxB {
    /// Packs `b`, column panels in parallel.
    pub(crate) fn new(b: MatRef<'_>) -> AmxB {
        let (k, n) = (b.rows(), b.cols());
        let groups = padded_groups(k);
        let mut data = vec![0u32; n.div_ceil(PANEL) * groups * PANEL];
        if groups > 0 {
            data.par_chunks_mut(groups * PANEL).enumerate().for_each(|(jp, panel)| {
                let cols = (jp * PANEL)..(n.min((jp + 1) * PANEL));
                // Column panels of B are row panels of Bᵀ.
                pack_pair_panels(b.cols_range(cols.start, cols.end).t(), PANEL, groups, panel);
            });
        }
        AmxB { data, k, n, groups, split: false }
    }

    /// Packs `b` for near-f32 products on the tiles ("bf16×3", as oneDNN and XLA do): each
    /// operand is split into a bf16 high part and a bf16 low part (`x − bf16(x)`, exact in
    /// f32), and `A·B ≈ A_hi·B_hi + A_hi·B_lo + A_lo·B_hi` is one product three times as deep,
    /// `[A_hi, A_hi, A_lo]·[B_hi; B_lo; B_hi]` (each part padded to whole tile steps). Each
    /// operand keeps 16 bits of mantissa and the dropped `A_lo·B_lo` is below 2^-16 of each
    /// |a·b|: the error is about 2^-16 of Σ|a||b|, against 2^-8 for a bf16 product, at three
    /// times its cost (on AMX, still 2–3× faster than the f32 register tiles).
    pub(crate) fn split(b: MatRef<'_>) -> AmxB {
        let (k, n) = (b.rows(), b.cols());
        let part = 2 * padded_groups(k);
        let mut parts = vec![0.0f32; 3 * part * n];
        let mut row = vec![0.0f32; n];
        for r in 0..k {
            b.copy_row(r, &mut row);
            parts[r * n..][..n].copy_from_slice(&row);
            parts[(2 * part + r) * n..][..n].copy_from_slice(&row);
            let low = &mut parts[(part + r) * n..][..n];
            low.iter_mut().zip(&row).for_each(|(l, &x)| *l = x - round_to_bf16(x));
        }
        let packed = AmxB::new(MatRef::new(&parts, 0, 3 * part, n, n));
        AmxB { k, split: true, ..packed }
    }
}

/// [`pack_rows`] of the split operand `[a_hi, a_hi, a_lo]` (see [`AmxB::split`]): row r's
/// three parts of `part` words each (a multiple of 16), blocked.
fn pack_split_rows(amx: Amx, src: MatRef<'_>, part: usize, rows_pad: usize, out: &mut [u32]) {
    let (rows, depth) = (src.rows(), src.cols());
    let used = depth.div_ceil(2);
    assert!(used <= part && part.is_multiple_of(GROUP_STEP) && rows <= rows_pad && rows_pad.is_multiple_of(32));
    assert!(out.len() >= rows_pad * 3 * part);
    let (mut row, mut low) = (vec![0.0f32; depth], vec![0.0f32; depth]);
    let mut words = vec![0u32; 3 * part];
    for r in 0..rows_pad {
        if r >= rows {
            words.fill(0);
        } else {
            src.copy_row(r, &mut row);
            low.iter_mut().zip(&row).for_each(|(l, &x)| *l = x - round_to_bf16(x));
            let (high, rest) = words.split_at_mut(part);
            row_to_pairs(amx, &row, &mut high[..used]);
            let (again, lows) = rest.split_at_mut(part);
            again.copy_from_slice(high);
            row_to_pairs(amx, &low, &mut lows[..used]);
        }
        scatter_row(r, &words, out);
    }
}

/// `C ← A·B` (`accumulate`: `C ← C + A·B`) on AMX tiles, A rounded to bf16 as it is packed,
/// row blocks of C in parallel with scratch from `ws`.
///
/// # Panics
/// If the shapes disagree.
pub(crate) fn gemm(amx: Amx, a: MatRef<'_>, b: &AmxB, accumulate: bool, c: &mut MatMut<'_>, ws: &Workspace) {
    gemm_from(amx, a, b, if accumulate { Start::C } else { Start::Zero }, c, ws)
}

/// [`gemm`] with the sums started from `start`: zero, C, or a bias row the tiles load (a
/// stride of 0) instead of a C filled with it. A residual start is written into C by the
/// caller.
///
/// # Panics
/// If the shapes disagree (a bias not N long), or for a [`Start::Residual`].
pub(crate) fn gemm_from(amx: Amx, a: MatRef<'_>, b: &AmxB, start: Start<'_>, c: &mut MatMut<'_>, ws: &Workspace) {
    assert_eq!((a.cols(), a.rows(), b.n), (b.k, c.rows(), c.cols()), "amx::gemm: shapes");
    assert!(!matches!(start, Start::Residual(..)), "amx::gemm: a residual start is written into C first");
    let (m, n, ld) = (c.rows(), c.cols(), c.ld());
    if m == 0 || n == 0 {
        return;
    }
    // The bias padded to whole panels, so that every tile reads 32 floats.
    let padded: Vec<f32>;
    let start = match start {
        Start::Bias(bias) => {
            assert_eq!(bias.len(), n, "amx::gemm: bias");
            padded = bias.iter().copied().chain(std::iter::repeat(0.0)).take(n.next_multiple_of(PANEL)).collect();
            Start::Bias(&padded)
        }
        other => other,
    };
    if b.k == 0 {
        for row in c.data_mut().chunks_mut(ld).take(m) {
            match start {
                Start::Zero => row[..n].fill(0.0),
                Start::C => {}
                Start::Bias(bias) => row[..n].copy_from_slice(&bias[..n]),
                Start::Residual(..) => unreachable!("asserted above"),
            }
        }
        return;
    }
    // Blocks of whole 32-row tiles, as many as a multiple of the thread count, near-equal.
    let threads = rayon::current_num_threads().max(1);
    let tiles = m.div_ceil(32);
    let blocks = threads * tiles.div_ceil(threads * (MAX_ROW_BLOCK / 32));
    let block = tiles.div_ceil(blocks) * 32;
    c.data_mut()[..(m - 1) * ld + n].par_chunks_mut(block * ld).enumerate().for_each(|(i, c_block)| {
        let first = i * block;
        let rows = block.min(m - first);
        amx.simd().vectorize(GemmBlock { amx, a: a.rows_range(first, first + rows), b, c: c_block, n, ld, start, ws });
    });
}

/// One block of rows of C for [`gemm`].
struct GemmBlock<'a> {
    amx: Amx,
    a: MatRef<'a>,
    b: &'a AmxB,
    c: &'a mut [f32],
    n: usize,
    ld: usize,
    start: Start<'a>,
    ws: &'a Workspace,
}

impl Job for GemmBlock<'_> {
    type Out = ();

    #[inline(always)]
    fn run<S: Bf16Simd>(self, _s: S) {
        let GemmBlock { amx, a, b, c, n, ld, start, ws } = self;
        let (rows, groups) = (a.rows(), b.groups);
        let rows_pad = rows.next_multiple_of(32);
        let mut scratch = ws.scratch(rows_pad * groups);
        let a_words = u32::of_mut(&mut scratch);
        match b.split {
            true => pack_split_rows(amx, a, groups / 3, rows_pad, a_words),
            false => pack_rows(amx, a, groups, rows_pad, a_words),
        }
        let tiles = Tiles::configure(amx);
        let mut edge = [0.0f32; 32 * 32];
        let steps = groups / GROUP_STEP;
        for jp in 0..n.div_ceil(PANEL) {
            let b_panel = &b.data[jp * groups * PANEL..][..groups * PANEL];
            let cols = PANEL.min(n - jp * PANEL);
            for ib in 0..rows_pad / 32 {
                let a_tile = &a_words[ib * 32 * groups..][..32 * groups];
                let tile_rows = 32.min(rows - ib * 32);
                let at = ib * 32 * ld + jp * PANEL;
                // The bias row of this panel (32 floats: padded above).
                let bias_row = match start {
                    Start::Bias(bias) => Some((bias[jp * PANEL..][..PANEL].as_ptr(), 0)),
                    _ => None,
                };
                if tile_rows == 32 && cols == PANEL {
                    let c_tile = &mut c[at..][..31 * ld + PANEL];
                    let ptr = c_tile.as_mut_ptr();
                    let init = if let Start::C = start { Some((ptr as *const f32, 4 * ld)) } else { bias_row };
                    // SAFETY: A holds 32 rows of `groups` words, B's panel `groups` rows of
                    // 32 words, C 32 rows of 32 floats `ld` apart, the bias row 32 floats.
                    unsafe { tiles.block(steps, a_tile.as_ptr(), b_panel.as_ptr(), 4 * PANEL, ptr, 4 * ld, init) };
                } else {
                    // SAFETY: as above, C being the 32 × 32 edge buffer.
                    unsafe {
                        tiles.block(
                            steps,
                            a_tile.as_ptr(),
                            b_panel.as_ptr(),
                            4 * PANEL,
                            edge.as_mut_ptr(),
                            4 * PANEL,
                            bias_row,
                        )
                    };
                    for r in 0..tile_rows {
                        let dst = &mut c[at + r * ld..][..cols];
                        let src = &edge[r * PANEL..][..cols];
                        match start {
                            Start::C => dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
                            _ => dst.copy_from_slice(src),
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16::round_to_bf16;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn padded_groups_are_whole_tile_steps() {
        assert_eq!(padded_groups(0), 0);
        assert_eq!(padded_groups(1), 16);
        assert_eq!(padded_groups(32), 16);
        assert_eq!(padded_groups(33), 32);
    }

    #[test]
    fn blocked_places_each_step_of_32_rows_contiguously() {
        // 64 rows, 32 words: block 1, step 1, row 5 of the block, word 3 of the step.
        assert_eq!(blocked(37, 19, 32), 32 * 32 + 512 + 5 * 16 + 3);
        let mut seen = vec![false; 64 * 32];
        for r in 0..64 {
            for g in 0..32 {
                assert!(!std::mem::replace(&mut seen[blocked(r, g, 32)], true), "({r},{g}) twice");
            }
        }
    }

    #[test]
    fn pack_rows_pairs_each_row_and_zeroes_the_padding() {
        let Some(amx) = Amx::detect() else {
            return;
        };
        // Depths around the 32-float steps; values that round up, down and to even, a NaN
        // and a subnormal.
        for (rows, depth) in [(3, 5), (2, 32), (4, 33), (1, 63), (3, 64), (2, 95)] {
            let mut data: Vec<f32> =
                (0..rows * depth).map(|i| (i as f32 * 0.37 + 0.5) * (1.0 + 3.0 * f32::EPSILON * i as f32)).collect();
            data[0] = f32::NAN;
            data[1] = 1e-40;
            let groups = padded_groups(depth);
            let rows_pad = (rows + 2).next_multiple_of(32);
            // Row-major, transposed (contiguous columns) and strided both ways.
            let cols: Vec<f32> = (0..rows * depth).map(|i| data[(i % rows) * depth + i / rows]).collect();
            let wide: Vec<f32> = (0..rows * 2 * depth).map(|i| if i % 2 == 0 { data[i / 2] } else { -1.0 }).collect();
            let views = [
                MatRef::new(&data, 0, rows, depth, depth),
                MatRef::new(&cols, 0, depth, rows, rows).t(),
                // SAFETY: every (i, 2j) with i < rows, j < depth is inside `wide`.
                unsafe { MatRef::from_raw(wide.as_ptr(), rows, depth, 2 * depth as isize, 2) },
            ];
            for (v, src) in views.into_iter().enumerate() {
                let mut out = vec![7u32; rows_pad * groups];
                pack_rows(amx, src, groups, rows_pad, &mut out);
                for r in 0..rows_pad {
                    for g in 0..groups {
                        let at = |j: usize| if r < rows && j < depth { f32_to_bf16(data[r * depth + j]) } else { 0 };
                        assert_eq!(
                            out[blocked(r, g, groups)],
                            pair(at(2 * g), at(2 * g + 1)),
                            "view {v} ({rows},{depth}) row {r} group {g}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn transpose16_transposes_and_scales() {
        let Some(amx) = Amx::detect() else {
            return;
        };
        let src: Vec<f32> = (0..16 * 19).map(|i| i as f32).collect();
        let scale: [f32; 16] = std::array::from_fn(|j| 1.0 + j as f32);
        for with in [None, Some(&scale)] {
            let mut dst = vec![-1.0f32; 16 * 21];
            // SAFETY: 16 rows of 19 and of 21 floats.
            unsafe { transpose16(amx, src.as_ptr(), 19, dst.as_mut_ptr(), 21, with) };
            for j in 0..16 {
                for i in 0..21 {
                    let want = if i < 16 { src[i * 19 + j] * with.map_or(1.0, |s| s[j]) } else { -1.0 };
                    assert_eq!(dst[j * 21 + i], want, "({j},{i})");
                }
            }
        }
    }

    #[test]
    fn pack_panels_is_pack_pair_panels_of_width_32() {
        let Some(amx) = Amx::detect() else {
            return;
        };
        for (rows, depth) in [(1, 1), (31, 33), (32, 64), (70, 5), (65, 96), (40, 700)] {
            let data = values(rows * depth, (rows + depth) as u64);
            let groups = padded_groups(depth);
            let src = MatRef::new(&data, 0, rows, depth, depth);
            let len = rows.div_ceil(PANEL) * groups * PANEL;
            let (mut got, mut want) = (vec![7u32; len], vec![9u32; len]);
            pack_panels(amx, src, groups, &mut got);
            pack_pair_panels(src, PANEL, groups, &mut want);
            assert_eq!(got, want, "({rows},{depth})");
        }
    }

    #[test]
    fn the_amx_product_matches_the_rounded_f64_product() {
        let Some(amx) = Amx::detect() else {
            eprintln!("no AMX-BF16 here: the AMX product is not run");
            return;
        };
        let ws = Workspace::default();
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (32, 32, 32), (33, 31, 65), (70, 513, 90), (300, 64, 50), (5, 1100, 3)]
        {
            let a = values(m * k, (m * 31 + k) as u64);
            let b = values(k * n, (k * 17 + n) as u64);
            let (ar, br): (Vec<f32>, Vec<f32>) =
                (a.iter().map(|&x| round_to_bf16(x)).collect(), b.iter().map(|&x| round_to_bf16(x)).collect());
            let want = crate::kernels::views::naive_product(MatRef::new(&ar, 0, m, k, k), MatRef::new(&br, 0, k, n, n));
            let packed = AmxB::new(MatRef::new(&b, 0, k, n, n));
            // A row-major and transposed (strided rows).
            let at: Vec<f32> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect();
            for (a_view, what) in [(MatRef::new(&a, 0, m, k, k), "rows"), (MatRef::new(&at, 0, k, m, m).t(), "cols")] {
                for accumulate in [false, true] {
                    let ld = n + 3;
                    let fill = if accumulate { 1.0 } else { f32::NAN };
                    let mut c = vec![fill; m * ld];
                    gemm(amx, a_view, &packed, accumulate, &mut MatMut::new(&mut c, m, n, ld), &ws);
                    for i in 0..m {
                        for j in 0..ld {
                            let got = c[i * ld + j];
                            if j >= n {
                                assert!(got.to_bits() == fill.to_bits(), "({m},{k},{n}) {what}: padding written");
                                continue;
                            }
                            let want = want[i * n + j] + if accumulate { 1.0 } else { 0.0 };
                            // f32 accumulation of k products of magnitude ≤ 1.
                            let tol = 1e-6 * (k as f64 + 1.0);
                            assert!(
                                (got as f64 - want).abs() <= tol,
                                "({m},{k},{n}) {what} acc={accumulate} at ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_started_from_a_bias_row_add_it_to_every_row() {
        let Some(amx) = Amx::detect() else {
            return;
        };
        for (m, k, n) in [(1, 3, 1), (33, 40, 65), (64, 64, 64), (70, 0, 5)] {
            let (a, b, bias) = (values(m * k, 3), values(k * n, 4), values(n, 5));
            let ar: Vec<f32> = a.iter().map(|&x| round_to_bf16(x)).collect();
            let br: Vec<f32> = b.iter().map(|&x| round_to_bf16(x)).collect();
            let want = crate::kernels::views::naive_product(MatRef::new(&ar, 0, m, k, k), MatRef::new(&br, 0, k, n, n));
            let ld = n + 2;
            let mut c = vec![f32::NAN; m * ld];
            let packed = AmxB::new(MatRef::new(&b, 0, k, n, n));
            let (a_view, ws) = (MatRef::new(&a, 0, m, k, k), Workspace::default());
            gemm_from(amx, a_view, &packed, Start::Bias(&bias), &mut MatMut::new(&mut c, m, n, ld), &ws);
            for i in 0..m {
                for j in 0..n {
                    let want = want[i * n + j] + bias[j] as f64;
                    assert!(
                        (c[i * ld + j] as f64 - want).abs() < 1e-5 * (k as f64 + 1.0),
                        "({m},{k},{n}) at ({i},{j})"
                    );
                }
                assert!(c[i * ld + n..][..2].iter().all(|v| v.is_nan()), "padding written");
            }
        }
    }

    #[test]
    fn the_split_product_is_near_f32() {
        // bf16×3: within ~2^-16 of Σ|a||b| of the exact product (against ~2^-8 for bf16), and
        // far closer than the bf16 product on the same operands.
        let Some(amx) = Amx::detect() else {
            return;
        };
        let ws = Workspace::default();
        for (m, k, n) in [(1, 1, 1), (33, 31, 65), (70, 513, 90), (5, 1100, 3)] {
            let a = values(m * k, (m * 31 + k) as u64);
            let b = values(k * n, (k * 17 + n) as u64);
            let want = crate::kernels::views::naive_product(MatRef::new(&a, 0, m, k, k), MatRef::new(&b, 0, k, n, n));
            let a_view = MatRef::new(&a, 0, m, k, k);
            let split = AmxB::split(MatRef::new(&b, 0, k, n, n));
            let plain = AmxB::new(MatRef::new(&b, 0, k, n, n));
            let (mut c, mut c_plain) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            gemm(amx, a_view, &split, false, &mut MatMut::new(&mut c, m, n, n), &ws);
            gemm(amx, a_view, &plain, false, &mut MatMut::new(&mut c_plain, m, n, n), &ws);
            let (mut worst, mut worst_plain) = (0.0f64, 0.0f64);
            for i in 0..m {
                for j in 0..n {
                    let norm: f64 = (0..k).map(|t| (a[i * k + t] as f64 * b[t * n + j] as f64).abs()).sum();
                    let err = (c[i * n + j] as f64 - want[i * n + j]).abs() / norm.max(1e-30);
                    worst = worst.max(err);
                    worst_plain =
                        worst_plain.max((c_plain[i * n + j] as f64 - want[i * n + j]).abs() / norm.max(1e-30));
                }
            }
            assert!(worst < 4.0 * 2f64.powi(-16), "({m},{k},{n}): {worst:e}");
            assert!(worst < worst_plain / 16.0, "({m},{k},{n}): {worst:e} against bf16 {worst_plain:e}");
        }
    }

    #[test]
    fn the_amx_product_has_the_same_bits_for_any_thread_count() {
        let Some(amx) = Amx::detect() else {
            return;
        };
        let (m, k, n) = (517, 300, 70);
        let (a, b) = (values(m * k, 1), values(k * n, 2));
        let packed = AmxB::new(MatRef::new(&b, 0, k, n, n));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
            let mut c = vec![0.0f32; m * n];
            pool.install(|| {
                gemm(
                    amx,
                    MatRef::new(&a, 0, m, k, k),
                    &packed,
                    false,
                    &mut MatMut::new(&mut c, m, n, n),
                    &Workspace::default(),
                )
            });
            c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let one = run(1);
        assert_eq!(run(2), one);
        assert_eq!(run(5), one);
    }
}
