//! The GEMM entry points, `C ← α·A·B + β·C`: which kernel runs a product, in f32 or with the
//! operands rounded to bf16 ([`Precision`]).
//!
//! f32: large products run on the packed AVX-512 kernel of `packed_gemm` where [`isa`] chose
//! AVX-512 (about 1.2× matrixmultiply's AVX-512 sgemm there), else on matrixmultiply's sgemm,
//! one thread per call, with rayon over row blocks of C. bf16 ([`par_gemm_in`]): the packed
//! kernel with bf16 pairs on every x86 path (`VDPBF16PS`, or its exact emulation: the same
//! bits), operands rounded as they are packed and every sum in f32; portable code rounds the
//! operands and runs matrixmultiply. An operand used many times (a layer's weights) can be
//! packed once ahead ([`PrepackedB`]).
//!
//! matrixmultiply's own threading is deliberately not used: inside rayon tasks it would start
//! more threads than there are cores. Each element of C is the same k-ordered sum whichever
//! row block it falls in, so splitting rows by thread count does not change any bit.

use rayon::prelude::*;

use super::bf16::round_to_bf16;
use super::packed_gemm::PackedB;
use super::simd::{isa, Isa};
#[cfg(target_arch = "x86_64")]
use super::tiles::{AVX2_BF16_MR, AVX2_BF16_NV, AVX512_MR, AVX512_NV};
use super::views::{MatMut, MatRef, Start};
use crate::config::Precision;
use crate::workspace::Workspace;

/// `C ← α·A·B + β·C` on one thread. With β = 0, C is only written (NaN in it is ignored).
///
/// # Panics
/// If the dimensions do not agree (an internal error).
pub fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: &mut MatMut<'_>) {
    assert_eq!(a.cols(), b.rows(), "gemm: inner dimensions");
    assert_eq!((a.rows(), b.cols()), (c.rows(), c.cols()), "gemm: output shape");
    let (rows, cols, ld) = (c.rows(), c.cols(), c.ld());
    if rows == 0 || cols == 0 {
        return;
    }
    if a.cols() == 0 {
        // matrixmultiply scales C by β in this case too, but be explicit.
        for row in c.data_mut().chunks_mut(ld).take(rows) {
            for v in &mut row[..cols] {
                *v = if beta == 0.0 { 0.0 } else { *v * beta };
            }
        }
        return;
    }
    // SAFETY: A and B are readable over their dimensions (their constructors check it); C is
    // an exclusive borrow covering rows × cols with row stride ld (checked in `MatMut::new`).
    unsafe {
        matrixmultiply::sgemm(
            rows,
            a.cols(),
            cols,
            alpha,
            a.as_ptr(),
            a.row_stride(),
            a.col_stride(),
            b.as_ptr(),
            b.row_stride(),
            b.col_stride(),
            beta,
            c.data_mut().as_mut_ptr(),
            ld as isize,
            1,
        );
    }
}

/// The row-block height for splitting `rows` over the current rayon pool: a multiple of 8
/// (the sgemm micro-tile) with about two blocks per thread.
pub fn row_block(rows: usize, min_block: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let block = rows.div_ceil(2 * threads).next_multiple_of(8);
    block.max(min_block).max(1)
}

/// Products smaller than this (multiply-adds) run on one thread through matrixmultiply.
const SMALL_PRODUCT: usize = 1 << 18;

/// `C ← α·A·B + β·C`, rows of C split over the rayon pool: the packed AVX-512 kernel (B packed
/// on the way) where [`isa`] chose AVX-512, else one sgemm call per row block.
///
/// # Panics
/// If the dimensions do not agree (an internal error).
pub fn par_gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: &mut MatMut<'_>) {
    par_gemm_ws(alpha, a, b, beta, c, &Workspace::default());
}

