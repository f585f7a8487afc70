//! Building blocks from checkpoints, and writing their parameters back for PyTorch.

use std::path::Path;

use super::NonLocalBlock;
use crate::config::NonLocalConfig;
use crate::error::{Error, Result};
use crate::load::{find_blocks, load_parameters, BlockInfo, BlockKind, TensorFile, WeightKeys};

/// Loads every non-local block [`find_blocks`] lists ([`BlockKind::NonLocal`]; disentangled
/// blocks load with [`DisentangledNonLocal::from_checkpoint`](crate::DisentangledNonLocal::from_checkpoint)),
/// each with the configuration `configure` gives for it: start from [`BlockInfo::config`] and set what the keys cannot show (the mode where
/// embedded Gaussian and dot product share keys, the pool kernel, `use_scale`). The closure is
/// not optional because those settings change the output: mmcv's `NonLocal3d` defaults to
/// `use_scale` true, but mmaction2's I3D configs set it false, and loading their checkpoints
/// with the default is wrong by ~1.5 (no error can tell).
///
/// # Example
/// ```
/// use nonlocal::{load_blocks, TensorFile};
///
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pth/pth_mmaction_i3d.pth");
/// let file = TensorFile::open(path)?;
/// // mmaction2's I3D non-local config: embedded Gaussian, use_scale=False, 1x2x2 pooling.
/// let blocks = load_blocks(&file, |info| info.config().use_scale(false))?;
/// assert_eq!(blocks.len(), 5);
/// assert!(blocks.iter().all(|(_, block)| !block.config().use_scale));
/// # Ok::<(), nonlocal::Error>(())
/// ```
///
/// # Errors
/// The first block's loading error, as [`NonLocalBlock::from_checkpoint`].
pub fn load_blocks(
    file: &TensorFile,
    configure: impl Fn(&BlockInfo) -> NonLocalConfig,
) -> Result<Vec<(BlockInfo, NonLocalBlock)>> {
    find_blocks(file)
        .into_iter()
        .filter(|info| info.kind == BlockKind::NonLocal)
        .map(|info| {
            let block = NonLocalBlock::from_checkpoint(configure(&info), file, &info.keys)?;
            Ok((info, block))
        })
        .collect()
}

impl NonLocalBlock {
    /// A block with parameters read from a checkpoint of any format ([`TensorFile`]) under
    /// `keys`.
    ///
    /// Other entries of the file are ignored. What the keys show must agree with `config`:
    /// BatchNorm present or not, φ/g pooled or not, the conv rank, the channel counts, and
    /// the mode where the keys decide it (a `concat_project` means concatenation; no θ/φ
    /// means Gaussian). [`find_blocks`] and [`BlockInfo::config`] read all of it off the file.
    ///
    /// # Errors
    /// [`Error::ConfigMismatch`] naming the setting,
    /// [`Error::MissingKey`],
    /// [`Error::NotATensor`],
    /// [`Error::WrongShape`],
    /// [`Error::UnsupportedDtype`],
    /// [`Error::InvalidParameter`] (non-finite values,
    /// negative variance) or [`Error::InvalidConfig`], each
    /// naming the key.
    pub fn from_checkpoint(config: NonLocalConfig, file: &TensorFile, keys: &WeightKeys) -> Result<Self> {
        let params = load_parameters(file, &config, keys)?;
        let mut block = Self::from_parameters(config, params)?;
        block.keys = Some(keys.clone());
        Ok(block)
    }

    /// Opens a checkpoint of any format ([`TensorFile::open`]), then as
    /// [`NonLocalBlock::from_checkpoint`].
    ///
    /// # Example
    /// ```
    /// use nonlocal::{Mode, NonLocalBlock, NonLocalConfig, WeightKeys};
    ///
    /// // mmcv's NonLocal2d with BatchNorm, saved in bfloat16 under a 'model' key.
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pth/pth_bf16_mmcv2d.pth");
    /// let config = NonLocalConfig::mmcv(16).sub_sample(Some([1, 2, 2])).bn_layer(true).conv_dims(2);
    /// let block = NonLocalBlock::from_checkpoint_file(config.clone(), path, &WeightKeys::mmcv())?;
    /// let x = ndarray::Array5::<f32>::zeros((1, 1, 6, 6, 16));
    /// assert_eq!(block.forward(&x)?.shape(), x.shape());
    ///
    /// // Loaded as the wrong mode, the weights say no.
    /// let err = NonLocalBlock::from_checkpoint_file(config.mode(Mode::Gaussian), path, &WeightKeys::mmcv());
    /// assert!(matches!(err, Err(nonlocal::Error::ConfigMismatch { what: "mode", .. })));
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// Those of [`TensorFile::open`] and [`NonLocalBlock::from_checkpoint`].
    pub fn from_checkpoint_file(config: NonLocalConfig, path: impl AsRef<Path>, keys: &WeightKeys) -> Result<Self> {
        Self::from_checkpoint(config, &TensorFile::open(path)?, keys)
    }

    /// The old name of [`NonLocalBlock::from_checkpoint`], which it calls: it reads every
    /// checkpoint format, not only safetensors.
    ///
    /// # Errors
    /// As [`NonLocalBlock::from_checkpoint`].
    #[deprecated(since = "0.2.0", note = "reads every checkpoint format: use `from_checkpoint`")]
    pub fn from_safetensors(config: NonLocalConfig, file: &TensorFile, keys: &WeightKeys) -> Result<Self> {
        Self::from_checkpoint(config, file, keys)
    }

    /// The old name of [`NonLocalBlock::from_checkpoint_file`], which it calls: it reads every
    /// checkpoint format, not only safetensors.
    ///
    /// # Errors
    /// As [`NonLocalBlock::from_checkpoint_file`].
    #[deprecated(since = "0.2.0", note = "reads every checkpoint format: use `from_checkpoint_file`")]
    pub fn from_safetensors_file(config: NonLocalConfig, path: impl AsRef<Path>, keys: &WeightKeys) -> Result<Self> {
        Self::from_checkpoint_file(config, path, keys)
    }

    /// The parameters as a safetensors file, under exactly the keys they were loaded with
    /// (AlexHex7 keys, no prefix, for a block not loaded from a file), with PyTorch's shapes
    /// (conv weights with [`NonLocalConfig::conv_dims`] trailing 1s). BatchNorm running
    /// statistics and `num_batches_tracked` (as 0) are included, so PyTorch's strict
    /// `load_state_dict` accepts the file; see [`NonLocalBlock::to_safetensors_with_keys`]
    /// for mmcv's scheme, whose `conv_out` has no bias when BatchNorm follows.
    ///
    /// # Errors
    /// [`Error::SaveFailed`] if serialisation fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let keys = self.keys.clone().unwrap_or_else(WeightKeys::alexhex7);
        self.to_safetensors_with_keys(&keys)
    }

    /// As [`NonLocalBlock::to_safetensors`], under other keys: for example to convert an
    /// AlexHex7 checkpoint to mmcv's key names, or to put the block under a model's prefix.
    ///
    /// The file computes the same function under the scheme's own module: mmcv's `NonLocal3d`
    /// with BatchNorm has no `conv_out` bias, so a `W_z` bias b is folded into the BatchNorm
    /// (its running mean becomes `running_mean − b`: `BN(W·y + b) = BN'(W·y)`).
    ///
    /// # Errors
    /// [`Error::SaveFailed`] if serialisation fails.
    pub fn to_safetensors_with_keys(&self, keys: &WeightKeys) -> Result<Vec<u8>> {
        crate::load::export(keys, &self.config, &self.params)
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
}
