//! Matrix views and the GEMM entry points: `C ← α·A·B + β·C`.
//!
//! Large products run on the packed AVX-512 kernel of `packed_gemm`
//! where [`isa`] chose AVX-512 (about 1.2× matrixmultiply's AVX-512 sgemm there), else on
//! matrixmultiply's sgemm, one thread per call, with rayon over row blocks of C.
//! Layer weights are `Weights`: packed once for the AVX-512 kernel when they are set.
//!
//! matrixmultiply's own threading is deliberately not used: inside rayon tasks it would start
//! more threads than there are cores. Each element of C is the same k-ordered sum whichever
//! row block it falls in, so splitting rows by thread count does not change any bit.

use std::marker::PhantomData;

use rayon::prelude::*;

use super::packed_gemm::PackedB;
use super::simd::{isa, Isa};
#[cfg(target_arch = "x86_64")]
use super::tiles::{AVX512_MR, AVX512_NV};

/// A read-only strided matrix view: element (i, j) is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
    _data: PhantomData<&'a [f32]>,
}

// SAFETY: a `MatRef` is a shared borrow of f32 data, like `&[f32]`.
unsafe impl Send for MatRef<'_> {}
// SAFETY: as above.
unsafe impl Sync for MatRef<'_> {}

impl<'a> MatRef<'a> {
    /// A row-major view of `rows × cols` elements of `data` starting at `offset`, rows `ld`
    /// apart.
    ///
    /// # Panics
    /// If the view does not fit in `data` or `ld` does not fit `isize` (an internal error);
    /// the arithmetic is checked, so no overflow can make a view that does not fit look as if
    /// it did.
    pub fn new(data: &'a [f32], offset: usize, rows: usize, cols: usize, ld: usize) -> Self {
        assert!(ld <= isize::MAX as usize, "MatRef: row stride {ld} does not fit isize");
        if rows > 0 && cols > 0 {
            let end = view_end(offset, rows, cols, ld);
            assert!(
                end.is_some_and(|end| end <= data.len()),
                "MatRef out of bounds: {rows}×{cols} rows {ld} apart from {offset} in {}",
                data.len()
            );
        } else {
            assert!(offset <= data.len(), "MatRef out of bounds: offset {offset} in {}", data.len());
        }
        MatRef { ptr: data.as_ptr().wrapping_add(offset), rows, cols, rs: ld as isize, cs: 1, _data: PhantomData }
    }

    /// A view of a 2-d ndarray view, with its strides.
    pub fn from_view(view: &ndarray::ArrayView2<'a, f32>) -> Self {
        let s = view.strides();
        MatRef { ptr: view.as_ptr(), rows: view.nrows(), cols: view.ncols(), rs: s[0], cs: s[1], _data: PhantomData }
    }

    /// A view from raw parts.
    ///
    /// # Safety
    /// Every element (i, j) with i < rows, j < cols at `ptr + i·rs + j·cs` must be readable
    /// for `'a`.
    pub unsafe fn from_raw(ptr: *const f32, rows: usize, cols: usize, rs: isize, cs: isize) -> Self {
        MatRef { ptr, rows, cols, rs, cs, _data: PhantomData }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Pointer to element (0, 0).
    pub fn as_ptr(&self) -> *const f32 {
        self.ptr
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// Rows `start..end`.
    pub fn rows_range(self, start: usize, end: usize) -> Self {
        assert!(start <= end && end <= self.rows);
        MatRef { ptr: self.ptr.wrapping_offset(start as isize * self.rs), rows: end - start, ..self }
    }

    /// Columns `start..end`.
    pub fn cols_range(self, start: usize, end: usize) -> Self {
        assert!(start <= end && end <= self.cols);
        MatRef { ptr: self.ptr.wrapping_offset(start as isize * self.cs), cols: end - start, ..self }
    }

    /// Element (i, j).
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        assert!(i < self.rows && j < self.cols);
        // SAFETY: in bounds, checked above; the constructor guarantees readability.
        unsafe { *self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
    }

    /// Row `i` as a slice, when columns are contiguous.
    #[inline]
    pub fn row(&self, i: usize) -> Option<&'a [f32]> {
        assert!(i < self.rows);
        if self.cols == 0 {
            // No element, so no pointer arithmetic: an empty view may sit anywhere.
            return Some(&[]);
        }
        (self.cs == 1 || self.cols == 1).then(|| {
            // SAFETY: `cols` contiguous readable elements start at row i.
            unsafe { std::slice::from_raw_parts(self.ptr.offset(i as isize * self.rs), self.cols) }
        })
    }

    /// Column `j` as a slice, when rows are contiguous (a transposed row-major matrix).
    #[inline]
    pub fn col(&self, j: usize) -> Option<&'a [f32]> {
        self.t().row(j)
    }

    /// Copies row `i` into `out` (length `cols`).
    #[inline]
    pub fn copy_row(&self, i: usize, out: &mut [f32]) {
        match self.row(i) {
            Some(r) => out.copy_from_slice(r),
            None => out.iter_mut().enumerate().for_each(|(j, o)| *o = self.at(i, j)),
        }
    }
}

/// A mutable row-major matrix over a slice: element (i, j) at `data[i·ld + j]`.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    ld: usize,
}

