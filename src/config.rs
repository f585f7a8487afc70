//! Configuration of a non-local block: pairwise function, channels, sub-sampling, BatchNorm.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The pairwise function `f(x_i, x_j)` and its normalisation `C(x)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `softmax_j(θ_i·φ_j · s)`, with `s = 1/√C'` when [`NonLocalConfig::use_scale`] is set.
    EmbeddedGaussian,
    /// `softmax_j(x_i·x̂_j)`: no θ/φ; keys `x̂` are the (max-pooled) input itself.
    Gaussian,
    /// `(θ_i·φ_j) / M`.
    DotProduct,
    /// `ReLU(w_θ·θ_i + w_φ·φ_j) / M`, with `[w_θ; w_φ]` a 1x1 conv from 2C' channels to 1.
    Concatenation,
}

impl Mode {
    /// All four modes, in the order of the paper's table.
    pub const ALL: [Mode; 4] = [Mode::EmbeddedGaussian, Mode::Gaussian, Mode::DotProduct, Mode::Concatenation];

    /// The name PyTorch implementations use (`embedded_gaussian`, `gaussian`, `dot_product`,
    /// `concatenation`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::EmbeddedGaussian => "embedded_gaussian",
            Mode::Gaussian => "gaussian",
            Mode::DotProduct => "dot_product",
            Mode::Concatenation => "concatenation",
        }
    }

    /// Whether the attention weights are a softmax over keys (the two Gaussian modes) rather
    /// than a division by the number of keys M.
    pub fn is_softmax(self) -> bool {
        matches!(self, Mode::EmbeddedGaussian | Mode::Gaussian)
    }

    /// Whether the block has θ and φ convolutions (every mode but Gaussian).
    pub fn has_theta_phi(self) -> bool {
        self != Mode::Gaussian
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = Error;

    /// Parses the PyTorch names, plus the short forms `eg`, `gauss`, `dp` and `concat`.
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "embedded_gaussian" | "eg" => Ok(Mode::EmbeddedGaussian),
            "gaussian" | "gauss" => Ok(Mode::Gaussian),
            "dot_product" | "dp" => Ok(Mode::DotProduct),
            "concatenation" | "concat" => Ok(Mode::Concatenation),
            _ => Err(Error::UnknownMode { name: s.to_string() }),
        }
    }
}

/// The arithmetic of a block's forward pass ([`NonLocalConfig::precision`]).
///
/// `#[non_exhaustive]`: precisions may be added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Precision {
    /// f32 throughout: PyTorch's float32 results (within its own float32 accuracy). The
    /// default.
    #[default]
    F32,
    /// bf16 operands with f32 accumulation on the value side, where that keeps the block at
    /// least as accurate as PyTorch's bf16 autocast: the g projection (φ and g in dot product
    /// and concatenation), the product of the attention weights (rounded to bf16 per key tile,
    /// as FlashAttention) with the values, and dot product's φᵀg. Parameters are rounded once,
    /// when they are packed; activations as they are packed for a product; every sum is f32.
    /// The logits and their projections (θ, φ), the softmax (maximum, exponential, sums),
    /// `W_z` with the folded BatchNorm, the residual and the output stay f32: bf16 logits
    /// would make the error PyTorch autocast's own (measured, README "bf16"). On AMX tiles
    /// where the CPU has AMX-BF16 ([`Isa::Amx`](crate::Isa::Amx)), the f32 products above
    /// there as near-f32 bf16×3 tile products (each operand split into bf16 high and low parts:
    /// about 2⁻¹⁶ of `Σ|a||b|` off the exact product); on `VDPBF16PS` where it has AVX512_BF16
    /// ([`Isa::Avx512Bf16`](crate::Isa::Avx512Bf16)); elsewhere an exact emulation (the same
    /// bits on every x86 CPU without AMX) at about the f32 speed. Only the
    /// forward pass: attention maps and training run in f32 (see
    /// [`NonLocalConfig::precision`]).
    Bf16,
    /// [`Bf16`](Precision::Bf16) and the logits too: θ and φ projected (Gaussian: the input
    /// rounded) and multiplied in bf16 with f32 sums, as PyTorch's bf16 autocast and
    /// OpenVINO's bf16 default do, and `W_z` multiplied in bf16 where it is applied to the
    /// outputs (channels-last; folded into the values or channels-first it stays f32); the
    /// softmax, the residual and the output stay f32.
    /// 1.2–1.9× faster than f32 on AVX512_BF16 and 1.7–3.6× on AMX (measured, README "bf16"), with an error in
    /// their class rather than below it: 0.18–1.37× PyTorch autocast's own on the golden cases,
    /// a median 0.44–0.61× over random blocks but up to 3.9× on one of them, so the per-case
    /// contract of [`Bf16`](Precision::Bf16) does not hold. The same entry points as `Bf16`
    /// (training and attention maps in f32).
    Bf16Logits,
}

