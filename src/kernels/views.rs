//! Strided matrix views over f32 data: [`MatRef`] (read-only, any strides) and [`MatMut`]
//! (row-major, mutable), and what a product's sums start from (`Start`: zero, C, a bias row
//! or a residual). Every kernel and driver takes these; they import nothing.

use std::marker::PhantomData;

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

    /// Distance between rows, in elements.
    pub fn row_stride(&self) -> isize {
        self.rs
    }

    /// Distance between columns, in elements.
    pub fn col_stride(&self) -> isize {
        self.cs
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

    /// Row `i`: in place where it is contiguous, else copied into `scratch` (resized to
    /// `cols`).
    #[inline]
    pub(crate) fn row_or_copy<'s>(self, i: usize, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        match self.row(i) {
            Some(row) => row,
            None => {
                scratch.resize(self.cols, 0.0);
                self.copy_row(i, scratch);
                scratch
            }
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

/// What a product's sums start from: `C ← start + A·B`. Kernels that can begin their first
/// depth block from it do (C is then written once); the others have it written into C first
/// and accumulate onto it, with the same bits: `start + Σ` either way.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Start<'a> {
    /// `C ← A·B`.
    Zero,
    /// `C ← C + A·B`.
    C,
    /// One row (N floats) under every row: `C ← 1·biasᵀ + A·B`.
    Bias(&'a [f32]),
    /// A matrix of C's shape plus a row, added in that order: `C ← (x + 1·biasᵀ) + A·B` (the
    /// block's residual and folded bias under its output projection).
    Residual(MatRef<'a>, &'a [f32]),
}

impl<'a> Start<'a> {
    /// `β·C` for β 0 or 1.
    ///
    /// # Panics
    /// For any other β.
    pub(crate) fn beta(beta: f32) -> Start<'a> {
        match beta {
            0.0 => Start::Zero,
            1.0 => Start::C,
            _ => panic!("Start::beta: β is 0 or 1, not {beta}"),
        }
    }

    /// The start of C's rows `from..to`.
    pub(crate) fn rows(self, from: usize, to: usize) -> Start<'a> {
        match self {
            Start::Residual(x, bias) => Start::Residual(x.rows_range(from, to), bias),
            other => other,
        }
    }

    /// The start of C's columns `from..to`.
    pub(crate) fn columns(self, from: usize, to: usize) -> Start<'a> {
        match self {
            Start::Bias(bias) => Start::Bias(&bias[from..to]),
            Start::Residual(x, bias) => Start::Residual(x.cols_range(from, to), &bias[from..to]),
            other => other,
        }
    }

    /// Whether the product adds to what C holds (every start but [`Start::Zero`], once it
    /// has been written into C).
    pub(crate) fn accumulates(self) -> bool {
        !matches!(self, Start::Zero)
    }

    /// Row `i`'s start for columns `cols` added under `c` (`c ← start + c`), for a product
    /// that began from zero; nothing for [`Start::Zero`] and [`Start::C`].
    ///
    /// # Panics
    /// If a residual's row `i` is not contiguous (kernels check [`Start::in_place`] first).
    #[inline(always)]
    pub(crate) fn add_under(self, i: usize, cols: std::ops::Range<usize>, c: &mut [f32]) {
        match self {
            Start::Zero | Start::C => {}
            Start::Bias(bias) => c.iter_mut().zip(&bias[cols]).for_each(|(c, &b)| *c += b),
            Start::Residual(x, bias) => {
                let row = &x.row(i).expect("Start::add_under: contiguous residual rows")[cols.clone()];
                c.iter_mut().zip(row).zip(&bias[cols]).for_each(|((c, &x), &b)| *c += x + b);
            }
        }
    }

    /// Whether [`Start::add_under`] can read every row in place (a residual's rows
    /// contiguous).
    pub(crate) fn in_place(self) -> bool {
        match self {
            Start::Residual(x, _) => x.rows() == 0 || x.row(0).is_some(),
            _ => true,
        }
    }
}

/// One past the last element of a `rows × cols` view (rows, cols ≥ 1) at `offset`, rows `ld`
/// apart, or None when that overflows.
fn view_end(offset: usize, rows: usize, cols: usize, ld: usize) -> Option<usize> {
    (rows - 1).checked_mul(ld)?.checked_add(cols)?.checked_add(offset)
}

#[cfg(test)]
/// `A·B` in f64, straight from the definition (row-major), for the GEMM tests.
pub(crate) fn naive_product(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f64> {
    let mut out = vec![0.0; a.rows() * b.cols()];
    for i in 0..a.rows() {
        for j in 0..b.cols() {
            out[i * b.cols() + j] = (0..a.cols()).map(|k| a.at(i, k) as f64 * b.at(k, j) as f64).sum();
        }
    }
    out
}
