//! The context block's learnable parameters, their checks, the upstream weight init, and
//! their names and PyTorch shapes.

use ndarray::{Array1, Array2, ArrayBase, ArrayViewD, ArrayViewMutD, Axis, IxDyn, RawData};

use super::config::{ContextConfig, Pooling};
use super::names::{Fusion, Part};
use crate::error::{Error, Result};
use crate::load::Naming;
use crate::params::{check_finite, mismatch, Conv1x1, SplitMix64};

/// One fusion MLP: `conv2 · ReLU(LayerNorm(conv1 · context))`, on the C-vector context.
///
/// Shapes for C channels and `planes` P: `conv1` (P, C) with bias (P), `ln_weight` and
/// `ln_bias` (P), `conv2` (C, P) with bias (C). A bias that is `None` counts as zero.
#[derive(Clone, Debug, PartialEq)]
pub struct ContextMlp {
    /// The 1x1 conv from C channels to `planes`.
    pub conv1: Conv1x1,
    /// LayerNorm γ over the `planes` channels.
    pub ln_weight: Array1<f32>,
    /// LayerNorm β.
    pub ln_bias: Array1<f32>,
    /// The 1x1 conv back from `planes` to C channels.
    pub conv2: Conv1x1,
}

/// All parameters of a context block, mirroring the upstream modules' parts.
#[derive(Clone, Debug, PartialEq)]
pub struct ContextParameters {
    /// The attention-pooling conv, weight (1, C) and bias (1) (mmcv `conv_mask`, timm
    /// `conv_attn`); `None` for [`Pooling::Average`].
    pub mask: Option<Conv1x1>,
    /// The add-fusion MLP (mmcv `channel_add_conv`, timm `mlp_add`), when `fuse_add`.
    pub add: Option<ContextMlp>,
    /// The multiplicative-fusion MLP (mmcv `channel_mul_conv`, timm `mlp_scale`), when
    /// `fuse_mul`.
    pub mul: Option<ContextMlp>,
}

impl ContextMlp {
    fn check(&self, naming: Naming, fusion: Fusion, c: usize, planes: usize) -> Result<()> {
        check_conv(&self.conv1, naming, Part::Conv1Weight(fusion), Part::Conv1Bias(fusion), planes, c)?;
        check_vector(&self.ln_weight, &Part::NormWeight(fusion).key(naming), planes)?;
        check_vector(&self.ln_bias, &Part::NormBias(fusion).key(naming), planes)?;
        check_conv(&self.conv2, naming, Part::Conv2Weight(fusion), Part::Conv2Bias(fusion), c, planes)
    }
}

impl ContextParameters {
    /// Parameters of a new block, drawn like the upstream module named by `config.naming`
    /// initialises them (same distributions, not PyTorch's random numbers), from a
    /// fixed-seed generator:
    ///
    /// - mmcv: the mask conv Kaiming-normal (fan in, ReLU gain: std √(2/C)), bias 0; each
    ///   MLP's first conv PyTorch's default (uniform in ±1/√fan_in, bias too), LayerNorm
    ///   γ = 1, β = 0, and its **last conv zero** (weight and bias): the add term is 0 and
    ///   the multiplicative gate sigmoid(0) = ½, so an add-only block is the identity.
    /// - timm: the mask conv Kaiming-normal, bias PyTorch's default; both MLPs PyTorch's
    ///   default except `mlp_add.fc2.weight`, which is zero (its bias is not): timm's block is
    ///   not the identity at init.
    pub fn init(config: &ContextConfig, seed: u64) -> Self {
        let (c, p) = (config.in_channels, config.planes);
        let mut rng = SplitMix64(seed);
        let mmcv = config.naming != Naming::Timm;
        let mask = (config.pooling == Pooling::Attention).then(|| {
            let std = (2.0 / c as f64).sqrt();
            let weight = Array2::from_shape_fn((1, c), |_| rng.normal(std));
            let bias = if mmcv { 0.0 } else { rng.uniform(1.0 / (c as f64).sqrt()) };
            Conv1x1::new(weight, Some(Array1::from_elem(1, bias)))
        });
        let mut mlp = |on: bool, zero_weight: bool, zero_bias: bool| {
            on.then(|| {
                let conv1 = default_conv(&mut rng, p, c);
                let mut conv2 = default_conv(&mut rng, c, p);
                if zero_weight {
                    conv2.weight.fill(0.0);
                }
                if zero_bias {
                    conv2.bias = Some(Array1::zeros(c));
                }
                ContextMlp { conv1, ln_weight: Array1::ones(p), ln_bias: Array1::zeros(p), conv2 }
            })
        };
        let add = mlp(config.fuse_add, true, mmcv);
        let mul = mlp(config.fuse_mul, mmcv, mmcv);
        ContextParameters { mask, add, mul }
    }

