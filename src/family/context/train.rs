//! Training: a forward pass that keeps what the backward pass needs, and the exact backward
//! pass for the input and every parameter.
//!
//! With `out_j = x_j ⊙ s + a`, `s = σ(MLP_mul(c))`, `a = MLP_add(c)` and the context `c`:
//!
//! - `∂L/∂s = Σ_j g_j ⊙ x_j`, `∂L/∂a = Σ_j g_j` (one pass over g and x);
//! - each MLP backwards (conv, LayerNorm, ReLU, conv) gives its parameters' gradients and
//!   its share of `dc = ∂L/∂c`;
//! - the pooling backwards (a second pass): average pooling `dx_j = g_j ⊙ s + dc/N`;
//!   attention pooling with `p = softmax(l)`, `dl_j = p_j·(dc·x_j − dc·c)`:
//!   `dx_j = g_j ⊙ s + p_j·dc + dl_j·w`, `∂L/∂w = Σ_j dl_j·x_j`, `∂L/∂b = Σ_j dl_j` (zero up
//!   to rounding: a softmax does not see a constant shift).
//!
//! Memory stays O(N·C): a copy of the input and N attention weights per sample. Sums over
//! positions go over fixed chunks added in order, so gradients are bit-identical for any
//! thread count.

use ndarray::{Array, Array1, Array2, ArrayBase, ArrayViewD, ArrayViewMutD, Data, Dimension};
use rayon::prelude::*;

use super::block::{next_generation, Compiled, CompiledMlp, ContextBlock, MlpTrace, SampleTrace};
use super::input::{check_input, contiguous, written_buffer, Layout};
use super::kernels::{chunk_rows, grad_sums, input_grad, on_worker, weighted_rows_sum, InputGradTerms};
use super::params::{ContextMlp, ContextParameters};
use crate::error::{Error, Result};
use crate::load::Naming;
use crate::params::Conv1x1;
use crate::workspace::Workspace;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// What [`ContextBlock::forward_train`] keeps for [`ContextBlock::backward`]: a copy of the
/// input, each position's attention weight, and each sample's context and MLP activations.
/// O(N·C) floats per sample.
#[derive(Debug)]
pub struct ContextTrainContext {
    shape: Vec<usize>,
    generation: u64,
    /// Positions per sample.
    n: usize,
    /// The input, row-major B·N·C.
    x: Vec<f32>,
    /// Per position, `e_j = exp(l_j − m_chunk)` (1 for average pooling).
    e: Vec<f32>,
    samples: Vec<SampleTrace>,
    /// The block's scratch pool: the input copy goes back to it when the context is dropped.
    home: Arc<Workspace>,
}

impl Drop for ContextTrainContext {
    fn drop(&mut self) {
        self.home.give(std::mem::take(&mut self.x));
        self.home.give(std::mem::take(&mut self.e));
    }
}

/// Gradients of the parameters, shaped like [`ContextParameters`]: a part (or a bias) the
/// block does not have has none.
#[derive(Clone, Debug, PartialEq)]
pub struct ContextParameterGradients {
    /// The key scheme of the names [`ContextParameterGradients::named`] gives.
    pub naming: Naming,
    /// The gradients, part by part.
    pub values: ContextParameters,
}

impl ContextParameterGradients {
    /// The gradients by checkpoint key without prefix (`conv_mask.weight`,
    /// `channel_add_conv.1.bias`, `mlp_scale.fc2.weight`, …) in `state_dict` order, each in
    /// its parameter's PyTorch shape (see [`ContextParameters::named`]).
    pub fn named(&self) -> Vec<(String, ArrayViewD<'_, f32>)> {
        self.values.named(self.naming)
    }
}

/// The result of [`ContextBlock::backward`].
#[derive(Clone, Debug, PartialEq)]
pub struct ContextGradients<D: Dimension> {
    /// ∂L/∂x, the input's shape.
    pub input: Array<f32, D>,
    /// ∂L/∂θ for every parameter.
    pub params: ContextParameterGradients,
}

/// One MLP's gradients summed over the samples.
struct MlpGrads {
    w1: Vec<f32>,
    b1: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    w2: Vec<f32>,
    b2: Vec<f64>,
    /// Samples added so far: the first one writes the weight gradients instead of adding
    /// (reading fresh zeroed pages first would fault each page twice).
    samples: usize,
}

