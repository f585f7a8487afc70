//! What the backward pass returns: the gradients of the input and of every trainable
//! parameter, by name and by checkpoint key.

use ndarray::{Array, Array1, ArrayD, ArrayViewD, Dimension, IxDyn};

use crate::config::NonLocalConfig;
use crate::error::{Error, Result};
use crate::load::{checkpoint_entry, WeightKeys};
use crate::params::{conv_tensors, Conv1x1};

/// Gradients of the parameters, shaped like [`Parameters`](crate::Parameters) (BatchNorm:
/// weight and bias only). A part the block does not have, or a bias it does not have, has no
/// gradient.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ParameterGradients {
    /// Gradient of θ (weight (C', C), bias (C')).
    pub theta: Option<Conv1x1>,
    /// Gradient of φ.
    pub phi: Option<Conv1x1>,
    /// Gradient of g.
    pub g: Conv1x1,
    /// Gradient of `W_z` (weight (C, C'), bias when the block has one).
    pub w_z: Conv1x1,
    /// Gradient of the BatchNorm weight γ and bias β.
    pub bn: Option<(Array1<f32>, Array1<f32>)>,
    /// Gradient of the concatenation projection (2C').
    pub concat_project: Option<Array1<f32>>,
}

/// The result of [`NonLocalBlock::backward`](crate::NonLocalBlock::backward).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Gradients<D: Dimension> {
    /// ∂L/∂x, the input's shape.
    pub input: Array<f32, D>,
    /// ∂L/∂θ for every trainable parameter.
    pub params: ParameterGradients,
}

impl ParameterGradients {
    /// The gradients by name (`theta.weight`, `g.bias`, `w_z.weight`, `bn.weight`,
    /// `concat_project`, …), in the order of
    /// [`Parameters::trainable_mut`](crate::Parameters::trainable_mut).
    pub fn named(&self) -> Vec<(String, ArrayViewD<'_, f32>)> {
        let mut out = Vec::new();
        if let Some(c) = &self.theta {
            conv_tensors("theta", c, &mut out);
        }
        if let Some(c) = &self.phi {
            conv_tensors("phi", c, &mut out);
        }
        conv_tensors("g", &self.g, &mut out);
        conv_tensors("w_z", &self.w_z, &mut out);
        if let Some((w, b)) = &self.bn {
            out.push(("bn.weight".into(), w.view().into_dyn()));
            out.push(("bn.bias".into(), b.view().into_dyn()));
        }
        if let Some(p) = &self.concat_project {
            out.push(("concat_project".into(), p.view().into_dyn()));
        }
        out
    }

    /// The gradients under the checkpoint keys of `keys` for a block of `config` (such as
    /// `W.1.weight` or `backbone.nl.conv_out.conv.weight`), each in its PyTorch shape: what
    /// PyTorch's `param.grad` holds after `loss.backward()`, for comparison or saving.
    ///
    /// ```
    /// use ndarray::Array5;
    /// use nonlocal::{NonLocalBlock, NonLocalConfig, WeightKeys};
    ///
    /// let config = NonLocalConfig::new(4);
    /// let block = NonLocalBlock::new(config.clone())?;
    /// let x = Array5::<f32>::ones((1, 1, 4, 4, 4));
    /// let (z, ctx) = block.forward_train(&x)?;
    /// let grads = block.backward(&ctx, &z)?;
    /// let by_key = grads.params.by_checkpoint_key(&WeightKeys::alexhex7(), &config)?;
    /// let (key, w) = &by_key[0];
    /// assert_eq!((key.as_str(), w.shape()), ("theta.weight", &[2, 4, 1, 1, 1][..]));
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// Under a scheme the parameters were not loaded with, a key may be one that scheme's module
    /// lacks: an AlexHex7 `W.0.bias` is `conv_out.conv.bias` under mmcv's keys, which mmcv's
    /// `NonLocal3d` with BatchNorm does not have (its export folds that bias into the
    /// BatchNorm's running mean, which has no gradient).
    ///
    /// # Errors
    /// [`Error::WrongShape`] when the gradients are not those of a block of `config`.
    pub fn by_checkpoint_key(&self, keys: &WeightKeys, config: &NonLocalConfig) -> Result<Vec<(String, ArrayD<f32>)>> {
        self.named()
            .into_iter()
            .map(|(name, grad)| {
                let (key, shape) = checkpoint_entry(keys, config, &name);
                let found = grad.shape().to_vec();
                let grad = grad.to_owned().into_shape_with_order(IxDyn(&shape)).map_err(|_| Error::WrongShape {
                    key: key.clone(),
                    expected: shape,
                    actual: found,
                })?;
                Ok((key, grad))
            })
            .collect()
    }
}