impl Precision {
    /// The name used on command lines and in reports: `f32`, `bf16` or `bf16-logits`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Bf16Logits => "bf16-logits",
        }
    }

    /// Whether the value side multiplies in bf16 (either bf16 precision).
    pub(crate) fn bf16_values(self) -> bool {
        self != Precision::F32
    }

    /// Whether the logits and their projections multiply in bf16.
    pub(crate) fn bf16_logits(self) -> bool {
        self == Precision::Bf16Logits
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;

    /// Parses `f32`, `bf16` or `bf16-logits` (any case).
    fn from_str(s: &str) -> Result<Precision> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "bf16-logits" | "bf16_logits" => Ok(Precision::Bf16Logits),
            _ => Err(Error::InvalidConfig { reason: format!("precision {s:?} is none of f32, bf16, bf16-logits") }),
        }
    }
}

/// Configuration of a [`NonLocalBlock`](crate::NonLocalBlock).
///
/// Fields are public to read; [`NonLocalConfig::new`] and the presets of the PyTorch
/// implementations ([`NonLocalConfig::alexhex7`], [`NonLocalConfig::mmcv`],
/// [`NonLocalConfig::mmaction2_i3d`]) fill them in, and the builder methods change one setting
/// each. The struct is `#[non_exhaustive]`: settings may be added without breaking callers.
///
/// # Example
/// ```
/// use nonlocal::{Mode, NonLocalConfig};
///
/// let config = NonLocalConfig::new(512)
///     .mode(Mode::EmbeddedGaussian)
///     .sub_sample(Some([1, 2, 2]))
///     .use_scale(true);
/// assert_eq!(config.inter_channels, 256);
/// config.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct NonLocalConfig {
    /// C, the number of input (and output) channels.
    pub in_channels: usize,
    /// C', the channels of θ, φ and g. Default `max(C / 2, 1)`.
    pub inter_channels: usize,
    /// The pairwise function. Default [`Mode::EmbeddedGaussian`].
    pub mode: Mode,
    /// Max-pool kernel (= stride) `(kt, kh, kw)` applied to φ and g (Gaussian: to the keys x
    /// and to g), or `None` for no sub-sampling. Default `Some([1, 2, 2])`, the 3d blocks'
    /// setting; 2d blocks use `[1, 2, 2]` on (1, H, W) inputs, 1d blocks `[1, 1, 2]`.
    pub sub_sample: Option<[usize; 3]>,
    /// Divide embedded-Gaussian logits by √C' (mmcv's default). Default `false` (the paper,
    /// AlexHex7). Has no effect in the other modes.
    pub use_scale: bool,
    /// The factor applied to embedded-Gaussian logits when given outright, instead of
    /// `use_scale`'s 1/√C': timm's `NonLocalAttn` uses `in_channels^-0.5`
    /// ([`NonLocalConfig::timm`]). Default `None`. Has no effect in the other modes.
    pub logit_factor: Option<f32>,
    /// Whether `W_z` is followed by BatchNorm (eval mode). Default `true`.
    pub bn_layer: bool,
    /// BatchNorm epsilon. Default `1e-5`.
    pub bn_eps: f64,
    /// Rank of the 1x1 convolutions in PyTorch (1, 2 or 3 for `NonLocal1d/2d/3d`): the number
    /// of trailing singleton dims of their weights in a checkpoint. It changes no arithmetic;
    /// it is checked against the weights on load and used when saving them. Default 3.
    pub conv_dims: usize,
    /// The arithmetic of the forward pass. Default [`Precision::F32`].
    pub precision: Precision,
}

