//! [`CrissCrossAttention`]: parameters plus the forward pass (shape checks, then kernels).

use std::path::Path;
use std::sync::Arc;

use ndarray::{Array, ArrayBase, ArrayView5, Data, DataMut, Dimension};

use super::config::CrissCrossConfig;
use super::forward::forward;
use super::input::{check_input, Layout};
use super::load::load_parameters;
use super::params::{Compiled, CrissCrossParameters};
use super::projections::{project, Projections};
use crate::block::{buffer, next_generation, sample_matrix};
use crate::error::{Error, Result};
use crate::kernels::views::MatRef;
use crate::load::TensorFile;
use crate::load::WeightKeys;
use crate::workspace::Workspace;

/// Seed of the weight init of [`CrissCrossAttention::new`].
const DEFAULT_SEED: u64 = 0x6363_6e65_7400_0001;

/// Criss-cross attention (Huang et al., [*CCNet: Criss-Cross Attention for Semantic
/// Segmentation*][paper], ICCV 2019), as mmcv's `CrissCrossAttention`: every position of an
/// image feature map attends to the positions of its own row and column,
///
/// ```text
/// a_i = softmax_j(q_i·k_j) over the H + W − 1 positions j on the row and column of i,
/// z_i = x_i + γ·Σ_j a_ij v_j,
/// ```
///
/// with q, k (C/8 channels) and v (C channels) 1x1 convolutions of x, and the position itself
/// counted once. [`CrissCrossConfig::recurrence`] applies the block several times in a row
/// with the same weights (CCNet's head uses 2), so information reaches every position.
///
/// Built from a [`CrissCrossConfig`] and fresh parameters ([`CrissCrossAttention::new`],
/// the identity until trained: γ = 0), parameters in ndarrays
/// ([`CrissCrossAttention::from_parameters`]) or an mmcv checkpoint
/// ([`CrissCrossAttention::from_checkpoint`]).
///
/// # Example
/// ```
/// use ndarray::Array4;
/// use nonlocal::{CrissCrossAttention, CrissCrossConfig};
///
/// let block = CrissCrossAttention::new(CrissCrossConfig::new(32).recurrence(2))?;
/// let x = Array4::<f32>::from_shape_fn((2, 6, 9, 32), |(b, h, w, c)| ((b + h * w + c) % 7) as f32 * 0.1);
/// let z = block.forward_images(&x)?;
/// // γ starts at 0, as in mmcv: a new block is the identity.
/// assert_eq!(z, x);
/// # Ok::<(), nonlocal::Error>(())
/// ```
///
/// [paper]: https://arxiv.org/abs/1811.11721
#[derive(Debug)]
pub struct CrissCrossAttention {
    pub(crate) config: CrissCrossConfig,
    pub(crate) params: CrissCrossParameters,
    pub(crate) keys: Option<WeightKeys>,
    pub(crate) compiled: Compiled,
    pub(crate) workspace: Arc<Workspace>,
    /// Identifies the current parameters, so a training context can tell it is stale.
    pub(crate) generation: u64,
}

impl Clone for CrissCrossAttention {
    /// The same block, starting without scratch buffers of its own (so clones used on
    /// different threads do not share them).
    fn clone(&self) -> Self {
        CrissCrossAttention {
            config: self.config.clone(),
            params: self.params.clone(),
            keys: self.keys.clone(),
            compiled: self.compiled.clone(),
            workspace: Default::default(),
            generation: self.generation,
        }
    }
}

impl CrissCrossAttention {
    /// A new block with fresh parameters (see [`CrissCrossParameters::init`]): the
    /// convolutions drawn like PyTorch's default init from a fixed seed, γ = 0, so the block
    /// is the identity until trained or loaded.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (see [`CrissCrossConfig::validate`]).
    pub fn new(config: CrissCrossConfig) -> Result<Self> {
        config.validate()?;
        let params = CrissCrossParameters::init(&config, DEFAULT_SEED);
        Self::from_parameters(config, params)
    }

