//! Finding blocks by their keys: what the keys under a prefix show ([`KeyLayout`]), the key
//! scheme of a prefix ([`detect_naming`]), and every non-local (or disentangled) block of a
//! checkpoint with the configuration its keys show ([`find_blocks`], [`BlockInfo`]).

use std::collections::HashSet;
use std::fmt;

use super::keys::{Naming, WeightKeys};
use super::TensorFile;
use crate::checkpoint::DType;
use crate::config::{Mode, NonLocalConfig};
use crate::error::{Error, Result};

/// Which block a non-local block's keys make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlockKind {
    /// A non-local block ([`NonLocalBlock`](crate::NonLocalBlock)).
    NonLocal,
    /// mmsegmentation's disentangled non-local block: mmcv's keys plus `conv_mask`
    /// ([`DisentangledNonLocal`](crate::DisentangledNonLocal), configured by
    /// [`DisentangledConfig::from_info`](crate::DisentangledConfig::from_info)).
    Disentangled,
}

impl BlockKind {
    /// The name used in golden-file metadata (`block`): `non_local`, `disentangled`.
    pub fn name(self) -> &'static str {
        match self {
            BlockKind::NonLocal => "non_local",
            BlockKind::Disentangled => "disentangled",
        }
    }
}

/// A non-local block found in a checkpoint: where its keys are and what they show.
///
/// Its [`Display`](fmt::Display) is one line,
/// `prefix=<p> naming=<alexhex7|mmcv|timm> in_channels=<C> inter_channels=<C'> sub_sample=<true|false> bn=<true|false> dims=<1|2|3> dtype=<f32|f16|bf16|f64>`,
/// followed by ` block=disentangled` for a disentangled block. `#[non_exhaustive]`: what the
/// keys show may grow.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct BlockInfo {
    /// Which block the keys make.
    pub kind: BlockKind,
    /// The key scheme and prefix of its parameters.
    pub keys: WeightKeys,
    /// C, from the `g` convolution's input channels.
    pub in_channels: usize,
    /// C', from the `g` convolution's output channels.
    pub inter_channels: usize,
    /// Whether φ and g are max-pooled (their keys have a `.0.` stage).
    pub sub_sample: bool,
    /// Whether BatchNorm follows `W_z`.
    pub bn: bool,
    /// Rank of the 1x1 convolutions (1, 2 or 3 for PyTorch's `Conv1d/2d/3d`).
    pub conv_dims: usize,
    /// The type the `g` weight is stored in.
    pub dtype: DType,
    /// The pairwise functions the keys allow: `[Concatenation]` when there is a
    /// `concat_project`, `[Gaussian]` when there is no θ/φ, else `[EmbeddedGaussian,
    /// DotProduct]`, which have the same parameters.
    pub modes: &'static [Mode],
}

impl fmt::Display for BlockInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "prefix={} naming={} in_channels={} inter_channels={} sub_sample={} bn={} dims={} dtype={}",
            self.keys.prefix,
            self.keys.naming,
            self.in_channels,
            self.inter_channels,
            self.sub_sample,
            self.bn,
            self.conv_dims,
            self.dtype.name()
        )?;
        match self.kind {
            BlockKind::NonLocal => Ok(()),
            kind => write!(f, " block={}", kind.name()),
        }
    }
}

