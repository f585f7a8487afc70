//! Configuration of a context block: channels, bottleneck width, pooling, fusion, and the
//! upstream module whose keys and defaults it follows.

use std::fmt;

use crate::error::{Error, Result};
use crate::load::Naming;

/// How the context vector is pooled from the positions of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pooling {
    /// `Σ_j softmax_j(w·x_j + b)·x_j`: attention pooling with a 1x1 conv to one channel
    /// (mmcv's `pooling_type='att'`, timm's `use_attn=True`).
    Attention,
    /// The mean of `x` over positions (mmcv's `pooling_type='avg'`, timm's `use_attn=False`).
    Average,
}

impl Pooling {
    /// mmcv's name: `att` or `avg`.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Attention => "att",
            Pooling::Average => "avg",
        }
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Configuration of a [`ContextBlock`](super::ContextBlock).
///
/// Fields are public; [`ContextConfig::mmcv`] and [`ContextConfig::timm`] fill in the
/// defaults of the two upstream modules, and the builder methods change one setting each.
///
/// # Example
/// ```
/// use nonlocal::{ContextConfig, Pooling};
///
/// // GCNet's block as mmdetection configures it: ratio 1/16, attention pooling, add fusion.
/// let config = ContextConfig::mmcv(2048, 1.0 / 16.0);
/// assert_eq!((config.planes, config.pooling, config.fuse_add, config.fuse_mul), (128, Pooling::Attention, true, false));
/// // Both fusions, as GCNet's ablation.
/// let both = config.fuse_mul(true);
/// both.validate()?;
/// # Ok::<(), nonlocal::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ContextConfig {
    /// C, the number of input (and output) channels.
    pub in_channels: usize,
    /// The bottleneck width of the two MLPs (mmcv's `planes`, timm's `rd_channels`).
    pub planes: usize,
    /// Attention or average pooling of the context.
    pub pooling: Pooling,
    /// `out = … + MLP_add(context)` (mmcv's `channel_add`, timm's `fuse_add`).
    pub fuse_add: bool,
    /// `out = x ⊙ sigmoid(MLP_mul(context)) …` (mmcv's `channel_mul`, timm's `fuse_scale`).
    /// When both fusions are on, the product comes first, then the sum, in both upstreams.
    pub fuse_mul: bool,
    /// The LayerNorm epsilon: `1e-5` for mmcv (`nn.LayerNorm`), `1e-6` for timm
    /// (`LayerNorm2d`). Checkpoints do not store it.
    pub ln_eps: f64,
    /// Whose module this is: [`Naming::Mmcv`] or [`Naming::Timm`]. It sets the key names and
    /// the LayerNorm parameter shapes (mmcv `(planes, 1, 1)`, timm `(planes)`) for
    /// checkpoints, gradients and [`ContextBlock::update_parameters`](super::ContextBlock::update_parameters),
    /// and the weight init of [`ContextBlock::new`](super::ContextBlock::new).
    pub naming: Naming,
}

impl ContextConfig {
    /// The defaults of mmcv's `ContextBlock(in_channels, ratio)`: `planes = int(in_channels ·
    /// ratio)` (truncated, as Python's `int`), attention pooling (`pooling_type='att'`), add
    /// fusion only (`fusion_types=('channel_add',)`), LayerNorm epsilon `1e-5`.
    ///
    /// ```
    /// # use nonlocal::ContextConfig;
    /// assert_eq!(ContextConfig::mmcv(16, 0.25).planes, 4);
    /// assert_eq!(ContextConfig::mmcv(2048, 0.25).ln_eps, 1e-5);
    /// ```
    pub fn mmcv(in_channels: usize, ratio: f64) -> Self {
        let planes = in_channels as f64 * ratio;
        ContextConfig {
            in_channels,
            // `as` saturates: a negative or NaN ratio gives 0, which validate() refuses.
            planes: if planes.is_finite() { planes as usize } else { 0 },
            pooling: Pooling::Attention,
            fuse_add: true,
            fuse_mul: false,
            ln_eps: 1e-5,
            naming: Naming::Mmcv,
        }
    }

    /// The defaults of timm's `GlobalContext(channels)`: `rd_channels =
    /// make_divisible(channels / 8, 1, round_limit=0)`, that is `max(1, round(C / 8))` with
    /// halves rounded up, attention pooling (`use_attn=True`), scale fusion only
    /// (`fuse_scale=True, fuse_add=False`), sigmoid gate, LayerNorm2d epsilon `1e-6`.
    /// Other gates than sigmoid are not supported.
    ///
    /// ```
    /// # use nonlocal::ContextConfig;
    /// let config = ContextConfig::timm(16);
    /// assert_eq!((config.planes, config.fuse_mul, config.fuse_add, config.ln_eps), (2, true, false, 1e-6));
    /// assert_eq!(ContextConfig::timm(2048).planes, 256);
    /// assert_eq!(ContextConfig::timm(4).planes, 1);
    /// ```
    pub fn timm(in_channels: usize) -> Self {
        // make_divisible(v, 1, round_limit=0) = max(1, int(v + 0.5)).
        let planes = ((in_channels as f64 / 8.0 + 0.5) as usize).max(1);
        ContextConfig {
            in_channels,
            planes,
            pooling: Pooling::Attention,
            fuse_add: false,
            fuse_mul: true,
            ln_eps: 1e-6,
            naming: Naming::Timm,
        }
    }

