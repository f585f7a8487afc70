//! The disentangled non-local block (Yin et al., *Disentangled Non-Local Neural Networks*,
//! ECCV 2020; mmsegmentation's `DisentangledNonLocal2d`): an mmcv `NonLocal2d` whose θ and φ
//! are whitened (their mean over positions subtracted) and whose logits are divided by a
//! temperature, plus a unary term: the softmax over positions of a 1-channel convolution of x
//! (`conv_mask`), applied to g and added to every `y_i` before `conv_out`:
//!
//! ```text
//! y_i = Σ_j softmax_j((θ_i − θ̄)·(φ_j − φ̄) · s / T) · g_j + Σ_j softmax_j(m_j) · g_j,   m = conv_mask(x)
//! z_i = x_i + BN(W_z · y_i)
//! ```
//!
//! with `s = 1/√C'` when `use_scale` (embedded Gaussian); dot product uses
//! `(θ_i − θ̄)·(φ_j − φ̄) / N` (no softmax, no scale, no temperature; the unary term keeps its
//! softmax), as mmsegmentation's code does. No sub-sampling (mmsegmentation refuses it).
//!
//! Built on [`NonLocalBlock`]: its parameters, checks, packed weights and output projection,
//! and the same fused kernels. The whitening costs nothing in the softmax: the terms
//! `(θ_i − θ̄)·φ̄` are constant over j, but the keys are whitened too, as PyTorch computes them.

use std::path::Path;

use ndarray::{Array, Array1, Array2, ArrayBase, ArrayView5, Data, Dimension};
use rayon::prelude::*;

use crate::block::{buffer, column_sums, sample_matrix, Accumulators, Layout, NonLocalBlock, ParameterGradients};
use crate::config::{Mode, NonLocalConfig, Precision};
use crate::error::{Error, Result};
use crate::kernels::attention::{attention_backward_in, attention_in};
use crate::kernels::dot_product::key_value_product;
use crate::kernels::gemm::par_gemm;
use crate::kernels::views::{MatMut, MatRef};
use crate::load::{BlockInfo, Naming, TensorFile, WeightKeys};
use crate::params::{check_shape, Conv1x1, Parameters};
use crate::plan::Weights;
use crate::workspace::Workspace;

/// Configuration of a [`DisentangledNonLocal`] block: the non-local block it extends (mmcv's
/// `NonLocal2d`: embedded Gaussian or dot product, no sub-sampling, 2-d convolutions) and the
/// temperature of the pairwise softmax.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DisentangledConfig {
    /// The non-local part. [`DisentangledConfig::mmseg`] sets mmsegmentation's defaults.
    pub non_local: NonLocalConfig,
    /// Embedded-Gaussian logits are divided by it. Default 0.05 (mmsegmentation's `DNLHead`).
    pub temperature: f32,
}

impl DisentangledConfig {
    /// mmsegmentation's `DNLHead` block for `in_channels` channels: `reduction=2` (C' = C/2),
    /// `use_scale=True`, `mode='embedded_gaussian'`, `temperature=0.05`, BatchNorm after
    /// `conv_out` (the head's `norm_cfg`), no sub-sampling, 2-d convolutions, mmcv's keys plus
    /// `conv_mask.weight` (1, C, 1, 1) and `conv_mask.bias` (1).
    ///
    /// ```
    /// # use nonlocal::DisentangledConfig;
    /// let config = DisentangledConfig::mmseg(512);
    /// assert_eq!((config.non_local.inter_channels, config.temperature), (256, 0.05));
    /// assert!(config.non_local.use_scale && config.non_local.bn_layer);
    /// ```
    pub fn mmseg(in_channels: usize) -> Self {
        DisentangledConfig {
            non_local: NonLocalConfig::mmcv(in_channels).conv_dims(2).bn_layer(true),
            temperature: 0.05,
        }
    }

