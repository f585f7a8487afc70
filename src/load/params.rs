//! A block's parameters read from a checkpoint under a key scheme, checked against the
//! configuration, and written back.

use ndarray::{Array1, Array2, ArrayD};
use safetensors::tensor::Dtype;

use super::find::{find_blocks, key_layout};
use super::keys::{checkpoint_entry, Naming, WeightKeys};
use super::TensorFile;
use crate::config::{Mode, NonLocalConfig};
use crate::error::{Error, Result};
use crate::params::{BatchNorm, Conv1x1, Parameters};

/// Reads one 1x1 conv weight: shape (out, in) followed by `conv_dims` singleton dims.
fn read_conv_weight(file: &TensorFile, key: &str, out: usize, inp: usize, conv_dims: usize) -> Result<Array2<f32>> {
    let shape = file.shape(key)?;
    let mut expected = vec![out, inp];
    expected.resize(2 + conv_dims, 1);
    if shape != expected.as_slice() {
        // Same (out, in) with another number of trailing 1s: a different conv rank.
        let rank_only = shape.len() >= 3 && shape[..2] == [out, inp] && shape[2..].iter().all(|&d| d == 1);
        if rank_only {
            return Err(Error::ConfigMismatch {
                what: "conv_dims",
                config: conv_dims.to_string(),
                weights: format!("{} (weight {key} has shape {shape:?})", shape.len() - 2),
            });
        }
        return Err(Error::WrongShape { key: key.into(), expected, actual: shape.to_vec() });
    }
    let t = file.tensor(key)?;
    Ok(to_2d(t, out, inp))
}

fn read_vector(file: &TensorFile, key: &str, len: usize) -> Result<Array1<f32>> {
    crate::params::check_shape(key, file.shape(key)?, &[len])?;
    Ok(Array1::from_vec(file.tensor(key)?.into_raw_vec_and_offset().0))
}

fn to_2d(t: ArrayD<f32>, rows: usize, cols: usize) -> Array2<f32> {
    let (data, _) = t.into_raw_vec_and_offset();
    Array2::from_shape_vec((rows, cols), data).expect("element count checked against the shape")
}

fn read_conv(
    file: &TensorFile,
    stem: &str,
    out: usize,
    inp: usize,
    dims: usize,
    bias_required: bool,
) -> Result<Conv1x1> {
    let weight = read_conv_weight(file, &format!("{stem}.weight"), out, inp, dims)?;
    let bias_key = format!("{stem}.bias");
    let bias = if bias_required || file.contains(&bias_key) { Some(read_vector(file, &bias_key, out)?) } else { None };
    Ok(Conv1x1 { weight, bias })
}

/// Reads a block's parameters from `file` under `keys`, checking them against `config`.
///
/// Whether BatchNorm is present and whether φ/g are pooled are read from the keys and must
/// agree with the configuration; so must the conv rank and the channel counts.
pub(crate) fn load_parameters(file: &TensorFile, config: &NonLocalConfig, keys: &WeightKeys) -> Result<Parameters> {
    config.validate()?;
    let (c, ci, dims) = (config.in_channels, config.inter_channels, config.conv_dims);
    let pooled = config.sub_sample.is_some();
    check_block_present(file, keys)?;
    check_layout(file, config, keys)?;

    let embed = |name: &str| read_conv(file, &keys.embedding(name, pooled), ci, c, dims, true);
    let (theta, phi) =
        if config.mode.has_theta_phi() { (Some(embed("theta")?), Some(embed("phi")?)) } else { (None, None) };
    let g = embed("g")?;
    // mmcv's conv_out has no bias when BatchNorm follows; AlexHex7's always has one.
    let w_z_bias_required = !(config.bn_layer && keys.naming == Naming::Mmcv);
    let w_z = read_conv(file, &keys.w_z(config.bn_layer), c, ci, dims, w_z_bias_required)?;
    let bn = if config.bn_layer {
        let stem = keys.bn();
        let v = |name: &str| read_vector(file, &format!("{stem}.{name}"), c);
        Some(BatchNorm {
            weight: v("weight")?,
            bias: v("bias")?,
            running_mean: v("running_mean")?,
            running_var: v("running_var")?,
        })
    } else {
        None
    };
    let concat_project = if config.mode == Mode::Concatenation {
        let key = keys.concat_project();
        crate::params::check_shape(&key, file.shape(&key)?, &[1, 2 * ci, 1, 1])?;
        Some(Array1::from_vec(file.tensor(&key)?.into_raw_vec_and_offset().0))
    } else {
        None
    };
    let params = Parameters { theta, phi, g, w_z, bn, concat_project };
    params.validate(config).map_err(|e| rename_key(e, keys, config))?;
    Ok(params)
}

/// Errors from [`Parameters::validate`] name parts generically (`bn.running_var`); give
/// them the checkpoint's full key.
fn rename_key(e: Error, keys: &WeightKeys, config: &NonLocalConfig) -> Error {
    let full = |key: &str| checkpoint_entry(keys, config, key).0;
    match e {
        Error::InvalidParameter { key, reason } => Error::InvalidParameter { key: full(&key), reason },
        Error::WrongShape { key, expected, actual } => Error::WrongShape { key: full(&key), expected, actual },
        other => other,
    }
}

