//! Training: a forward pass that saves what the backward pass needs, and the exact backward
//! pass for the input and every parameter.
//!
//! BatchNorm is in inference form (frozen running statistics), as when fine-tuning: its
//! weight and bias get gradients, its running mean and variance do not change.
//!
//! Memory stays O(N·C) per sample: the (embedded) Gaussian modes save each query's
//! log-sum-exp and recompute attention tiles in the backward pass (FlashAttention-2); dot
//! product runs `y = θ·(φᵀg)/M` backwards; concatenation uses sorted prefix sums both ways.
//! Key-side gradients are sums over all queries, added over a fixed number of query chunks in
//! a fixed order, so results are bit-identical for any thread count.

use std::sync::Arc;

use ndarray::{
    Array, Array1, Array2, Array5, ArrayBase, ArrayView5, ArrayViewD, ArrayViewMutD, Axis, Data, Dimension, Ix5,
};
use rayon::prelude::*;

use super::gradients::{Gradients, ParameterGradients};
use super::{buffer, next_generation, sample_matrix, Layout, NonLocalBlock, Order};
use crate::config::{Mode, Precision};
use crate::error::{Error, Result};
use crate::kernels::attention::{attention_backward_in, attention_in};
use crate::kernels::concat::{concat_attention, concat_attention_backward, key_scores};
use crate::kernels::dot_product::key_value_product;
use crate::kernels::gemm::par_gemm_ws;
use crate::kernels::pool::{max_pool_argmax, max_unpool_add};
use crate::kernels::transpose::{write_transposed, Onto};
use crate::kernels::views::{MatMut, MatRef};
use crate::params::{check_shape, Conv1x1};
use crate::plan::{prepare, Columns, Compiled, Purpose};
use crate::workspace::Workspace;

/// What [`NonLocalBlock::forward_train`] (or
/// [`NonLocalBlock::forward_train_channels_first`]) saves for [`NonLocalBlock::backward`] (or
/// [`NonLocalBlock::backward_channels_first`]: either backward takes a context of either
/// forward): a copy of the input and, per sample, the projections, pooled keys with their
/// arg-max, y, and the softmax log-sum-exp. O(N·C) floats per sample; never the N×M attention.
#[derive(Debug)]
pub struct TrainContext {
    /// The clips' shape (B, T, H, W, C).
    dims: [usize; 5],
    generation: u64,
    /// The input, contiguous (B·N·C), each sample in `x_order`.
    x: Vec<f32>,
    x_order: Order,
    /// Whether `x` holds the input (else the caller gives it to the backward pass again).
    input_kept: bool,
    samples: Vec<Saved>,
    /// The block's scratch pool: the buffers go back to it when the context is dropped, so
    /// a training loop does not pay for fresh pages every step.
    home: Arc<Workspace>,
}

impl Drop for TrainContext {
    fn drop(&mut self) {
        self.home.give(std::mem::take(&mut self.x));
        for saved in self.samples.drain(..) {
            for buf in [Some(saved.proj), saved.pooled.map(|p| p.0), saved.pooled_x.map(|p| p.0), Some(saved.y)] {
                self.home.give(buf.unwrap_or_default());
            }
        }
    }
}

impl TrainContext {
    /// Sample `s` of the saved input as an N × C view.
    fn input(&self, s: usize) -> MatRef<'_> {
        let [_, t, h, w, c] = self.dims;
        let n = t * h * w;
        match self.x_order {
            Order::PositionMajor => MatRef::new(&self.x, s * n * c, n, c, c),
            Order::ChannelMajor => MatRef::new(&self.x, s * n * c, c, n, n).t(),
        }
    }
}

#[derive(Debug)]
struct Saved {
    proj: Vec<f32>,
    /// Pooled key-side columns and, per pooled element, the winning row.
    pooled: Option<(Vec<f32>, Vec<u32>)>,
    /// Gaussian mode with pooling: the pooled input and its arg-max.
    pooled_x: Option<(Vec<f32>, Vec<u32>)>,
    /// y (N × C').
    y: Vec<f32>,
    /// Softmax modes: per-query log-sum-exp.
    lse: Vec<f32>,
    m: usize,
}