    /// The configuration a checkpoint's keys show for a block [`find_blocks`](crate::find_blocks)
    /// found ([`BlockInfo::config`]: channels, BatchNorm, conv rank), the rest from
    /// [`DisentangledConfig::mmseg`]. The keys cannot show the temperature (0.05 here),
    /// `use_scale` (true) or embedded Gaussian against dot product (embedded Gaussian): set
    /// those from the model's config.
    ///
    /// ```
    /// use nonlocal::{find_blocks, BlockKind, DisentangledConfig, DisentangledNonLocal, TensorFile};
    ///
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/family/dnl_mmseg.safetensors");
    /// let file = TensorFile::open(path)?;
    /// let info = &find_blocks(&file)[0];
    /// assert_eq!(info.kind, BlockKind::Disentangled);
    /// let block = DisentangledNonLocal::from_checkpoint(DisentangledConfig::from_info(info), &file, &info.keys)?;
    /// assert_eq!(block.config().non_local.in_channels, 16);
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    pub fn from_info(info: &BlockInfo) -> Self {
        DisentangledConfig::mmseg(info.in_channels).non_local(info.config())
    }

    /// Sets the temperature. Default 0.05.
    ///
    /// ```
    /// # use nonlocal::DisentangledConfig;
    /// assert_eq!(DisentangledConfig::mmseg(8).temperature(0.5).temperature, 0.5);
    /// ```
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets the non-local part's configuration (its mode, BatchNorm, `use_scale`, channels).
    pub fn non_local(mut self, non_local: NonLocalConfig) -> Self {
        self.non_local = non_local;
        self
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`]: the non-local part's own errors, a mode other than embedded
    /// Gaussian or dot product, sub-sampling, a temperature that is not finite and positive, or
    /// a precision other than f32 (the block runs in f32).
    pub fn validate(&self) -> Result<()> {
        self.non_local.validate()?;
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if !matches!(self.non_local.mode, Mode::EmbeddedGaussian | Mode::DotProduct) {
            return invalid(format!(
                "the disentangled block is embedded Gaussian or dot product, not {}",
                self.non_local.mode
            ));
        }
        if self.non_local.sub_sample.is_some() {
            return invalid("the disentangled block has no sub-sampling".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return invalid(format!("temperature {} is not a finite positive number", self.temperature));
        }
        if self.non_local.precision != Precision::F32 {
            return invalid(format!("the disentangled block runs in f32, not {:?}", self.non_local.precision));
        }
        Ok(())
    }

    /// The factor applied to embedded-Gaussian logits: `s / T`.
    fn logit_scale(&self) -> f32 {
        match self.non_local.mode {
            Mode::EmbeddedGaussian => (self.non_local.logit_scale() as f64 / self.temperature as f64) as f32,
            _ => 1.0,
        }
    }
}

/// The disentangled non-local block (DNLNet), mmsegmentation's `DisentangledNonLocal2d`.
///
/// # Example
/// ```
/// use ndarray::Array4;
/// use nonlocal::{DisentangledConfig, DisentangledNonLocal};
///
/// let block = DisentangledNonLocal::new(DisentangledConfig::mmseg(16))?;
/// let images = Array4::<f32>::from_shape_fn((2, 5, 7, 16), |(b, h, w, c)| ((b + h * w + c) % 7) as f32 * 0.1);
/// // A new block's BatchNorm is zero, as the non-local block's: it starts as the identity.
/// assert_eq!(block.forward_images(&images)?, images);
/// # Ok::<(), nonlocal::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct DisentangledNonLocal {
    config: DisentangledConfig,
    /// The non-local part: θ, φ, g, `conv_out` with its BatchNorm, checks and output.
    block: NonLocalBlock,
    /// `conv_mask`: 1 × C, and its bias.
    mask: Conv1x1,
    /// `[θ | φ | g | mask]` stacked (3C' + 1 rows × C) and their bias.
    proj: Weights,
    b_proj: Vec<f32>,
}

/// What [`DisentangledNonLocal::backward`] returns.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DisentangledGradients<D: Dimension> {
    /// ∂L/∂x, the input's shape.
    pub input: Array<f32, D>,
    /// The non-local part's parameters (θ and φ's biases have zero gradients: the whitening
    /// removes them).
    pub params: ParameterGradients,
    /// `conv_mask`'s weight (1, C) and bias (1; zero: a softmax ignores a shift).
    pub conv_mask: Conv1x1,
}

/// What [`DisentangledNonLocal::forward_train`] saves for the backward pass: O(N·C) per sample.
#[derive(Debug)]
pub struct DisentangledContext {
    shape: Vec<usize>,
    grid: [usize; 3],
    generation: u64,
    /// The input, contiguous (B·N·C).
    x: Vec<f32>,
    samples: Vec<Saved>,
}

