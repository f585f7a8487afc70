//! Reading a context block from checkpoint keys (and its configuration off them), and
//! writing it back under the same keys.

use ndarray::{Array1, Array2};
use safetensors::tensor::{Dtype, TensorView};

use super::config::{no_context_block, ContextConfig, Pooling};
use super::names::{Fusion, Part};
use super::params::{ContextMlp, ContextParameters};
use crate::error::{Error, Result};
use crate::load::TensorFile;
use crate::load::{Naming, WeightKeys};
use crate::params::check_finite;
use crate::params::Conv1x1;

/// The full key of a part under `keys` (prefix included).
fn full_key(keys: &WeightKeys, part: Part) -> String {
    format!("{}{}", keys.prefix, part.key(keys.naming))
}

/// Which parts the keys under the prefix show.
struct Present {
    mask: bool,
    add: bool,
    mul: bool,
}

impl Present {
    fn of(file: &TensorFile, keys: &WeightKeys) -> Self {
        let has = |part| file.contains(&full_key(keys, part));
        Present {
            mask: has(Part::MaskWeight),
            add: has(Part::Conv1Weight(Fusion::Add)),
            mul: has(Part::Conv1Weight(Fusion::Mul)),
        }
    }
}

/// Refuses AlexHex7 keys, which name no context block.
fn check_naming(keys: &WeightKeys) -> Result<()> {
    match keys.naming {
        Naming::AlexHex7 => Err(no_context_block()),
        _ => Ok(()),
    }
}

/// The configuration the keys under `keys.prefix` show (see [`ContextConfig::from_keys`]).
pub(super) fn read_config(file: &TensorFile, keys: &WeightKeys) -> Result<ContextConfig> {
    check_naming(keys)?;
    let present = Present::of(file, keys);
    let fusion = match (present.add, present.mul) {
        (true, _) => Fusion::Add,
        (false, true) => Fusion::Mul,
        (false, false) => {
            // Name the MLP the naming's own default would have.
            let default = if keys.naming == Naming::Timm { Fusion::Mul } else { Fusion::Add };
            return Err(Error::MissingKey { key: full_key(keys, Part::Conv1Weight(default)) });
        }
    };
    let key = full_key(keys, Part::Conv1Weight(fusion));
    let shape = file.shape(&key)?;
    if shape.len() != 4 {
        return Err(Error::WrongRank { key, expected: 4, actual: shape.len() });
    }
    if shape[2..] != [1, 1] || shape[0] == 0 || shape[1] == 0 {
        let expected = vec![shape[0].max(1), shape[1].max(1), 1, 1];
        return Err(Error::WrongShape { key, expected, actual: shape.to_vec() });
    }
    let (planes, channels) = (shape[0], shape[1]);
    let pooling = if present.mask { Pooling::Attention } else { Pooling::Average };
    Ok(ContextConfig::preset(keys.naming, channels)?
        .planes(planes)
        .pooling(pooling)
        .fuse_add(present.add)
        .fuse_mul(present.mul))
}

/// Compares what the keys show (pooling, which MLPs) with the configuration.
fn check_layout(file: &TensorFile, config: &ContextConfig, keys: &WeightKeys) -> Result<()> {
    if keys.naming != config.naming {
        return Err(Error::ConfigMismatch {
            what: "naming",
            config: config.naming.to_string(),
            weights: format!("{} keys (WeightKeys::naming)", keys.naming),
        });
    }
    let present = Present::of(file, keys);
    let mask_key = full_key(keys, Part::MaskWeight);
    if present.mask != (config.pooling == Pooling::Attention) {
        return Err(Error::ConfigMismatch {
            what: "pooling",
            config: config.pooling.to_string(),
            weights: if present.mask {
                format!("{mask_key} (attention pooling)")
            } else {
                format!("no {mask_key} (average pooling)")
            },
        });
    }
    for (fusion, on, what) in [(Fusion::Add, config.fuse_add, "fuse_add"), (Fusion::Mul, config.fuse_mul, "fuse_mul")] {
        let has = if fusion == Fusion::Add { present.add } else { present.mul };
        if has != on {
            let key = full_key(keys, Part::Conv1Weight(fusion));
            return Err(Error::ConfigMismatch {
                what,
                config: on.to_string(),
                weights: if has { format!("an MLP ({key})") } else { format!("no {key}") },
            });
        }
    }
    Ok(())
}

