//! The block's learnable parameters, in PyTorch's layout, and their checks.

use ndarray::{Array1, Array2, ArrayViewD, ArrayViewMutD};

use crate::config::{Mode, NonLocalConfig};
use crate::error::{Error, Result};

/// A 1x1(x1) convolution: `y = W·x + b` per position.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv1x1 {
    /// Weight, shape (out_channels, in_channels): PyTorch's conv weight without the trailing
    /// singleton dims.
    pub weight: Array2<f32>,
    /// Bias, shape (out_channels), or `None` for a convolution without bias.
    pub bias: Option<Array1<f32>>,
}

impl Conv1x1 {
    /// A convolution from its weight (out, in) and optional bias (out).
    pub fn new(weight: Array2<f32>, bias: Option<Array1<f32>>) -> Self {
        Conv1x1 { weight, bias }
    }

    /// An all-zero convolution with a zero bias.
    pub fn zeros(out_channels: usize, in_channels: usize) -> Self {
        Conv1x1 { weight: Array2::zeros((out_channels, in_channels)), bias: Some(Array1::zeros(out_channels)) }
    }

    /// Checks the shapes (out × in, out) and that every value is finite, errors naming
    /// `{name}.weight` / `{name}.bias`.
    pub(crate) fn check(&self, name: &str, out_channels: usize, in_channels: usize) -> Result<()> {
        check_shape(&format!("{name}.weight"), self.weight.shape(), &[out_channels, in_channels])?;
        check_finite(&format!("{name}.weight"), self.weight.iter())?;
        if let Some(bias) = &self.bias {
            check_shape(&format!("{name}.bias"), bias.shape(), &[out_channels])?;
            check_finite(&format!("{name}.bias"), bias.iter())?;
        }
        Ok(())
    }
}

/// BatchNorm in inference form: `y = (x − running_mean) / √(running_var + eps) · weight + bias`.
/// The epsilon is [`NonLocalConfig::bn_eps`].
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm {
    /// γ, shape (C).
    pub weight: Array1<f32>,
    /// β, shape (C).
    pub bias: Array1<f32>,
    /// Running mean, shape (C).
    pub running_mean: Array1<f32>,
    /// Running variance, shape (C); must be finite and non-negative.
    pub running_var: Array1<f32>,
}

impl BatchNorm {
    /// The state a new block starts in: γ = β = 0 (so `W_z` contributes nothing, as in the
    /// paper), running mean 0, running variance 1.
    pub fn zero_init(channels: usize) -> Self {
        BatchNorm {
            weight: Array1::zeros(channels),
            bias: Array1::zeros(channels),
            running_mean: Array1::zeros(channels),
            running_var: Array1::ones(channels),
        }
    }

    fn check(&self, channels: usize, eps: f64) -> Result<()> {
        for (name, v) in [
            ("bn.weight", &self.weight),
            ("bn.bias", &self.bias),
            ("bn.running_mean", &self.running_mean),
            ("bn.running_var", &self.running_var),
        ] {
            check_shape(name, v.shape(), &[channels])?;
            check_finite(name, v.iter())?;
        }
        if let Some(var) = self.running_var.iter().find(|&&v| v < 0.0 || f64::from(v) + eps <= 0.0) {
            return Err(Error::InvalidParameter {
                key: "bn.running_var".into(),
                reason: format!("variance {var} with eps {eps} is not positive"),
            });
        }
        Ok(())
    }
}

/// All parameters of a non-local block, mirroring the PyTorch modules.
///
/// Shapes for in_channels C and inter_channels C':
/// θ, φ, g: (C', C); `w_z`: (C, C'); BatchNorm vectors: (C); `concat_project`: (2C'),
/// its first C' entries multiply θ and the last C' multiply φ.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameters {
    /// θ, the query embedding; `None` in Gaussian mode.
    pub theta: Option<Conv1x1>,
    /// φ, the key embedding; `None` in Gaussian mode.
    pub phi: Option<Conv1x1>,
    /// g, the value embedding.
    pub g: Conv1x1,
    /// `W_z`, back from C' to C channels.
    pub w_z: Conv1x1,
    /// BatchNorm after `W_z`, when the configuration has `bn_layer`.
    pub bn: Option<BatchNorm>,
    /// The concatenation projection `[w_θ; w_φ]` (2C'), in concatenation mode only.
    pub concat_project: Option<Array1<f32>>,
}