#[derive(Debug)]
struct Saved {
    /// Whitened θ and φ, g (N × C' each).
    q: Vec<f32>,
    k: Vec<f32>,
    g: Vec<f32>,
    /// The attention's output (N × C'), without the unary term.
    y: Vec<f32>,
    /// The unary weights softmax(m) (N) and term u (C').
    unary_w: Vec<f32>,
    unary: Vec<f32>,
    /// Embedded Gaussian: per-query log-sum-exp.
    lse: Vec<f32>,
}

/// One sample's projections: whitened θ and φ, g, the unary weights and term.
struct Projected {
    q: Vec<f32>,
    k: Vec<f32>,
    g: Vec<f32>,
    unary_w: Vec<f32>,
    unary: Vec<f32>,
}

impl DisentangledNonLocal {
    /// A new block: the non-local part as [`NonLocalBlock::new`] (the identity until trained),
    /// `conv_mask` drawn like PyTorch's default init from a fixed seed.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (see [`DisentangledConfig::validate`]), [`Error::TooLarge`].
    pub fn new(config: DisentangledConfig) -> Result<Self> {
        config.validate()?;
        let block = NonLocalBlock::new(config.non_local.clone())?;
        let c = config.non_local.in_channels;
        let bound = 1.0 / (c as f32).sqrt();
        let mask = Conv1x1::new(
            Array2::from_shape_fn((1, c), |(_, i)| bound * (((i * 7919 + 13) % 1000) as f32 / 500.0 - 1.0)),
            Some(Array1::zeros(1)),
        );
        Self::assemble(config, block, mask)
    }

    /// A block from parameters: the non-local part's and `conv_mask` (weight (1, C), bias (1)
    /// or none).
    ///
    /// # Errors
    /// As [`NonLocalBlock::from_parameters`], and [`Error::WrongShape`] or
    /// [`Error::InvalidParameter`] for `conv_mask`.
    pub fn from_parameters(config: DisentangledConfig, params: Parameters, mask: Conv1x1) -> Result<Self> {
        config.validate()?;
        let block = NonLocalBlock::from_parameters(config.non_local.clone(), params)?;
        Self::assemble(config, block, mask)
    }

    /// A block with parameters read from a checkpoint (any format, [`TensorFile`]): mmcv's
    /// `NonLocal2d` keys (`keys.naming` must be [`Naming::Mmcv`]) plus `conv_mask.weight`
    /// (1, C, 1, 1) and `conv_mask.bias` (1) under the prefix. The temperature and the mode
    /// cannot be read off the keys: they come from `config`.
    ///
    /// # Errors
    /// As [`NonLocalBlock::from_checkpoint`]; [`Error::ConfigMismatch`] for another key scheme.
    pub fn from_checkpoint(config: DisentangledConfig, file: &TensorFile, keys: &WeightKeys) -> Result<Self> {
        config.validate()?;
        if keys.naming != Naming::Mmcv {
            return Err(Error::ConfigMismatch {
                what: "naming",
                config: keys.naming.to_string(),
                weights: "mmsegmentation's disentangled block, under mmcv's NonLocal2d keys".into(),
            });
        }
        let block = NonLocalBlock::from_checkpoint(config.non_local.clone(), file, keys)?;
        let c = config.non_local.in_channels;
        let key = format!("{}conv_mask.weight", keys.prefix);
        let dims = config.non_local.conv_dims;
        let mut expected = vec![1, c];
        expected.resize(2 + dims, 1);
        check_shape(&key, file.shape(&key)?, &expected)?;
        let weight = Array2::from_shape_vec((1, c), file.tensor(&key)?.into_raw_vec_and_offset().0)?;
        let bias_key = format!("{}conv_mask.bias", keys.prefix);
        let bias = match file.contains(&bias_key) {
            true => {
                check_shape(&bias_key, file.shape(&bias_key)?, &[1])?;
                Some(Array1::from_vec(file.tensor(&bias_key)?.into_raw_vec_and_offset().0))
            }
            false => None,
        };
        Self::assemble(config, block, Conv1x1::new(weight, bias))
    }

