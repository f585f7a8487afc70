//! The forward pass: the entry points per input layout, then one sample at a time, one
//! function per pairwise mode, each a few kernel calls on the plan's prepared operands.

use ndarray::{Array, Array5, ArrayBase, ArrayView4, ArrayView5, Data, DataMut, Dimension, Ix5};

use super::{buffer, Layout, NonLocalBlock};
use crate::config::{Mode, Precision};
use crate::error::{Error, Result};
use crate::kernels::attention::attention_in;
use crate::kernels::concat::concat_attention;
use crate::kernels::dot_product::key_value_product_in;
use crate::kernels::gemm::{
    beta_once_written, par_gemm, par_gemm_from, par_gemm_on_tiles, par_gemm_prepacked, residual_rows, PrepackedB,
};
use crate::kernels::transpose::{par_rows_transposed, write_transposed, Onto};
use crate::kernels::views::{MatMut, MatRef, Start};
use crate::plan::{prepare, Prepared, Purpose};

impl NonLocalBlock {
    /// Runs the block on a batch of clips.
    ///
    /// # Shapes
    /// - `x`: (B, T, H, W, C), channels last, any strides; rank 5 exactly (image maps go to
    ///   [`NonLocalBlock::forward_images`], sequences to [`NonLocalBlock::forward_sequences`]);
    /// - returns an array of the same shape, in standard (row-major) layout.
    ///
    /// A block whose [`NonLocalConfig::conv_dims`](crate::NonLocalConfig::conv_dims) is below
    /// 3 (PyTorch's `NonLocal2d` or `NonLocal1d`) attends over the last `conv_dims` of
    /// (T, H, W) only: T (and for `conv_dims` 1, H) must be 1.
    ///
    /// NaN or infinite values in `x` propagate: the outputs that depend on them are NaN or
    /// infinite (as in PyTorch, though the exact set of affected positions may differ);
    /// nothing panics or loops.
    ///
    /// # Errors
    /// [`Error::InputRank`], [`Error::InputChannels`], [`Error::EmptyInput`] (a zero-sized
    /// dimension), [`Error::LayoutMismatch`] (more axes than `conv_dims`), [`Error::NoKeys`]
    /// (spatial size below the pool kernel), [`Error::TooLarge`] (buffers that cannot be
    /// sized), [`Error::AllocationFailed`].
    pub fn forward<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        self.forward_layout(x, Layout::Clips)
    }

    /// Runs the block on a batch of image feature maps (B, H, W, C), channels last (PyTorch's
    /// `NonLocal2d` on (B, C, H, W)): each image attends within itself. Returns the input's
    /// shape. The same as [`NonLocalBlock::forward`] on clips of one frame (T = 1), so any
    /// `conv_dims` of 2 or more fits.
    ///
    /// ```
    /// use ndarray::Array4;
    /// use nonlocal::{NonLocalBlock, NonLocalConfig};
    ///
    /// let block = NonLocalBlock::new(NonLocalConfig::new(16).conv_dims(2))?;
    /// let images = Array4::<f32>::from_shape_fn((2, 6, 6, 16), |(b, h, w, c)| (b + h * w + c) as f32 * 0.01);
    /// assert_eq!(block.forward_images(&images)?.shape(), &[2, 6, 6, 16]);
    /// // A rank-4 batch of images is never read as one clip.
    /// assert!(matches!(block.forward(&images), Err(nonlocal::Error::InputRank { actual: 4, .. })));
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`NonLocalBlock::forward`]; [`Error::InputRank`] unless `x` has rank 4.
    pub fn forward_images<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        self.forward_layout(x, Layout::Images)
    }

    /// Runs the block on a batch of sequences (B, L, C), channels last (PyTorch's
    /// `NonLocal1d` on (B, C, L)): each sequence attends within itself. Returns the input's
    /// shape. The same as [`NonLocalBlock::forward`] on clips of shape (B, 1, 1, L, C), so the
    /// pool kernel must be `[1, 1, k]` (mmcv's `NonLocal1d`: `[1, 1, 2]`) or `None`.
    ///
    /// # Errors
    /// As [`NonLocalBlock::forward`]; [`Error::InputRank`] unless `x` has rank 3.
    pub fn forward_sequences<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        self.forward_layout(x, Layout::Sequences)
    }

    fn forward_layout<S, D>(&self, x: &ArrayBase<S, D>, layout: Layout) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let x5 = self.check_input(x.view().into_dyn(), layout)?;
        let mut out = buffer(x5.len(), "output")?;
        self.forward_checked(x5, &mut out)?;
        Ok(Array::from_shape_vec(x.raw_dim(), out).expect("output has the input's element count"))
    }

    /// Runs the block on clips (B, T, H, W, C) into `out`, an array of the input's shape in any
    /// layout: no output allocation when `out` is contiguous, for loops that reuse their
    /// buffers. Same results as [`NonLocalBlock::forward`]; image maps (B, H, W, C) are clips of
    /// one frame, `x.insert_axis(Axis(1))`.
    ///
    /// # Errors
    /// As [`NonLocalBlock::forward`], and [`Error::WrongShape`] when `out`'s shape is not the
    /// input's.
    pub fn forward_into<S, D, So>(&self, x: &ArrayBase<S, D>, out: &mut ArrayBase<So, D>) -> Result<()>
    where
        S: Data<Elem = f32>,
        So: DataMut<Elem = f32>,
        D: Dimension,
    {
        if out.shape() != x.shape() {
            return Err(Error::WrongShape {
                key: "out".into(),
                expected: x.shape().to_vec(),
                actual: out.shape().to_vec(),
            });
        }
        let x5 = self.check_input(x.view().into_dyn(), Layout::Clips)?;
        match out.as_slice_mut() {
            Some(slice) => self.forward_checked(x5, slice),
            None => {
                let mut tmp = buffer(x5.len(), "output")?;
                self.forward_checked(x5, &mut tmp)?;
                out.iter_mut().zip(tmp).for_each(|(o, v)| *o = v);
                Ok(())
            }
        }
    }

    /// Runs the block on clips in PyTorch's layout, (B, C, T, H, W) channels-first with any
    /// strides, and returns (B, C, T, H, W) in standard layout: the output product runs
    /// position-major a chunk of positions at a time and is written channel-major with its
    /// residual through register transposes, at the speed of [`NonLocalBlock::forward`] and
    /// without a permuting copy. The same values as `forward` on the permuted input, up to
    /// float rounding (the residual is added in another order on some paths).
    ///
    /// ```
    /// use ndarray::Array5;
    /// use nonlocal::{NonLocalBlock, NonLocalConfig};
    ///
    /// let block = NonLocalBlock::new(NonLocalConfig::new(4))?;
    /// let x = Array5::<f32>::from_shape_fn((1, 4, 2, 4, 4), |(_, c, t, h, w)| (c + t * h + w) as f32 * 0.1);
    /// let z = block.forward_channels_first(&x)?;
    /// assert_eq!(z.shape(), &[1, 4, 2, 4, 4]);
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`NonLocalBlock::forward`] (shapes in them are named channels-last, (B, T, H, W, C)).
    pub fn forward_channels_first<S>(&self, x: &ArrayBase<S, Ix5>) -> Result<Array5<f32>>
    where
        S: Data<Elem = f32>,
    {
        let x5 = self.check_input(x.view().permuted_axes([0, 2, 3, 4, 1]).into_dyn(), Layout::Clips)?;
        let mut out = buffer(x5.len(), "output")?;
        self.forward_ordered(x5, &mut out, Order::ChannelMajor)?;
        Ok(Array5::from_shape_vec(x.raw_dim(), out).expect("output has the input's element count"))
    }

    fn forward_checked(&self, x5: ArrayView5<'_, f32>, out: &mut [f32]) -> Result<()> {
        self.forward_ordered(x5, out, Order::PositionMajor)
    }

    /// Every sample of `x5` into `out`, each sample positions × channels or channels × positions.
    fn forward_ordered(&self, x5: ArrayView5<'_, f32>, out: &mut [f32], order: Order) -> Result<()> {
        let (_, t, h, w, c) = x5.dim();
        let n = t * h * w;
        for (sample, out_sample) in x5.outer_iter().zip(out.chunks_mut(n * c)) {
            let mut copy = Vec::new();
            let x = sample_matrix(sample, &mut copy);
            let prepared = prepare(&self.config, &self.compiled, &self.workspace, (x, [t, h, w]), Purpose::Inference)?;
            match self.config.mode {
                Mode::EmbeddedGaussian | Mode::Gaussian => self.forward_softmax(&prepared, out_sample, order)?,
                Mode::DotProduct => self.forward_dot_product(&prepared, out_sample, order)?,
                Mode::Concatenation => self.forward_concatenation(&prepared, out_sample, order)?,
            }
        }
        Ok(())
    }

    /// The (embedded) Gaussian modes: the fused online-softmax attention, with `W_z` applied
    /// to the M values first when the plan says that is cheaper.
    fn forward_softmax(&self, p: &Prepared<'_>, out: &mut [f32], order: Order) -> Result<()> {
        let (n, m, c, ci) = (p.x.rows(), p.m, self.config.in_channels, self.config.inter_channels);
        let (q, k, bias) = p.attention_operands();
        let (scale, precision) = (self.config.logit_scale(), self.config.precision);
        let ws = &self.workspace;
        let attend = |v: MatRef<'_>, out: &mut [f32]| attention_in(ws, precision, (q, k, v, scale), bias, out, None);
        if self.compiled.folds_values_in_attention(n, m) {
            // W_out·Σ_j a_ij ĝ_j = Σ_j a_ij (W_out ĝ_j): aggregate C columns instead of C'.
            let mut vw = self.workspace.take(m * c, "projected values")?;
            let fold_precision = self.compiled.value_fold_precision();
            self.compiled.w_out.apply(fold_precision, p.values(), 0.0, &mut MatMut::new(&mut vw, m, c, c), ws);
            match order {
                Order::PositionMajor => {
                    attend(MatRef::new(&vw, 0, m, c, c), out);
                    self.add_residual(p.x, out);
                }
                Order::ChannelMajor => {
                    let mut rows = self.workspace.take(n * c, "attention output")?;
                    attend(MatRef::new(&vw, 0, m, c, c), &mut rows);
                    let onto = Onto::Residual(p.x, &self.compiled.b_out);
                    write_transposed(MatRef::new(&rows, 0, n, c, c), onto, out, n, 0);
                }
            }
        } else {
            let mut y = self.workspace.take(n * ci, "y")?;
            attend(p.values(), &mut y);
            self.output_in(order, p.x, MatRef::new(&y, 0, n, ci, ci), None, out);
        }
        Ok(())
    }

    /// Dot product: `y = θ·(φᵀg/M)`, the C'×C' product instead of the N×M matrix, or where the
    /// plan finds it cheaper (few keys, many channels) the direct `(θφᵀ/M)·g` with θ folded into
    /// the keys and `W_z` into the values, as the softmax modes.
    fn forward_dot_product(&self, p: &Prepared<'_>, out: &mut [f32], order: Order) -> Result<()> {
        let (n, c, ci) = (p.x.rows(), self.config.in_channels, self.config.inter_channels);
        if self.compiled.dot_product_direct(n, p.m) {
            return self.forward_dot_product_direct(p, out, order);
        }
        let kv = key_value_product_in(self.config.precision, p.keys(), p.values(), 1.0 / p.m as f32);
        let kv = MatRef::new(&kv, 0, ci, ci, ci);
        if self.compiled.folds_key_values_into_output(n) {
            // z = x + θ·((φᵀg/M)·W_outᵀ) + b_out.
            let mut folded = vec![0.0f32; ci * c];
            par_gemm(1.0, kv, self.compiled.w_out.view().t(), 0.0, &mut MatMut::new(&mut folded, ci, c, c));
            self.output_in(order, p.x, p.queries(), Some(MatRef::new(&folded, 0, ci, c, c)), out);
        } else {
            let mut y = self.workspace.take(n * ci, "y")?;
            self.dot_product_gemm(1.0, p.queries(), kv, 0.0, &mut MatMut::new(&mut y, n, ci, ci));
            self.output_in(order, p.x, MatRef::new(&y, 0, n, ci, ci), None, out);
        }
        Ok(())
    }

    /// A product of dot product's (the logits, `θ·(φᵀg)`, `S·g`): f32, except in a bf16 block
    /// where bf16 products run on AMX tiles ([`par_gemm_on_tiles`]): there in bf16 for
    /// [`Precision::Bf16Logits`] and near f32 (bf16×3) for [`Precision::Bf16`].
    fn dot_product_gemm(&self, alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: &mut MatMut<'_>) {
        let precision = self.config.precision;
        let near_f32 = !precision.bf16_logits();
        if precision == Precision::F32 || !par_gemm_on_tiles(near_f32, alpha, a, b, beta, c, &self.workspace) {
            par_gemm(alpha, a, b, beta, c);
        }
    }

    /// Dot product's direct form: logits `S = q·kᵀ (+ offsets)` (N × M: no larger than the
    /// projections where the plan picks it), then `S·v/M`.
    fn forward_dot_product_direct(&self, p: &Prepared<'_>, out: &mut [f32], order: Order) -> Result<()> {
        let (n, m, c, ci) = (p.x.rows(), p.m, self.config.in_channels, self.config.inter_channels);
        let (q, k, bias) = p.attention_operands();
        let mut logits = self.workspace.take(n * m, "dot-product logits")?;
        let start = bias.map_or(Start::Zero, Start::Bias);
        let logits_out = &mut MatMut::new(&mut logits, n, m, m);
        match self.config.precision {
            Precision::F32 => par_gemm_from(q, k.t(), start, logits_out, &self.workspace),
            _ => {
                let beta = beta_once_written(start, logits_out);
                self.dot_product_gemm(1.0, q, k.t(), beta, logits_out);
            }
        }
        let s = MatRef::new(&logits, 0, n, m, m);
        let inv_m = 1.0 / m as f32;
        if self.compiled.folds_values(n, m) {
            let mut vw = self.workspace.take(m * c, "projected values")?;
            self.compiled.w_out.apply(
                self.compiled.value_fold_precision(),
                p.values(),
                0.0,
                &mut MatMut::new(&mut vw, m, c, c),
                &self.workspace,
            );
            let vw = MatRef::new(&vw, 0, m, c, c);
            match order {
                Order::PositionMajor => {
                    let out = &mut MatMut::new(out, n, c, c);
                    let beta = beta_once_written(Start::Residual(p.x, &self.compiled.b_out), out);
                    self.dot_product_gemm(inv_m, s, vw, beta, out);
                }
                Order::ChannelMajor => {
                    let mut rows = self.workspace.take(n * c, "attention output")?;
                    self.dot_product_gemm(inv_m, s, vw, 0.0, &mut MatMut::new(&mut rows, n, c, c));
                    let onto = Onto::Residual(p.x, &self.compiled.b_out);
                    write_transposed(MatRef::new(&rows, 0, n, c, c), onto, out, n, 0);
                }
            }
        } else {
            let mut y = self.workspace.take(n * ci, "y")?;
            self.dot_product_gemm(inv_m, s, p.values(), 0.0, &mut MatMut::new(&mut y, n, ci, ci));
            self.output_in(order, p.x, MatRef::new(&y, 0, n, ci, ci), None, out);
        }
        Ok(())
    }

    /// Concatenation: sorted keys and prefix sums (see [`concat_attention`]).
    fn forward_concatenation(&self, p: &Prepared<'_>, out: &mut [f32], order: Order) -> Result<()> {
        let (n, ci) = (p.x.rows(), self.config.inter_channels);
        let mut y = self.workspace.take(n * ci, "y")?;
        let b = p.concat_b(&self.compiled.w_phi);
        concat_attention(p.concat_a(), &b, p.values(), &mut y);
        self.output_in(order, p.x, MatRef::new(&y, 0, n, ci, ci), None, out);
        Ok(())
    }

    /// [`NonLocalBlock::output`], or with [`Order::ChannelMajor`] its transpose
    /// `outᵀ ← xᵀ + Wᵀ·yᵀ + b_out` (C × N).
    pub(super) fn output_in(&self, order: Order, x: MatRef<'_>, y: MatRef<'_>, w: Option<MatRef<'_>>, out: &mut [f32]) {
        self.output_at(self.config.precision, order, x, y, w, out);
    }

    /// [`NonLocalBlock::output_in`] in `precision` (the training pass's is f32 in every
    /// precision). Channel-major, the product runs position-major on the packed weights, a
    /// chunk of positions at a time in cache, and [`par_rows_transposed`] writes each chunk's
    /// channel rows with the residual: the same products as channels-last (the same bits where
    /// C' fits one K block), without packing the large `yᵀ` on every call.
    pub(super) fn output_at(
        &self,
        precision: Precision,
        order: Order,
        x: MatRef<'_>,
        y: MatRef<'_>,
        w: Option<MatRef<'_>>,
        out: &mut [f32],
    ) {
        if order == Order::PositionMajor {
            return self.output(precision, x, y, w, out);
        }
        let (n, c) = (x.rows(), x.cols());
        let onto = Onto::Residual(x, &self.compiled.b_out);
        // A given f32 W is packed once for all the chunks (the same bits as packed per call).
        let packed = w.filter(|_| precision == Precision::F32).map(|w| (w, PrepackedB::new(w, Precision::F32)));
        let ws = &self.workspace;
        par_rows_transposed(n, c, onto, out, n, ws, |range, rows| {
            let y = y.rows_range(range.start, range.end);
            match &packed {
                Some((w, packed)) => par_gemm_prepacked(Precision::F32, y, (*w, packed), 0.0, rows, ws),
                None => self.output_product(precision, y, w, 0.0, rows),
            }
        });
    }

    /// `out ← x + y·W + b_out` with W = `w` (C' × C: f32, or in a bf16 block on AMX tiles as
    /// dot product's other products) or `W_outᵀ` (in bf16 when `precision` is `Bf16Logits`,
    /// else f32).
    pub(crate) fn output(
        &self,
        precision: Precision,
        x: MatRef<'_>,
        y: MatRef<'_>,
        w: Option<MatRef<'_>>,
        out: &mut [f32],
    ) {
        let (n, c) = (x.rows(), x.cols());
        let start = Start::Residual(x, &self.compiled.b_out);
        let out = &mut MatMut::new(out, n, c, c);
        match w {
            // The packed kernels begin their sums from x + b_out: out is written once.
            None => self.compiled.w_out.apply_from(precision, y, start, out, &self.workspace),
            Some(w) if precision == Precision::F32 => par_gemm_from(y, w, start, out, &self.workspace),
            Some(_) => {
                let beta = beta_once_written(start, out);
                self.output_product(precision, y, w, beta, out);
            }
        }
    }

    /// `out ← β·out + y·W` for [`NonLocalBlock::output`]'s W.
    fn output_product(
        &self,
        precision: Precision,
        y: MatRef<'_>,
        w: Option<MatRef<'_>>,
        beta: f32,
        out: &mut MatMut<'_>,
    ) {
        match w {
            // Dot product's θ·((φᵀg/M)·W_outᵀ): on the tiles in a bf16 block where they run.
            Some(w) if precision != Precision::F32 => self.dot_product_gemm(1.0, y, w, beta, out),
            Some(w) => par_gemm(1.0, y, w, beta, out),
            None => self.compiled.w_out.apply(precision, y, beta, out, &self.workspace),
        }
    }

    /// `out ← (out + x) + b_out` ([`residual_rows`]).
    fn add_residual(&self, x: MatRef<'_>, out: &mut [f32]) {
        let (n, c) = (x.rows(), x.cols());
        residual_rows(x, &self.compiled.b_out, true, &mut MatMut::new(out, n, c, c));
    }
}

