//! [`NonLocalBlock`]: parameters plus the forward pass (shape checks, then kernels).

use std::path::Path;

use ndarray::{Array, Array3, ArrayBase, ArrayView4, ArrayView5, Data, DataMut, Dimension};

use crate::config::{Mode, NonLocalConfig};
use crate::error::{Error, Result};
use crate::kernels::attention::{softmax_attention, softmax_attention_with_key_bias};
use crate::kernels::concat::concat_attention;
use crate::kernels::dot_product::key_value_product;
use crate::kernels::exp::{exp_sum, row_max};
use crate::kernels::gemm::{gemm, par_gemm, row_block, MatMut, MatRef};
use crate::layout::Layout;
use crate::params::Parameters;
use crate::plan::{Compiled, Prepared};
use crate::weights::{load_parameters, TensorFile, WeightKeys};
use crate::workspace::Workspace;
use rayon::prelude::*;

/// Seed of the weight init of [`NonLocalBlock::new`].
const DEFAULT_SEED: u64 = 0x6e6f_6e6c_6f63_616c;

/// A non-local block: `z = BN(W_z·y) + x` with `y_i = Σ_j f(x_i, x_j)·g(x_j) / C(x)`.
///
/// Built from a [`NonLocalConfig`] and either fresh parameters ([`NonLocalBlock::new`], the
/// identity until trained), parameters in ndarrays ([`NonLocalBlock::from_parameters`]) or a
/// PyTorch checkpoint ([`NonLocalBlock::from_safetensors_file`]).
///
/// # Example
/// ```
/// use ndarray::Array5;
/// use nonlocal::{NonLocalBlock, NonLocalConfig};
///
/// let block = NonLocalBlock::new(NonLocalConfig::new(16))?;
/// let x = Array5::<f32>::from_shape_fn((1, 2, 6, 6, 16), |(_, t, h, w, c)| (t + h * w + c) as f32 * 0.01);
/// let z = block.forward(&x)?;
/// // A new block's last layer is zero (as in the paper): it starts as the identity.
/// assert_eq!(z, x);
/// # Ok::<(), nonlocal::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct NonLocalBlock {
    pub(crate) config: NonLocalConfig,
    pub(crate) params: Parameters,
    pub(crate) keys: Option<WeightKeys>,
    pub(crate) compiled: Compiled,
    pub(crate) workspace: std::sync::Arc<Workspace>,
    /// Identifies the current parameters, so a training context can tell it is stale.
    pub(crate) generation: u64,
}