    /// Opens a checkpoint of any format, then as [`DisentangledNonLocal::from_checkpoint`].
    ///
    /// # Errors
    /// Those of [`TensorFile::open`] and [`DisentangledNonLocal::from_checkpoint`].
    pub fn from_checkpoint_file(config: DisentangledConfig, path: impl AsRef<Path>, keys: &WeightKeys) -> Result<Self> {
        Self::from_checkpoint(config, &TensorFile::open(path)?, keys)
    }

    fn assemble(config: DisentangledConfig, block: NonLocalBlock, mask: Conv1x1) -> Result<Self> {
        let c = config.non_local.in_channels;
        check_shape("conv_mask.weight", mask.weight.shape(), &[1, c])?;
        if let Some(b) = &mask.bias {
            check_shape("conv_mask.bias", b.shape(), &[1])?;
        }
        let finite = mask.weight.iter().chain(mask.bias.iter().flatten()).all(|v| v.is_finite());
        if !finite {
            return Err(Error::InvalidParameter { key: "conv_mask".into(), reason: "non-finite value".into() });
        }
        let compiled = block.compiled();
        let mut w = compiled.w_proj.to_vec();
        w.extend(mask.weight.iter());
        let mut b_proj = compiled.b_proj.clone();
        b_proj.push(mask.bias.as_ref().map_or(0.0, |b| b[0]));
        let proj = Weights::new(w, b_proj.len(), c);
        Ok(DisentangledNonLocal { config, block, mask, proj, b_proj })
    }

    /// The configuration.
    pub fn config(&self) -> &DisentangledConfig {
        &self.config
    }

    /// The non-local part's parameters.
    pub fn parameters(&self) -> &Parameters {
        self.block.parameters()
    }

    /// `conv_mask`: weight (1, C) and bias.
    pub fn conv_mask(&self) -> &Conv1x1 {
        &self.mask
    }