impl BlockInfo {
    /// The block's configuration: everything the keys show (channels, BatchNorm, pooling,
    /// conv rank, and the mode where the keys decide it), the rest from the preset of its
    /// implementation ([`NonLocalConfig::alexhex7`], [`NonLocalConfig::mmcv`] or
    /// [`NonLocalConfig::timm`]).
    ///
    /// What the weights cannot show, and you may have to set yourself from the model's
    /// training configuration:
    /// - **embedded Gaussian or dot product** — the same parameters; this returns embedded
    ///   Gaussian, the default of both implementations (`.mode(Mode::DotProduct)` for the other);
    /// - **the pool kernel** — pooling has no parameters; a pooled block gets the kernel of its
    ///   implementation for its rank, `[1, 1, 2]` for 1-d blocks and `[1, 2, 2]` for 2-d and 3-d
    ///   ones (a `(2, 2, 2)` pool needs `.sub_sample(Some([2, 2, 2]))`);
    /// - **`use_scale`** — mmcv's default is `true`, AlexHex7 has no scaling; note that
    ///   mmaction2's I3D non-local configs set `use_scale=False` ([`NonLocalConfig::mmaction2_i3d`]);
    ///   timm scales by `in_channels^-0.5` by default ([`NonLocalConfig::logit_factor`]).
    /// - **`bn_eps`** — PyTorch's 1e-5.
    ///
    /// # Example
    /// ```
    /// use nonlocal::{find_blocks, Mode, NonLocalBlock, TensorFile};
    ///
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pth/pth_alexhex7_zip.pth");
    /// let file = TensorFile::open(path)?;
    /// let info = &find_blocks(&file)[0];
    /// assert_eq!(info.modes, [Mode::EmbeddedGaussian, Mode::DotProduct]);
    /// let config = info.config();
    /// assert_eq!((config.in_channels, config.inter_channels, config.use_scale), (16, 8, false));
    /// let block = NonLocalBlock::from_checkpoint(config, &file, &info.keys)?;
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    pub fn config(&self) -> NonLocalConfig {
        let preset = match self.keys.naming {
            Naming::AlexHex7 => NonLocalConfig::alexhex7(self.in_channels),
            Naming::Mmcv => NonLocalConfig::mmcv(self.in_channels),
            Naming::Timm => NonLocalConfig::timm(self.in_channels),
        };
        let kernel = if self.conv_dims == 1 { [1, 1, 2] } else { [1, 2, 2] };
        preset
            .inter_channels(self.inter_channels)
            .mode(self.modes[0])
            .sub_sample(self.sub_sample.then_some(kernel))
            .bn_layer(self.bn)
            .conv_dims(self.conv_dims)
    }
}

/// Every non-local block in a checkpoint, in the order of the file, under any key scheme:
/// a `g` convolution (`g.weight`, `g.0.weight`, `g.conv.weight` or `g.0.conv.weight` after a
/// prefix) beside a `W_z` (`W.weight`, `W.0.weight` or `conv_out.conv.weight`), with
/// consistent 1x1 convolution shapes.
///
/// # Example
/// ```
/// use nonlocal::{find_blocks, TensorFile};
///
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pth/pth_mmaction_i3d.pth");
/// let file = TensorFile::open(path)?; // an mmengine training checkpoint
/// assert_eq!(file.state_dict_location(), "state_dict");
/// let blocks = find_blocks(&file);
/// assert_eq!(blocks.len(), 5);
/// assert_eq!(
///     blocks[0].to_string(),
///     "prefix=backbone.layer2.0.non_local_block. naming=mmcv in_channels=32 inter_channels=16 \
///      sub_sample=true bn=true dims=3 dtype=f32"
/// );
/// # Ok::<(), nonlocal::Error>(())
/// ```
pub fn find_blocks(file: &TensorFile) -> Vec<BlockInfo> {
    let mut seen = HashSet::new();
    let mut blocks = Vec::new();
    for key in file.keys_in_order() {
        for naming in Naming::ALL {
            for pooled in [false, true] {
                let stem = format!("{}.weight", WeightKeys { naming, prefix: String::new() }.embedding("g", pooled));
                let Some(prefix) = key.strip_suffix(stem.as_str()) else { continue };
                if !(prefix.is_empty() || prefix.ends_with('.')) || seen.contains(prefix) {
                    continue;
                }
                let keys = WeightKeys { naming, prefix: prefix.to_string() };
                if let Some(info) = block_at(file, keys) {
                    seen.insert(prefix.to_string());
                    blocks.push(info);
                }
            }
        }
    }
    blocks
}