impl MlpGrads {
    fn zeros(m: &CompiledMlp) -> Self {
        let (p, c) = (m.b1.len(), m.b2.len());
        MlpGrads {
            w1: vec![0.0; p * c],
            b1: vec![0.0; p],
            gamma: vec![0.0; p],
            beta: vec![0.0; p],
            w2: vec![0.0; c * p],
            b2: vec![0.0; c],
            samples: 0,
        }
    }

    /// Adds one sample's gradients, given ∂L/∂(MLP output); returns ∂L/∂context.
    fn add_sample(&mut self, m: &CompiledMlp, t: &MlpTrace, context: &[f32], d_out: &[f32]) -> Vec<f32> {
        let (p, c) = (m.b1.len(), m.b2.len());
        add_vec(&mut self.b2, d_out);
        let first = self.samples == 0;
        self.samples += 1;
        add_outer(&mut self.w2, d_out, &t.hidden, first);
        let d_hidden = weighted_rows_sum(&m.w2, p, d_out);
        // ReLU, then LayerNorm's affine part.
        let d_pre: Vec<f64> =
            d_hidden.iter().zip(&t.pre_relu).map(|(&d, &v)| if v > 0.0 { f64::from(d) } else { 0.0 }).collect();
        for ((g, b), (d, n)) in self.gamma.iter_mut().zip(&mut self.beta).zip(d_pre.iter().zip(&t.normed)) {
            *g += d * n;
            *b += d;
        }
        // LayerNorm's normalisation: dh = (dn − mean(dn) − n·mean(dn·n)) / σ.
        let dn: Vec<f64> = d_pre.iter().zip(&m.gamma).map(|(d, &g)| d * f64::from(g)).collect();
        let mean_dn = dn.iter().sum::<f64>() / p as f64;
        let mean_dn_n = dn.iter().zip(&t.normed).map(|(d, n)| d * n).sum::<f64>() / p as f64;
        let dh: Vec<f32> =
            dn.iter().zip(&t.normed).map(|(d, n)| ((d - mean_dn - n * mean_dn_n) * t.inv_std) as f32).collect();
        add_vec(&mut self.b1, &dh);
        add_outer(&mut self.w1, &dh, context, first);
        weighted_rows_sum(&m.w1, c, &dh)
    }

    /// The gradients in the parameters' shapes (biases where the parameter has one).
    fn into_mlp(self, param: &ContextMlp) -> Result<ContextMlp> {
        let (p, c) = (self.b1.len(), self.b2.len());
        let conv = |w: Vec<f32>, b: Vec<f64>, shape: (usize, usize), has_bias: bool| -> Result<Conv1x1> {
            Ok(Conv1x1::new(Array2::from_shape_vec(shape, w)?, has_bias.then(|| to_f32(&b))))
        };
        Ok(ContextMlp {
            conv1: conv(self.w1, self.b1, (p, c), param.conv1.bias.is_some())?,
            ln_weight: to_f32(&self.gamma),
            ln_bias: to_f32(&self.beta),
            conv2: conv(self.w2, self.b2, (c, p), param.conv2.bias.is_some())?,
        })
    }
}

fn to_f32(v: &[f64]) -> Array1<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn add_vec(acc: &mut [f64], v: &[f32]) {
    acc.iter_mut().zip(v).for_each(|(a, &v)| *a += f64::from(v));
}

/// `dst[i][k] += u[i]·v[k]` (dst row-major u.len() × v.len(); `=` when `first`), rows in
/// parallel.
fn add_outer(dst: &mut [f32], u: &[f32], v: &[f32], first: bool) {
    let cols = v.len();
    let rows = chunk_rows(cols);
    dst.par_chunks_mut(rows * cols).zip(u.par_chunks(rows)).for_each(|(block, u)| {
        for (row, &ui) in block.chunks_exact_mut(cols).zip(u) {
            if first {
                row.iter_mut().zip(v).for_each(|(d, &vk)| *d = ui * vk);
            } else {
                row.iter_mut().zip(v).for_each(|(d, &vk)| *d += ui * vk);
            }
        }
    });
}