impl NonLocalConfig {
    /// The default configuration for `in_channels` channels: embedded Gaussian, C' = C/2,
    /// sub-sampling 1x2x2, BatchNorm after `W_z`, no logit scaling.
    pub fn new(in_channels: usize) -> Self {
        NonLocalConfig {
            in_channels,
            inter_channels: (in_channels / 2).max(1),
            mode: Mode::EmbeddedGaussian,
            sub_sample: Some([1, 2, 2]),
            use_scale: false,
            logit_factor: None,
            bn_layer: true,
            bn_eps: 1e-5,
            conv_dims: 3,
            precision: Precision::F32,
        }
    }

    /// The defaults of AlexHex7's `Non-local_pytorch` (`NONLocalBlock3D(in_channels)`):
    /// embedded Gaussian without logit scaling, C' = C/2, φ/g max-pooled 1x2x2, BatchNorm
    /// after `W_z`, 3-d convolutions. The same as [`NonLocalConfig::new`].
    ///
    /// ```
    /// # use nonlocal::NonLocalConfig;
    /// assert_eq!(NonLocalConfig::alexhex7(64), NonLocalConfig::new(64));
    /// ```
    pub fn alexhex7(in_channels: usize) -> Self {
        Self::new(in_channels)
    }

    /// The defaults of mmcv's `NonLocal3d(in_channels)`: embedded Gaussian **with** logit
    /// scaling by 1/√C' (`use_scale=True`), C' = C/2 (`reduction=2`), no sub-sampling, no
    /// normalisation after `conv_out` (`norm_cfg=None`), 3-d convolutions.
    ///
    /// Models built on mmcv often change these: mmaction2's I3D non-local backbones use
    /// `sub_sample=True`, `use_scale=False` and `norm_cfg=dict(type='BN3d')`. Pooling,
    /// BatchNorm and the conv rank are checked against the weights when loading; `use_scale`
    /// and embedded Gaussian versus dot product cannot be, so set them from the model's config.
    ///
    /// ```
    /// # use nonlocal::NonLocalConfig;
    /// let config = NonLocalConfig::mmcv(64);
    /// assert!(config.use_scale && !config.bn_layer && config.sub_sample.is_none());
    /// ```
    pub fn mmcv(in_channels: usize) -> Self {
        Self::new(in_channels).use_scale(true).sub_sample(None).bn_layer(false)
    }

    /// The non-local blocks of mmaction2's I3D backbones (`resnet3d` with `non_local_cfg`:
    /// `sub_sample=True`, `use_scale=False`, `norm_cfg=dict(type='BN3d')`, `mode` embedded
    /// Gaussian), the most common video checkpoints: mmcv's `NonLocal3d` keys with 1x2x2
    /// pooling, BatchNorm, no logit scaling. Loading them with [`NonLocalConfig::mmcv`]'s
    /// `use_scale` true instead gives outputs off by up to ~1.5, and no key can tell.
    ///
    /// ```
    /// # use nonlocal::NonLocalConfig;
    /// let config = NonLocalConfig::mmaction2_i3d(1024);
    /// assert!(!config.use_scale && config.bn_layer && config.sub_sample == Some([1, 2, 2]));
    /// assert_eq!(config.inter_channels, 512);
    /// ```
    pub fn mmaction2_i3d(in_channels: usize) -> Self {
        Self::mmcv(in_channels).use_scale(false).sub_sample(Some([1, 2, 2])).bn_layer(true)
    }