/// [`par_gemm`] with its packing buffers (B packed once, A per row block) from `ws`, kept
/// there for the next product: the block's large per-call GEMMs, whose packed operands on
/// fresh pages would cost about as much as the packing.
///
/// # Panics
/// As [`par_gemm`].
pub(crate) fn par_gemm_ws(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: &mut MatMut<'_>, ws: &Workspace) {
    assert_eq!((a.rows(), a.cols(), b.cols()), (c.rows(), b.rows(), c.cols()), "par_gemm: shapes");
    // Small products are not worth the fork.
    if c.rows() * c.cols() * a.cols() < SMALL_PRODUCT {
        return gemm(alpha, a, b, beta, c);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = avx512_gemm(beta) {
        return packed_on_the_call(simd, alpha, a, b, Start::beta(beta), c, ws);
    }
    sgemm_row_blocks(alpha, a, b, beta, c);
}

/// `C ← start + A·(αB)` on the packed AVX-512 kernel, B packed here into scratch from `ws`
/// (and given back); `start`'s rows in place.
#[cfg(target_arch = "x86_64")]
fn packed_on_the_call(
    simd: super::simd::Avx512,
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    start: Start<'_>,
    c: &mut MatMut<'_>,
    ws: &Workspace,
) {
    use super::microkernel::F32;
    let packed = PackedB::new_in(b, AVX512_NV * 16, alpha, ws);
    super::packed_gemm::gemm_packed::<_, F32, AVX512_MR, AVX512_NV>(simd, a, &packed, start, c, ws);
    ws.give(packed.into_data());
}

/// `C ← start + A·B` as [`par_gemm`] with scratch from `ws`: the packed AVX-512 kernel
/// begins its sums from the start; elsewhere it is written into C first (the same bits).
///
/// # Panics
/// If the dimensions disagree.
pub(crate) fn par_gemm_from(a: MatRef<'_>, b: MatRef<'_>, start: Start<'_>, c: &mut MatMut<'_>, ws: &Workspace) {
    assert_eq!((a.rows(), a.cols(), b.cols()), (c.rows(), b.rows(), c.cols()), "par_gemm: shapes");
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(simd)) = (c.rows() * c.cols() * a.cols() >= SMALL_PRODUCT, avx512_gemm(0.0)) {
        let start = in_kernel(start, c);
        return packed_on_the_call(simd, 1.0, a, b, start, c, ws);
    }
    let beta = beta_once_written(start, c);
    par_gemm_ws(1.0, a, b, beta, c, ws)
}

/// `C ← α·A·B + β·C` (β 0 or 1) on the AMX tiles, B packed on the call: bf16 operands, or
/// with `near_f32` split into bf16 high and low parts ([`AmxB::split`](super::amx::AmxB::split)).
/// Returns false, doing nothing, where bf16 products do not run on tiles
/// ([`bf16_on_tiles`]): the caller multiplies another way.
///
/// # Panics
/// If the dimensions disagree or β is not 0 or 1.
pub(crate) fn par_gemm_on_tiles(
    near_f32: bool,
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: &mut MatMut<'_>,
    ws: &Workspace,
) -> bool {
    assert!(beta == 0.0 || beta == 1.0, "par_gemm_on_tiles: β 0 or 1");
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(amx)) = (bf16_on_tiles(), super::simd::Amx::detect()) {
        // α scales B before it is packed (with β = 1 it cannot scale the product after).
        let scaled: Vec<f32>;
        let b = match alpha {
            1.0 => b,
            _ => {
                let (k, n) = (b.rows(), b.cols());
                let mut rows = vec![0.0f32; k * n];
                for (r, row) in rows.chunks_mut(n.max(1)).enumerate().take(k) {
                    b.copy_row(r, row);
                    row.iter_mut().for_each(|v| *v *= alpha);
                }
                scaled = rows;
                MatRef::new(&scaled, 0, k, n, n)
            }
        };
        let packed = if near_f32 { super::amx::AmxB::split(b) } else { super::amx::AmxB::new(b) };
        super::amx::gemm(amx, a, &packed, beta == 1.0, c, ws);
        return true;
    }
    let _ = (near_f32, alpha, a, b, c, ws);
    false
}

/// Whether this process's bf16 products run on matrix tiles (AMX: several times the f32
/// rate) rather than in vector registers (at most twice it): the plan weighs its folds by it.
pub(crate) fn bf16_on_tiles() -> bool {
    isa() == Isa::Amx
}

/// The AVX-512 token when that path runs and β is one the packed kernel takes (0 or 1).
#[cfg(target_arch = "x86_64")]
fn avx512_gemm(beta: f32) -> Option<super::simd::Avx512> {
    (isa().f32_avx512() && (beta == 0.0 || beta == 1.0)).then(super::simd::Avx512::detect).flatten()
}

/// `C ← α·A·B + β·C` in `precision`, rows of C split over the rayon pool: [`par_gemm`] for
/// f32; for bf16, A and B rounded to bf16 as they are packed, each element of C summed in f32
/// (α applied to the f32 product).
///
/// # Panics
/// If the dimensions do not agree, or for bf16 when β is not 0 or 1, or α is not 1 with β 1
/// (internal errors).
pub fn par_gemm_in(precision: Precision, alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: &mut MatMut<'_>) {
    if !precision.bf16_values() {
        return par_gemm(alpha, a, b, beta, c);
    }
    assert!(beta == 0.0 || (beta == 1.0 && alpha == 1.0), "par_gemm_in: bf16 takes β 0, or β 1 with α 1");
    par_gemm_bf16(a, (b, None), Start::beta(beta), c, &Workspace::default());
    if alpha != 1.0 {
        let (rows, cols, ld) = (c.rows(), c.cols(), c.ld());
        c.data_mut().chunks_mut(ld).take(rows).for_each(|row| row[..cols].iter_mut().for_each(|v| *v *= alpha));
    }
}