impl ContextBlock {
    /// The forward pass for training on clips `x` (B, 1, H, W, C): the output (bit for bit
    /// [`ContextBlock::forward`]'s) and the context [`ContextBlock::backward`] needs. Image
    /// maps (B, H, W, C) are clips of one frame, `x.insert_axis(Axis(1))`.
    ///
    /// # Errors
    /// As [`ContextBlock::forward`].
    pub fn forward_train<S, D>(&self, x: &ArrayBase<S, D>) -> Result<(Array<f32, D>, ContextTrainContext)>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let x4 = check_input(x.view().into_dyn(), Layout::Clips, self.config.in_channels)?;
        let (b, h, w, _) = x4.dim();
        let n = h * w;
        let mut saved = self.workspace.take(x4.len(), "input copy")?.into_vec();
        match x4.as_slice() {
            Some(xs) => saved.copy_from_slice(xs),
            None => saved.iter_mut().zip(x4.iter()).for_each(|(s, &v)| *s = v),
        }
        let mut e = self.workspace.take(b * n, "attention weights")?.into_vec();
        let mut samples = Vec::new();
        // SAFETY: `run` cannot fail, and its fusion pass writes every element of `out`.
        let out = unsafe {
            written_buffer(saved.len(), "output", |out| samples = on_worker(|| self.run(&saved, b, n, &mut e, out)))
        }?;
        let z = Array::from_shape_vec(x.raw_dim(), out)?;
        let ctx = ContextTrainContext {
            shape: x.shape().to_vec(),
            generation: self.generation,
            n,
            x: saved,
            e,
            samples,
            home: self.workspace.clone(),
        };
        Ok((z, ctx))
    }

    /// The backward pass: gradients of a loss L with respect to the input and every
    /// parameter, given `grad_output` = ∂L/∂out (the output's shape, any layout).
    ///
    /// ```
    /// use ndarray::Array5;
    /// use nonlocal::{ContextBlock, ContextConfig};
    ///
    /// let mut block = ContextBlock::new(ContextConfig::timm(8))?;
    /// let x = Array5::<f32>::from_shape_fn((2, 1, 4, 5, 8), |(b, _, h, w, c)| ((b + h * w + c) % 7) as f32 * 0.3);
    /// let target = x.mapv(|v| 0.5 * v);
    /// let loss = |z: &Array5<f32>| (z - &target).mapv(|d| d * d).sum();
    /// let (z, ctx) = block.forward_train(&x)?;
    /// let before = loss(&z);
    /// let grads = block.backward(&ctx, &((&z - &target) * 2.0))?;
    /// assert_eq!(grads.params.named()[0].0, "conv_attn.weight");
    /// block.update_parameters(&grads.params, |_name, mut param, grad| param.scaled_add(-0.01, &grad))?;
    /// assert!(loss(&block.forward(&x)?) < before);
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::WrongShape`] when `grad_output` is not the shape of the forward input,
    /// [`Error::StaleContext`] when the parameters changed since `forward_train`,
    /// [`Error::AllocationFailed`] when buffers cannot be allocated.
    pub fn backward<S, D>(
        &self,
        ctx: &ContextTrainContext,
        grad_output: &ArrayBase<S, D>,
    ) -> Result<ContextGradients<D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        if ctx.generation != self.generation {
            return Err(Error::StaleContext);
        }
        if grad_output.shape() != ctx.shape.as_slice() {
            return Err(Error::WrongShape {
                key: "grad_output".into(),
                expected: ctx.shape.clone(),
                actual: grad_output.shape().to_vec(),
            });
        }
        let (c, n) = (self.config.in_channels, ctx.n);
        let g = contiguous(grad_output, &self.workspace)?;
        let compiled = &self.compiled;
        let mut add_grads = compiled.add.as_ref().map(MlpGrads::zeros);
        let mut mul_grads = compiled.mul.as_ref().map(MlpGrads::zeros);
        let mut d_mask = (vec![0.0f64; c], 0.0f64);
        let rows = chunk_rows(c);
        let mut per_sample = |dx: &mut [MaybeUninit<f32>]| {
            let samples = ctx
                .x
                .chunks(n * c)
                .zip(g.chunks(n * c))
                .zip(dx.chunks_mut(n * c))
                .zip(ctx.e.chunks(n).zip(&ctx.samples));
            for (((xs, gs), dxs), (es, trace)) in samples {
                let (ds, da) = grad_sums(xs, gs, c, trace.gate.is_some(), trace.add.is_some());
                let context = &trace.pooled.context;
                let mut dc = vec![0.0f64; c];
                if let (Some(m), Some(t), Some(acc)) = (&compiled.add, &trace.add, &mut add_grads) {
                    add_vec(&mut dc, &acc.add_sample(m, t, context, &da));
                }
                if let (Some(m), Some(t), Some(acc), Some(gate)) =
                    (&compiled.mul, &trace.mul, &mut mul_grads, &trace.gate)
                {
                    // σ' = σ·(1 − σ).
                    let d_logit: Vec<f32> = ds
                        .iter()
                        .zip(gate)
                        .map(|(&d, &s)| (f64::from(d) * f64::from(s) * (1.0 - f64::from(s))) as f32)
                        .collect();
                    add_vec(&mut dc, &acc.add_sample(m, t, context, &d_logit));
                }
                let gate = trace.gate.as_deref();
                match &compiled.mask {
                    Some((w, _)) => {
                        let dc: Vec<f32> = dc.iter().map(|&v| v as f32).collect();
                        let p: Vec<f32> = es
                            .chunks(rows)
                            .zip(&trace.pooled.weight_scale)
                            .flat_map(|(e, &scale)| e.iter().map(move |&e| (f64::from(e) * scale) as f32))
                            .collect();
                        let terms = InputGradTerms { s: gate, dc: &dc, attention: Some((&p, context, w)) };
                        if let Some((dw, db)) = input_grad(xs, gs, &terms, dxs) {
                            add_vec(&mut d_mask.0, &dw);
                            d_mask.1 += db;
                        }
                    }
                    None => {
                        let dc: Vec<f32> = dc.iter().map(|&v| (v / n as f64) as f32).collect();
                        input_grad(xs, gs, &InputGradTerms { s: gate, dc: &dc, attention: None }, dxs);
                    }
                }
            }
        };
        // SAFETY: nothing in `per_sample` can fail, and its input_grad calls write every
        // element of each sample's share of `dx`; the samples cover it.
        let dx = unsafe { written_buffer(ctx.x.len(), "input gradient", |dx| on_worker(|| per_sample(dx))) }?;
        let params = &self.params;
        let mask = match &params.mask {
            Some(m) => Some(Conv1x1::new(
                Array2::from_shape_vec((1, c), d_mask.0.iter().map(|&v| v as f32).collect())?,
                m.bias.as_ref().map(|_| Array1::from_elem(1, d_mask.1 as f32)),
            )),
            None => None,
        };
        let mlp = |grads: Option<MlpGrads>, param: &Option<ContextMlp>| match (grads, param) {
            (Some(g), Some(p)) => g.into_mlp(p).map(Some),
            _ => Ok(None),
        };
        let values = ContextParameters { mask, add: mlp(add_grads, &params.add)?, mul: mlp(mul_grads, &params.mul)? };
        Ok(ContextGradients {
            input: Array::from_shape_vec(grad_output.raw_dim(), dx)?,
            params: ContextParameterGradients { naming: self.config.naming, values },
        })
    }

    /// Applies `update(name, param, grad)` to every parameter with its own gradient, paired
    /// by name (the checkpoint key without prefix, as [`ContextParameterGradients::named`]),
    /// both in the parameter's PyTorch shape; updates in place, then refreshes the block
    /// (training contexts from before become stale).
    ///
    /// # Errors
    /// Before anything changes: [`Error::MissingKey`] when a parameter has no gradient or a
    /// gradient no parameter (gradients of another configuration or naming),
    /// [`Error::WrongShape`] when their shapes differ. After the update:
    /// [`Error::InvalidParameter`] when it left a non-finite value; the update is kept.
    pub fn update_parameters<F>(&mut self, grads: &ContextParameterGradients, mut update: F) -> Result<()>
    where
        F: FnMut(&str, ArrayViewMutD<'_, f32>, ArrayViewD<'_, f32>),
    {
        let mut grads = grads.named();
        let mut pairs = Vec::with_capacity(grads.len());
        for (name, param) in self.params.named_mut(self.config.naming) {
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
        self.compiled = Compiled::new(&self.params);
        self.generation = next_generation();
        self.params.validate(&self.config)
    }
}