impl NonLocalBlock {
    /// The forward pass for training on clips `x` (B, T, H, W, C): the output and the context
    /// [`NonLocalBlock::backward`] needs. The output equals [`NonLocalBlock::forward`]'s up to
    /// float rounding (inference may fold `W_z` into other products, which changes the order
    /// of operations). The context holds a copy of the input and O(N·C) floats per sample;
    /// never the N×M attention. Image maps (B, H, W, C) are clips of one frame,
    /// `x.insert_axis(Axis(1))`; the output and ∂L/∂x then have that shape too.
    ///
    /// # Errors
    /// As [`NonLocalBlock::forward`].
    pub fn forward_train<S, D>(&self, x: &ArrayBase<S, D>) -> Result<(Array<f32, D>, TrainContext)>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let x5 = self.check_input(x.view().into_dyn(), Layout::Clips)?;
        let mut out = buffer(x5.len(), "output")?;
        let ctx = self.forward_train_checked(x5, Order::PositionMajor, &mut out, true)?;
        let z = Array::from_shape_vec(x.raw_dim(), out).expect("output has the input's element count");
        Ok((z, ctx))
    }

    /// [`NonLocalBlock::forward_train`] in PyTorch's layout: `x` is (B, C, T, H, W)
    /// channels-first with any strides, and the output (B, C, T, H, W) in standard layout,
    /// written channel-major as the output is computed (no permuting copy either way), as
    /// [`NonLocalBlock::forward_channels_first`]. The same values as `forward_train` on the
    /// permuted input, up to float rounding; the context serves
    /// [`NonLocalBlock::backward_channels_first`] (or [`NonLocalBlock::backward`]).
    ///
    /// ```
    /// use ndarray::Array5;
    /// use nonlocal::{NonLocalBlock, NonLocalConfig};
    ///
    /// let block = NonLocalBlock::new(NonLocalConfig::new(4))?;
    /// let x = Array5::<f32>::from_shape_fn((1, 4, 2, 4, 4), |(_, c, t, h, w)| (c + t * h + w) as f32 * 0.1);
    /// let (z, ctx) = block.forward_train_channels_first(&x)?;
    /// let grads = block.backward_channels_first(&ctx, &z)?; // ∂(|z|²/2)/∂x, (B, C, T, H, W)
    /// assert_eq!(grads.input.shape(), x.shape());
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`NonLocalBlock::forward`] (shapes in them are named channels-last, (B, T, H, W, C)).
    pub fn forward_train_channels_first<S>(&self, x: &ArrayBase<S, Ix5>) -> Result<(Array5<f32>, TrainContext)>
    where
        S: Data<Elem = f32>,
    {
        let x5 = self.check_input(x.view().permuted_axes([0, 2, 3, 4, 1]).into_dyn(), Layout::Clips)?;
        let mut out = buffer(x5.len(), "output")?;
        let ctx = self.forward_train_checked(x5, Order::ChannelMajor, &mut out, true)?;
        let z = Array5::from_shape_vec(x.raw_dim(), out).expect("output has the input's element count");
        Ok((z, ctx))
    }

    /// The training forward pass on checked clips `x5` (B, T, H, W, C, any strides) into
    /// `out` (B·N·C), each sample positions × channels or channels × positions by `order`.
    /// With `keep_input` the context keeps a copy of the input in the same order; without,
    /// [`NonLocalBlock::backward_checked`] must be given the same input again (the candle op,
    /// whose input tensor candle keeps for the backward pass anyway).
    pub(crate) fn forward_train_checked(
        &self,
        x5: ArrayView5<'_, f32>,
        order: Order,
        out: &mut [f32],
        keep_input: bool,
    ) -> Result<TrainContext> {
        let (b, t, h, w, c) = x5.dim();
        let (n, grid) = (t * h * w, [t, h, w]);
        assert_eq!(out.len(), x5.len(), "forward_train_checked: output length");
        let mut xs = Vec::new();
        if keep_input {
            xs = self.workspace.take(x5.len(), "input copy")?.into_vec();
            let whole = match order {
                Order::PositionMajor => x5.as_slice(),
                Order::ChannelMajor => x5.permuted_axes([0, 4, 1, 2, 3]).to_slice(),
            };
            match whole {
                Some(contiguous) => xs.copy_from_slice(contiguous),
                None => {
                    for (sample, dst) in x5.outer_iter().zip(xs.chunks_mut((n * c).max(1))) {
                        let mut copy = Vec::new();
                        copy_ordered(sample_matrix(sample, &mut copy), order, dst);
                    }
                }
            }
        }
        let mut ctx = TrainContext {
            dims: [b, t, h, w, c],
            generation: self.generation,
            x: xs,
            x_order: order,
            input_kept: keep_input,
            samples: Vec::with_capacity(b),
            home: self.workspace.clone(),
        };
        for (s, (sample, out_sample)) in x5.outer_iter().zip(out.chunks_mut((n * c).max(1))).enumerate() {
            let mut copy = Vec::new();
            let x = if keep_input { ctx.input(s) } else { sample_matrix(sample, &mut copy) };
            let saved = self.forward_train_sample(x, grid, out_sample, order)?;
            ctx.samples.push(saved);
        }
        Ok(ctx)
    }

    fn forward_train_sample(&self, x: MatRef<'_>, grid: [usize; 3], out: &mut [f32], order: Order) -> Result<Saved> {
        let p = prepare(&self.config, &self.compiled, &self.workspace, (x, grid), Purpose::Exact)?;
        let (n, ci, m) = (x.rows(), self.config.inter_channels, p.m);
        let kernel = self.config.pool_kernel();
        let mut y = self.workspace.take(n * ci, "y")?.into_vec();
        let mut lse = Vec::new();
        match self.config.mode {
            Mode::EmbeddedGaussian | Mode::Gaussian => {
                lse = buffer(n, "log-sum-exp")?;
                let qkv = (p.queries(), p.keys(), p.values(), self.config.logit_scale());
                attention_in(&self.workspace, Precision::F32, qkv, None, &mut y, Some(&mut lse));
            }
            Mode::DotProduct => {
                let kv = key_value_product(p.keys(), p.values(), 1.0 / m as f32);
                par_gemm_ws(
                    1.0,
                    p.queries(),
                    MatRef::new(&kv, 0, ci, ci, ci),
                    0.0,
                    &mut MatMut::new(&mut y, n, ci, ci),
                    &self.workspace,
                );
            }
            Mode::Concatenation => {
                let b = p.concat_b(&self.compiled.w_phi);
                concat_attention(p.concat_a(), &b, p.values(), &mut y);
            }
        }
        self.output_at(Precision::F32, order, x, MatRef::new(&y, 0, n, ci, ci), None, out);
        let cols = p.cols;
        let k = p.proj_cols;
        let pooled = match p.pooled {
            Some(pooled) => {
                let key_cols =
                    MatRef::new(&p.proj, 0, n, k, k).cols_range(cols.key_start, cols.key_start + cols.key_width);
                Some((pooled.into_vec(), max_pool_argmax(key_cols, grid, kernel)))
            }
            None => None,
        };
        let pooled_x = p.pooled_x.map(|px| (px.into_vec(), max_pool_argmax(x, grid, kernel)));
        Ok(Saved { proj: p.proj.into_vec(), pooled, pooled_x, y, lse, m })
    }

    /// The backward pass: gradients of a loss L with respect to the input and every
    /// trainable parameter, given `grad_output` = ∂L/∂z (the output's shape, (B, T, H, W, C),
    /// any strides).
    ///
    /// # Errors
    /// [`Error::WrongShape`] when `grad_output` is not the shape of the forward input,
    /// [`Error::StaleContext`] when the parameters changed since `forward_train`,
    /// [`Error::TooLarge`] when buffers cannot be allocated.
    pub fn backward<S, D>(&self, ctx: &TrainContext, grad_output: &ArrayBase<S, D>) -> Result<Gradients<D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let dz5 = checked_gradient(ctx, grad_output.view().into_dyn(), ctx.dims.to_vec())?;
        let mut dx = buffer(dz5.len(), "input gradient")?;
        let params = self.backward_checked(ctx, dz5, Order::PositionMajor, &mut dx, None)?;
        let input = Array::from_shape_vec(grad_output.raw_dim(), dx).expect("input gradient has the input's size");
        Ok(Gradients { input, params })
    }

    /// [`NonLocalBlock::backward`] in PyTorch's layout: `grad_output` is (B, C, T, H, W) (any
    /// strides) and ∂L/∂x comes (B, C, T, H, W) in standard layout, written channel-major by
    /// the GEMMs themselves. For a context of either forward pass (see
    /// [`NonLocalBlock::forward_train_channels_first`]); the same values as `backward` on the
    /// permuted gradient, up to float rounding.
    ///
    /// # Errors
    /// As [`NonLocalBlock::backward`] (the expected shape named channels-first).
    pub fn backward_channels_first<S>(
        &self,
        ctx: &TrainContext,
        grad_output: &ArrayBase<S, Ix5>,
    ) -> Result<Gradients<Ix5>>
    where
        S: Data<Elem = f32>,
    {
        let [b, t, h, w, c] = ctx.dims;
        let dz = grad_output.view().permuted_axes([0, 2, 3, 4, 1]);
        let dz5 = checked_gradient(ctx, dz.into_dyn(), vec![b, c, t, h, w]).map_err(|e| match e {
            Error::WrongShape { key, expected, .. } => {
                Error::WrongShape { key, expected, actual: grad_output.shape().to_vec() }
            }
            other => other,
        })?;
        let mut dx = buffer(dz5.len(), "input gradient")?;
        let params = self.backward_checked(ctx, dz5, Order::ChannelMajor, &mut dx, None)?;
        let input = Array5::from_shape_vec(grad_output.raw_dim(), dx).expect("input gradient has the input's size");
        Ok(Gradients { input, params })
    }

    /// The backward pass on a checked output gradient `dz5` (clips (B, T, H, W, C), any
    /// strides) into `dx` (B·N·C), each sample positions × channels or channels × positions
    /// by `order`: the parameters' gradients.
    ///
    /// `input`: the forward pass's input (clips, as given to it) when the context did not
    /// keep a copy; ignored when it did.
    pub(crate) fn backward_checked(
        &self,
        ctx: &TrainContext,
        dz5: ArrayView5<'_, f32>,
        order: Order,
        dx: &mut [f32],
        input: Option<ArrayView5<'_, f32>>,
    ) -> Result<ParameterGradients> {
        if dz5.shape() != ctx.dims.as_slice() {
            let (expected, actual) = (ctx.dims.to_vec(), dz5.shape().to_vec());
            return Err(Error::WrongShape { key: "grad_output".into(), expected, actual });
        }
        let input = match (ctx.input_kept, input) {
            (true, _) => None,
            (false, Some(x)) if x.shape() == ctx.dims.as_slice() => Some(x),
            (false, x) => {
                let actual = x.map_or_else(Vec::new, |x| x.shape().to_vec());
                return Err(Error::WrongShape { key: "input".into(), expected: ctx.dims.to_vec(), actual });
            }
        };
        if ctx.generation != self.generation {
            return Err(Error::StaleContext);
        }
        let (c, ci) = (self.config.in_channels, self.config.inter_channels);
        let [_, t, h, w, _] = ctx.dims;
        let n = t * h * w;
        assert_eq!(dx.len(), dz5.len(), "backward_checked: gradient length");
        let k = self.compiled.proj_cols;
        let mut acc = Accumulators::new(c, ci, k);
        for ((s, saved), (sample, dx_s)) in
            ctx.samples.iter().enumerate().zip(dz5.outer_iter().zip(dx.chunks_mut((n * c).max(1))))
        {
            let mut copy = Vec::new();
            let dz_s = sample_matrix(sample, &mut copy);
            let mut x_copy = Vec::new();
            let x = match &input {
                Some(input) => sample_matrix(input.index_axis(Axis(0), s), &mut x_copy),
                None => ctx.input(s),
            };
            self.backward_sample(x, saved, dz_s, (dx_s, order), &mut acc)?;
        }
        Ok(self.parameter_gradients(&acc))
    }

    fn backward_sample(
        &self,
        x: MatRef<'_>,
        saved: &Saved,
        dz: MatRef<'_>,
        (dx, order): (&mut [f32], Order),
        acc: &mut Accumulators,
    ) -> Result<()> {
        let (n, c) = (x.rows(), x.cols());
        match order {
            Order::PositionMajor => self.backward_rows(x, saved, dz, (dx, true), acc),
            Order::ChannelMajor => {
                // Position-major throughout (every product on the packed weights) into rows
                // holding all of dx but dz's own term, then one transposing pass
                // `dxᵀ ← dz + rowsᵀ` (dz channel-major like dx: read in place).
                let mut rows = self.workspace.take(n * c, "input gradient rows")?;
                rows.fill(0.0);
                self.backward_rows(x, saved, dz, (&mut rows, false), acc)?;
                let zeros = vec![0.0f32; c];
                write_transposed(MatRef::new(&rows, 0, n, c, c), Onto::Residual(dz, &zeros), dx, n, 0);
                Ok(())
            }
        }
    }

    /// One sample's backward pass into the position-major `dx` (N × C): `dx ← dz + …` with
    /// `with_dz`, else `dx ← dx + …` without dz's own term.
    fn backward_rows(
        &self,
        x: MatRef<'_>,
        saved: &Saved,
        dz: MatRef<'_>,
        (dx, with_dz): (&mut [f32], bool),
        acc: &mut Accumulators,
    ) -> Result<()> {
        let (n, c, ci, m) = (x.rows(), x.cols(), self.config.inter_channels, saved.m);
        let k = self.compiled.proj_cols;
        let cols = Columns::of(self.config.mode, ci);
        let y = MatRef::new(&saved.y, 0, n, ci, ci);
        // Output side: z = x + y·W_outᵀ + b_out.
        let ws = &self.workspace;
        let mut dy = ws.take(n * ci, "y gradient")?;
        par_gemm_ws(1.0, dz, self.compiled.w_out.view(), 0.0, &mut MatMut::new(&mut dy, n, ci, ci), &self.workspace);
        par_gemm_ws(1.0, dz.t(), y, 1.0, &mut MatMut::new(&mut acc.dz_y, c, ci, ci), &self.workspace);
        column_sums(dz, &mut acc.dz_sum);
        match (with_dz, dz.col_stride() == 1) {
            (false, _) => {}
            (true, true) => dx.par_chunks_mut(c.max(1)).enumerate().for_each(|(i, row)| dz.copy_row(i, row)),
            // A channels-first gradient: rows from its channel rows through register transposes.
            (true, false) => write_transposed(dz.t(), Onto::Set, dx, c, 0),
        }

        // Attention side, into dP (N × proj_cols) and the key side (M × key_width, the key-side
        // columns' order; every column written by the mode) and, for Gaussian, into dx.
        let proj = MatRef::new(&saved.proj, 0, n, k, k);
        let (kstart, kwidth) = (cols.key_start, cols.key_width);
        let key_side = match &saved.pooled {
            Some((pooled, _)) => MatRef::new(pooled, 0, m, kwidth, kwidth),
            None => proj.cols_range(kstart, kstart + kwidth),
        };
        let mut dp = ws.take(n * k, "projection gradient")?;
        dp.fill(0.0);
        let mut dkey = ws.take(m * kwidth, "key gradient")?;
        let sample = SampleGrad {
            x,
            proj,
            key_side,
            cols,
            y,
            dy: MatRef::new(&dy, 0, n, ci, ci),
            saved,
            dp: Block { data: &mut dp, ld: k, start: 0 },
            dkey: Block { data: &mut dkey, ld: kwidth, start: kstart },
        };
        match self.config.mode {
            Mode::EmbeddedGaussian | Mode::Gaussian => self.backward_softmax(sample, dx)?,
            Mode::DotProduct => self.backward_dot_product(sample)?,
            Mode::Concatenation => self.backward_concatenation(sample, &mut acc.d_w_phi)?,
        }
        // Key-side gradients back through the pooling (or straight, without it).
        match &saved.pooled {
            Some((_, arg)) => max_unpool_add(&dkey, arg, kwidth, &mut dp, k, kstart),
            None => {
                for (dp_row, dkey_row) in dp.chunks_mut(k).zip(dkey.chunks(kwidth)) {
                    dp_row[kstart..kstart + kwidth].iter_mut().zip(dkey_row).for_each(|(a, b)| *a += b);
                }
            }
        }
        // Projection side: P = x·W_allᵀ + b_all.
        let dp_m = MatRef::new(&dp, 0, n, k, k);
        par_gemm_ws(1.0, dp_m.t(), x, 1.0, &mut MatMut::new(&mut acc.d_proj_w, k, c, c), &self.workspace);
        column_sums(dp_m, &mut acc.d_proj_b);
        let w_proj = self.compiled.w_proj.view();
        par_gemm_ws(1.0, dp_m, w_proj, 1.0, &mut MatMut::new(dx, n, c, c), &self.workspace);
        Ok(())
    }

    /// The (embedded) Gaussian modes: the FlashAttention-2 backward from the saved
    /// log-sum-exp. Gaussian's queries and keys are the input itself, so their gradients go
    /// straight into `dx` (through the pooling arg-max for the keys).
    fn backward_softmax(&self, s: SampleGrad<'_>, dx: &mut [f32]) -> Result<()> {
        let SampleGrad { x, proj, key_side, cols, y, dy, saved, mut dp, mut dkey } = s;
        let (n, c, ci, m) = (x.rows(), x.cols(), self.config.inter_channels, saved.m);
        let (q, keys) = match cols.theta {
            Some(th) => (proj.cols_range(th, th + ci), dkey.view_of(key_side, cols.phi.expect("θ comes with φ"), ci)),
            None => match &saved.pooled_x {
                Some((px, _)) => (x, MatRef::new(px, 0, m, c, c)),
                None => (x, x),
            },
        };
        let values = dkey.view_of(key_side, cols.g, ci);
        let d = q.cols();
        let ws = &self.workspace;
        let (mut dq, mut dk, mut dv) = (ws.take(n * d, "dq")?, ws.take(m * d, "dk")?, ws.take(m * ci, "dv")?);
        let scale = self.config.logit_scale();
        attention_backward_in(ws, (q, keys, values, scale), &saved.lse, (y, dy), (&mut dq, &mut dk, &mut dv));
        dkey.set(cols.g, &dv, ci);
        match cols.theta {
            Some(th) => {
                dp.set(th, &dq, ci);
                dkey.set(cols.phi.expect("θ comes with φ"), &dk, ci);
            }
            None => {
                dx.iter_mut().zip(dq.iter()).for_each(|(a, b)| *a += b);
                match &saved.pooled_x {
                    Some((_, arg)) => max_unpool_add(&dk, arg, c, dx, c, 0),
                    None => dx.iter_mut().zip(dk.iter()).for_each(|(a, b)| *a += b),
                }
            }
        }
        Ok(())
    }

    /// Dot product, `y = θ·A` with `A = φ̂ᵀĝ/M`: `dθ = dy·Aᵀ`, and with `dA = θᵀ·dy/M`,
    /// `dφ̂ = ĝ·dAᵀ`, `dĝ = φ̂·dA`.
    fn backward_dot_product(&self, s: SampleGrad<'_>) -> Result<()> {
        let SampleGrad { x, proj, key_side, cols, dy, saved, mut dp, mut dkey, .. } = s;
        let (n, ci, m) = (x.rows(), dy.cols(), saved.m);
        let th = cols.theta.expect("dot product has θ");
        let phi_col = cols.phi.expect("dot product has φ");
        let theta = proj.cols_range(th, th + ci);
        let (phi, values) = (dkey.view_of(key_side, phi_col, ci), dkey.view_of(key_side, cols.g, ci));
        let inv_m = 1.0 / m as f32;
        let a = key_value_product(phi, values, inv_m);
        let ws = &self.workspace;
        let mut dtheta = ws.take(n * ci, "θ gradient")?;
        par_gemm_ws(
            1.0,
            dy,
            MatRef::new(&a, 0, ci, ci, ci).t(),
            0.0,
            &mut MatMut::new(&mut dtheta, n, ci, ci),
            &self.workspace,
        );
        dp.set(th, &dtheta, ci);
        let mut da = vec![0.0f32; ci * ci];
        par_gemm_ws(inv_m, theta.t(), dy, 0.0, &mut MatMut::new(&mut da, ci, ci, ci), &self.workspace);
        let da = MatRef::new(&da, 0, ci, ci, ci);
        let (mut dphi, mut dg) = (ws.take(m * ci, "φ gradient")?, ws.take(m * ci, "g gradient")?);
        par_gemm_ws(1.0, values, da.t(), 0.0, &mut MatMut::new(&mut dphi, m, ci, ci), &self.workspace);
        par_gemm_ws(1.0, phi, da, 0.0, &mut MatMut::new(&mut dg, m, ci, ci), &self.workspace);
        dkey.set(phi_col, &dphi, ci);
        dkey.set(cols.g, &dg, ci);
        Ok(())
    }

    /// Concatenation through the sorted-keys prefix sums; `b_j = w_φ·φ̂_j`, so `dφ̂_j = db_j·w_φ`
    /// and `w_φ` collects `Σ_j db_j·φ̂_j` (into `d_w_phi`).
    fn backward_concatenation(&self, s: SampleGrad<'_>, d_w_phi: &mut [f32]) -> Result<()> {
        let SampleGrad { x, proj, key_side, cols, dy, saved, mut dp, mut dkey, .. } = s;
        let (n, ci, m) = (x.rows(), dy.cols(), saved.m);
        let a_col = cols.a.expect("concatenation has an `a` column");
        let a = proj.cols_range(a_col, a_col + 1);
        let phi_col = cols.phi.expect("concatenation has φ");
        let (phi, values) = (dkey.view_of(key_side, phi_col, ci), dkey.view_of(key_side, cols.g, ci));
        let w_phi = &self.compiled.w_phi;
        let b = key_scores(phi, w_phi);
        let ws = &self.workspace;
        let (mut da, mut db, mut dv) = (vec![0.0f32; n], vec![0.0f32; m], ws.zeroed(m * ci));
        concat_attention_backward(a, &b, values, dy, (&mut da, &mut db, &mut dv));
        dp.set(a_col, &da, 1);
        let mut row = vec![0.0f32; ci];
        let mut dphi = ws.take(m * ci, "φ gradient")?;
        for (j, dphi_row) in dphi.chunks_mut(ci).enumerate() {
            phi.copy_row(j, &mut row);
            for ch in 0..ci {
                dphi_row[ch] = db[j] * w_phi[ch];
                d_w_phi[ch] += (db[j] as f64 * row[ch] as f64) as f32;
            }
        }
        dkey.set(phi_col, &dphi, ci);
        dkey.set(cols.g, &dv, ci);
        Ok(())
    }

    /// Updates every trainable parameter in place from its gradient, paired by name:
    /// `update(name, parameter, gradient)` is called once per tensor of
    /// [`Parameters::trainable_mut`](crate::Parameters::trainable_mut), with the gradient of the same name from `grads`. The
    /// block's prepared state (BatchNorm folded into `W_z`, stacked projections) is then
    /// rebuilt once, and training contexts from before become stale. No parameter is copied.
    ///
    /// ```
    /// use ndarray::Array5;
    /// use nonlocal::{NonLocalBlock, NonLocalConfig};
    ///
    /// let mut block = NonLocalBlock::new(NonLocalConfig::new(4).bn_layer(false))?;
    /// let x = Array5::<f32>::from_shape_fn((1, 2, 4, 4, 4), |(_, t, h, w, c)| ((t + h * w + c) % 3) as f32);
    /// let target = x.mapv(|v| 0.5 * v);
    /// let loss = |z: &Array5<f32>| (z - &target).mapv(|d| d * d).sum();
    /// let (z, ctx) = block.forward_train(&x)?;
    /// let before = loss(&z);
    /// let grads = block.backward(&ctx, &((&z - &target) * 2.0))?;
    /// block.update_parameters(&grads.params, |_name, mut param, grad| param.scaled_add(-0.01, &grad))?;
    /// assert!(loss(&block.forward(&x)?) < before);
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// Before anything changes: [`Error::MissingKey`] when a parameter has no gradient in
    /// `grads` or a gradient no parameter (gradients of another configuration),
    /// [`Error::WrongShape`] when their shapes differ. After the update:
    /// [`Error::InvalidParameter`] when it left a non-finite value (a diverging optimiser);
    /// the update is kept, so the block's outputs will be NaN — reload saved parameters to
    /// go on.
    pub fn update_parameters<F>(&mut self, grads: &ParameterGradients, mut update: F) -> Result<()>
    where
        F: FnMut(&str, ArrayViewMutD<'_, f32>, ArrayViewD<'_, f32>),
    {
        let mut grads = grads.named();
        let mut pairs = Vec::with_capacity(grads.len());
        for (name, param) in self.params.trainable_mut() {
            let Some(at) = grads.iter().position(|(g, _)| *g == name) else {
                return Err(Error::MissingKey { key: format!("{name} (no gradient for this parameter)") });
            };
            let (_, grad) = grads.swap_remove(at);
            check_shape(&name, grad.shape(), param.shape())?;
            pairs.push((name, param, grad));
        }
        if let Some((name, _)) = grads.first() {
            return Err(Error::MissingKey { key: format!("{name} (a gradient for no parameter of this block)") });
        }
        for (name, param, grad) in pairs {
            update(&name, param, grad);
        }
        self.compiled = Compiled::new(&self.config, &self.params);
        self.generation = next_generation();
        self.params.validate(&self.config)
    }

    /// Maps the accumulated sums back onto the parameters' shapes (the projection sums in the
    /// column order of [`Columns::of`]).
    pub(crate) fn parameter_gradients(&self, acc: &Accumulators) -> ParameterGradients {
        let (c, ci) = (self.config.in_channels, self.config.inter_channels);
        let params = &self.params;
        let cols = Columns::of(self.config.mode, ci);
        let k = self.compiled.proj_cols;
        let proj_w = |start: usize| Array2::from_shape_fn((ci, c), |(o, i)| acc.d_proj_w[(start + o) * c + i]);
        let proj_b = |start: usize| Array1::from_shape_fn(ci, |o| acc.d_proj_b[start + o]);
        let conv_grad = |start: usize, conv: &Conv1x1| Conv1x1 {
            weight: proj_w(start),
            bias: conv.bias.as_ref().map(|_| proj_b(start)),
        };
        let g = conv_grad(cols.g, &params.g);
        let mut theta = cols.theta.zip(params.theta.as_ref()).map(|(s, p)| conv_grad(s, p));
        let mut phi = cols.phi.zip(params.phi.as_ref()).map(|(s, p)| conv_grad(s, p));
        if self.config.mode == Mode::EmbeddedGaussian {
            // φ's bias adds θ_i·b to every logit of query i (through the max-pool too): the
            // softmax does not see it, so its gradient is exactly 0. Summed, the kernels' dS
            // rows give rounding noise instead, growing with N and C'.
            if let Some(bias) = phi.as_mut().and_then(|p| p.bias.as_mut()) {
                bias.fill(0.0);
            }
        }
        let mut concat_project = None;
        if let (Some(a), Some(w), Some(th)) = (cols.a, &params.concat_project, &params.theta) {
            // a_i = u·x_i + w_θ·b_θ with u = W_θᵀ w_θ: r = Σ_i da_i x_i, ra = Σ_i da_i.
            let r = &acc.d_proj_w[a * c..(a + 1) * c];
            let ra = acc.d_proj_b[a];
            debug_assert_eq!(a + 1, k);
            theta = Some(Conv1x1 {
                weight: Array2::from_shape_fn((ci, c), |(o, i)| w[o] * r[i]),
                bias: th.bias.as_ref().map(|_| Array1::from_shape_fn(ci, |o| w[o] * ra)),
            });
            let mut grad = Array1::<f32>::zeros(2 * ci);
            for o in 0..ci {
                let dot: f64 = (0..c).map(|i| th.weight[[o, i]] as f64 * r[i] as f64).sum();
                let bias = th.bias.as_ref().map_or(0.0, |b| b[o] as f64 * ra as f64);
                grad[o] = (dot + bias) as f32;
                grad[ci + o] = acc.d_w_phi[o];
            }
            concat_project = Some(grad);
        }
        // z = x + s ⊙ (W_z·y + b_z − mean) + β with s = γ/√(var + eps).
        let s = &self.compiled.bn_scale;
        let w_z = Conv1x1 {
            weight: Array2::from_shape_fn((c, ci), |(o, i)| s[o] * acc.dz_y[o * ci + i]),
            bias: params.w_z.bias.as_ref().map(|_| Array1::from_shape_fn(c, |o| s[o] * acc.dz_sum[o])),
        };
        let bn = params.bn.as_ref().map(|bn| {
            let weight = Array1::from_shape_fn(c, |o| {
                let sigma = (bn.running_var[o] as f64 + self.config.bn_eps).sqrt();
                let wy: f64 = (0..ci).map(|i| params.w_z.weight[[o, i]] as f64 * acc.dz_y[o * ci + i] as f64).sum();
                let b = params.w_z.bias.as_ref().map_or(0.0, |b| b[o] as f64);
                ((wy + (b - bn.running_mean[o] as f64) * acc.dz_sum[o] as f64) / sigma) as f32
            });
            (weight, Array1::from_vec(acc.dz_sum.clone()))
        });
        ParameterGradients { theta, phi, g, w_z, bn, concat_project }
    }
}