impl Parameters {
    /// Parameters of a new block: θ, φ, g (and `W_z` when BatchNorm follows) drawn like
    /// PyTorch's default conv init (uniform in ±1/√fan_in) from a fixed-seed generator, and
    /// the last layer zeroed as in the paper — BatchNorm γ = β = 0, or `W_z` = 0 without
    /// BatchNorm — so the block starts as the identity.
    ///
    /// # Panics
    /// If the parameter tensors of `config` cannot be sized (`in_channels · inter_channels`
    /// elements overflow); [`NonLocalBlock::new`](crate::NonLocalBlock::new) checks that first
    /// and returns [`Error::TooLarge`] instead.
    pub fn init(config: &NonLocalConfig, seed: u64) -> Self {
        let (c, ci) = (config.in_channels, config.inter_channels);
        let mut rng = SplitMix64(seed);
        let mut conv = |out: usize, inp: usize| {
            let bound = 1.0 / (inp as f64).sqrt();
            Conv1x1 {
                weight: Array2::from_shape_fn((out, inp), |_| rng.uniform(bound)),
                bias: Some(Array1::from_shape_fn(out, |_| rng.uniform(bound))),
            }
        };
        let with_theta_phi = config.mode.has_theta_phi();
        let theta = with_theta_phi.then(|| conv(ci, c));
        let phi = with_theta_phi.then(|| conv(ci, c));
        let g = conv(ci, c);
        let (w_z, bn) =
            if config.bn_layer { (conv(c, ci), Some(BatchNorm::zero_init(c))) } else { (Conv1x1::zeros(c, ci), None) };
        let concat_project = (config.mode == Mode::Concatenation).then(|| {
            let bound = 1.0 / ((2 * ci) as f64).sqrt();
            Array1::from_shape_fn(2 * ci, |_| rng.uniform(bound))
        });
        Parameters { theta, phi, g, w_z, bn, concat_project }
    }

    /// Checks that the parameters fit the configuration: the parts the mode needs are
    /// present (and no others), every shape matches, every value is finite, and BatchNorm
    /// variances are non-negative.
    ///
    /// # Errors
    /// [`Error::MissingKey`] for a missing part, [`Error::ConfigMismatch`] for a part the
    /// configuration does not have, [`Error::WrongShape`] or [`Error::InvalidParameter`].
    pub fn validate(&self, config: &NonLocalConfig) -> Result<()> {
        config.validate()?;
        let (c, ci) = (config.in_channels, config.inter_channels);
        let needs_theta_phi = config.mode.has_theta_phi();
        for (name, part) in [("theta", &self.theta), ("phi", &self.phi)] {
            match (part, needs_theta_phi) {
                (Some(conv), true) => conv.check(name, ci, c)?,
                (None, true) => return Err(Error::MissingKey { key: name.into() }),
                (Some(_), false) => return Err(mismatch("mode", config.mode, format!("a {name} conv"))),
                (None, false) => {}
            }
        }
        self.g.check("g", ci, c)?;
        self.w_z.check("w_z", c, ci)?;
        match (&self.bn, config.bn_layer) {
            (Some(bn), true) => bn.check(c, config.bn_eps)?,
            (None, false) => {}
            (None, true) => return Err(mismatch("bn_layer", true, "no BatchNorm")),
            (Some(_), false) => return Err(mismatch("bn_layer", false, "a BatchNorm")),
        }
        match (&self.concat_project, config.mode == Mode::Concatenation) {
            (Some(w), true) => {
                check_shape("concat_project", w.shape(), &[2 * ci])?;
                check_finite("concat_project", w.iter())?;
            }
            (None, true) => return Err(Error::MissingKey { key: "concat_project".into() }),
            (Some(_), false) => return Err(mismatch("mode", config.mode, "a concatenation projection")),
            (None, false) => {}
        }
        Ok(())
    }
}