    /// The preset of `naming` for `in_channels` channels: [`ContextConfig::mmcv`] with
    /// mmcv's usual `ratio` 1/4 or [`ContextConfig::timm`] (the planes are replaced when
    /// read off a checkpoint anyway).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for [`Naming::AlexHex7`], which has no context block.
    pub fn preset(naming: Naming, in_channels: usize) -> Result<Self> {
        match naming {
            Naming::Mmcv => Ok(Self::mmcv(in_channels, 0.25)),
            Naming::Timm => Ok(Self::timm(in_channels)),
            Naming::AlexHex7 => Err(no_context_block()),
        }
    }

    /// Sets the bottleneck width. Default: the preset's (see [`ContextConfig::mmcv`],
    /// [`ContextConfig::timm`]).
    ///
    /// ```
    /// # use nonlocal::ContextConfig;
    /// assert_eq!(ContextConfig::timm(64).planes(16).planes, 16);
    /// ```
    pub fn planes(mut self, planes: usize) -> Self {
        self.planes = planes;
        self
    }

    /// Sets the pooling. Default [`Pooling::Attention`] in both presets.
    ///
    /// ```
    /// # use nonlocal::{ContextConfig, Pooling};
    /// assert_eq!(ContextConfig::mmcv(64, 0.25).pooling(Pooling::Average).pooling.name(), "avg");
    /// ```
    pub fn pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// Sets the add fusion. Default on for mmcv, off for timm.
    ///
    /// ```
    /// # use nonlocal::ContextConfig;
    /// assert!(ContextConfig::timm(64).fuse_add(true).fuse_add);
    /// ```
    pub fn fuse_add(mut self, on: bool) -> Self {
        self.fuse_add = on;
        self
    }

    /// Sets the multiplicative (scale) fusion. Default off for mmcv, on for timm.
    ///
    /// ```
    /// # use nonlocal::ContextConfig;
    /// assert!(!ContextConfig::timm(64).fuse_mul(false).fuse_mul);
    /// ```
    pub fn fuse_mul(mut self, on: bool) -> Self {
        self.fuse_mul = on;
        self
    }

    /// Sets the LayerNorm epsilon. Default `1e-5` (mmcv) or `1e-6` (timm).
    ///
    /// ```
    /// # use nonlocal::ContextConfig;
    /// assert_eq!(ContextConfig::mmcv(64, 0.25).ln_eps(1e-6).ln_eps, 1e-6);
    /// ```
    pub fn ln_eps(mut self, eps: f64) -> Self {
        self.ln_eps = eps;
        self
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero channels or planes, no fusion at all (mmcv asserts
    /// one; timm's block would be the identity), a LayerNorm epsilon that is negative or not
    /// finite, or [`Naming::AlexHex7`]; [`Error::TooLarge`] when the weights cannot be sized.
    ///
    /// ```
    /// # use nonlocal::{ContextConfig, Error};
    /// let none = ContextConfig::timm(8).fuse_mul(false);
    /// assert!(matches!(none.validate(), Err(Error::InvalidConfig { .. })));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if self.in_channels == 0 {
            return invalid("in_channels is 0".into());
        }
        if self.planes == 0 {
            return invalid("planes is 0".into());
        }
        if !self.fuse_add && !self.fuse_mul {
            return invalid("a context block needs at least one fusion (fuse_add or fuse_mul)".into());
        }
        if !(self.ln_eps.is_finite() && self.ln_eps >= 0.0) {
            return invalid(format!("ln_eps {} is not a finite non-negative number", self.ln_eps));
        }
        if self.naming == Naming::AlexHex7 {
            return Err(no_context_block());
        }
        self.in_channels
            .checked_mul(self.planes)
            .and_then(|p| p.checked_mul(4 * 4))
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .map(|_| ())
            .ok_or(Error::TooLarge { what: "in_channels·planes" })
    }
}

/// The error for AlexHex7 keys, which name no context block.
pub(super) fn no_context_block() -> Error {
    Error::InvalidConfig {
        reason:
            "AlexHex7's Non-local_pytorch has no context block: use mmcv (ContextBlock) or timm (GlobalContext) keys"
                .into(),
    }
}