/// `grad_output` (its clips view: (B, T, H, W, C)) when its shape is `ctx`'s and `ctx` is
/// not stale; `expected` is the shape named in the error.
fn checked_gradient<'a>(
    ctx: &TrainContext,
    grad_output: ArrayViewD<'a, f32>,
    expected: Vec<usize>,
) -> Result<ArrayView5<'a, f32>> {
    if grad_output.shape() != ctx.dims.as_slice() {
        return Err(Error::WrongShape { key: "grad_output".into(), expected, actual: grad_output.shape().to_vec() });
    }
    let dz5 = grad_output.into_dimensionality::<Ix5>().expect("rank 5, checked above");
    Ok(dz5)
}

/// Copies the N × C matrix `x` into `out`, positions × channels or channels × positions by
/// `order`, rows of `out` in parallel.
fn copy_ordered(x: MatRef<'_>, order: Order, out: &mut [f32]) {
    let src = match order {
        Order::PositionMajor => x,
        Order::ChannelMajor => x.t(),
    };
    out.par_chunks_mut(src.cols().max(1)).enumerate().take(src.rows()).for_each(|(i, row)| src.copy_row(i, row));
}

/// Sums over the samples of a batch.
pub(crate) struct Accumulators {
    /// Σ dzᵀ·y (C × C').
    pub(crate) dz_y: Vec<f32>,
    /// Σ dz over positions (C).
    pub(crate) dz_sum: Vec<f32>,
    /// Σ dPᵀ·x (proj_cols × C) and Σ dP (proj_cols).
    pub(crate) d_proj_w: Vec<f32>,
    pub(crate) d_proj_b: Vec<f32>,
    /// Concatenation: Σ db_j·φ̂_j (C').
    pub(crate) d_w_phi: Vec<f32>,
}