    /// A block from parameters held in ndarrays.
    ///
    /// # Errors
    /// Any error of [`CrissCrossParameters::validate`]: a wrong shape or a non-finite value.
    pub fn from_parameters(config: CrissCrossConfig, params: CrissCrossParameters) -> Result<Self> {
        params.validate(&config)?;
        let compiled = Compiled::new(&config, &params);
        Ok(CrissCrossAttention {
            config,
            params,
            keys: None,
            compiled,
            workspace: Default::default(),
            generation: next_generation(),
        })
    }

    /// A block with parameters read from a checkpoint (safetensors or `torch.save`, whatever
    /// [`TensorFile::open`] read) under mmcv's keys: `query_conv.weight` (C_qk, C, 1, 1),
    /// `query_conv.bias` (C_qk), `key_conv.*` likewise, `value_conv.weight` (C, C, 1, 1),
    /// `value_conv.bias` (C) and `gamma.scale` (a 0-d tensor), each after `keys.prefix`
    /// (for a block inside a model, e.g. `decode_head.cca.`). Other tensors are ignored.
    /// The recurrence does not show in the keys: set it in `config` (mmseg's `CCHead`
    /// uses 2).
    ///
    /// ```
    /// use nonlocal::{CrissCrossAttention, CrissCrossConfig, TensorFile, WeightKeys};
    ///
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/family/cc_mmcv.safetensors");
    /// let file = TensorFile::open(path)?;
    /// let block = CrissCrossAttention::from_checkpoint(CrissCrossConfig::new(16), &file, &WeightKeys::mmcv())?;
    /// let x = file.tensor_as::<ndarray::Ix5>("input")?; // (1, 1, 7, 8, 16)
    /// assert_eq!(block.forward(&x)?.shape(), x.shape());
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `keys` are not mmcv's ([`WeightKeys::mmcv`]) or the
    /// configuration is invalid; [`Error::MissingKey`], [`Error::NotATensor`],
    /// [`Error::WrongShape`] (channels other than the configuration's), [`Error::UnsupportedDtype`]
    /// or [`Error::InvalidParameter`] (a non-finite value), each naming the key.
    pub fn from_checkpoint(config: CrissCrossConfig, file: &TensorFile, keys: &WeightKeys) -> Result<Self> {
        let params = load_parameters(file, &config, keys)?;
        let mut block = Self::from_parameters(config, params)?;
        block.keys = Some(keys.clone());
        Ok(block)
    }

    /// Reads a checkpoint of any format from `path`, then as
    /// [`CrissCrossAttention::from_checkpoint`].
    ///
    /// # Errors
    /// Those of [`TensorFile::open`] ([`Error::Io`], [`Error::NotACheckpoint`],
    /// [`Error::BadCheckpoint`]) and of [`CrissCrossAttention::from_checkpoint`].
    pub fn from_checkpoint_file(config: CrissCrossConfig, path: impl AsRef<Path>, keys: &WeightKeys) -> Result<Self> {
        Self::from_checkpoint(config, &TensorFile::open(path)?, keys)
    }

    /// The configuration.
    pub fn config(&self) -> &CrissCrossConfig {
        &self.config
    }

    /// The parameters.
    pub fn parameters(&self) -> &CrissCrossParameters {
        &self.params
    }

    /// The checkpoint keys the parameters were loaded under, if they came from a file.
    pub fn weight_keys(&self) -> Option<&WeightKeys> {
        self.keys.as_ref()
    }

    /// Replaces the parameters.
    ///
    /// # Errors
    /// As [`CrissCrossAttention::from_parameters`]; on error the block is unchanged.
    pub fn set_parameters(&mut self, params: CrissCrossParameters) -> Result<()> {
        params.validate(&self.config)?;
        self.compiled = Compiled::new(&self.config, &params);
        self.params = params;
        self.generation = next_generation();
        Ok(())
    }