    /// Checks the parameters against the configuration: the parts it needs are present (and
    /// no others), every shape matches, every value is finite. Errors name the parts by
    /// their keys under `config.naming` (`conv_mask.weight`, `mlp_add.fc1.bias`, …).
    ///
    /// # Errors
    /// [`Error::MissingKey`] for a missing part, [`Error::ConfigMismatch`] for a part the
    /// configuration does not have, [`Error::WrongShape`], [`Error::InvalidParameter`]
    /// (NaN or ±∞), and those of [`ContextConfig::validate`].
    pub fn validate(&self, config: &ContextConfig) -> Result<()> {
        config.validate()?;
        let (naming, c, p) = (config.naming, config.in_channels, config.planes);
        match (&self.mask, config.pooling) {
            (Some(mask), Pooling::Attention) => check_conv(mask, naming, Part::MaskWeight, Part::MaskBias, 1, c)?,
            (None, Pooling::Average) => {}
            (None, Pooling::Attention) => return Err(Error::MissingKey { key: Part::MaskWeight.key(naming) }),
            (Some(_), Pooling::Average) => {
                return Err(mismatch(
                    "pooling",
                    Pooling::Average,
                    format!("a mask conv ({})", Part::MaskWeight.key(naming)),
                ))
            }
        }
        for (fusion, mlp, on, what) in [
            (Fusion::Add, &self.add, config.fuse_add, "fuse_add"),
            (Fusion::Mul, &self.mul, config.fuse_mul, "fuse_mul"),
        ] {
            match (mlp, on) {
                (Some(mlp), true) => mlp.check(naming, fusion, c, p)?,
                (None, false) => {}
                (None, true) => return Err(Error::MissingKey { key: Part::Conv1Weight(fusion).key(naming) }),
                (Some(_), false) => {
                    return Err(mismatch(what, false, format!("an MLP ({})", Part::Conv1Weight(fusion).key(naming))))
                }
            }
        }
        Ok(())
    }