/// The block under `keys`, if its keys and shapes make one.
fn block_at(file: &TensorFile, keys: WeightKeys) -> Option<BlockInfo> {
    let layout = key_layout(file, &keys)?;
    let (sub_sample, bn) = (layout.pooled?, layout.bn?);
    let g_key = format!("{}.weight", keys.embedding("g", sub_sample));
    let g = file.shape(&g_key).ok()?;
    let w = file.shape(&format!("{}.weight", keys.w_z(bn))).ok()?;
    let conv_dims = g.len().checked_sub(2).filter(|d| (1..=3).contains(d))?;
    let ones = |shape: &[usize]| shape[2..].iter().all(|&d| d == 1);
    let (ci, c) = (g[0], g[1]);
    if w.len() != g.len() || w[..2] != [c, ci] || !ones(g) || !ones(w) || c == 0 || ci == 0 {
        return None;
    }
    let dtype = file.dtype(&g_key).ok()?.clone();
    // mmsegmentation's disentangled block: mmcv's keys and a 1-channel conv_mask of the same rank.
    let mask = file.shape(&format!("{}conv_mask.weight", keys.prefix)).ok();
    let mut mask_shape = vec![1, c];
    mask_shape.resize(2 + conv_dims, 1);
    let kind = match mask {
        Some(shape) if keys.naming == Naming::Mmcv && shape == mask_shape => BlockKind::Disentangled,
        _ => BlockKind::NonLocal,
    };
    Some(BlockInfo {
        kind,
        keys,
        in_channels: c,
        inter_channels: ci,
        sub_sample,
        bn,
        conv_dims,
        dtype,
        modes: layout.modes,
    })
}

/// What the keys under a prefix say about a block.
pub(crate) struct KeyLayout {
    /// Whether φ/g are pooled (`.0.` keys); `None` when both forms are present.
    pub pooled: Option<bool>,
    /// Whether BatchNorm follows `W_z`; `None` when there is no `W_z`.
    pub bn: Option<bool>,
    /// The modes the keys allow: concatenation (`concat_project`), Gaussian (no θ and no φ),
    /// or embedded Gaussian and dot product, which have the same parameters.
    pub modes: &'static [Mode],
}

/// Reads [`KeyLayout`] off the keys; `None` when there is no `g` convolution under the prefix.
pub(crate) fn key_layout(file: &TensorFile, keys: &WeightKeys) -> Option<KeyLayout> {
    let has = |stem: String| file.contains(&format!("{stem}.weight"));
    let (pooled, unpooled) = (has(keys.embedding("g", true)), has(keys.embedding("g", false)));
    if !pooled && !unpooled {
        return None;
    }
    let w_z = has(keys.w_z(true)) || has(keys.w_z(false));
    let theta_phi = has(keys.embedding("theta", false)) || has(keys.embedding("phi", pooled));
    let modes: &'static [Mode] = if file.contains(&keys.concat_project()) {
        &[Mode::Concatenation]
    } else if theta_phi {
        &[Mode::EmbeddedGaussian, Mode::DotProduct]
    } else {
        &[Mode::Gaussian]
    };
    Some(KeyLayout { pooled: (pooled != unpooled).then_some(pooled), bn: w_z.then(|| has(keys.bn())), modes })
}

/// Guesses the key scheme of a checkpoint from the keys under `prefix`: mmcv keys contain
/// `.conv.`; AlexHex7 keys do not.
///
/// # Errors
/// [`Error::MissingKey`] when neither scheme's `g` convolution is found under the prefix.
pub fn detect_naming(file: &TensorFile, prefix: &str) -> Result<Naming> {
    for naming in Naming::ALL {
        let keys = WeightKeys { naming, prefix: prefix.into() };
        let has = |stem: String| file.contains(&format!("{stem}.weight"));
        let g = has(keys.embedding("g", true)) || has(keys.embedding("g", false));
        // AlexHex7's and timm's unpooled `g` have the same key: the output conv tells them apart.
        if g && (has(keys.w_z(true)) || has(keys.w_z(false))) {
            return Ok(naming);
        }
    }
    Err(Error::MissingKey { key: format!("{prefix}g.weight") })
}