    /// The defaults of timm's `NonLocalAttn(in_channels)` (`timm.layers.non_local_attn`):
    /// embedded Gaussian without sub-sampling, logits scaled by `in_channels^-0.5`
    /// (`use_scale=True`: note C, not C'), C' = `make_divisible(C / 8, 8)` (a multiple of 8,
    /// at least 8, rounded to nearest and never more than 10% below C/8), BatchNorm after `z`,
    /// 2-d convolutions (keys [`Naming::Timm`](crate::Naming::Timm)). With `use_scale=False`,
    /// set [`NonLocalConfig::logit_factor`] to `None`.
    ///
    /// ```
    /// # use nonlocal::NonLocalConfig;
    /// let config = NonLocalConfig::timm(512);
    /// assert_eq!((config.inter_channels, config.sub_sample, config.conv_dims), (64, None, 2));
    /// assert_eq!(config.logit_scale(), 1.0 / 512f32.sqrt());
    /// assert_eq!(NonLocalConfig::timm(32).inter_channels, 8);
    /// ```
    pub fn timm(in_channels: usize) -> Self {
        let scale = (in_channels as f64).powf(-0.5) as f32;
        Self::new(in_channels)
            .inter_channels(make_divisible(in_channels as f64 / 8.0, 8))
            .sub_sample(None)
            .conv_dims(2)
            .use_scale(true)
            .logit_factor(Some(scale))
    }

    /// Sets the pairwise function. Default [`Mode::EmbeddedGaussian`].
    ///
    /// Weights decide concatenation (a `concat_project` convolution) and Gaussian (no θ/φ),
    /// and loading refuses a mode they contradict; embedded Gaussian and dot product have the
    /// same parameters, so only the model's own configuration tells them apart.
    ///
    /// ```
    /// # use nonlocal::{Mode, NonLocalConfig};
    /// let config = NonLocalConfig::new(64).mode(Mode::DotProduct);
    /// assert_eq!(config.mode.name(), "dot_product");
    /// ```
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets C', the inter channels. Default `max(C / 2, 1)`.
    ///
    /// ```
    /// # use nonlocal::NonLocalConfig;
    /// assert_eq!(NonLocalConfig::new(64).inter_channels, 32);
    /// assert_eq!(NonLocalConfig::new(64).inter_channels(16).inter_channels, 16);
    /// ```
    pub fn inter_channels(mut self, inter_channels: usize) -> Self {
        self.inter_channels = inter_channels;
        self
    }

    /// Sets the sub-sampling max-pool kernel `(kt, kh, kw)` (stride = kernel), or `None`
    /// for no sub-sampling. Default `Some([1, 2, 2])`; mmcv's `NonLocal1d` corresponds to
    /// `[1, 1, 2]` on (1, 1, L) inputs, `NonLocal2d` to `[1, 2, 2]` on (1, H, W).
    ///
    /// Whether there is pooling shows in a checkpoint's keys (and is checked on load); the
    /// kernel size does not, since max-pooling has no parameters.
    ///
    /// ```
    /// # use nonlocal::{NonLocalBlock, NonLocalConfig};
    /// let block = NonLocalBlock::new(NonLocalConfig::new(8).sub_sample(Some([2, 2, 2])))?;
    /// // Floor on sizes that do not divide, as PyTorch's max-pool: 5x7x9 → 2x3x4 keys.
    /// assert_eq!(block.key_grid([5, 7, 9]), [2, 3, 4]);
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    pub fn sub_sample(mut self, kernel: Option<[usize; 3]>) -> Self {
        self.sub_sample = kernel;
        self
    }