impl Accumulators {
    /// Zero sums for C channels, C' inter channels and `proj_cols` projection columns.
    pub(crate) fn new(c: usize, ci: usize, proj_cols: usize) -> Self {
        Accumulators {
            dz_y: vec![0.0; c * ci],
            dz_sum: vec![0.0; c],
            d_proj_w: vec![0.0; proj_cols * c],
            d_proj_b: vec![0.0; proj_cols],
            d_w_phi: vec![0.0; ci],
        }
    }
}

/// Adds the column sums of `m` to `out`, each in f64 over rows in order (columns in
/// parallel blocks, so the order per column is fixed).
pub(crate) fn column_sums(m: MatRef<'_>, out: &mut [f32]) {
    const BLOCK: usize = 64;
    if m.rows() > 1 && m.cols() > 1 && m.row_stride() == 1 {
        // Contiguous columns (a channel-major matrix): each column on its own, the same
        // order of additions.
        out.par_iter_mut().enumerate().for_each(|(j, o)| {
            let col = m.col(j).expect("rows are contiguous");
            let sum = col.iter().fold(0.0f64, |s, &v| s + v as f64);
            *o = (*o as f64 + sum) as f32;
        });
        return;
    }
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, out_block)| {
        let cols = m.cols_range(b * BLOCK, b * BLOCK + out_block.len());
        let mut sums = vec![0.0f64; out_block.len()];
        let mut row = Vec::new();
        for i in 0..cols.rows() {
            sums.iter_mut().zip(cols.row_or_copy(i, &mut row)).for_each(|(s, &v)| *s += v as f64);
        }
        out_block.iter_mut().zip(sums).for_each(|(o, s)| *o = (*o as f64 + s) as f32);
    });
}