/// The order of a sample's output: positions × channels (channels-last, as `forward`) or
/// channels × positions (channels-first, as `forward_channels_first`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    PositionMajor,
    ChannelMajor,
}

/// The sample (T, H, W, C) as an N × C matrix: a view of the input when its positions have
/// one common stride, else a contiguous copy in `copy`.
pub(crate) fn sample_matrix<'a>(sample: ArrayView4<'a, f32>, copy: &'a mut Vec<f32>) -> MatRef<'a> {
    let (t, h, w, c) = sample.dim();
    let n = t * h * w;
    let strides = sample.strides();
    let mut row_stride: Option<isize> = None;
    let mut span = 1usize;
    let mut uniform = true;
    for axis in [2, 1, 0] {
        let len = sample.shape()[axis];
        if len == 1 {
            continue;
        }
        match row_stride {
            None => row_stride = Some(strides[axis]),
            Some(rs) => uniform &= strides[axis] == rs * span as isize,
        }
        span *= len;
    }
    if uniform {
        let rs = row_stride.unwrap_or(c as isize);
        // SAFETY: every (position, channel) element is an element of the view `sample`.
        return unsafe { MatRef::from_raw(sample.as_ptr(), n, c, rs, strides[3]) };
    }
    copy.extend(sample.iter().copied());
    MatRef::new(copy, 0, n, c, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NonLocalConfig;
    use crate::params::Parameters;
    use ndarray::{s, Axis};

    /// A block with every parameter non-trivial.
    fn busy_block(config: NonLocalConfig, seed: u64) -> NonLocalBlock {
        let mut params = Parameters::init(&config, seed);
        if let Some(bn) = &mut params.bn {
            bn.weight.fill(0.7);
            bn.bias.fill(-0.2);
        }
        params.w_z.weight.mapv_inplace(|v| v + 0.1);
        NonLocalBlock::from_parameters(config, params).unwrap()
    }

    #[test]
    fn forward_channels_first_is_forward_transposed_in_every_path() {
        // (C, C', grid, pooling): the plain paths, the dot-product fold (N > C) and not, the
        // values fold of the softmax modes and dot product's direct form (few keys, many
        // channels).
        let shapes = [
            (6, 3, [2, 5, 7], Some([1, 2, 2])),
            (40, 8, [1, 3, 4], None),
            (64, 32, [1, 8, 8], Some([1, 2, 2])),
            (40, 20, [1, 4, 6], Some([1, 2, 2])),
        ];
        for mode in Mode::ALL {
            for (i, &(c, ci, [t, h, w], pool)) in shapes.iter().enumerate() {
                let config = NonLocalConfig::new(c).inter_channels(ci).mode(mode).sub_sample(pool);
                let block = busy_block(config, 7 + i as u64);
                let x = Array5::<f32>::from_shape_fn((2, c, t, h, w), |(b, ch, tt, hh, ww)| {
                    (((b * 7 + ch * 13 + tt * 5 + hh * 3 + ww) % 17) as f32 - 8.0) * 0.1
                });
                let want = block.forward(&x.view().permuted_axes([0, 2, 3, 4, 1])).unwrap();
                let runs: Vec<_> = [1, 2, 3]
                    .iter()
                    .map(|&threads| {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        pool.install(|| block.forward_channels_first(&x).unwrap())
                    })
                    .collect();
                let got = &runs[0];
                assert_eq!(got.shape(), x.shape());
                let want = want.permuted_axes([0, 4, 1, 2, 3]);
                let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                let err = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err < 1e-5 * scale, "{mode} shape {i}: {err}");
                for run in &runs[1..] {
                    assert!(run.iter().zip(got.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{mode} {i}: threads");
                }
            }
        }
        let block = NonLocalBlock::new(NonLocalConfig::new(4)).unwrap();
        let wrong = Array5::<f32>::zeros((1, 3, 2, 4, 4));
        assert!(matches!(block.forward_channels_first(&wrong), Err(Error::InputChannels { expected: 4, .. })));
    }

    #[test]
    fn sample_matrix_views_collapsible_layouts_and_copies_others() {
        let x =
            Array5::<f32>::from_shape_fn((1, 2, 3, 4, 5), |(_, t, h, w, c)| (t * 1000 + h * 100 + w * 10 + c) as f32);
        let mut copy = Vec::new();
        let sample = x.index_axis(Axis(0), 0);
        let m = sample_matrix(sample, &mut copy);
        assert_eq!(m.as_ptr(), sample.as_ptr(), "contiguous input is not copied");
        assert_eq!(m.at(23, 4), 1234.0);
        let strided = x.slice(s![0, .., .., ..;2, ..]);
        let mut copy = Vec::new();
        let m = sample_matrix(strided, &mut copy);
        assert_eq!(m.as_ptr(), strided.as_ptr(), "w-strided rows still share one stride");
        assert_eq!(m.at(3, 1), 121.0);
        let cut = x.slice(s![0, .., 1.., .., ..]);
        let mut copy = Vec::new();
        let m = sample_matrix(cut, &mut copy);
        assert_ne!(m.as_ptr(), cut.as_ptr());
        assert_eq!(m.at(4, 0), 200.0);
    }
}