impl<'a> MatMut<'a> {
    /// A `rows × cols` view of `data`, rows `ld` apart.
    ///
    /// # Panics
    /// If the view does not fit in `data`, `ld < cols` or `ld` does not fit `isize` (an
    /// internal error); the arithmetic is checked.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, ld: usize) -> Self {
        assert!(ld >= cols && ld <= isize::MAX as usize, "MatMut: row stride {ld} for {cols} columns");
        if rows > 0 && cols > 0 {
            let end = view_end(0, rows, cols, ld);
            assert!(
                end.is_some_and(|end| end <= data.len()),
                "MatMut out of bounds: {rows}×{cols} rows {ld} apart in {}",
                data.len()
            );
        }
        MatMut { data, rows, cols, ld }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Distance between rows.
    pub fn ld(&self) -> usize {
        self.ld
    }

    /// The underlying slice.
    pub fn data_mut(&mut self) -> &mut [f32] {
        self.data
    }
}

/// One past the last element of a `rows × cols` view (rows, cols ≥ 1) at `offset`, rows `ld`
/// apart, or None when that overflows.
fn view_end(offset: usize, rows: usize, cols: usize, ld: usize) -> Option<usize> {
    (rows - 1).checked_mul(ld)?.checked_add(cols)?.checked_add(offset)
}

/// `C ← α·A·B + β·C` on one thread. With β = 0, C is only written (NaN in it is ignored).
///
/// # Panics
/// If the dimensions do not agree (an internal error).
pub fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: &mut MatMut<'_>) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions");
    assert_eq!((a.rows, b.cols), (c.rows, c.cols), "gemm: output shape");
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    if a.cols == 0 {
        // matrixmultiply scales C by β in this case too, but be explicit.
        for i in 0..c.rows {
            for v in &mut c.data[i * c.ld..i * c.ld + c.cols] {
                *v = if beta == 0.0 { 0.0 } else { *v * beta };
            }
        }
        return;
    }
    // SAFETY: A and B are readable over their dimensions (their constructors check it); C is
    // an exclusive borrow covering rows × cols with row stride ld (checked in `MatMut::new`).
    unsafe {
        matrixmultiply::sgemm(
            a.rows,
            a.cols,
            b.cols,
            alpha,
            a.ptr,
            a.rs,
            a.cs,
            b.ptr,
            b.rs,
            b.cs,
            beta,
            c.data.as_mut_ptr(),
            c.ld as isize,
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
    assert_eq!((a.rows, a.cols, b.cols), (c.rows, b.rows, c.cols), "par_gemm: shapes");
    // Small products are not worth the fork.
    if c.rows * c.cols * a.cols < SMALL_PRODUCT {
        return gemm(alpha, a, b, beta, c);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = avx512_gemm(beta) {
        let packed = PackedB::new(b, AVX512_NV * 16, alpha);
        return super::packed_gemm::gemm_packed::<_, AVX512_MR, AVX512_NV>(simd, a, &packed, beta == 1.0, c);
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
    let block = c.rows.div_ceil(threads).next_multiple_of(8).max(32);
    let (rows, cols, ld) = (c.rows, c.cols, c.ld);
    c.data.par_chunks_mut(block * ld).enumerate().for_each(|(i, chunk)| {
        let start = i * block;
        let end = (start + block).min(rows);
        if start >= end {
            return;
        }
        let mut c_block = MatMut::new(chunk, end - start, cols, ld);
        gemm(alpha, a.rows_range(start, end), b, beta, &mut c_block);
    });
}

/// A layer's weights W (`out × in`, row-major), used as the right-hand operand of `X·Wᵀ` many
/// times: packed once for the AVX-512 GEMM kernel when that path runs.
#[derive(Clone, Debug)]
pub(crate) struct Weights {
    data: Vec<f32>,
    out: usize,
    inp: usize,
    /// Wᵀ packed for the AVX-512 kernel, when [`isa`] chose it.
    packed_t: Option<PackedB>,
}

impl Weights {
    /// W from `data` (`out × in`, row-major).
    ///
    /// # Panics
    /// If `data` does not hold `out × in` floats.
    pub(crate) fn new(data: Vec<f32>, out: usize, inp: usize) -> Weights {
        assert_eq!(Some(data.len()), out.checked_mul(inp), "Weights: {out}×{inp}");
        #[allow(unused_mut)]
        let mut w = Weights { data, out, inp, packed_t: None };
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx512 && out > 0 && inp > 0 {
            w.packed_t = Some(PackedB::new(w.view().t(), AVX512_NV * 16, 1.0));
        }
        w
    }

    /// W as a view (`out × in`).
    pub(crate) fn view(&self) -> MatRef<'_> {
        MatRef::new(&self.data, 0, self.out, self.inp, self.inp)
    }

    /// `C ← X·Wᵀ + β·C` (β 0 or 1), rows of C in parallel.
    pub(crate) fn apply(&self, x: MatRef<'_>, beta: f32, c: &mut MatMut<'_>) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(packed), Some(simd)) = (&self.packed_t, avx512_gemm(beta)) {
            debug_assert_eq!((packed.rows(), packed.cols(), packed.tile_width()), (self.inp, self.out, AVX512_NV * 16));
            if c.rows * c.cols * x.cols >= SMALL_PRODUCT {
                return super::packed_gemm::gemm_packed::<_, AVX512_MR, AVX512_NV>(simd, x, packed, beta == 1.0, c);
            }
        }
        par_gemm(1.0, x, self.view().t(), beta, c);
    }
}

/// `A·B` in f64, straight from the definition (row-major), for the GEMM tests.
#[cfg(test)]
pub(crate) fn naive_product(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f64> {
    let mut out = vec![0.0; a.rows() * b.cols()];
    for i in 0..a.rows() {
        for j in 0..b.cols() {
            out[i * b.cols() + j] = (0..a.cols()).map(|k| a.at(i, k) as f64 * b.at(k, j) as f64).sum();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
