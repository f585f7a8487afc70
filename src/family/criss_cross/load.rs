//! Reading a criss-cross block's parameters from a checkpoint under mmcv's keys.

use ndarray::{Array1, Array2};

use super::config::CrissCrossConfig;
use super::params::CrissCrossParameters;
use crate::checkpoint::TensorFile;
use crate::error::{Error, Result};
use crate::params::Conv1x1;
use crate::weights::{Naming, WeightKeys};

/// Reads `query_conv.*`, `key_conv.*`, `value_conv.*` and `gamma.scale` under `keys.prefix`,
/// checking every shape against `config` (conv weights (out, C, 1, 1) as PyTorch's `Conv2d`
/// stores them; `gamma.scale` a 0-d tensor, or of shape (1)).
pub(crate) fn load_parameters(
    file: &TensorFile,
    config: &CrissCrossConfig,
    keys: &WeightKeys,
) -> Result<CrissCrossParameters> {
    config.validate()?;
    if keys.naming != Naming::Mmcv {
        return Err(Error::InvalidConfig {
            reason: format!(
                "criss-cross attention is read under mmcv's keys (query_conv, key_conv, value_conv, gamma), \
                 not under {} keys: use WeightKeys::mmcv()",
                keys.naming
            ),
        });
    }
    let (c, qk) = (config.in_channels, config.qk_channels);
    let prefix = &keys.prefix;
    let query = read_conv(file, &format!("{prefix}query_conv"), qk, c)?;
    let key = read_conv(file, &format!("{prefix}key_conv"), qk, c)?;
    let value = read_conv(file, &format!("{prefix}value_conv"), c, c)?;
    let gamma_key = format!("{prefix}gamma.scale");
    let shape = file.shape(&gamma_key)?;
    if !(shape.is_empty() || shape == [1]) {
        return Err(Error::WrongShape { key: gamma_key, expected: vec![], actual: shape.to_vec() });
    }
    let gamma = file.tensor(&gamma_key)?.iter().copied().next().expect("one element, checked");
    let params = CrissCrossParameters { query, key, value, gamma };
    params.validate(config).map_err(|e| with_prefix(e, prefix))?;
    Ok(params)
}

fn read_conv(file: &TensorFile, stem: &str, out: usize, inp: usize) -> Result<Conv1x1> {
    let weight_key = format!("{stem}.weight");
    let shape = file.shape(&weight_key)?;
    if shape != [out, inp, 1, 1] {
        return Err(Error::WrongShape { key: weight_key, expected: vec![out, inp, 1, 1], actual: shape.to_vec() });
    }
    let (weight, _) = file.tensor(&weight_key)?.into_raw_vec_and_offset();
    let weight = Array2::from_shape_vec((out, inp), weight).expect("element count checked against the shape");
    let bias_key = format!("{stem}.bias");
    let shape = file.shape(&bias_key)?;
    if shape != [out] {
        return Err(Error::WrongShape { key: bias_key, expected: vec![out], actual: shape.to_vec() });
    }
    let (bias, _) = file.tensor(&bias_key)?.into_raw_vec_and_offset();
    Ok(Conv1x1::new(weight, Some(Array1::from_vec(bias))))
}

/// Puts the checkpoint prefix in front of the key an error names.
fn with_prefix(e: Error, prefix: &str) -> Error {
    match e {
        Error::InvalidParameter { key, reason } => Error::InvalidParameter { key: format!("{prefix}{key}"), reason },
        other => other,
    }
}
