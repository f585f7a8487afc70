//! Attention maps: the normalised weights `f(x_i, x_j)/C(x)` for all queries or chosen ones.

use ndarray::{Array3, ArrayBase, ArrayView5, Data, Dimension};

use super::forward::sample_matrix;
use super::{buffer, Layout, NonLocalBlock};
use crate::config::Mode;
use crate::error::{Error, Result};
use crate::kernels::exp::{exp_sum, row_max};
use crate::kernels::gemm::gemm;
use crate::kernels::views::{MatMut, MatRef};
use crate::plan::{prepare, Prepared, Purpose};

impl NonLocalBlock {
    /// The normalised attention weights `f(x_i, x_j)/C(x)` of clips `x` (B, T, H, W, C) for
    /// every query i and key j: shape (B, N, M), what PyTorch's `return_nl_map` gives. This
    /// is N·M numbers per sample: for large inputs ask for chosen queries with
    /// [`NonLocalBlock::attention_rows`]. Image maps (B, H, W, C) are clips of one frame,
    /// `x.insert_axis(Axis(1))`; sequences (B, L, C) clips of one row,
    /// `x.insert_axis(Axis(1)).insert_axis(Axis(1))`.
    ///
    /// # Errors
    /// As [`NonLocalBlock::forward`]; [`Error::TooLarge`] when B·N·M does not fit.
    pub fn attention<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array3<f32>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let x5 = self.check_input(x.view().into_dyn(), Layout::Clips)?;
        let n = x5.shape()[1] * x5.shape()[2] * x5.shape()[3];
        let all: Vec<usize> = (0..n).collect();
        self.attention_rows_checked(x5, &all)
    }

    /// The attention weights of the chosen query positions of clips `x` (B, T, H, W, C) only:
    /// shape (B, queries.len(), M), row r holding query `queries[r]` (an index into the
    /// N = T·H·W positions in (t, h, w) row-major order, see [`NonLocalBlock::query_index`];
    /// column j is the key at [`NonLocalBlock::key_position`], standing for the input region
    /// [`NonLocalBlock::key_region`]). Costs the projections plus O(len·M·C').
    ///
    /// ```
    /// use ndarray::{s, Array4, Axis};
    /// use nonlocal::{NonLocalBlock, NonLocalConfig};
    ///
    /// let block = NonLocalBlock::new(NonLocalConfig::new(4).conv_dims(2))?;
    /// let images = Array4::<f32>::from_shape_fn((1, 6, 8, 4), |(_, h, w, c)| ((h * w + c) % 5) as f32);
    /// let grid = [1, 6, 8]; // an image map is a clip of one frame
    /// let query = block.query_index(grid, [0, 2, 3])?;
    /// let rows = block.attention_rows(&images.view().insert_axis(Axis(1)), &[query])?;
    /// let row = rows.slice(s![0, 0, ..]);
    /// let best = (0..row.len()).fold(0, |best, j| if row[j] > row[best] { j } else { best });
    /// // The strongest key stands for a 2x2 window of the image.
    /// let [t, h, w] = block.key_region(grid, best)?;
    /// assert_eq!((t.len(), h.len(), w.len()), (1, 2, 2));
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`NonLocalBlock::forward`]; [`Error::QueryOutOfRange`] for an index ≥ N.
    pub fn attention_rows<S, D>(&self, x: &ArrayBase<S, D>, queries: &[usize]) -> Result<Array3<f32>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let x5 = self.check_input(x.view().into_dyn(), Layout::Clips)?;
        self.attention_rows_checked(x5, queries)
    }

    fn attention_rows_checked(&self, x5: ArrayView5<'_, f32>, queries: &[usize]) -> Result<Array3<f32>> {
        let (b, t, h, w, _) = x5.dim();
        let n = t * h * w;
        if let Some(&index) = queries.iter().find(|&&q| q >= n) {
            return Err(Error::QueryOutOfRange { index, positions: n });
        }
        let m: usize = self.key_grid([t, h, w]).iter().product();
        let per_sample = queries.len().checked_mul(m).ok_or(Error::TooLarge { what: "attention map" })?;
        let mut out =
            buffer(b.checked_mul(per_sample).ok_or(Error::TooLarge { what: "attention map" })?, "attention map")?;
        for (sample, out_sample) in x5.outer_iter().zip(out.chunks_mut(per_sample.max(1))) {
            let mut copy = Vec::new();
            let x = sample_matrix(sample, &mut copy);
            let prepared = prepare(&self.config, &self.compiled, &self.workspace, (x, [t, h, w]), Purpose::Exact)?;
            self.attention_for(&prepared, queries, out_sample);
        }
        Ok(Array3::from_shape_vec((b, queries.len(), m), out).expect("sized above"))
    }

    /// Attention weights of chosen queries for one sample into `out` (len × M).
    fn attention_for(&self, p: &Prepared<'_>, queries: &[usize], out: &mut [f32]) {
        let m = p.m;
        if self.config.mode == Mode::Concatenation {
            let a = p.concat_a();
            let b = p.concat_b(&self.compiled.w_phi);
            for (row, &i) in out.chunks_mut(m).zip(queries) {
                let ai = a.at(i, 0);
                for (o, &bj) in row.iter_mut().zip(&b) {
                    *o = (ai + bj).max(0.0) / m as f32;
                }
            }
            return;
        }
        let q = p.queries();
        let d = q.cols();
        let mut selected = vec![0.0f32; queries.len() * d];
        for (row, &i) in selected.chunks_mut(d).zip(queries) {
            q.copy_row(i, row);
        }
        let sel = MatRef::new(&selected, 0, queries.len(), d, d);
        gemm(1.0, sel, p.keys().t(), 0.0, &mut MatMut::new(out, queries.len(), m, m));
        for row in out.chunks_mut(m) {
            if self.config.mode.is_softmax() {
                let scale = self.config.logit_scale();
                let max = row_max(row);
                let total = exp_sum(row, scale, scale * max);
                row.iter_mut().for_each(|v| *v /= total);
            } else {
                row.iter_mut().for_each(|v| *v /= m as f32);
            }
        }
    }
}
