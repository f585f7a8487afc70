//! Where a block's parameters sit in a PyTorch `state_dict`: the key schemes ([`Naming`]),
//! a scheme under a prefix ([`WeightKeys`]), and the key of each parameter.

use std::fmt;

use crate::config::NonLocalConfig;
use crate::error::{Error, Result};

/// The key scheme of a PyTorch non-local block's `state_dict`. `#[non_exhaustive]`: schemes of
/// other implementations may be added.
///
/// Every key, for C input channels and C' inter channels; a convolution weight is (out, in)
/// followed by [`NonLocalConfig::conv_dims`] singleton dims (3 for `NonLocal3d`), a bias (out);
/// "pooled" is sub-sampling ([`NonLocalConfig::sub_sample`]), which puts the max-pool after
/// φ and g in a `Sequential`.
///
/// | part | [`Naming::AlexHex7`] | [`Naming::Mmcv`] | [`Naming::Timm`] | shape |
/// |---|---|---|---|---|
/// | θ | `theta.weight`, `theta.bias` | `theta.conv.weight`, `theta.conv.bias` | `t.weight`, `t.bias` | (C', C), (C') |
/// | φ | `phi.weight`, `phi.bias`; pooled `phi.0.weight`, `phi.0.bias` | `phi.conv.*`; pooled `phi.0.conv.*` | `p.weight`, `p.bias` | (C', C), (C') |
/// | g | `g.weight`, `g.bias`; pooled `g.0.weight`, `g.0.bias` | `g.conv.*`; pooled `g.0.conv.*` | `g.weight`, `g.bias` | (C', C), (C') |
/// | `W_z`, BatchNorm after it | `W.0.weight`, `W.0.bias` | `conv_out.conv.weight` (no bias) | `z.weight`, `z.bias` | (C, C'), (C) |
/// | BatchNorm | `W.1.weight`, `W.1.bias`, `W.1.running_mean`, `W.1.running_var`, `W.1.num_batches_tracked` | `conv_out.bn.weight`, `.bias`, `.running_mean`, `.running_var`, `.num_batches_tracked` | `norm.weight`, `.bias`, `.running_mean`, `.running_var`, `.num_batches_tracked` | (C); the count is an I64 scalar |
/// | `W_z`, no BatchNorm | `W.weight`, `W.bias` | `conv_out.conv.weight`, `conv_out.conv.bias` | — (timm always has `norm`) | (C, C'), (C) |
/// | concatenation's projection | `concat_project.0.weight` | `concat_project.conv.weight` | — (embedded Gaussian only) | (1, 2C', 1, 1) in every rank, no bias |
///
/// timm's block is a 2-d embedded-Gaussian block without sub-sampling. Gaussian mode has no θ and φ. With a prefix (a block inside a model, [`WeightKeys::with_prefix`]),
/// every key starts with it. Loading reads the keys the configuration needs and checks what
/// they show (pooling, BatchNorm, conv rank, mode) against it; other keys are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Naming {
    /// AlexHex7/Non-local_pytorch: `theta.weight`, `phi.0.weight` (pooled), `W.0.weight`,
    /// `W.1.running_var` (BatchNorm), `concat_project.0.weight`.
    AlexHex7,
    /// mmcv's `NonLocal1d/2d/3d`: `theta.conv.weight`, `g.0.conv.bias` (pooled),
    /// `conv_out.conv.weight`, `conv_out.bn.weight`, `concat_project.conv.weight`.
    Mmcv,
    /// timm's `NonLocalAttn` (`timm.layers.non_local_attn`): `t`, `p`, `g`, `z` (with a bias)
    /// and `norm` (BatchNorm2d), no sub-sampling, embedded Gaussian with logits scaled by
    /// `in_channels^-0.5` ([`NonLocalConfig::timm`]).
    Timm,
}

impl Naming {
    /// Every scheme, in the order [`find_blocks`](crate::find_blocks) tries them.
    pub const ALL: [Naming; 3] = [Naming::Mmcv, Naming::AlexHex7, Naming::Timm];

    /// The name used in golden-file metadata: `alexhex7`, `mmcv` or `timm`.
    pub fn name(self) -> &'static str {
        match self {
            Naming::AlexHex7 => "alexhex7",
            Naming::Mmcv => "mmcv",
            Naming::Timm => "timm",
        }
    }
}

impl fmt::Display for Naming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Naming {
    type Err = Error;

    /// Parses `alexhex7`, `mmcv` or `timm` (any case).
    fn from_str(s: &str) -> Result<Naming> {
        Naming::ALL.into_iter().find(|n| n.name() == s.to_ascii_lowercase()).ok_or_else(|| Error::InvalidConfig {
            reason: format!("unknown naming {s:?}: expected alexhex7, mmcv or timm"),
        })
    }
}