    /// Every tensor by its key under `naming` (without prefix), in `state_dict` order, with
    /// its PyTorch shape: conv weights (out, in, 1, 1), biases (out), LayerNorm (planes, 1, 1)
    /// for mmcv and (planes) for timm. A bias that is `None` is left out.
    ///
    /// ```
    /// use nonlocal::{ContextConfig, ContextParameters};
    /// let config = ContextConfig::mmcv(16, 0.25);
    /// let params = ContextParameters::init(&config, 1);
    /// let named = params.named(config.naming);
    /// assert_eq!(named[0].0, "conv_mask.weight");
    /// assert_eq!(named[0].1.shape(), &[1, 16, 1, 1]);
    /// assert_eq!(named[4].0, "channel_add_conv.1.weight");
    /// assert_eq!(named[4].1.shape(), &[4, 1, 1]);
    /// ```
    pub fn named<'a>(&'a self, naming: Naming) -> Vec<(String, ArrayViewD<'a, f32>)> {
        let mut out = Vec::new();
        let mut push =
            |part: Part, view: ArrayViewD<'a, f32>| out.push((part.key(naming), torch_shaped(part, naming, view)));
        if let Some(mask) = &self.mask {
            push(Part::MaskWeight, mask.weight.view().into_dyn());
            if let Some(b) = &mask.bias {
                push(Part::MaskBias, b.view().into_dyn());
            }
        }
        for (fusion, mlp) in [(Fusion::Add, &self.add), (Fusion::Mul, &self.mul)] {
            let Some(mlp) = mlp else { continue };
            push(Part::Conv1Weight(fusion), mlp.conv1.weight.view().into_dyn());
            if let Some(b) = &mlp.conv1.bias {
                push(Part::Conv1Bias(fusion), b.view().into_dyn());
            }
            push(Part::NormWeight(fusion), mlp.ln_weight.view().into_dyn());
            push(Part::NormBias(fusion), mlp.ln_bias.view().into_dyn());
            push(Part::Conv2Weight(fusion), mlp.conv2.weight.view().into_dyn());
            if let Some(b) = &mlp.conv2.bias {
                push(Part::Conv2Bias(fusion), b.view().into_dyn());
            }
        }
        out
    }

    /// As [`ContextParameters::named`], mutable.
    pub fn named_mut<'a>(&'a mut self, naming: Naming) -> Vec<(String, ArrayViewMutD<'a, f32>)> {
        let mut out = Vec::new();
        let mut push =
            |part: Part, view: ArrayViewMutD<'a, f32>| out.push((part.key(naming), torch_shaped(part, naming, view)));
        if let Some(mask) = &mut self.mask {
            push(Part::MaskWeight, mask.weight.view_mut().into_dyn());
            if let Some(b) = &mut mask.bias {
                push(Part::MaskBias, b.view_mut().into_dyn());
            }
        }
        for (fusion, mlp) in [(Fusion::Add, &mut self.add), (Fusion::Mul, &mut self.mul)] {
            let Some(mlp) = mlp else { continue };
            push(Part::Conv1Weight(fusion), mlp.conv1.weight.view_mut().into_dyn());
            if let Some(b) = &mut mlp.conv1.bias {
                push(Part::Conv1Bias(fusion), b.view_mut().into_dyn());
            }
            push(Part::NormWeight(fusion), mlp.ln_weight.view_mut().into_dyn());
            push(Part::NormBias(fusion), mlp.ln_bias.view_mut().into_dyn());
            push(Part::Conv2Weight(fusion), mlp.conv2.weight.view_mut().into_dyn());
            if let Some(b) = &mut mlp.conv2.bias {
                push(Part::Conv2Bias(fusion), b.view_mut().into_dyn());
            }
        }
        out
    }
}

/// A part's tensor in its PyTorch shape: conv weights get two trailing 1s, and so do mmcv's
/// LayerNorm parameters (`nn.LayerNorm([planes, 1, 1])`).
fn torch_shaped<S: RawData<Elem = f32>>(part: Part, naming: Naming, a: ArrayBase<S, IxDyn>) -> ArrayBase<S, IxDyn> {
    let trailing = match part {
        Part::MaskWeight | Part::Conv1Weight(_) | Part::Conv2Weight(_) => true,
        Part::NormWeight(_) | Part::NormBias(_) => naming != Naming::Timm,
        _ => false,
    };
    if trailing {
        let rank = a.ndim();
        a.insert_axis(Axis(rank)).insert_axis(Axis(rank + 1))
    } else {
        a
    }
}

fn check_conv(conv: &Conv1x1, naming: Naming, weight: Part, bias: Part, out: usize, inp: usize) -> Result<()> {
    let key = weight.key(naming);
    if conv.weight.shape() != [out, inp] {
        return Err(Error::WrongShape { key, expected: vec![out, inp], actual: conv.weight.shape().to_vec() });
    }
    check_finite(&key, conv.weight.iter())?;
    if let Some(b) = &conv.bias {
        check_vector(b, &bias.key(naming), out)?;
    }
    Ok(())
}

fn check_vector(v: &Array1<f32>, key: &str, len: usize) -> Result<()> {
    if v.len() != len {
        return Err(Error::WrongShape { key: key.into(), expected: vec![len], actual: v.shape().to_vec() });
    }
    check_finite(key, v.iter())
}

/// PyTorch's default conv init: weight and bias uniform in ±1/√fan_in.
fn default_conv(rng: &mut SplitMix64, out: usize, inp: usize) -> Conv1x1 {
    let bound = 1.0 / (inp as f64).sqrt();
    let weight = Array2::from_shape_fn((out, inp), |_| rng.uniform(bound));
    Conv1x1::new(weight, Some(Array1::from_shape_fn(out, |_| rng.uniform(bound))))
}