/// Reads one part: its shape checked against the PyTorch shape, its values finite.
fn read_part(file: &TensorFile, config: &ContextConfig, keys: &WeightKeys, part: Part) -> Result<Vec<f32>> {
    let key = full_key(keys, part);
    let expected = part.shape(keys.naming, config.in_channels, config.planes);
    let shape = file.shape(&key)?;
    if shape != expected.as_slice() {
        return Err(Error::WrongShape { key, expected, actual: shape.to_vec() });
    }
    let (values, _) = file.tensor(&key)?.into_raw_vec_and_offset();
    check_finite(&key, values.iter())?;
    Ok(values)
}

fn read_conv(
    file: &TensorFile,
    config: &ContextConfig,
    keys: &WeightKeys,
    (weight, bias): (Part, Part),
    (out, inp): (usize, usize),
) -> Result<Conv1x1> {
    let w = Array2::from_shape_vec((out, inp), read_part(file, config, keys, weight)?)?;
    let b = Array1::from_vec(read_part(file, config, keys, bias)?);
    Ok(Conv1x1::new(w, Some(b)))
}

fn read_mlp(file: &TensorFile, config: &ContextConfig, keys: &WeightKeys, fusion: Fusion) -> Result<ContextMlp> {
    let (c, p) = (config.in_channels, config.planes);
    let [w1, b1, gamma, beta, w2, b2] = Part::mlp(fusion);
    Ok(ContextMlp {
        conv1: read_conv(file, config, keys, (w1, b1), (p, c))?,
        ln_weight: Array1::from_vec(read_part(file, config, keys, gamma)?),
        ln_bias: Array1::from_vec(read_part(file, config, keys, beta)?),
        conv2: read_conv(file, config, keys, (w2, b2), (c, p))?,
    })
}

/// Reads a block's parameters from `file` under `keys`, checking them against `config`.
pub(super) fn load(file: &TensorFile, config: &ContextConfig, keys: &WeightKeys) -> Result<ContextParameters> {
    check_naming(keys)?;
    config.validate()?;
    check_layout(file, config, keys)?;
    let c = config.in_channels;
    let mask = match config.pooling {
        Pooling::Attention => Some(read_conv(file, config, keys, (Part::MaskWeight, Part::MaskBias), (1, c))?),
        Pooling::Average => None,
    };
    let add = config.fuse_add.then(|| read_mlp(file, config, keys, Fusion::Add)).transpose()?;
    let mul = config.fuse_mul.then(|| read_mlp(file, config, keys, Fusion::Mul)).transpose()?;
    let params = ContextParameters { mask, add, mul };
    params.validate(config)?;
    Ok(params)
}

/// The parameters as a safetensors file under `keys` (prefix included), F32, PyTorch shapes:
/// exactly the upstream module's `state_dict` keys.
pub(super) fn export(keys: &WeightKeys, params: &ContextParameters) -> Result<Vec<u8>> {
    let entries: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .named(keys.naming)
        .into_iter()
        .map(|(name, t)| {
            (format!("{}{name}", keys.prefix), t.shape().to_vec(), t.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    let views = entries
        .iter()
        .map(|(key, shape, bytes)| {
            Ok((key.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(save_failed)?))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None).map_err(save_failed)
}

fn save_failed(e: safetensors::SafeTensorError) -> Error {
    Error::SaveFailed { reason: e.to_string() }
}

impl ContextConfig {
    /// The configuration the keys under `keys.prefix` show: channels and planes from the
    /// first MLP conv's shape, attention pooling when there is a mask conv (`conv_mask` /
    /// `conv_attn`), each fusion when its MLP is there. What keys cannot show, the LayerNorm
    /// epsilon, is the naming's preset ([`ContextConfig::mmcv`]: `1e-5`,
    /// [`ContextConfig::timm`]: `1e-6`).
    ///
    /// ```
    /// use nonlocal::{ContextConfig, Pooling, TensorFile, WeightKeys};
    ///
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/family/gc_mmcv_mul_avg.safetensors");
    /// let config = ContextConfig::from_keys(&TensorFile::open(path)?, &WeightKeys::mmcv())?;
    /// assert_eq!((config.in_channels, config.planes, config.pooling), (12, 6, Pooling::Average));
    /// assert_eq!((config.fuse_add, config.fuse_mul, config.ln_eps), (false, true, 1e-5));
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for AlexHex7 keys, [`Error::MissingKey`] when neither MLP is
    /// under the prefix (naming the naming's default MLP's conv), [`Error::WrongRank`] or
    /// [`Error::WrongShape`] when its weight is not (planes, C, 1, 1), [`Error::NotATensor`].
    pub fn from_keys(file: &TensorFile, keys: &WeightKeys) -> Result<ContextConfig> {
        read_config(file, keys)
    }
}