/// [`Error::BlockNotFound`] when no weight of a block (θ, φ, g or `W_z`, pooled or not) is
/// under `keys`: the wrong key scheme or prefix, so the error lists the blocks the file has.
fn check_block_present(file: &TensorFile, keys: &WeightKeys) -> Result<()> {
    let stems = ["theta", "phi", "g"]
        .iter()
        .flat_map(|name| [keys.embedding(name, false), keys.embedding(name, true)])
        .chain([keys.w_z(true), keys.w_z(false)]);
    if stems.into_iter().any(|stem| file.has_entry(&format!("{stem}.weight"))) {
        return Ok(());
    }
    Err(Error::BlockNotFound {
        naming: keys.naming.name(),
        prefix: keys.prefix.clone(),
        found: find_blocks(file).iter().map(|info| format!("{} at {:?}", info.keys.naming, info.keys.prefix)).collect(),
    })
}

/// Compares what the keys show (pooling, BatchNorm, mode) with the configuration.
fn check_layout(file: &TensorFile, config: &NonLocalConfig, keys: &WeightKeys) -> Result<()> {
    let Some(layout) = key_layout(file, keys) else { return Ok(()) };
    if let Some(pooled) = layout.pooled.filter(|&p| p != config.sub_sample.is_some()) {
        return Err(Error::ConfigMismatch {
            what: "sub_sample",
            config: match config.sub_sample {
                Some(k) => format!("{k:?}"),
                None => "none".into(),
            },
            weights: if pooled { "pooled φ/g (`.0.` keys)".into() } else { "unpooled φ/g".into() },
        });
    }
    if let Some(bn) = layout.bn.filter(|&bn| bn != config.bn_layer) {
        return Err(Error::ConfigMismatch {
            what: "bn_layer",
            config: config.bn_layer.to_string(),
            weights: if bn { "BatchNorm keys".into() } else { "no BatchNorm keys".into() },
        });
    }
    // A concatenation configuration on θ/φ keys without `concat_project` is left to the
    // missing-key error, which names the key.
    let missing_projection = config.mode == Mode::Concatenation && layout.modes.contains(&Mode::EmbeddedGaussian);
    if !layout.modes.contains(&config.mode) && !missing_projection {
        return Err(Error::ConfigMismatch {
            what: "mode",
            config: config.mode.name().into(),
            weights: match layout.modes {
                [Mode::Concatenation] => format!("{} (concatenation)", keys.concat_project()),
                [Mode::Gaussian] => "no θ/φ convolutions (gaussian)".into(),
                _ => "θ/φ convolutions and no concatenation projection (embedded_gaussian or dot_product)".into(),
            },
        });
    }
    Ok(())
}

/// A block's parameters as a safetensors file under `keys`: every tensor the checkpoint
/// scheme has for this configuration (BatchNorm running statistics and
/// `num_batches_tracked` included, so PyTorch's strict `load_state_dict` accepts it), F32.
pub(crate) fn export(keys: &WeightKeys, config: &NonLocalConfig, params: &Parameters) -> Result<Vec<u8>> {
    let mut params = params.clone();
    match keys.naming {
        Naming::Mmcv => fold_w_z_bias_into_batchnorm(&mut params),
        // timm's NonLocalAttn always has BatchNorm, and its `z` a bias.
        Naming::Timm if params.bn.is_none() => {
            return Err(Error::ConfigMismatch {
                what: "bn_layer",
                config: "false".into(),
                weights: "timm keys, whose NonLocalAttn always has a BatchNorm `norm`".into(),
            })
        }
        Naming::Timm => {
            let c = params.w_z.weight.nrows();
            params.w_z.bias.get_or_insert_with(|| Array1::zeros(c));
        }
        Naming::AlexHex7 => {}
    }
    let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let stats: Vec<(String, Vec<f32>)> = params
        .bn
        .as_ref()
        .map(|bn| {
            vec![
                ("bn.running_mean".to_string(), bn.running_mean.to_vec()),
                ("bn.running_var".to_string(), bn.running_var.to_vec()),
            ]
        })
        .unwrap_or_default();
    let mut tensors: Vec<(String, Vec<f32>)> =
        params.trainable_mut().into_iter().map(|(name, t)| (name, t.iter().copied().collect())).collect();
    tensors.extend(stats);
    for (name, values) in tensors {
        let (key, shape) = checkpoint_entry(keys, config, &name);
        entries.push((key, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
        .iter()
        .map(|(k, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(save_failed)?;
            Ok((k.clone(), view))
        })
        .collect::<Result<_>>()?;
    let counter = 0i64.to_le_bytes();
    if config.bn_layer {
        let key = format!("{}.num_batches_tracked", keys.bn());
        views.push((key, safetensors::tensor::TensorView::new(Dtype::I64, vec![], &counter).map_err(save_failed)?));
    }
    safetensors::serialize(views, None).map_err(save_failed)
}

/// mmcv's `conv_out` has no bias when BatchNorm follows: fold a `W_z` bias b into the
/// BatchNorm, whose running mean becomes `running_mean − b` (`BN(W·y + b) = BN'(W·y)`, one
/// rounding per channel). Without BatchNorm, or without a bias, nothing changes.
fn fold_w_z_bias_into_batchnorm(params: &mut Parameters) {
    let Some(bn) = params.bn.as_mut() else { return };
    let Some(bias) = params.w_z.bias.take() else { return };
    bn.running_mean.iter_mut().zip(&bias).for_each(|(mean, &b)| *mean -= b);
}

fn save_failed(e: safetensors::SafeTensorError) -> Error {
    Error::SaveFailed { reason: e.to_string() }
}
