//! The parameter names of the two upstream modules, without prefix, and their PyTorch shapes.

use crate::load::Naming;

/// One of the two fusion MLPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fusion {
    /// `out = … + MLP_add(context)`.
    Add,
    /// `out = x ⊙ sigmoid(MLP_mul(context)) …`.
    Mul,
}

/// A tensor of the block, as named in a `state_dict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Part {
    /// The attention-pooling conv's weight (1, C, 1, 1).
    MaskWeight,
    /// Its bias (1).
    MaskBias,
    /// First conv of an MLP: weight (planes, C, 1, 1).
    Conv1Weight(Fusion),
    /// Its bias (planes).
    Conv1Bias(Fusion),
    /// LayerNorm weight: mmcv (planes, 1, 1), timm (planes).
    NormWeight(Fusion),
    /// LayerNorm bias, shaped like its weight.
    NormBias(Fusion),
    /// Second conv of an MLP: weight (C, planes, 1, 1).
    Conv2Weight(Fusion),
    /// Its bias (C).
    Conv2Bias(Fusion),
}

/// The mask conv's stem: `conv_mask` (mmcv) or `conv_attn` (timm).
pub(super) fn mask_stem(naming: Naming) -> &'static str {
    match naming {
        Naming::Timm => "conv_attn",
        _ => "conv_mask",
    }
}

/// An MLP's stem: `channel_add_conv`/`channel_mul_conv` (mmcv) or `mlp_add`/`mlp_scale` (timm).
pub(super) fn mlp_stem(naming: Naming, fusion: Fusion) -> &'static str {
    match (naming, fusion) {
        (Naming::Timm, Fusion::Add) => "mlp_add",
        (Naming::Timm, Fusion::Mul) => "mlp_scale",
        (_, Fusion::Add) => "channel_add_conv",
        (_, Fusion::Mul) => "channel_mul_conv",
    }
}

/// The name of an MLP's layer: conv1, norm, conv2 are `0`, `1`, `3` in mmcv's
/// `nn.Sequential` (2 is the ReLU), `fc1`, `norm`, `fc2` in timm's `ConvMlp`.
fn layer(naming: Naming, index: usize) -> &'static str {
    match naming {
        Naming::Timm => ["fc1", "norm", "fc2"][index],
        _ => ["0", "1", "3"][index],
    }
}

impl Part {
    /// The key without prefix, e.g. `channel_add_conv.1.bias` or `mlp_scale.fc2.weight`.
    pub(super) fn key(self, naming: Naming) -> String {
        let mlp = |fusion, index, field: &str| format!("{}.{}.{field}", mlp_stem(naming, fusion), layer(naming, index));
        match self {
            Part::MaskWeight => format!("{}.weight", mask_stem(naming)),
            Part::MaskBias => format!("{}.bias", mask_stem(naming)),
            Part::Conv1Weight(f) => mlp(f, 0, "weight"),
            Part::Conv1Bias(f) => mlp(f, 0, "bias"),
            Part::NormWeight(f) => mlp(f, 1, "weight"),
            Part::NormBias(f) => mlp(f, 1, "bias"),
            Part::Conv2Weight(f) => mlp(f, 2, "weight"),
            Part::Conv2Bias(f) => mlp(f, 2, "bias"),
        }
    }

    /// The PyTorch shape for C channels and `planes` (conv weights with two trailing 1s).
    pub(super) fn shape(self, naming: Naming, c: usize, planes: usize) -> Vec<usize> {
        match self {
            Part::MaskWeight => vec![1, c, 1, 1],
            Part::MaskBias => vec![1],
            Part::Conv1Weight(_) => vec![planes, c, 1, 1],
            Part::Conv1Bias(_) => vec![planes],
            Part::NormWeight(_) | Part::NormBias(_) => match naming {
                Naming::Timm => vec![planes],
                _ => vec![planes, 1, 1],
            },
            Part::Conv2Weight(_) => vec![c, planes, 1, 1],
            Part::Conv2Bias(_) => vec![c],
        }
    }

    /// The six tensors of an MLP, in `state_dict` order.
    pub(super) fn mlp(fusion: Fusion) -> [Part; 6] {
        [
            Part::Conv1Weight(fusion),
            Part::Conv1Bias(fusion),
            Part::NormWeight(fusion),
            Part::NormBias(fusion),
            Part::Conv2Weight(fusion),
            Part::Conv2Bias(fusion),
        ]
    }
}