/// Where a block's parameters sit in a checkpoint: the key scheme and a key prefix (empty for
/// a file holding the block alone, e.g. `backbone.layer3.1.non_local_block.` inside a model).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightKeys {
    /// The key scheme.
    pub naming: Naming,
    /// Prepended to every key.
    pub prefix: String,
}

impl WeightKeys {
    /// `naming`'s keys under `prefix` (empty for a file holding the block alone).
    pub fn new(naming: Naming, prefix: impl Into<String>) -> Self {
        WeightKeys { naming, prefix: prefix.into() }
    }

    /// AlexHex7 keys, no prefix.
    pub fn alexhex7() -> Self {
        WeightKeys { naming: Naming::AlexHex7, prefix: String::new() }
    }

    /// mmcv keys, no prefix.
    pub fn mmcv() -> Self {
        WeightKeys { naming: Naming::Mmcv, prefix: String::new() }
    }

    /// The same scheme under a prefix such as `backbone.layer3.1.non_local_block.`.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// timm's NonLocalAttn keys: `t`, `p`, `g`, `z`, `norm`.
    pub fn timm() -> Self {
        WeightKeys { naming: Naming::Timm, prefix: String::new() }
    }

    fn conv(&self, name: &str, pooled: bool) -> String {
        let stage = if pooled { ".0" } else { "" };
        match self.naming {
            Naming::AlexHex7 => format!("{}{name}{stage}", self.prefix),
            Naming::Mmcv => format!("{}{name}{stage}.conv", self.prefix),
            Naming::Timm => {
                let short = match name {
                    "theta" => "t",
                    "phi" => "p",
                    other => other,
                };
                format!("{}{short}{stage}", self.prefix)
            }
        }
    }

    /// The key stem of θ, φ, g (`theta`, `phi.0`, `g.0.conv`…), before `.weight`/`.bias`.
    pub(crate) fn embedding(&self, name: &str, pooled: bool) -> String {
        self.conv(name, pooled && name != "theta")
    }

    /// The key stem of `W_z`.
    pub(crate) fn w_z(&self, bn: bool) -> String {
        match (self.naming, bn) {
            (Naming::AlexHex7, true) => format!("{}W.0", self.prefix),
            (Naming::AlexHex7, false) => format!("{}W", self.prefix),
            (Naming::Mmcv, _) => format!("{}conv_out.conv", self.prefix),
            (Naming::Timm, _) => format!("{}z", self.prefix),
        }
    }

    /// The key stem of the BatchNorm after `W_z`.
    pub(crate) fn bn(&self) -> String {
        match self.naming {
            Naming::AlexHex7 => format!("{}W.1", self.prefix),
            Naming::Mmcv => format!("{}conv_out.bn", self.prefix),
            Naming::Timm => format!("{}norm", self.prefix),
        }
    }

    /// The key of the concatenation projection's weight.
    pub(crate) fn concat_project(&self) -> String {
        match self.naming {
            Naming::AlexHex7 => format!("{}concat_project.0.weight", self.prefix),
            Naming::Mmcv => format!("{}concat_project.conv.weight", self.prefix),
            // timm's block is embedded Gaussian only.
            Naming::Timm => format!("{}concat_project.weight", self.prefix),
        }
    }
}

/// The checkpoint key and PyTorch shape of a parameter named as in
/// [`Parameters::trainable_mut`](crate::Parameters::trainable_mut) (`theta.weight`,
/// `bn.bias`, …, plus `bn.running_mean` and `bn.running_var`).
pub(crate) fn checkpoint_entry(keys: &WeightKeys, config: &NonLocalConfig, name: &str) -> (String, Vec<usize>) {
    let (c, ci) = (config.in_channels, config.inter_channels);
    let pooled = config.sub_sample.is_some();
    let conv_shape = |out: usize, inp: usize| {
        let mut shape = vec![out, inp];
        shape.resize(2 + config.conv_dims, 1);
        shape
    };
    let (part, field) = name.split_once('.').unwrap_or((name, ""));
    match (part, field) {
        ("concat_project", _) => (keys.concat_project(), vec![1, 2 * ci, 1, 1]),
        ("bn", f) => (format!("{}.{f}", keys.bn()), vec![c]),
        ("w_z", "weight") => (format!("{}.weight", keys.w_z(config.bn_layer)), conv_shape(c, ci)),
        ("w_z", f) => (format!("{}.{f}", keys.w_z(config.bn_layer)), vec![c]),
        (p, "weight") => (format!("{}.weight", keys.embedding(p, pooled)), conv_shape(ci, c)),
        (p, f) => (format!("{}.{f}", keys.embedding(p, pooled)), vec![ci]),
    }
}