/// Source of [`NonLocalBlock::generation`] values.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub(crate) fn next_generation() -> u64 {
    GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl NonLocalBlock {
    /// A new block with fresh parameters (see [`Parameters::init`]): θ, φ, g drawn like
    /// PyTorch's default init from a fixed seed, and the last layer zero so the block is the
    /// identity until trained or loaded.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (see [`NonLocalConfig::validate`]).
    pub fn new(config: NonLocalConfig) -> Result<Self> {
        config.validate()?;
        check_parameter_count(&config)?;
        let params = Parameters::init(&config, DEFAULT_SEED);
        Self::from_parameters(config, params)
    }

    /// A block from parameters held in ndarrays.
    ///
    /// # Errors
    /// Any error of [`Parameters::validate`]: a missing part, a wrong shape, a non-finite
    /// value, or a part the configuration does not have.
    pub fn from_parameters(config: NonLocalConfig, params: Parameters) -> Result<Self> {
        params.validate(&config)?;
        let compiled = Compiled::new(&config, &params);
        Ok(NonLocalBlock {
            config,
            params,
            keys: None,
            compiled,
            workspace: Default::default(),
            generation: next_generation(),
        })
    }

    /// A block with parameters read from a checkpoint under `keys`: safetensors or a
    /// `torch.save` file, whatever [`TensorFile::open`] read (the same as
    /// [`NonLocalBlock::from_checkpoint`]).
    ///
    /// Other tensors in the file are ignored. Whether BatchNorm is present and whether φ/g
    /// are pooled are read off the keys and must agree with `config`, as must the conv rank
    /// ([`NonLocalConfig::conv_dims`]) and the channel counts.
    ///
    /// # Errors
    /// [`Error::MissingKey`], [`Error::WrongShape`], [`Error::UnsupportedDtype`],
    /// [`Error::ConfigMismatch`], [`Error::InvalidParameter`] (non-finite values, negative
    /// variance) or [`Error::InvalidConfig`], each naming the key.
    pub fn from_safetensors(config: NonLocalConfig, file: &TensorFile, keys: &WeightKeys) -> Result<Self> {
        let params = load_parameters(file, &config, keys)?;
        let mut block = Self::from_parameters(config, params)?;
        block.keys = Some(keys.clone());
        Ok(block)
    }

    /// Reads a checkpoint of any format from `path` (the same as
    /// [`NonLocalBlock::from_checkpoint_file`]), then as [`NonLocalBlock::from_safetensors`].
    ///
    /// # Errors
    /// Those of [`TensorFile::open`] ([`Error::Io`], [`Error::NotACheckpoint`],
    /// [`Error::BadCheckpoint`]) and of [`NonLocalBlock::from_safetensors`].
    pub fn from_safetensors_file(config: NonLocalConfig, path: impl AsRef<Path>, keys: &WeightKeys) -> Result<Self> {
        Self::from_safetensors(config, &TensorFile::open(path)?, keys)
    }

    /// The configuration.
    pub fn config(&self) -> &NonLocalConfig {
        &self.config
    }

    /// The parameters, as loaded or built (BatchNorm not folded).
    pub fn parameters(&self) -> &Parameters {
        &self.params
    }

    /// The checkpoint keys the parameters were loaded under, if they came from a file.
    pub fn weight_keys(&self) -> Option<&WeightKeys> {
        self.keys.as_ref()
    }

    /// Replaces the parameters.
    ///
    /// # Errors
    /// As [`NonLocalBlock::from_parameters`]; on error the block is unchanged.
    pub fn set_parameters(&mut self, params: Parameters) -> Result<()> {
        params.validate(&self.config)?;
        self.compiled = Compiled::new(&self.config, &params);
        self.params = params;
        self.generation = next_generation();
        Ok(())
    }

    /// The parameters as a safetensors file, under exactly the keys they were loaded with
    /// (AlexHex7 keys, no prefix, for a block not loaded from a file), with PyTorch's shapes
    /// (conv weights with [`NonLocalConfig::conv_dims`] trailing 1s). BatchNorm running
    /// statistics and `num_batches_tracked` (as 0) are included; a parameter the block does
    /// not have (mmcv's `W_z` bias when BatchNorm follows) is absent.
    ///
    /// # Errors
    /// [`Error::Format`] if serialisation fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let keys = self.keys.clone().unwrap_or_else(WeightKeys::alexhex7);
        self.to_safetensors_with_keys(&keys)
    }

    /// As [`NonLocalBlock::to_safetensors`], under other keys: for example to convert an
    /// AlexHex7 checkpoint to mmcv's key names, or to put the block under a model's prefix.
    ///
    /// # Errors
    /// [`Error::Format`] if serialisation fails.
    pub fn to_safetensors_with_keys(&self, keys: &WeightKeys) -> Result<Vec<u8>> {
        crate::weights::export(keys, &self.config, &self.params)
    }

    /// Writes [`NonLocalBlock::to_safetensors`] to `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written, or as [`NonLocalBlock::to_safetensors`].
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_safetensors()?)
            .map_err(|source| Error::Io { path: path.display().to_string(), source })
    }

    /// Runs the block on a batch of clips.
    ///
    /// # Shapes
    /// - `x`: (B, T, H, W, C), channels last, any strides; rank 5 exactly (image maps go to
    ///   [`NonLocalBlock::forward_images`], sequences to [`NonLocalBlock::forward_sequences`]);
    /// - returns an array of the same shape, in standard (row-major) layout.
    ///
    /// A block whose [`NonLocalConfig::conv_dims`] is below 3 (PyTorch's `NonLocal2d` or
    /// `NonLocal1d`) attends over the last `conv_dims` of (T, H, W) only: T (and for
    /// `conv_dims` 1, H) must be 1.
    ///
    /// NaN or infinite values in `x` propagate: the outputs that depend on them are NaN or
    /// infinite (as in PyTorch, though the exact set of affected positions may differ);
    /// nothing panics or loops.
    ///
    /// # Errors
    /// [`Error::InputRank`], [`Error::InputChannels`], [`Error::EmptyInput`] (a zero-sized
    /// dimension), [`Error::LayoutMismatch`] (more axes than `conv_dims`), [`Error::NoKeys`]
    /// (spatial size below the pool kernel), [`Error::TooLarge`] (buffers that cannot be
    /// sized or allocated).
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

    /// Runs the block on clips (B, T, H, W, C) into `out`, an array of the input's shape: no
    /// output allocation, for loops that reuse their buffers. Same results as
    /// [`NonLocalBlock::forward`]; image maps (B, H, W, C) are clips of one frame,
    /// `x.insert_axis(Axis(1))`.
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

    fn forward_checked(&self, x5: ArrayView5<'_, f32>, out: &mut [f32]) -> Result<()> {
        self.forward_ordered(x5, out, Order::PositionMajor)
    }

    fn forward_ordered(&self, x5: ArrayView5<'_, f32>, out: &mut [f32], order: Order) -> Result<()> {
        let (_, t, h, w, c) = x5.dim();
        let n = t * h * w;
        for (sample, out_sample) in x5.outer_iter().zip(out.chunks_mut(n * c)) {
            self.forward_sample(sample, out_sample, order)?;
        }
        Ok(())
    }

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
            let prepared = self.prepare(x, [t, h, w])?;
            self.attention_for(&prepared, queries, out_sample);
        }
        Ok(Array3::from_shape_vec((b, queries.len(), m), out).expect("sized above"))
    }

    /// Runs the block on clips in PyTorch's layout, (B, C, T, H, W) channels-first with any
    /// strides, and returns (B, C, T, H, W) in standard layout: the output GEMM writes the
    /// channel-major result directly (`zᵀ = xᵀ + W·yᵀ + b`), at the speed of
    /// [`NonLocalBlock::forward`] and without a permuting copy. The same values as `forward`
    /// on the permuted input, up to float rounding (the output GEMM's operands swap roles).
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
    /// As [`NonLocalBlock::forward`] (shapes in them are named channels-last, (B, T, H, W, C));
    /// [`Error::InputRank`] unless `x` has rank 5.
    pub fn forward_channels_first<S>(&self, x: &ArrayBase<S, ndarray::Ix5>) -> Result<ndarray::Array5<f32>>
    where
        S: Data<Elem = f32>,
    {
        let x5 = self.check_input(x.view().permuted_axes([0, 2, 3, 4, 1]).into_dyn(), Layout::Clips)?;
        let mut out = buffer(x5.len(), "output")?;
        self.forward_ordered(x5, &mut out, Order::ChannelMajor)?;
        Ok(ndarray::Array5::from_shape_vec(x.raw_dim(), out).expect("output has the input's element count"))
    }

    /// The whole block for one sample: `out ← x + BN(W_z·y)`, positions × channels or, with
    /// [`Order::ChannelMajor`], channels × positions.
    fn forward_sample(&self, sample: ArrayView4<'_, f32>, out: &mut [f32], order: Order) -> Result<()> {
        let (t, h, w, _) = sample.dim();
        let mut copy = Vec::new();
        let x = sample_matrix(sample, &mut copy);
        let (n, ci, c) = (x.rows(), self.config.inter_channels, self.config.in_channels);
        let m = self.key_grid([t, h, w]).iter().product();
        let fold_theta = self.config.mode == Mode::EmbeddedGaussian && theta_fold_pays(n, m, c, ci);
        let prepared = crate::plan::prepare(&self.config, &self.compiled, &self.workspace, (x, [t, h, w]), fold_theta)?;
        match self.config.mode {
            Mode::EmbeddedGaussian | Mode::Gaussian => {
                let scale = self.config.logit_scale();
                // With θ folded into the keys: K' = φ·W_θ (M × C) and one offset b_θ·φ_j per key.
                let folded_keys = match (&self.compiled.theta_fold, fold_theta) {
                    (Some(fold), true) => {
                        let mut keys = self.workspace.take(m * c, "folded keys")?;
                        fold.w_theta_t.apply(prepared.keys(), 0.0, &mut MatMut::new(&mut keys, m, c, c));
                        let mut phi = vec![0.0f32; ci];
                        let offsets: Vec<f32> = (0..m)
                            .map(|j| {
                                prepared.keys().copy_row(j, &mut phi);
                                phi.iter().zip(&fold.b_theta).map(|(a, b)| a * b).sum()
                            })
                            .collect();
                        Some((keys, offsets))
                    }
                    _ => None,
                };
                let attend = |v: MatRef<'_>, out: &mut [f32]| match &folded_keys {
                    Some((keys, offsets)) => {
                        let keys = MatRef::new(keys, 0, m, c, c);
                        softmax_attention_with_key_bias(prepared.queries(), keys, offsets, v, scale, out)
                    }
                    None => softmax_attention(prepared.queries(), prepared.keys(), v, scale, out),
                };
                if values_fold_pays(n, m, c, ci) {
                    // W_out·Σ_j a_ij ĝ_j = Σ_j a_ij (W_out ĝ_j): apply W_z to the M keys
                    // instead of the N outputs, and aggregate C columns instead of C'.
                    let mut vw = self.workspace.take(m * c, "projected values")?;
                    self.compiled.w_out.apply(prepared.values(), 0.0, &mut MatMut::new(&mut vw, m, c, c));
                    match order {
                        Order::PositionMajor => {
                            attend(MatRef::new(&vw, 0, m, c, c), out);
                            self.add_residual(x, out);
                        }
                        Order::ChannelMajor => {
                            let mut rows = self.workspace.take(n * c, "attention output")?;
                            attend(MatRef::new(&vw, 0, m, c, c), &mut rows);
                            self.residual_channels(x, out);
                            add_transposed(MatRef::new(&rows, 0, n, c, c), out);
                        }
                    }
                } else {
                    let mut y = self.workspace.take(n * ci, "y")?;
                    attend(prepared.values(), &mut y);
                    self.output_in(order, x, MatRef::new(&y, 0, n, ci, ci), None, out);
                }
            }
            Mode::DotProduct => {
                // y = θ·(φᵀg/M): the C'×C' product replaces the N×M matrix.
                let kv = key_value_product(prepared.keys(), prepared.values(), 1.0 / prepared.m as f32);
                let kv = MatRef::new(&kv, 0, ci, ci, ci);
                let c = self.config.in_channels;
                if n > c {
                    // Fold it into the output projection too (C'²·C work instead of N·C'²):
                    // z = x + θ·((φᵀg/M)·W_outᵀ) + b_out.
                    let mut folded = vec![0.0f32; ci * c];
                    par_gemm(1.0, kv, self.w_out_t(), 0.0, &mut MatMut::new(&mut folded, ci, c, c));
                    self.output_in(order, x, prepared.queries(), Some(MatRef::new(&folded, 0, ci, c, c)), out);
                } else {
                    let mut y = self.workspace.take(n * ci, "y")?;
                    par_gemm(1.0, prepared.queries(), kv, 0.0, &mut MatMut::new(&mut y, n, ci, ci));
                    self.output_in(order, x, MatRef::new(&y, 0, n, ci, ci), None, out);
                }
            }
            Mode::Concatenation => {
                let mut y = self.workspace.take(n * ci, "y")?;
                let b = prepared.concat_b(&self.compiled.w_phi);
                concat_attention(prepared.concat_a(), &b, prepared.values(), &mut y);
                self.output_in(order, x, MatRef::new(&y, 0, n, ci, ci), None, out);
            }
        }
        Ok(())
    }

    /// `W_outᵀ` (C' × C) as a view.
    pub(crate) fn w_out_t(&self) -> MatRef<'_> {
        self.compiled.w_out.view().t()
    }

    /// Projections and pooling for one sample (see [`crate::plan::prepare`]).
    pub(crate) fn prepare<'a>(&'a self, x: MatRef<'a>, grid: [usize; 3]) -> Result<Prepared<'a>> {
        crate::plan::prepare(&self.config, &self.compiled, &self.workspace, (x, grid), false)
    }

    /// `out ← x + y·W + b_out` with W = `w` (C' × C) or `W_outᵀ`.
    pub(crate) fn output(&self, x: MatRef<'_>, y: MatRef<'_>, w: Option<MatRef<'_>>, out: &mut [f32]) {
        let (n, c) = (x.rows(), x.cols());
        self.residual_rows(x, out, |row, residual| row.copy_from_slice(residual));
        let mut out = MatMut::new(out, n, c, c);
        match w {
            Some(w) => par_gemm(1.0, y, w, 1.0, &mut out),
            None => self.compiled.w_out.apply(y, 1.0, &mut out),
        }
    }

    /// [`NonLocalBlock::output`], or with [`Order::ChannelMajor`] its transpose
    /// `outᵀ ← xᵀ + Wᵀ·yᵀ + b_out` (C × N): the GEMM writes channel-major rows directly.
    fn output_in(&self, order: Order, x: MatRef<'_>, y: MatRef<'_>, w: Option<MatRef<'_>>, out: &mut [f32]) {
        if order == Order::PositionMajor {
            return self.output(x, y, w, out);
        }
        let (n, c) = (x.rows(), x.cols());
        self.residual_channels(x, out);
        let w_t = w.map_or_else(|| self.compiled.w_out.view(), |w| w.t());
        par_gemm(1.0, w_t, y.t(), 1.0, &mut MatMut::new(out, c, n, n));
    }

    /// `outᵀ ← xᵀ + b_out` (C × N), channel rows in parallel.
    fn residual_channels(&self, x: MatRef<'_>, out: &mut [f32]) {
        let n = x.rows();
        out.par_chunks_mut(n.max(1)).enumerate().for_each(|(ch, row)| {
            let column = x.cols_range(ch, ch + 1).t();
            column.copy_row(0, row);
            let bias = self.compiled.b_out[ch];
            row.iter_mut().for_each(|v| *v += bias);
        });
    }

    /// `out ← out + x + b_out`.
    fn add_residual(&self, x: MatRef<'_>, out: &mut [f32]) {
        self.residual_rows(x, out, |row, residual| row.iter_mut().zip(residual).for_each(|(o, r)| *o += r));
    }

    /// Applies `combine(out_row, x_row)` to every row, then adds `b_out`, rows in parallel.
    fn residual_rows(&self, x: MatRef<'_>, out: &mut [f32], combine: impl Fn(&mut [f32], &[f32]) + Sync) {
        let (n, c) = (x.rows(), x.cols());
        let block = row_block(n, 64);
        out.par_chunks_mut(block * c).enumerate().for_each(|(b, rows)| {
            let mut residual = vec![0.0f32; c];
            for (r, row) in rows.chunks_mut(c).enumerate() {
                x.copy_row(b * block + r, &mut residual);
                combine(row, &residual);
                for (o, bias) in row.iter_mut().zip(&self.compiled.b_out) {
                    *o += bias;
                }
            }
        });
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

/// The order of a sample's output: positions × channels (channels-last, as `forward`) or
/// channels × positions (channels-first, as `forward_channels_first`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    PositionMajor,
    ChannelMajor,
}

