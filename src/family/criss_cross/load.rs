//! Reading a criss-cross block's parameters from a checkpoint under mmcv's keys.

use ndarray::{Array1, Array2};

use super::config::CrissCrossConfig;
use super::params::CrissCrossParameters;
use crate::error::{Error, Result};
use crate::load::TensorFile;
use crate::load::{Naming, WeightKeys};
use crate::params::Conv1x1;

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

impl CrissCrossConfig {
    /// The configuration the keys under `keys` show: C from `value_conv` (C, C, 1, 1), the query
    /// and key width from `query_conv`. The recurrence (how many times CCNet's head applies the
    /// module, 2 in its configs) cannot be read off the keys: it is 1 here; set it from the
    /// model's config.
    ///
    /// ```
    /// use nonlocal::{CrissCrossConfig, TensorFile, WeightKeys};
    ///
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/family/cc_mmcv.safetensors");
    /// let config = CrissCrossConfig::from_keys(&TensorFile::open(path)?, &WeightKeys::mmcv())?;
    /// assert_eq!((config.in_channels, config.qk_channels, config.recurrence), (16, 2, 1));
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a key scheme other than mmcv's, [`Error::MissingKey`],
    /// [`Error::WrongShape`] when the convolutions' shapes do not make a block.
    pub fn from_keys(file: &TensorFile, keys: &WeightKeys) -> Result<CrissCrossConfig> {
        if keys.naming != Naming::Mmcv {
            return Err(Error::InvalidConfig {
                reason: format!("criss-cross attention is under mmcv's keys, not {} keys", keys.naming),
            });
        }
        let value_key = format!("{}value_conv.weight", keys.prefix);
        let value = file.shape(&value_key)?;
        let c = match value {
            [c, c2, 1, 1] if c == c2 && *c > 0 => *c,
            other => {
                return Err(Error::WrongShape { key: value_key, expected: vec![0, 0, 1, 1], actual: other.to_vec() })
            }
        };
        let query_key = format!("{}query_conv.weight", keys.prefix);
        let qk = match file.shape(&query_key)? {
            [qk, c2, 1, 1] if *c2 == c => *qk,
            other => {
                return Err(Error::WrongShape { key: query_key, expected: vec![0, c, 1, 1], actual: other.to_vec() })
            }
        };
        Ok(CrissCrossConfig::new(c).qk_channels(qk))
    }
}