impl Parameters {
    /// The trainable tensors by name, mutable, in the order of
    /// [`ParameterGradients::named`](crate::ParameterGradients::named)
    /// (BatchNorm running statistics are not trainable). To train a block, use
    /// [`NonLocalBlock::update_parameters`](crate::NonLocalBlock::update_parameters), which pairs them with their gradients by name and
    /// keeps the block consistent.
    pub fn trainable_mut(&mut self) -> Vec<(String, ArrayViewMutD<'_, f32>)> {
        let mut out = Vec::new();
        if let Some(c) = &mut self.theta {
            conv_tensors_mut("theta", c, &mut out);
        }
        if let Some(c) = &mut self.phi {
            conv_tensors_mut("phi", c, &mut out);
        }
        conv_tensors_mut("g", &mut self.g, &mut out);
        conv_tensors_mut("w_z", &mut self.w_z, &mut out);
        if let Some(bn) = &mut self.bn {
            out.push(("bn.weight".into(), bn.weight.view_mut().into_dyn()));
            out.push(("bn.bias".into(), bn.bias.view_mut().into_dyn()));
        }
        if let Some(p) = &mut self.concat_project {
            out.push(("concat_project".into(), p.view_mut().into_dyn()));
        }
        out
    }
}

/// Appends a convolution's weight and bias (when it has one) as `{name}.weight`,
/// `{name}.bias`.
pub(crate) fn conv_tensors<'a>(name: &'static str, conv: &'a Conv1x1, out: &mut Vec<(String, ArrayViewD<'a, f32>)>) {
    out.push((format!("{name}.weight"), conv.weight.view().into_dyn()));
    if let Some(b) = &conv.bias {
        out.push((format!("{name}.bias"), b.view().into_dyn()));
    }
}

/// [`conv_tensors`], mutable.
fn conv_tensors_mut<'a>(name: &'static str, conv: &'a mut Conv1x1, out: &mut Vec<(String, ArrayViewMutD<'a, f32>)>) {
    out.push((format!("{name}.weight"), conv.weight.view_mut().into_dyn()));
    if let Some(b) = &mut conv.bias {
        out.push((format!("{name}.bias"), b.view_mut().into_dyn()));
    }
}

/// A setting the configuration and the weights disagree on.
pub(crate) fn mismatch(what: &'static str, config: impl ToString, weights: impl ToString) -> Error {
    Error::ConfigMismatch { what, config: config.to_string(), weights: weights.to_string() }
}

/// Checks a shape, naming the key in the error.
pub(crate) fn check_shape(key: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::WrongShape { key: key.into(), expected: expected.to_vec(), actual: actual.to_vec() })
    }
}

/// Checks that every value is finite, naming the key in the error.
pub(crate) fn check_finite<'a>(key: &str, mut values: impl Iterator<Item = &'a f32>) -> Result<()> {
    match values.find(|v| !v.is_finite()) {
        None => Ok(()),
        Some(v) => Err(Error::InvalidParameter { key: key.into(), reason: format!("non-finite value {v}") }),
    }
}

/// SplitMix64: a tiny, well-known generator, enough for reproducible weight init (every
/// block's `init`).
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [−bound, bound).
    pub(crate) fn uniform(&mut self, bound: f64) -> f32 {
        ((2.0 * self.unit() - 1.0) * bound) as f32
    }

    /// Normal with mean 0 and standard deviation `std` (Box–Muller).
    pub(crate) fn normal(&mut self, std: f64) -> f32 {
        let u = 1.0 - self.unit(); // (0, 1]: the logarithm is finite
        let v = self.unit();
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * std) as f32
    }
}
