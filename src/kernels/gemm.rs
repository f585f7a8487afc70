//! The GEMM entry points, `C ← α·A·B + β·C`: which kernel runs a product.
//!
//! Large products run on the packed AVX-512 kernel of `packed_gemm` where [`isa`] chose
//! AVX-512 (about 1.2× matrixmultiply's AVX-512 sgemm there), else on matrixmultiply's sgemm,
//! one thread per call, with rayon over row blocks of C. An operand used many times (a
//! layer's weights) can be packed once ahead ([`PrepackedB`]).
//!
//! matrixmultiply's own threading is deliberately not used: inside rayon tasks it would start
//! more threads than there are cores. Each element of C is the same k-ordered sum whichever
//! row block it falls in, so splitting rows by thread count does not change any bit.

use rayon::prelude::*;

use super::packed_gemm::PackedB;
use super::simd::{isa, Isa};
#[cfg(target_arch = "x86_64")]
use super::tiles::{AVX512_MR, AVX512_NV};
use super::views::{MatMut, MatRef};
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
    assert_eq!((a.rows(), a.cols(), b.cols()), (c.rows(), b.rows(), c.cols()), "par_gemm: shapes");
    // Small products are not worth the fork.
    if c.rows() * c.cols() * a.cols() < SMALL_PRODUCT {
        return gemm(alpha, a, b, beta, c);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = avx512_gemm(beta) {
        let packed = PackedB::new(b, AVX512_NV * 16, alpha);
        let ws = Workspace::default();
        return super::packed_gemm::gemm_packed::<_, AVX512_MR, AVX512_NV>(simd, a, &packed, beta == 1.0, c, &ws);
    }
    sgemm_row_blocks(alpha, a, b, beta, c);
}

/// The AVX-512 token when that path runs and β is one the packed kernel takes (0 or 1).
#[cfg(target_arch = "x86_64")]
fn avx512_gemm(beta: f32) -> Option<super::simd::Avx512> {
    (isa() == Isa::Avx512 && (beta == 0.0 || beta == 1.0)).then(super::simd::Avx512::detect).flatten()
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

/// B (K × N) packed once ahead of many products `A·B` for the GEMM path this process runs
/// (the packed AVX-512 kernel), or nothing on paths whose GEMMs pack on every call.
#[derive(Clone, Debug)]
pub(crate) struct PrepackedB {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    packed: Option<PackedB>,
    rows: usize,
    cols: usize,
}

impl PrepackedB {
    /// Packs `b` when the chosen path packs its operands.
    pub(crate) fn new(b: MatRef<'_>) -> PrepackedB {
        #[allow(unused_mut)]
        let mut packed = None;
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx512 && b.rows() > 0 && b.cols() > 0 {
            packed = Some(PackedB::new(b, AVX512_NV * 16, 1.0));
        }
        PrepackedB { packed, rows: b.rows(), cols: b.cols() }
    }
}

/// `C ← A·B + β·C` (β 0 or 1) with B given both as a view and packed ahead
/// ([`PrepackedB::new`] of the same `b`), rows of C in parallel, scratch from `ws`.
///
/// # Panics
/// If the dimensions disagree, or `packed` was made from a matrix of another shape.
pub(crate) fn par_gemm_prepacked(
    a: MatRef<'_>,
    (b, packed): (MatRef<'_>, &PrepackedB),
    beta: f32,
    c: &mut MatMut<'_>,
    ws: &Workspace,
) {
    assert_eq!((packed.rows, packed.cols), (b.rows(), b.cols()), "par_gemm_prepacked: B and its packing");
    #[cfg(target_arch = "x86_64")]
    if let (Some(packed), Some(simd)) = (&packed.packed, avx512_gemm(beta)) {
        if c.rows() * c.cols() * a.cols() >= SMALL_PRODUCT {
            return super::packed_gemm::gemm_packed::<_, AVX512_MR, AVX512_NV>(simd, a, packed, beta == 1.0, c, ws);
        }
    }
    par_gemm(1.0, a, b, beta, c);
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
        let packed = PrepackedB::new(b);
        let ws = Workspace::default();
        for a in [MatRef::new(&a_rows, 0, m, k, k), MatRef::new(&a_cols, 0, k, m, m).t()] {
            let want = naive_product(a, b);
            for beta in [0.0f32, 1.0] {
                let mut c = vec![if beta == 0.0 { f32::NAN } else { 1.0 }; m * n];
                par_gemm_prepacked(a, (b, &packed), beta, &mut MatMut::new(&mut c, m, n, n), &ws);
                for (i, (&g, &w)) in c.iter().zip(&want).enumerate() {
                    // Integer-valued operands: the sums are exact.
                    assert_eq!(g as f64, w + beta as f64, "β {beta} at {i}");
                }
            }
        }
    }
}