    /// Sets whether embedded-Gaussian logits are divided by √C'. Default `false` (the paper,
    /// AlexHex7); mmcv's blocks default to `true`.
    ///
    /// ```
    /// # use nonlocal::NonLocalConfig;
    /// assert_eq!(NonLocalConfig::new(32).use_scale(true).logit_scale(), 0.25);
    /// ```
    pub fn use_scale(mut self, use_scale: bool) -> Self {
        self.use_scale = use_scale;
        self
    }

    /// Sets the embedded-Gaussian logit factor outright, or `None` for `use_scale`'s rule.
    /// Default `None`.
    ///
    /// ```
    /// # use nonlocal::NonLocalConfig;
    /// let config = NonLocalConfig::new(32).use_scale(true).logit_factor(Some(0.5));
    /// assert_eq!(config.logit_scale(), 0.5);
    /// ```
    pub fn logit_factor(mut self, factor: Option<f32>) -> Self {
        self.logit_factor = factor;
        self
    }

    /// Sets whether BatchNorm follows `W_z`. Default `true`.
    ///
    /// ```
    /// # use nonlocal::NonLocalConfig;
    /// assert!(!NonLocalConfig::new(8).bn_layer(false).bn_layer);
    /// ```
    pub fn bn_layer(mut self, bn_layer: bool) -> Self {
        self.bn_layer = bn_layer;
        self
    }

    /// Sets the BatchNorm epsilon. Default `1e-5` (PyTorch's).
    ///
    /// ```
    /// # use nonlocal::NonLocalConfig;
    /// assert_eq!(NonLocalConfig::new(8).bn_eps(1e-3).bn_eps, 1e-3);
    /// ```
    pub fn bn_eps(mut self, eps: f64) -> Self {
        self.bn_eps = eps;
        self
    }

    /// Sets the rank of the 1x1 convolutions as stored in checkpoints (1, 2 or 3). Default 3.
    ///
    /// ```
    /// # use nonlocal::NonLocalConfig;
    /// // An mmcv NonLocal2d checkpoint stores conv weights as (out, in, 1, 1).
    /// NonLocalConfig::new(8).conv_dims(2).validate()?;
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    pub fn conv_dims(mut self, dims: usize) -> Self {
        self.conv_dims = dims;
        self
    }

    /// Sets the arithmetic of the forward pass. Default [`Precision::F32`], PyTorch's float32
    /// results.
    ///
    /// [`Precision::Bf16`] multiplies the value side in bf16 (parameters rounded once, when
    /// they are packed, activations as they are packed for each product, every sum in f32) and
    /// keeps the logits, the softmax, `W_z` with the BatchNorm fold, the residual and the
    /// output in f32 (see [`Precision`]). It applies to [`forward`](crate::NonLocalBlock::forward) and the other
    /// forward entry points (`forward_into`, `forward_images`, `forward_sequences`) in every
    /// mode. [`attention`](crate::NonLocalBlock::attention),
    /// [`attention_rows`](crate::NonLocalBlock::attention_rows),
    /// [`forward_train`](crate::NonLocalBlock::forward_train) and
    /// [`backward`](crate::NonLocalBlock::backward) run in f32 exactly as on an f32 block (the
    /// same bits), from the f32 parameters the block keeps.
    ///
    /// Accuracy: on each of the PyTorch golden cases the crate tests, the bf16 output's error
    /// `max |z − z_ref| / max(1, max |z_ref|)` is at most `max(1.25 × e, 4e-3)`, where `e` is
    /// PyTorch's own error there under `torch.autocast("cpu", dtype=torch.bfloat16)` (the
    /// README lists both per case). [`Precision::Bf16Logits`] is faster, with an error in
    /// PyTorch autocast's class rather than below it: no such per-case bound (see [`Precision`]).
    ///
    /// ```
    /// use ndarray::Array5;
    /// use nonlocal::{NonLocalBlock, NonLocalConfig, Parameters, Precision};
    ///
    /// let config = NonLocalConfig::new(16);
    /// let mut params = Parameters::init(&config, 7);
    /// params.bn.as_mut().unwrap().weight.fill(1.0); // not the identity
    /// let f32_block = NonLocalBlock::from_parameters(config.clone(), params.clone())?;
    /// let bf16_block = NonLocalBlock::from_parameters(config.precision(Precision::Bf16), params)?;
    /// let x = Array5::<f32>::from_shape_fn((1, 2, 6, 6, 16), |(_, t, h, w, c)| ((t + h * w + c) % 7) as f32 * 0.1);
    /// let (z32, z16) = (f32_block.forward(&x)?, bf16_block.forward(&x)?);
    /// let err = (&z32 - &z16).iter().fold(0f32, |m, d| m.max(d.abs()));
    /// assert!(err > 0.0 && err < 0.05);
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    pub fn precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The factor applied to the logits: for embedded Gaussian [`NonLocalConfig::logit_factor`]
    /// when given, else `1/√C'` with `use_scale`; 1 otherwise.
    pub fn logit_scale(&self) -> f32 {
        match (self.mode, self.logit_factor) {
            (Mode::EmbeddedGaussian, Some(factor)) => factor,
            (Mode::EmbeddedGaussian, None) if self.use_scale => (1.0 / (self.inter_channels as f64).sqrt()) as f32,
            _ => 1.0,
        }
    }