/// `out ← out + mᵀ` for `m` N × C and `out` C × N row-major, in 32 × 32 tiles, channel rows in
/// parallel.
fn add_transposed(m: MatRef<'_>, out: &mut [f32]) {
    const TILE: usize = 32;
    let (n, c) = (m.rows(), m.cols());
    out.par_chunks_mut(TILE * n.max(1)).enumerate().for_each(|(t, rows)| {
        let c0 = t * TILE;
        let width = rows.len() / n.max(1);
        for i in 0..n {
            for dc in 0..width.min(c - c0) {
                rows[dc * n + i] += m.at(i, c0 + dc);
            }
        }
    });
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

/// Whether folding θ into the keys (embedded Gaussian: M·C'·C multiply-adds for `φ·W_θ`, then
/// N·M·C for the logits `x_i·(W_θᵀφ_j)`) costs less than projecting θ (N·C·C') and forming the
/// logits `θ_i·φ_j` (N·M·C'): true when there are few keys and many channels, as at video-res4.
fn theta_fold_pays(n: usize, m: usize, c: usize, ci: usize) -> bool {
    let (n, m, c, ci) = (n as f64, m as f64, c as f64, ci as f64);
    m * ci * c + n * m * c < n * c * ci + n * m * ci
}

/// Whether applying `W_z` to the M values before the softmax aggregation (C·C'·M + N·M·C
/// multiply-adds) costs less than applying it to the N outputs after (N·M·C' + N·C'·C): true
/// when there are few keys and many channels, as at video-res4.
fn values_fold_pays(n: usize, m: usize, c: usize, ci: usize) -> bool {
    let (n, m, c, ci) = (n as f64, m as f64, c as f64, ci as f64);
    c * ci * m + n * m * c < n * m * ci + n * ci * c
}

/// A zeroed f32 buffer, or [`Error::TooLarge`] when it cannot be allocated.
pub(crate) fn buffer(len: usize, what: &'static str) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::TooLarge { what })?;
    v.resize(len, 0.0);
    Ok(v)
}

/// Rejects configurations whose parameter tensors cannot be sized.
fn check_parameter_count(config: &NonLocalConfig) -> Result<()> {
    config
        .in_channels
        .checked_mul(config.inter_channels)
        .and_then(|p| p.checked_mul(4 * 4))
        .filter(|&bytes| bytes <= isize::MAX as usize)
        .map(|_| ())
        .ok_or(Error::TooLarge { what: "in_channels·inter_channels" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array5, Axis};

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
        use crate::config::Mode;
        // (C, C', grid, pooling): the plain paths, the dot-product fold (N > C) and not, and
        // the values fold of the softmax modes (few keys, many channels).
        let shapes =
            [(6, 3, [2, 5, 7], Some([1, 2, 2])), (40, 8, [1, 3, 4], None), (64, 32, [1, 8, 8], Some([1, 2, 2]))];
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
                let err = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err < 1e-5, "{mode} shape {i}: {err}");
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