/// One sample's views for the backward pass of one mode, and where it writes.
struct SampleGrad<'a> {
    x: MatRef<'a>,
    /// The projections (N × proj_cols) and the key side (M × key_width), as saved.
    proj: MatRef<'a>,
    key_side: MatRef<'a>,
    cols: Columns,
    y: MatRef<'a>,
    dy: MatRef<'a>,
    saved: &'a Saved,
    /// ∂L/∂P (N × proj_cols) and ∂L/∂(key side) (M × key_width).
    dp: Block<'a>,
    dkey: Block<'a>,
}

/// A row-major matrix whose columns are named by projection columns: column `col` of the
/// projections is column `col − start` here (the key side starts at `key_start`).
struct Block<'a> {
    data: &'a mut [f32],
    ld: usize,
    start: usize,
}

impl Block<'_> {
    /// Writes `src` (rows × width) into the columns of projection column `col` onwards.
    fn set(&mut self, col: usize, src: &[f32], width: usize) {
        let col = col - self.start;
        for (d, s) in self.data.chunks_mut(self.ld).zip(src.chunks(width)) {
            d[col..col + width].copy_from_slice(s);
        }
    }

    /// Columns `col..col + width` (projection columns) of `m`, a matrix laid out like this one.
    fn view_of<'m>(&self, m: MatRef<'m>, col: usize, width: usize) -> MatRef<'m> {
        let col = col - self.start;
        m.cols_range(col, col + width)
    }
}
