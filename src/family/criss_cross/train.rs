//! Training: a forward pass that saves what the backward pass needs, the exact backward pass
//! for the input and every parameter, and the optimiser step.
//!
//! Per application of the block the context keeps its input, its projections `[q | k | v]`,
//! y and one log-sum-exp per position: O(N·C) floats, never the N × (H + W) attention, which
//! the backward pass recomputes one image row or column at a time. With a recurrence r the
//! same weights serve r applications: their gradients are the sums over the applications,
//! run backwards from the last. Every sum has a fixed order (samples, applications, and
//! positions in order), so the gradients are bit-identical for any thread count.

use std::sync::Arc;

use ndarray::{Array, Array1, Array2, ArrayBase, ArrayViewD, ArrayViewMutD, Axis, Data, Dimension};
use rayon::prelude::*;

use super::backward::{backward, Forward};
use super::block::CrissCrossAttention;
use super::forward::{forward, Saved};
use super::input::{check_input, Layout};
use super::params::{Compiled, NAMES};
use super::projections::{project_into, Projections};
use crate::block::{buffer, next_generation};
use crate::error::{Error, Result};
use crate::kernels::gemm::par_gemm;
use crate::kernels::views::{MatMut, MatRef};
use crate::params::Conv1x1;
use crate::workspace::Workspace;

/// What [`CrissCrossAttention::forward_train`] saves for [`CrissCrossAttention::backward`]:
/// per application of the block its input, projections, y and per-position log-sum-exp.
#[derive(Debug)]
pub struct CrissCrossContext {
    shape: Vec<usize>,
    /// (B, H, W).
    dims: [usize; 3],
    generation: u64,
    steps: Vec<Step>,
    /// The block's scratch pool: the buffers go back to it when the context is dropped.
    home: Arc<Workspace>,
}

/// One application, the whole batch: sample s at offset s·N·(row width).
#[derive(Debug)]
struct Step {
    /// Its input, B·N·C.
    x: Vec<f32>,
    /// `[q | k | v]`, B·N·(2·qk + C).
    proj: Vec<f32>,
    /// y, B·N·C.
    y: Vec<f32>,
    /// Log-sum-exp, B·N.
    lse: Vec<f32>,
}

impl Drop for CrissCrossContext {
    fn drop(&mut self) {
        for step in self.steps.drain(..) {
            for buf in [step.x, step.proj, step.y, step.lse] {
                self.home.give(buf);
            }
        }
    }
}

/// Gradients of the parameters, shaped like
/// [`CrissCrossParameters`](super::CrissCrossParameters): a bias the block does not have has
/// no gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct CrissCrossParameterGradients {
    /// ∂L/∂`query_conv` (weight (C_qk, C), bias (C_qk)).
    pub query: Conv1x1,
    /// ∂L/∂`key_conv`.
    pub key: Conv1x1,
    /// ∂L/∂`value_conv` (weight (C, C), bias (C)).
    pub value: Conv1x1,
    /// ∂L/∂γ.
    pub gamma: f32,
}

impl CrissCrossParameterGradients {
    /// The gradients by name, as mmcv's `state_dict` keys without a prefix and with
    /// PyTorch's shapes: `query_conv.weight` (C_qk, C, 1, 1), `query_conv.bias` (C_qk), …,
    /// `value_conv.bias` (C), `gamma.scale` (0-d); in the order of
    /// [`CrissCrossParameters::trainable_mut`](super::CrissCrossParameters::trainable_mut).
    pub fn named(&self) -> Vec<(String, ArrayViewD<'_, f32>)> {
        let mut out = Vec::with_capacity(NAMES.len());
        for (stem, conv) in [("query_conv", &self.query), ("key_conv", &self.key), ("value_conv", &self.value)] {
            let weight = conv.weight.view().insert_axis(Axis(2)).insert_axis(Axis(3));
            out.push((format!("{stem}.weight"), weight.into_dyn()));
            if let Some(bias) = &conv.bias {
                out.push((format!("{stem}.bias"), bias.view().into_dyn()));
            }
        }
        out.push(("gamma.scale".into(), ndarray::aview0(&self.gamma).into_dyn()));
        out
    }
}

/// The result of [`CrissCrossAttention::backward`].
#[derive(Clone, Debug, PartialEq)]
pub struct CrissCrossGradients<D: Dimension> {
    /// ∂L/∂x, the input's shape.
    pub input: Array<f32, D>,
    /// ∂L/∂θ for every parameter.
    pub params: CrissCrossParameterGradients,
}