    /// Runs the block on image maps (B, H, W, C), channels last, any layout (mmsegmentation's
    /// module on (B, C, H, W)). Returns the input's shape.
    ///
    /// # Errors
    /// As [`NonLocalBlock::forward_images`].
    pub fn forward_images<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        self.forward_layout(x, Layout::Images)
    }

    /// Runs the block on clips (B, T, H, W, C) with T = 1 (a 2-d block).
    ///
    /// # Errors
    /// As [`NonLocalBlock::forward`] ([`Error::LayoutMismatch`] for T > 1).
    pub fn forward<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        self.forward_layout(x, Layout::Clips)
    }

    fn forward_layout<S, D>(&self, x: &ArrayBase<S, D>, layout: Layout) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let x5 = self.block.check_input(x.view().into_dyn(), layout)?;
        let mut out = buffer(x5.len(), "output")?;
        self.run(x5, &mut out, None)?;
        Ok(Array::from_shape_vec(x.raw_dim(), out).expect("output has the input's element count"))
    }

    /// Every sample of `x5` into `out`; with `saved`, what the backward pass needs.
    fn run(&self, x5: ArrayView5<'_, f32>, out: &mut [f32], mut saved: Option<&mut Vec<Saved>>) -> Result<()> {
        let (_, t, h, w, c) = x5.dim();
        let n = t * h * w;
        let ci = self.config.non_local.inter_channels;
        let ws = &**self.block.workspace();
        for (sample, out_sample) in x5.outer_iter().zip(out.chunks_mut(n * c)) {
            let mut copy = Vec::new();
            let x = sample_matrix(sample, &mut copy);
            let p = self.project(x, ws)?;
            let (q, k, g) = (rows(&p.q, n, ci), rows(&p.k, n, ci), rows(&p.g, n, ci));
            let mut y = buffer(n * ci, "y")?;
            let mut lse = Vec::new();
            match self.config.non_local.mode {
                Mode::EmbeddedGaussian => {
                    lse = buffer(n, "log-sum-exp")?;
                    attention_in(
                        ws,
                        Precision::F32,
                        (q, k, g, self.config.logit_scale()),
                        None,
                        &mut y,
                        Some(&mut lse),
                    );
                }
                _ => {
                    let kv = key_value_product(k, g, 1.0 / n as f32);
                    par_gemm(1.0, q, rows(&kv, ci, ci), 0.0, &mut MatMut::new(&mut y, n, ci, ci));
                }
            }
            // y + u: the unary term added to every position before conv_out.
            let mut y_u = y.clone();
            y_u.par_chunks_mut(ci).for_each(|row| row.iter_mut().zip(&p.unary).for_each(|(a, b)| *a += b));
            self.block.output(Precision::F32, x, rows(&y_u, n, ci), None, out_sample);
            if let Some(saved) = saved.as_deref_mut() {
                let Projected { q, k, g, unary_w, unary } = p;
                saved.push(Saved { q, k, g, y, unary_w, unary, lse });
            }
        }
        Ok(())
    }

    /// `[θ | φ | g | m]` for one sample, θ and φ whitened, and the unary term.
    fn project(&self, x: MatRef<'_>, ws: &Workspace) -> Result<Projected> {
        let (n, ci) = (x.rows(), self.config.non_local.inter_channels);
        let width = self.b_proj.len();
        let mut proj = ws.take(n * width, "projections")?;
        self.proj.apply_bias(Precision::F32, x, &self.b_proj, &mut MatMut::new(&mut proj, n, width, width), ws);
        let all = rows(&proj, n, width);
        let whitened = |col: usize| -> Result<Vec<f32>> {
            let view = all.cols_range(col, col + ci);
            let mut mean = vec![0.0f32; ci];
            column_sums(view, &mut mean);
            mean.iter_mut().for_each(|m| *m = (*m as f64 / n as f64) as f32);
            let mut out = buffer(n * ci, "whitened projection")?;
            out.par_chunks_mut(ci).enumerate().for_each(|(i, row)| {
                view.copy_row(i, row);
                row.iter_mut().zip(&mean).for_each(|(v, m)| *v -= m);
            });
            Ok(out)
        };
        let (q, k) = (whitened(0)?, whitened(ci)?);
        let mut g = buffer(n * ci, "g")?;
        g.par_chunks_mut(ci).enumerate().for_each(|(i, row)| all.cols_range(2 * ci, 3 * ci).copy_row(i, row));
        // softmax over positions of the mask logits, in f64, and u = Σ_j w_j g_j.
        let logits: Vec<f64> = (0..n).map(|i| all.at(i, 3 * ci) as f64).collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f64 = e.iter().sum();
        let unary_w: Vec<f32> = e.iter().map(|v| (v / total) as f32).collect();
        let mut unary = vec![0.0f64; ci];
        for (row, &wj) in g.chunks(ci).zip(&unary_w) {
            unary.iter_mut().zip(row).for_each(|(u, &v)| *u += wj as f64 * v as f64);
        }
        Ok(Projected { q, k, g, unary_w, unary: unary.into_iter().map(|v| v as f32).collect() })
    }

    /// The forward pass for training on clips (B, 1, H, W, C): the output and what
    /// [`DisentangledNonLocal::backward`] needs (O(N·C) per sample, never N×N). Image maps
    /// are clips of one frame, `x.insert_axis(Axis(1))`.
    ///
    /// # Errors
    /// As [`DisentangledNonLocal::forward`].
    pub fn forward_train<S, D>(&self, x: &ArrayBase<S, D>) -> Result<(Array<f32, D>, DisentangledContext)>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let x5 = self.block.check_input(x.view().into_dyn(), Layout::Clips)?;
        let (_, t, h, w, _) = x5.dim();
        let xs: Vec<f32> = x5.iter().copied().collect();
        let x5 = ArrayView5::from_shape(x5.raw_dim(), &xs).expect("a contiguous copy of x");
        let mut out = buffer(x5.len(), "output")?;
        let mut samples = Vec::new();
        self.run(x5, &mut out, Some(&mut samples))?;
        let z = Array::from_shape_vec(x.raw_dim(), out).expect("output has the input's element count");
        let ctx = DisentangledContext {
            shape: x.shape().to_vec(),
            grid: [t, h, w],
            generation: self.block.generation(),
            x: xs,
            samples,
        };
        Ok((z, ctx))
    }

    /// Gradients of a loss with respect to the input and every parameter, given
    /// `grad_output` = ∂L/∂z.
    ///
    /// # Errors
    /// [`Error::WrongShape`] when `grad_output` is not the forward input's shape,
    /// [`Error::StaleContext`] when the parameters changed since `forward_train`,
    /// [`Error::AllocationFailed`].
    pub fn backward<S, D>(
        &self,
        ctx: &DisentangledContext,
        grad_output: &ArrayBase<S, D>,
    ) -> Result<DisentangledGradients<D>>
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
        if ctx.generation != self.block.generation() {
            return Err(Error::StaleContext);
        }
        let (c, ci) = (self.config.non_local.in_channels, self.config.non_local.inter_channels);
        let n: usize = ctx.grid.iter().product();
        let dz: Vec<f32> = grad_output.iter().copied().collect();
        let mut dx = buffer(ctx.x.len(), "input gradient")?;
        let width = self.b_proj.len();
        let mut acc = Accumulators::new(c, ci, width);
        for (s, saved) in ctx.samples.iter().enumerate() {
            let range = s * n * c..(s + 1) * n * c;
            let x = rows(&ctx.x[range.clone()], n, c);
            let dz_s = rows(&dz[range.clone()], n, c);
            self.backward_sample(x, saved, dz_s, &mut dx[range], &mut acc)?;
        }
        // The non-local part's sums are the first 3C' projection columns ([θ | φ | g]).
        let mask_row = 3 * ci;
        let mask_w: Vec<f32> = acc.d_proj_w[mask_row * c..(mask_row + 1) * c].to_vec();
        let mask_b = acc.d_proj_b[mask_row];
        acc.d_proj_w.truncate(mask_row * c);
        acc.d_proj_b.truncate(mask_row);
        let params = self.block.parameter_gradients(&acc);
        let conv_mask = Conv1x1::new(
            Array2::from_shape_vec((1, c), mask_w).expect("C values"),
            self.mask.bias.as_ref().map(|_| Array1::from_elem(1, mask_b)),
        );
        let input = Array::from_shape_vec(grad_output.raw_dim(), dx).expect("the input's size");
        Ok(DisentangledGradients { input, params, conv_mask })
    }

    fn backward_sample(
        &self,
        x: MatRef<'_>,
        saved: &Saved,
        dz: MatRef<'_>,
        dx: &mut [f32],
        acc: &mut Accumulators,
    ) -> Result<()> {
        let (n, c, ci) = (x.rows(), x.cols(), self.config.non_local.inter_channels);
        let width = self.b_proj.len();
        let ws = &**self.block.workspace();
        // Output side: z = x + (y + u)·W_outᵀ + b_out.
        let w_out = self.block.compiled().w_out.view();
        let mut dy = buffer(n * ci, "y gradient")?;
        par_gemm(1.0, dz, w_out, 0.0, &mut MatMut::new(&mut dy, n, ci, ci));
        let mut y_u = saved.y.clone();
        y_u.par_chunks_mut(ci).for_each(|row| row.iter_mut().zip(&saved.unary).for_each(|(a, b)| *a += b));
        par_gemm(1.0, dz.t(), rows(&y_u, n, ci), 1.0, &mut MatMut::new(&mut acc.dz_y, c, ci, ci));
        column_sums(dz, &mut acc.dz_sum);
        dx.par_chunks_mut(c).enumerate().for_each(|(i, row)| dz.copy_row(i, row));
        let (q, k, g, dy_m) = (rows(&saved.q, n, ci), rows(&saved.k, n, ci), rows(&saved.g, n, ci), rows(&dy, n, ci));
        let (mut dq, mut dk, mut dg) = (buffer(n * ci, "dq")?, buffer(n * ci, "dk")?, buffer(n * ci, "dg")?);
        match self.config.non_local.mode {
            Mode::EmbeddedGaussian => {
                let scale = self.config.logit_scale();
                attention_backward_in(
                    ws,
                    (q, k, g, scale),
                    &saved.lse,
                    (rows(&saved.y, n, ci), dy_m),
                    (&mut dq, &mut dk, &mut dg),
                );
            }
            _ => {
                // y = q·A with A = kᵀg/N: dq = dy·Aᵀ; dA = qᵀ·dy/N; dk = g·dAᵀ; dg = k·dA.
                let inv_n = 1.0 / n as f32;
                let a = key_value_product(k, g, inv_n);
                par_gemm(1.0, dy_m, rows(&a, ci, ci).t(), 0.0, &mut MatMut::new(&mut dq, n, ci, ci));
                let mut da = vec![0.0f32; ci * ci];
                par_gemm(inv_n, q.t(), dy_m, 0.0, &mut MatMut::new(&mut da, ci, ci, ci));
                par_gemm(1.0, g, rows(&da, ci, ci).t(), 0.0, &mut MatMut::new(&mut dk, n, ci, ci));
                par_gemm(1.0, k, rows(&da, ci, ci), 0.0, &mut MatMut::new(&mut dg, n, ci, ci));
            }
        }
        // The unary term u = Σ_j w_j g_j, w = softmax(m), added to every y_i: with
        // du = Σ_i dy_i, dg_j += w_j·du and dm_j = w_j·(g_j·du − u·du).
        let mut du = vec![0.0f32; ci];
        column_sums(dy_m, &mut du);
        let u_du: f64 = saved.unary.iter().zip(&du).map(|(a, b)| *a as f64 * *b as f64).sum();
        let mut dm = vec![0.0f32; n];
        for (j, (dg_row, g_row)) in dg.chunks_mut(ci).zip(saved.g.chunks(ci)).enumerate() {
            let wj = saved.unary_w[j];
            dg_row.iter_mut().zip(&du).for_each(|(d, u)| *d += wj * u);
            let g_du: f64 = g_row.iter().zip(&du).map(|(a, b)| *a as f64 * *b as f64).sum();
            dm[j] = (wj as f64 * (g_du - u_du)) as f32;
        }
        // The whitening θ − θ̄: the gradient loses its mean over positions.
        for d in [&mut dq, &mut dk] {
            let mut mean = vec![0.0f32; ci];
            column_sums(rows(d, n, ci), &mut mean);
            mean.iter_mut().for_each(|m| *m = (*m as f64 / n as f64) as f32);
            d.par_chunks_mut(ci).for_each(|row| row.iter_mut().zip(&mean).for_each(|(v, m)| *v -= m));
        }
        // Projection side: P = x·W_allᵀ + b_all with [θ | φ | g | m].
        let mut dp = buffer(n * width, "projection gradient")?;
        dp.par_chunks_mut(width).enumerate().for_each(|(i, row)| {
            row[..ci].copy_from_slice(&dq[i * ci..(i + 1) * ci]);
            row[ci..2 * ci].copy_from_slice(&dk[i * ci..(i + 1) * ci]);
            row[2 * ci..3 * ci].copy_from_slice(&dg[i * ci..(i + 1) * ci]);
            row[3 * ci] = dm[i];
        });
        let dp_m = rows(&dp, n, width);
        par_gemm(1.0, dp_m.t(), x, 1.0, &mut MatMut::new(&mut acc.d_proj_w, width, c, c));
        column_sums(dp_m, &mut acc.d_proj_b);
        par_gemm(1.0, dp_m, self.proj.view(), 1.0, &mut MatMut::new(dx, n, c, c));
        Ok(())
    }

    /// Updates every trainable parameter in place from its gradient: the non-local part's as
    /// [`NonLocalBlock::update_parameters`] (names `theta.weight`, `w_z.weight`, `bn.bias`, …),
    /// then `conv_mask.weight` and `conv_mask.bias`; training contexts from before become stale.
    ///
    /// # Errors
    /// As [`NonLocalBlock::update_parameters`].
    pub fn update_parameters<F, D>(&mut self, grads: &DisentangledGradients<D>, mut update: F) -> Result<()>
    where
        F: FnMut(&str, ndarray::ArrayViewMutD<'_, f32>, ndarray::ArrayViewD<'_, f32>),
        D: Dimension,
    {
        check_shape("conv_mask.weight", grads.conv_mask.weight.shape(), self.mask.weight.shape())?;
        self.block.update_parameters(&grads.params, &mut update)?;
        update("conv_mask.weight", self.mask.weight.view_mut().into_dyn(), grads.conv_mask.weight.view().into_dyn());
        if let (Some(b), Some(g)) = (self.mask.bias.as_mut(), grads.conv_mask.bias.as_ref()) {
            update("conv_mask.bias", b.view_mut().into_dyn(), g.view().into_dyn());
        }
        let rebuilt = Self::assemble(self.config.clone(), self.block.clone(), self.mask.clone())?;
        *self = rebuilt;
        Ok(())
    }
}

/// `data` as a row-major `rows × cols` view.
fn rows(data: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
    MatRef::new(data, 0, rows, cols, cols)
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<DisentangledNonLocal>();
};