    /// Runs the block on a batch of image feature maps, mmcv's (B, C, H, W) channels last:
    /// each image attends within itself.
    ///
    /// # Shapes
    /// - `x`: (B, H, W, C), channels last, any strides (views, slices, permuted axes);
    /// - returns an array of the same shape, in standard (row-major) layout.
    ///
    /// NaN or infinite values in `x` propagate to the outputs on their rows and columns (as
    /// in PyTorch, though the exact set of affected positions may differ); nothing panics.
    ///
    /// # Errors
    /// [`Error::InputRank`] unless `x` has rank 4, [`Error::InputChannels`],
    /// [`Error::EmptyInput`] (a zero-sized dimension), [`Error::TooLarge`] (buffers that
    /// cannot be sized or allocated).
    pub fn forward_images<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        self.forward_layout(x, Layout::Images)
    }

    /// Runs the block on a batch of clips (B, T, H, W, C) with T = 1, the layout of the
    /// crate's other entry points: the same as [`CrissCrossAttention::forward_images`] on
    /// `x.index_axis(Axis(1), 0)`. Returns the input's shape.
    ///
    /// # Errors
    /// As [`CrissCrossAttention::forward_images`]; [`Error::InputRank`] unless `x` has rank
    /// 5, [`Error::LayoutMismatch`] when T > 1 (the block attends within one image, as
    /// mmcv's module on (B, C, H, W)).
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
        let x5 = check_input(&self.config, x.view().into_dyn(), layout)?;
        let mut out = buffer(x5.len(), "output")?;
        self.forward_checked(x5, &mut out)?;
        Ok(Array::from_shape_vec(x.raw_dim(), out).expect("output has the input's element count"))
    }

    /// Runs the block on clips (B, 1, H, W, C) into `out`, an array of the input's shape: no
    /// output allocation, for loops that reuse their buffers. Same results as
    /// [`CrissCrossAttention::forward`]; image maps (B, H, W, C) are clips of one frame,
    /// `x.insert_axis(Axis(1))`.
    ///
    /// # Errors
    /// As [`CrissCrossAttention::forward`], and [`Error::WrongShape`] when `out`'s shape is
    /// not the input's.
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
        let x5 = check_input(&self.config, x.view().into_dyn(), Layout::Clips)?;
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
        let (_, _, h, w, c) = x5.dim();
        for (sample, out) in x5.outer_iter().zip(out.chunks_mut(h * w * c)) {
            let mut copy = Vec::new();
            let x = sample_matrix(sample, &mut copy);
            self.forward_sample(x, [h, w], out)?;
        }
        Ok(())
    }

    /// The block applied `recurrence` times to one sample, the last application writing
    /// `out` and the others alternating between `out` and one scratch buffer.
    fn forward_sample(&self, x: MatRef<'_>, grid: [usize; 2], out: &mut [f32]) -> Result<()> {
        let r = self.config.recurrence;
        let (n, c) = (x.rows(), self.config.in_channels);
        let mut other = if r > 1 { Some(self.workspace.take(out.len(), "criss-cross recurrence")?) } else { None };
        for step in 0..r {
            let Some(other) = other.as_deref_mut() else {
                return self.apply(x, grid, out);
            };
            let into_out = (r - 1 - step).is_multiple_of(2);
            match (step, into_out) {
                (0, true) => self.apply(x, grid, out)?,
                (0, false) => self.apply(x, grid, other)?,
                (_, true) => self.apply(MatRef::new(other, 0, n, c, c), grid, out)?,
                (_, false) => self.apply(MatRef::new(out, 0, n, c, c), grid, other)?,
            }
        }
        Ok(())
    }

    /// One application: `out ← x + γ·y`.
    fn apply(&self, x: MatRef<'_>, grid: [usize; 2], out: &mut [f32]) -> Result<()> {
        let proj = project(&self.compiled, x, &self.workspace)?;
        let p = Projections::new(&proj, grid, self.config.qk_channels, self.config.in_channels);
        forward(p, x, self.compiled.gamma, &self.workspace, out, None)
    }
}