    /// The pool kernel, `[1, 1, 1]` when there is no sub-sampling.
    pub fn pool_kernel(&self) -> [usize; 3] {
        self.sub_sample.unwrap_or([1, 1, 1])
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero channels, a pool kernel with a zero, `conv_dims` not
    /// 1, 2 or 3, or a logit factor or BatchNorm epsilon that is negative or not finite.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if self.in_channels == 0 {
            return invalid("in_channels is 0".into());
        }
        if self.inter_channels == 0 {
            return invalid("inter_channels is 0".into());
        }
        if let Some(k) = self.sub_sample {
            if k.contains(&0) {
                return invalid(format!("pool kernel {k:?} has a zero"));
            }
        }
        if !(1..=3).contains(&self.conv_dims) {
            return invalid(format!("conv_dims is {}, expected 1, 2 or 3", self.conv_dims));
        }
        if let Some(f) = self.logit_factor.filter(|f| !(f.is_finite() && *f >= 0.0)) {
            return invalid(format!("logit_factor {f} is not a finite non-negative number"));
        }
        if !(self.bn_eps.is_finite() && self.bn_eps >= 0.0) {
            return invalid(format!("bn_eps {} is not a finite non-negative number", self.bn_eps));
        }
        Ok(())
    }
}

/// Parses a sub-sampling setting as the golden files and command lines write it: `none`, or
/// a kernel `kt,kh,kw`.
///
/// # Errors
/// [`Error::InvalidConfig`] when the text is neither.
pub fn parse_sub_sample(text: &str) -> Result<Option<[usize; 3]>> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("none") || text.eq_ignore_ascii_case("false") {
        return Ok(None);
    }
    let bad = || Error::InvalidConfig { reason: format!("sub_sample {text:?} is neither \"none\" nor \"kt,kh,kw\"") };
    let parts: Vec<usize> =
        text.split(',').map(|p| p.trim().parse::<usize>().map_err(|_| bad())).collect::<Result<_>>()?;
    let kernel: [usize; 3] = parts.try_into().map_err(|_| bad())?;
    Ok(Some(kernel))
}

/// timm's `make_divisible(v, divisor)` (round_limit 0.9): `v` rounded to the nearest multiple of
/// `divisor`, at least `divisor`, bumped by one `divisor` when rounding lost more than 10%.
fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let rounded = (((v + d / 2.0) as usize) / divisor * divisor).max(divisor);
    if (rounded as f64) < 0.9 * v {
        rounded + divisor
    } else {
        rounded
    }
}