/// Sums over the samples and applications of a batch.
struct Accumulators {
    /// Σ ∂[q | k | v]ᵀ·x, (2·qk + C) × C.
    weight: Vec<f32>,
    /// Σ ∂[q | k | v] over positions, in f64.
    bias: Vec<f64>,
    /// Σ dz·y.
    gamma: f64,
}

impl CrissCrossAttention {
    /// The forward pass for training: the output and the context
    /// [`CrissCrossAttention::backward`] needs. Takes image maps (B, H, W, C) as
    /// [`CrissCrossAttention::forward_images`] and clips (B, 1, H, W, C) as
    /// [`CrissCrossAttention::forward`], told apart by rank; the output is bit for bit
    /// theirs. The context holds, per application of the block, its input, projections and
    /// y (O(N·C) floats per sample) and one float per position.
    ///
    /// # Errors
    /// As [`CrissCrossAttention::forward_images`] (rank 4) or
    /// [`CrissCrossAttention::forward`] (rank 5).
    pub fn forward_train<S, D>(&self, x: &ArrayBase<S, D>) -> Result<(Array<f32, D>, CrissCrossContext)>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let layout = if x.ndim() == 5 { Layout::Clips } else { Layout::Images };
        let x5 = check_input(&self.config, x.view().into_dyn(), layout)?;
        let (b, _, h, w, c) = x5.dim();
        let (n, width) = (h * w, self.config.projection_width());
        let ws = &self.workspace;
        let mut input = ws.take(x5.len(), "input copy")?.into_vec();
        match x5.as_slice() {
            Some(contiguous) => input.copy_from_slice(contiguous),
            None => input.iter_mut().zip(x5.iter()).for_each(|(d, &s)| *d = s),
        }
        let mut steps = Vec::with_capacity(self.config.recurrence);
        for _ in 0..self.config.recurrence {
            let mut proj = ws.take(b * n * width, "criss-cross projections")?.into_vec();
            let mut y = ws.take(b * n * c, "criss-cross y")?.into_vec();
            let mut lse = ws.take(b * n, "criss-cross log-sum-exp")?.into_vec();
            let mut out = buffer(b * n * c, "output")?;
            for s in 0..b {
                let xm = MatRef::new(&input, s * n * c, n, c, c);
                let proj = &mut proj[s * n * width..][..n * width];
                project_into(&self.compiled, xm, proj, ws);
                let p = Projections::new(proj, [h, w], self.config.qk_channels, c);
                let saved = Saved { y: &mut y[s * n * c..][..n * c], lse: &mut lse[s * n..][..n] };
                forward(p, xm, self.compiled.gamma, ws, &mut out[s * n * c..][..n * c], Some(saved))?;
            }
            steps.push(Step { x: std::mem::replace(&mut input, out), proj, y, lse });
        }
        let z = Array::from_shape_vec(x.raw_dim(), input).expect("output has the input's element count");
        let ctx = CrissCrossContext {
            shape: x.shape().to_vec(),
            dims: [b, h, w],
            generation: self.generation,
            steps,
            home: self.workspace.clone(),
        };
        Ok((z, ctx))
    }

    /// The backward pass: gradients of a loss L with respect to the input and every
    /// parameter, given `grad_output` = ∂L/∂z (the output's shape). With a recurrence, the
    /// parameter gradients are summed over the applications.
    ///
    /// # Errors
    /// [`Error::WrongShape`] when `grad_output` is not the shape of the forward input,
    /// [`Error::StaleContext`] when the parameters changed since `forward_train`,
    /// [`Error::TooLarge`] when buffers cannot be allocated.
    pub fn backward<S, D>(
        &self,
        ctx: &CrissCrossContext,
        grad_output: &ArrayBase<S, D>,
    ) -> Result<CrissCrossGradients<D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        if grad_output.shape() != ctx.shape.as_slice() {
            return Err(Error::WrongShape {
                key: "grad_output".into(),
                expected: ctx.shape.clone(),
                actual: grad_output.shape().to_vec(),
            });
        }
        if ctx.generation != self.generation {
            return Err(Error::StaleContext);
        }
        let [b, h, w] = ctx.dims;
        let (c, qk, width) = (self.config.in_channels, self.config.qk_channels, self.config.projection_width());
        let n = h * w;
        let mut dz = buffer(grad_output.len(), "output gradient")?;
        match grad_output.as_slice() {
            Some(contiguous) => dz.copy_from_slice(contiguous),
            None => dz.iter_mut().zip(grad_output.iter()).for_each(|(d, &s)| *d = s),
        }
        let mut acc = Accumulators { weight: vec![0.0; width * c], bias: vec![0.0; width], gamma: 0.0 };
        let gamma = self.compiled.gamma;
        let ws = &self.workspace;
        // Each application turns dz into its input's gradient in place, sample by sample.
        for step in ctx.steps.iter().rev() {
            for s in 0..b {
                let p = Projections::new(&step.proj[s * n * width..][..n * width], [h, w], qk, c);
                let saved = Forward { y: &step.y[s * n * c..][..n * c], lse: &step.lse[s * n..][..n] };
                let dz_s = &mut dz[s * n * c..][..n * c];
                let (dproj, dz_y) = backward(p, saved, dz_s, gamma, ws)?;
                acc.gamma += dz_y;
                let dproj = MatRef::new(&dproj, 0, n, width, width);
                let x = MatRef::new(&step.x, s * n * c, n, c, c);
                par_gemm(1.0, dproj.t(), x, 1.0, &mut MatMut::new(&mut acc.weight, width, c, c));
                add_column_sums(dproj, &mut acc.bias);
                // dx = dz + ∂[q | k | v]·[W_q; W_k; W_v].
                par_gemm(1.0, dproj, self.compiled.w_proj.view(), 1.0, &mut MatMut::new(dz_s, n, c, c));
            }
        }
        let params = self.parameter_gradients(&acc);
        let input = Array::from_shape_vec(grad_output.raw_dim(), dz).expect("input gradient has the input's size");
        Ok(CrissCrossGradients { input, params })
    }

    fn parameter_gradients(&self, acc: &Accumulators) -> CrissCrossParameterGradients {
        let (c, qk) = (self.config.in_channels, self.config.qk_channels);
        let conv = |start: usize, rows: usize, has_bias: bool| Conv1x1 {
            weight: Array2::from_shape_fn((rows, c), |(o, i)| acc.weight[(start + o) * c + i]),
            bias: has_bias.then(|| Array1::from_shape_fn(rows, |o| acc.bias[start + o] as f32)),
        };
        let p = &self.params;
        let mut key = conv(qk, qk, p.key.bias.is_some());
        // The key bias adds q_i·b to every energy of query i (its row and its column alike):
        // the softmax does not see it, so its gradient is exactly 0, where the summed dS rows
        // would give rounding noise.
        if let Some(bias) = key.bias.as_mut() {
            bias.fill(0.0);
        }
        CrissCrossParameterGradients {
            query: conv(0, qk, p.query.bias.is_some()),
            key,
            value: conv(2 * qk, c, p.value.bias.is_some()),
            gamma: acc.gamma as f32,
        }
    }

    /// Applies an optimiser step in place: `update(name, parameter, gradient)` once per
    /// trainable tensor, paired by name (`query_conv.weight`, …, `gamma.scale`, with
    /// PyTorch's shapes, as [`CrissCrossParameterGradients::named`]), then re-packs the
    /// weights for the kernels. A plain SGD step:
    ///
    /// ```
    /// use ndarray::Array4;
    /// use nonlocal::{CrissCrossAttention, CrissCrossConfig};
    ///
    /// let mut block = CrissCrossAttention::new(CrissCrossConfig::new(16))?;
    /// let x = Array4::<f32>::from_shape_fn((1, 5, 6, 16), |(_, h, w, c)| ((h * w + c) % 5) as f32 - 2.0);
    /// let (z, ctx) = block.forward_train(&x)?;
    /// let grads = block.backward(&ctx, &z)?; // L = |z|²/2
    /// block.update_parameters(&grads.params, |_name, mut param, grad| param.scaled_add(-0.01, &grad))?;
    /// assert!(block.parameters().gamma != 0.0, "γ moved off zero");
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// Before any change: [`Error::MissingKey`] when a parameter has no gradient in `grads` or
    /// a gradient no parameter (a block with other biases), [`Error::WrongShape`] when their
    /// shapes differ. After the update: [`Error::InvalidParameter`] when it left a
    /// non-finite value (the update is kept; reload saved parameters to go on).
    pub fn update_parameters<F>(&mut self, grads: &CrissCrossParameterGradients, mut update: F) -> Result<()>
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
            if grad.shape() != param.shape() {
                return Err(Error::WrongShape {
                    key: name,
                    expected: param.shape().to_vec(),
                    actual: grad.shape().to_vec(),
                });
            }
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
}

/// Adds the column sums of `m` to `out` in f64, rows in order (column blocks in parallel, so
/// each column's order is fixed).
fn add_column_sums(m: MatRef<'_>, out: &mut [f64]) {
    const BLOCK: usize = 64;
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, sums)| {
        let cols = m.cols_range(b * BLOCK, b * BLOCK + sums.len());
        let mut row = vec![0.0f32; sums.len()];
        for i in 0..cols.rows() {
            cols.copy_row(i, &mut row);
            sums.iter_mut().zip(&row).for_each(|(s, &v)| *s += v as f64);
        }
    });
}