/// `C ← A·B (+ C)` with A and B rounded to bf16 and every sum in f32, B packed ahead when
/// `packed` is given (a [`PrepackedB::new`] in bf16 of the same `b`), else on the call; the
/// sums start from `start`.
fn par_gemm_bf16(
    a: MatRef<'_>,
    (b, packed): (MatRef<'_>, Option<&BPacking>),
    start: Start<'_>,
    c: &mut MatMut<'_>,
    ws: &Workspace,
) {
    assert_eq!((a.rows(), a.cols(), b.cols()), (c.rows(), b.rows(), c.cols()), "par_gemm_bf16: shapes");
    let packed_here;
    let packed = match packed {
        Some(p) => p,
        None => {
            packed_here = BPacking::bf16(b);
            &packed_here
        }
    };
    // The packed kernels begin from any start whose rows they read in place; the others from
    // the start written into C.
    let start = match (packed, start) {
        (BPacking::Bf16(_), start) => in_kernel(start, c),
        #[cfg(target_arch = "x86_64")]
        (BPacking::Amx(_), start @ (Start::Zero | Start::C | Start::Bias(_))) => start,
        (_, start) => written(start, c),
    };
    let accumulate = start.accumulates();
    match packed {
        #[cfg(target_arch = "x86_64")]
        BPacking::Bf16(packed) => match isa() {
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 if packed.nr() == AVX512_NV * 16 => {
                use super::microkernel::Bf16;
                use super::simd::{Avx512, Avx512Bf16};
                if let (true, Some(s)) = (isa().has_avx512_bf16(), Avx512Bf16::detect()) {
                    return super::packed_gemm::gemm_packed::<_, Bf16, AVX512_MR, AVX512_NV>(
                        s, a, packed, start, c, ws,
                    );
                }
                let s = Avx512::detect().expect("the AVX-512 path runs on AVX-512 CPUs");
                super::packed_gemm::gemm_packed::<_, Bf16, AVX512_MR, AVX512_NV>(s, a, packed, start, c, ws)
            }
            _ => {
                use super::microkernel::Bf16;
                let s = super::simd::Avx2::detect().expect("bf16 pairs are packed for AVX2 only on AVX2 CPUs");
                assert_eq!(packed.nr(), AVX2_BF16_NV * 8, "par_gemm_bf16: B packed for another path");
                super::packed_gemm::gemm_packed::<_, Bf16, AVX2_BF16_MR, AVX2_BF16_NV>(s, a, packed, start, c, ws)
            }
        },
        BPacking::Rounded(rounded) => {
            let (k, n) = (b.rows(), b.cols());
            rounded_gemm(a, MatRef::new(rounded, 0, k, n, n), accumulate, c)
        }
        #[cfg(target_arch = "x86_64")]
        BPacking::Amx(packed) => {
            let amx = super::simd::Amx::detect().expect("B is packed for AMX only where AMX runs");
            super::amx::gemm_from(amx, a, packed, start, c, ws)
        }
        _ => unreachable!("BPacking::bf16 packs bf16"),
    }
}

/// The portable bf16 product: A rounded in blocks of rows, times `b_rounded` (B already
/// rounded), through matrixmultiply.
fn rounded_gemm(a: MatRef<'_>, b_rounded: MatRef<'_>, accumulate: bool, c: &mut MatMut<'_>) {
    /// Rows of A rounded at a time.
    const CHUNK: usize = 128;
    let threads = rayon::current_num_threads().max(1);
    let (rows, cols, ld, k) = (c.rows(), c.cols(), c.ld(), a.cols());
    let beta = if accumulate { 1.0 } else { 0.0 };
    if rows == 0 || cols == 0 {
        return;
    }
    let block = rows.div_ceil(threads).next_multiple_of(8).max(32);
    c.data_mut()[..(rows - 1) * ld + cols].par_chunks_mut(block * ld).enumerate().for_each(|(i, chunk)| {
        let start = i * block;
        let end = (start + block).min(rows);
        let mut rounded = vec![0.0f32; CHUNK.min(end - start) * k];
        let mut row = vec![0.0f32; k];
        for first in (start..end).step_by(CHUNK) {
            let last = (first + CHUNK).min(end);
            for (r, dst) in (first..last).zip(rounded.chunks_mut(k.max(1))) {
                a.copy_row(r, &mut row);
                dst.iter_mut().zip(&row).for_each(|(d, &x)| *d = round_to_bf16(x));
            }
            let offset = (first - start) * ld;
            let mut c_rows = MatMut::new(&mut chunk[offset..], last - first, cols, ld);
            gemm(1.0, MatRef::new(&rounded, 0, last - first, k, k), b_rounded, beta, &mut c_rows);
        }
    });
}

/// [`par_gemm`] through matrixmultiply, one call per row block.
fn sgemm_row_blocks(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: &mut MatMut<'_>) {
    // One block per thread: each sgemm call packs all of B again, so fewer, larger blocks
    // win (measured: 784×1024×1536 at 170 GFLOP/s in 2 blocks, 160 in 4, 146 in 8).
    let threads = rayon::current_num_threads().max(1);
    let (rows, cols, ld) = (c.rows(), c.cols(), c.ld());
    let block = rows.div_ceil(threads).next_multiple_of(8).max(32);
    c.data_mut().par_chunks_mut(block * ld).enumerate().for_each(|(i, chunk)| {
        let start = i * block;
        let end = (start + block).min(rows);
        if start >= end {
            return;
        }
        let mut c_block = MatMut::new(chunk, end - start, cols, ld);
        gemm(alpha, a.rows_range(start, end), b, beta, &mut c_block);
    });
}

/// B packed for one precision on the path this process runs.
#[derive(Clone, Debug)]
enum BPacking {
    /// Nothing: the path's f32 GEMMs pack on every call.
    None,
    /// f32 panels for the packed AVX-512 kernel.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    F32(PackedB),
    /// bf16 pair panels for the packed kernel of the path (12×32 on AVX-512, 4×16 on AVX2).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Bf16(PackedB<u32>),
    /// Portable code: B rounded to bf16, row-major K × N, for matrixmultiply.
    Rounded(Vec<f32>),
    /// bf16 pair panels for the AMX tiles.
    #[cfg(target_arch = "x86_64")]
    Amx(super::amx::AmxB),
    /// B split into bf16 high and low parts for near-f32 products on the AMX tiles
    /// (`AmxB::split`).
    #[cfg(target_arch = "x86_64")]
    AmxSplit(super::amx::AmxB),
}

impl BPacking {
    /// B packed for the bf16 products of the path.
    fn bf16(b: MatRef<'_>) -> BPacking {
        #[cfg(target_arch = "x86_64")]
        match isa() {
            Isa::Amx => return BPacking::Amx(super::amx::AmxB::new(b)),
            Isa::Avx512Bf16 | Isa::Avx512 => return BPacking::Bf16(PackedB::bf16(b, AVX512_NV * 16)),
            Isa::Avx2 => return BPacking::Bf16(PackedB::bf16(b, AVX2_BF16_NV * 8)),
            _ => {}
        }
        let (k, n) = (b.rows(), b.cols());
        let mut rounded = vec![0.0f32; k * n];
        for (i, row) in rounded.chunks_mut(n.max(1)).enumerate().take(k) {
            b.copy_row(i, row);
            row.iter_mut().for_each(|v| *v = round_to_bf16(*v));
        }
        BPacking::Rounded(rounded)
    }
}

/// B (K × N) packed once ahead of many products `A·B` in one precision for the GEMM path this
/// process runs: f32 panels for the packed AVX-512 kernel (nothing on paths whose f32 GEMMs
/// pack on every call), or B rounded to bf16 (pair panels for the packed kernels, a rounded
/// copy for portable code).
#[derive(Clone, Debug)]
pub(crate) struct PrepackedB {
    packed: BPacking,
    rows: usize,
    cols: usize,
}

impl PrepackedB {
    /// Packs `b` for products in `precision`, when the chosen path packs its operands.
    pub(crate) fn new(b: MatRef<'_>, precision: Precision) -> PrepackedB {
        let packed = match precision {
            p if p.bf16_values() => BPacking::bf16(b),
            #[cfg(target_arch = "x86_64")]
            _ if isa().f32_avx512() && b.rows() > 0 && b.cols() > 0 => {
                BPacking::F32(PackedB::new(b, AVX512_NV * 16, 1.0))
            }
            _ => BPacking::None,
        };
        PrepackedB { packed, rows: b.rows(), cols: b.cols() }
    }

    /// B packed for the products a bf16 block keeps near f32 (the logits' projections of
    /// [`Precision::Bf16`]), when the path has a faster way than f32 products: on
    /// [`Isa::Amx`], split into bf16 high and low parts for three tile products
    /// ([`AmxB::split`](super::amx::AmxB::split): about 2^-16 of Σ|a||b| off the exact
    /// product, against f32's 2^-24). `None` elsewhere (such products run in f32).
    pub(crate) fn near_f32(b: MatRef<'_>) -> Option<PrepackedB> {
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Amx && b.rows() > 0 && b.cols() > 0 {
            let packed = BPacking::AmxSplit(super::amx::AmxB::split(b));
            return Some(PrepackedB { packed, rows: b.rows(), cols: b.cols() });
        }
        let _ = b;
        None
    }

    /// The precision of the products the packing is for (the near-f32 split: f32).
    fn precision(&self) -> Precision {
        match self.packed {
            BPacking::Bf16(_) | BPacking::Rounded(_) => Precision::Bf16,
            #[cfg(target_arch = "x86_64")]
            BPacking::Amx(_) => Precision::Bf16,
            #[cfg(target_arch = "x86_64")]
            BPacking::AmxSplit(_) => Precision::F32,
            BPacking::None | BPacking::F32(_) => Precision::F32,
        }
    }
}

/// `C ← A·B + β·C` (β 0 or 1) in `precision` with B given both as a view and packed ahead
/// ([`PrepackedB::new`] of the same `b`), rows of C in parallel, scratch from `ws`: see
/// [`par_gemm_prepacked_from`].
///
/// # Panics
/// If the dimensions disagree, `packed` was made from a matrix of another shape, or β is not 0
/// or 1.
pub(crate) fn par_gemm_prepacked(
    precision: Precision,
    a: MatRef<'_>,
    b: (MatRef<'_>, &PrepackedB),
    beta: f32,
    c: &mut MatMut<'_>,
    ws: &Workspace,
) {
    par_gemm_prepacked_from(precision, a, b, Start::beta(beta), c, ws)
}

/// `C ← start + A·B` in `precision` with B given both as a view and packed ahead
/// ([`PrepackedB::new`] of the same `b`), rows of C in parallel, scratch from `ws`. The packed
/// kernels (AVX-512 f32 and bf16, the AMX tiles for a bias) begin their sums from the start;
/// elsewhere it is written into C and the product accumulated onto it, with the same bits. A
/// packing made for the other precision is not used: the product then packs B on the call,
/// with the same bits as a packing of the right precision. An f32 product on a
/// [`PrepackedB::near_f32`] packing is that packing's near-f32 product.
///
/// # Panics
/// If the dimensions disagree, `packed` was made from a matrix of another shape, or the start
/// does not fit C (a bias not N long, a residual not C's shape).
pub(crate) fn par_gemm_prepacked_from(
    precision: Precision,
    a: MatRef<'_>,
    (b, packed): (MatRef<'_>, &PrepackedB),
    start: Start<'_>,
    c: &mut MatMut<'_>,
    ws: &Workspace,
) {
    assert_eq!((packed.rows, packed.cols), (b.rows(), b.cols()), "par_gemm_prepacked: B and its packing");
    match start {
        Start::Bias(bias) => assert_eq!(bias.len(), c.cols(), "par_gemm_prepacked: bias"),
        Start::Residual(x, bias) => {
            assert_eq!((x.rows(), x.cols(), bias.len()), (c.rows(), c.cols(), c.cols()), "par_gemm_prepacked: residual")
        }
        Start::Zero | Start::C => {}
    }
    if precision.bf16_values() {
        let ahead = (packed.precision() == Precision::Bf16).then_some(&packed.packed);
        return par_gemm_bf16(a, (b, ahead), start, c, ws);
    }
    #[cfg(target_arch = "x86_64")]
    if let BPacking::AmxSplit(packed) = &packed.packed {
        let amx = super::simd::Amx::detect().expect("B is split for AMX only where AMX runs");
        let start = if let Start::Residual(..) = start { written(start, c) } else { start };
        return super::amx::gemm_from(amx, a, packed, start, c, ws);
    }
    #[cfg(target_arch = "x86_64")]
    if let (BPacking::F32(packed), Some(simd)) = (&packed.packed, avx512_gemm(0.0)) {
        if c.rows() * c.cols() * a.cols() >= SMALL_PRODUCT {
            use super::microkernel::F32;
            let start = in_kernel(start, c);
            return super::packed_gemm::gemm_packed::<_, F32, AVX512_MR, AVX512_NV>(simd, a, packed, start, c, ws);
        }
    }
    let beta = beta_once_written(start, c);
    par_gemm(1.0, a, b, beta, c);
}

/// The start a packed kernel begins from: `start` itself where it reads its rows in place,
/// else `start` written into C ([`written`]).
fn in_kernel<'a>(start: Start<'a>, c: &mut MatMut<'_>) -> Start<'a> {
    if start.in_place() {
        start
    } else {
        written(start, c)
    }
}

/// [`written`] for a product taking β: 1 once the start is in C, 0 for [`Start::Zero`].
pub(crate) fn beta_once_written(start: Start<'_>, c: &mut MatMut<'_>) -> f32 {
    if written(start, c).accumulates() {
        1.0
    } else {
        0.0
    }
}

/// `start` written into C (rows in parallel) for a product that cannot begin from it, and
/// the start that product then has: [`Start::C`], or [`Start::Zero`] unchanged.
fn written<'s>(start: Start<'_>, c: &mut MatMut<'_>) -> Start<'s> {
    match start {
        Start::Zero => Start::Zero,
        Start::C => Start::C,
        Start::Bias(bias) => {
            fill_rows(bias, c);
            Start::C
        }
        Start::Residual(x, bias) => {
            residual_rows(x, bias, false, c);
            Start::C
        }
    }
}

/// Every row of C set to (`add` false) or incremented by (`add` true, in the order
/// `(c + x) + bias`) its row of x plus `bias`, in one pass, rows in parallel; x's rows are read
/// in place where they are contiguous.
pub(crate) fn residual_rows(x: MatRef<'_>, bias: &[f32], add: bool, c: &mut MatMut<'_>) {
    let (rows, cols, ld) = (c.rows(), c.cols(), c.ld());
    if rows == 0 || cols == 0 {
        return;
    }
    let block = row_block(rows, 64);
    c.data_mut()[..(rows - 1) * ld + cols].par_chunks_mut(block * ld).enumerate().for_each(|(b, chunk)| {
        let mut copy = Vec::new();
        for (r, dst) in chunk.chunks_mut(ld).enumerate() {
            let terms = dst[..cols].iter_mut().zip(x.row_or_copy(b * block + r, &mut copy)).zip(bias);
            match add {
                true => terms.for_each(|((d, &x), &b)| *d = *d + x + b),
                false => terms.for_each(|((d, &x), &b)| *d = x + b),
            }
        }
    });
}

/// Every row of C set to `row`, rows in parallel.
pub(crate) fn fill_rows(row: &[f32], c: &mut MatMut<'_>) {
    let (rows, cols, ld) = (c.rows(), c.cols(), c.ld());
    if rows == 0 || cols == 0 {
        return;
    }
    c.data_mut()[..(rows - 1) * ld + cols].par_chunks_mut(row_block(rows, 64) * ld).for_each(|block| {
        block.chunks_mut(ld).for_each(|dst| dst[..cols].copy_from_slice(row));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::views::naive_product;

    #[test]
    fn gemm_matches_naive_on_awkward_sizes_and_strides() {
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (13, 1, 9), (17, 33, 2), (70, 40, 90), (300, 64, 50)] {
            // Integer-valued entries make the sums exact.
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
            let a = MatRef::new(&a, 0, m, k, k);
            // B stored transposed, read through strides.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let bv = MatRef::new(&bt, 0, n, k, k).t();
            let want = naive_product(a, bv);
            for parallel in [false, true] {
                // NaN pre-fill proves β = 0 overwrites everything; padding proves nothing past
                // each row is touched.
                let ld = n + 3;
                let mut c = vec![f32::NAN; m * ld];
                let mut cm = MatMut::new(&mut c, m, n, ld);
                if parallel {
                    par_gemm(1.0, a, bv, 0.0, &mut cm);
                } else {
                    gemm(1.0, a, bv, 0.0, &mut cm);
                }
                for i in 0..m {
                    for j in 0..ld {
                        let got = c[i * ld + j];
                        if j < n {
                            assert_eq!(got as f64, want[i * n + j], "({m},{k},{n}) at ({i},{j})");
                        } else {
                            assert!(got.is_nan(), "padding written at ({i},{j})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_on_tiles_scale_accumulate_and_split() {
        // α·A·B + C with B strided: bf16 operands within bf16 rounding, the split within
        // ~2^-16; off AMX the call declines and leaves C alone.
        let (m, k, n) = (70, 300, 45);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 13) as f32 * 0.07 - 0.4).collect();
        let (a, b) = (MatRef::new(&a, 0, m, k, k), MatRef::new(&bt, 0, n, k, k).t());
        let want = naive_product(a, b);
        let norm: f64 = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        for (near_f32, tol) in [(false, 2e-2), (true, 2e-5)] {
            let mut c = vec![1.0f32; m * n];
            let ran =
                par_gemm_on_tiles(near_f32, 0.5, a, b, 1.0, &mut MatMut::new(&mut c, m, n, n), &Workspace::default());
            assert_eq!(ran, bf16_on_tiles());
            if !ran {
                assert!(c.iter().all(|&v| v == 1.0));
                continue;
            }
            for (i, (&got, &w)) in c.iter().zip(&want).enumerate() {
                assert!((got as f64 - (1.0 + 0.5 * w)).abs() < tol * norm, "near_f32={near_f32} [{i}]: {got} vs {w}");
            }
        }
    }

    #[test]
    fn par_gemm_writes_only_the_rows_of_c_in_a_longer_buffer() {
        let (m, k, n) = (300, 40, 50);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
        let (a, b) = (MatRef::new(&a, 0, m, k, k), MatRef::new(&b, 0, k, n, n));
        let mut c = vec![f32::NAN; (m + 500) * n];
        par_gemm(1.0, a, b, 0.0, &mut MatMut::new(&mut c, m, n, n));
        assert_eq!(c[..m * n].iter().map(|&v| v as f64).collect::<Vec<_>>(), naive_product(a, b));
        assert!(c[m * n..].iter().all(|v| v.is_nan()), "written past the view");
    }

    #[test]
    fn views_whose_extent_overflows_are_refused() {
        let data = [0.0f32; 4];
        let mut out = [0.0f32; 4];
        type Build = Box<dyn Fn() + std::panic::RefUnwindSafe>;
        let cases: Vec<(&str, Build)> = vec![
            ("row stride usize::MAX", Box::new(move || _ = MatRef::new(&data, 0, 2, 2, usize::MAX))),
            ("row stride past isize", Box::new(move || _ = MatRef::new(&data, 0, 1, 1, isize::MAX as usize + 1))),
            ("rows·ld overflowing", Box::new(move || _ = MatRef::new(&data, 0, usize::MAX / 2, 1, 3))),
            ("offset overflowing", Box::new(move || _ = MatRef::new(&data, usize::MAX, 1, 2, 2))),
            ("empty view past the end", Box::new(move || _ = MatRef::new(&data, 5, 0, 2, 2))),
            ("mut row stride usize::MAX", Box::new(move || _ = MatMut::new(&mut out.clone(), 2, 2, usize::MAX))),
            ("mut rows·ld overflowing", Box::new(move || _ = MatMut::new(&mut out.clone(), usize::MAX / 2, 1, 3))),
        ];
        for (what, build) in cases {
            assert!(std::panic::catch_unwind(&*build).is_err(), "{what}: accepted");
        }
        // The largest views that fit are accepted.
        assert_eq!(MatRef::new(&data, 0, 2, 2, 2).at(1, 1), 0.0);
        assert_eq!(MatRef::new(&data, 4, 0, 3, 3).rows(), 0);
        assert_eq!(MatMut::new(&mut out, 1, 4, 4).rows(), 1);
    }

    #[test]
    fn prepacked_products_match_the_reference_on_every_path() {
        // Above SMALL_PRODUCT with several depth blocks and row blocks: on AVX-512 the packed
        // kernel with B packed ahead, elsewhere matrixmultiply; both against the f64 product,
        // with β = 0 over NaN and β = 1 over ones, A row-major and transposed (strided rows).
        let (m, k, n) = (301, 517, 71);
        let a_rows: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let a_cols: Vec<f32> = (0..m * k).map(|i| a_rows[(i % m) * k + i / m]).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
        // B = Wᵀ, as the layers' weights are used.
        let b = MatRef::new(&w, 0, n, k, k).t();
        let packed = PrepackedB::new(b, Precision::F32);
        let ws = Workspace::default();
        for a in [MatRef::new(&a_rows, 0, m, k, k), MatRef::new(&a_cols, 0, k, m, m).t()] {
            let want = naive_product(a, b);
            for beta in [0.0f32, 1.0] {
                let mut c = vec![if beta == 0.0 { f32::NAN } else { 1.0 }; m * n];
                par_gemm_prepacked(Precision::F32, a, (b, &packed), beta, &mut MatMut::new(&mut c, m, n, n), &ws);
                for (i, (&g, &w)) in c.iter().zip(&want).enumerate() {
                    // Integer-valued operands: the sums are exact.
                    assert_eq!(g as f64, w + beta as f64, "β {beta} at {i}");
                }
            }
        }
    }

    /// Σ_k r(a_ik)·r(b_kj) in f64 with r the bf16 rounding, and Σ |terms| (for the bound).
    fn rounded_product(a: MatRef<'_>, b: MatRef<'_>) -> Vec<(f64, f64)> {
        let r = |x: f32| round_to_bf16(x) as f64;
        let mut out = Vec::new();
        for i in 0..a.rows() {
            for j in 0..b.cols() {
                out.push((0..a.cols()).fold((0.0, 0.0), |(s, m), k| {
                    let p = r(a.at(i, k)) * r(b.at(k, j));
                    (s + p, m + p.abs())
                }));
            }
        }
        out
    }

    #[test]
    fn bf16_products_of_every_entry_point_are_the_products_of_the_rounded_operands() {
        let (m, k, n) = (301, 517, 71);
        let a: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.618).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.377).cos()).collect();
        let (a, b) = (MatRef::new(&a, 0, m, k, k), MatRef::new(&w, 0, n, k, k).t());
        let want = rounded_product(a, b);
        let check = |c: &[f32], offset: f32, scale: f32, what: &str| {
            for (i, (&g, &(exact, magnitude))) in c.iter().zip(&want).enumerate() {
                let bound = (k as f64 * f32::EPSILON as f64 * magnitude + 1e-6) * scale.abs() as f64;
                let w = exact * scale as f64 + offset as f64;
                assert!((g as f64 - w).abs() <= bound + 1e-6, "{what} at {i}: {g} vs {w}");
            }
        };
        let ws = Workspace::default();
        let packed = PrepackedB::new(b, Precision::Bf16);
        for beta in [0.0f32, 1.0] {
            let start = if beta == 0.0 { f32::NAN } else { 1.0 };
            let mut c = vec![start; m * n];
            par_gemm_prepacked(Precision::Bf16, a, (b, &packed), beta, &mut MatMut::new(&mut c, m, n, n), &ws);
            check(&c, beta, 1.0, &format!("prepacked β {beta}"));
            let mut c2 = vec![start; m * n];
            par_gemm_in(Precision::Bf16, 1.0, a, b, beta, &mut MatMut::new(&mut c2, m, n, n));
            assert_eq!(c, c2, "packed ahead or on the call: the same bits");
        }
        let mut c = vec![f32::NAN; m * n];
        par_gemm_in(Precision::Bf16, 0.25, a, b, 0.0, &mut MatMut::new(&mut c, m, n, n));
        check(&c, 0.0, 0.25, "α 0.25");
        // The portable path: the same rounding points through matrixmultiply.
        let rounded_b: Vec<f32> = (0..k * n).map(|i| round_to_bf16(b.at(i / n, i % n))).collect();
        let mut c = vec![f32::NAN; m * n];
        rounded_gemm(a, MatRef::new(&rounded_b, 0, k, n, n), false, &mut MatMut::new(&mut c, m, n, n));
        check(&c, 0.0, 1.0, "portable");
        // An f32 product on a bf16 packing is the f32 product (packed on the call).
        let mut c32 = vec![f32::NAN; m * n];
        par_gemm_prepacked(Precision::F32, a, (b, &packed), 0.0, &mut MatMut::new(&mut c32, m, n, n), &ws);
        let mut direct = vec![f32::NAN; m * n];
        par_gemm(1.0, a, b, 0.0, &mut MatMut::new(&mut direct, m, n, n));
        assert_eq!(c32, direct);
    }

    #[test]
    fn products_from_a_bias_or_residual_start_have_the_bits_of_that_start_written_into_c() {
        // Above SMALL_PRODUCT with several depth, row and column blocks; a residual with rows
        // in place and one stored transposed (strided rows, written into C first).
        let (m, k, n) = (301, 517, 300);
        let a: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.618).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.377).cos()).collect();
        let x: Vec<f32> = (0..m * n).map(|i| ((i as f32) * 0.123).sin() * 3.0).collect();
        let x_t: Vec<f32> = (0..m * n).map(|i| x[(i % m) * n + i / m]).collect();
        let bias: Vec<f32> = (0..n).map(|j| (j as f32 * 0.7).cos()).collect();
        let (a, b) = (MatRef::new(&a, 0, m, k, k), MatRef::new(&w, 0, n, k, k).t());
        let x_rows = MatRef::new(&x, 0, m, n, n);
        let x_strided = MatRef::new(&x_t, 0, n, m, m).t();
        let product: Vec<f64> = naive_product(a, b);
        let ws = Workspace::default();
        for precision in [Precision::F32, Precision::Bf16] {
            let packed = PrepackedB::new(b, precision);
            let starts = [
                ("bias", Start::Bias(&bias)),
                ("residual", Start::Residual(x_rows, &bias)),
                ("strided residual", Start::Residual(x_strided, &bias)),
            ];
            for (what, start) in starts {
                let mut got = vec![f32::NAN; m * n];
                par_gemm_prepacked_from(precision, a, (b, &packed), start, &mut MatMut::new(&mut got, m, n, n), &ws);
                let mut want = vec![f32::NAN; m * n];
                assert!(written(start, &mut MatMut::new(&mut want, m, n, n)).accumulates());
                par_gemm_prepacked(precision, a, (b, &packed), 1.0, &mut MatMut::new(&mut want, m, n, n), &ws);
                assert_eq!(got, want, "{precision:?} {what}: the bits of the start written first");
                if precision == Precision::F32 {
                    let mut unpacked = vec![f32::NAN; m * n];
                    par_gemm_from(a, b, start, &mut MatMut::new(&mut unpacked, m, n, n), &ws);
                    assert_eq!(unpacked, want, "{what}: B packed on the call");
                }
                // And the values: start + A·B (bf16: within the rounding of the operands).
                let tolerance = if precision == Precision::F32 { 1e-3 } else { 0.2 };
                for (i, (&g, &p)) in got.iter().zip(&product).enumerate() {
                    let (r, j) = (i / n, i % n);
                    let under = if what == "bias" { 0.0 } else { x[r * n + j] as f64 };
                    let exact = p + under + bias[j] as f64;
                    assert!((g as f64 - exact).abs() <= tolerance, "{precision:?} {what} at {i}: {g} vs {exact}");
                }
            }
        }
    }
}
