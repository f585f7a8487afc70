//! [`CrissCrossParameters`]: the three 1x1 convolutions and γ, their checks, and the stacked
//! projection the forward pass applies ([`Compiled`]).

use ndarray::{Array1, Array2, ArrayViewMutD, Axis};

use super::config::CrissCrossConfig;
use crate::error::Result;
use crate::params::{check_finite, Conv1x1, SplitMix64};
use crate::plan::Weights;

/// The parameters of a criss-cross attention block, as mmcv's `CrissCrossAttention` holds
/// them (conv weights without their trailing 1x1).
///
/// Shapes for in_channels C and qk_channels C_qk: `query` and `key` weight (C_qk, C), bias
/// (C_qk); `value` weight (C, C), bias (C); `gamma` a scalar. A bias may be `None` (a
/// convolution without bias; mmcv's always have one).
#[derive(Clone, Debug, PartialEq)]
pub struct CrissCrossParameters {
    /// `query_conv`: C → C_qk.
    pub query: Conv1x1,
    /// `key_conv`: C → C_qk.
    pub key: Conv1x1,
    /// `value_conv`: C → C.
    pub value: Conv1x1,
    /// `gamma.scale`: the factor of the attention output before the residual. mmcv starts it
    /// at 0, so a new block is the identity.
    pub gamma: f32,
}

/// The names of the trainable tensors, as mmcv's `state_dict` keys (without a prefix), in the
/// order of [`CrissCrossParameters::trainable_mut`].
pub(crate) const NAMES: [&str; 7] = [
    "query_conv.weight",
    "query_conv.bias",
    "key_conv.weight",
    "key_conv.bias",
    "value_conv.weight",
    "value_conv.bias",
    "gamma.scale",
];

impl CrissCrossParameters {
    /// Parameters of a new block, as mmcv initialises them: each convolution's weight and
    /// bias uniform in ±1/√C (PyTorch's default conv init) from a fixed-seed generator, and
    /// γ = 0, so the block starts as the identity.
    pub fn init(config: &CrissCrossConfig, seed: u64) -> Self {
        let (c, qk) = (config.in_channels, config.qk_channels);
        let mut rng = SplitMix64(seed);
        let bound = 1.0 / (c as f64).sqrt();
        let mut conv = |out: usize| Conv1x1 {
            weight: Array2::from_shape_fn((out, c), |_| rng.uniform(bound)),
            bias: Some(Array1::from_shape_fn(out, |_| rng.uniform(bound))),
        };
        CrissCrossParameters { query: conv(qk), key: conv(qk), value: conv(c), gamma: 0.0 }
    }

    /// Checks that the parameters fit the configuration: every shape matches and every value
    /// is finite.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) (see
    /// [`CrissCrossConfig::validate`]), [`Error::WrongShape`](crate::Error::WrongShape) or
    /// [`Error::InvalidParameter`](crate::Error::InvalidParameter), naming the tensor by its
    /// mmcv key.
    pub fn validate(&self, config: &CrissCrossConfig) -> Result<()> {
        config.validate()?;
        let (c, qk) = (config.in_channels, config.qk_channels);
        self.query.check("query_conv", qk, c)?;
        self.key.check("key_conv", qk, c)?;
        self.value.check("value_conv", c, c)?;
        check_finite("gamma.scale", [self.gamma].iter())
    }

    /// The trainable tensors by name, mutable, with PyTorch's shapes: `query_conv.weight`
    /// (C_qk, C, 1, 1), `query_conv.bias` (C_qk), …, `gamma.scale` (a 0-d tensor); a bias the
    /// parameters do not have is left out. The order and names are those of
    /// [`CrissCrossParameterGradients::named`](super::CrissCrossParameterGradients::named).
    /// To train a block, use
    /// [`CrissCrossAttention::update_parameters`](super::CrissCrossAttention::update_parameters),
    /// which pairs them with their gradients and keeps the block consistent.
    pub fn trainable_mut(&mut self) -> Vec<(String, ArrayViewMutD<'_, f32>)> {
        let mut out = Vec::with_capacity(NAMES.len());
        for (stem, conv) in
            [("query_conv", &mut self.query), ("key_conv", &mut self.key), ("value_conv", &mut self.value)]
        {
            let weight = conv.weight.view_mut().insert_axis(Axis(2)).insert_axis(Axis(3));
            out.push((format!("{stem}.weight"), weight.into_dyn()));
            if let Some(bias) = &mut conv.bias {
                out.push((format!("{stem}.bias"), bias.view_mut().into_dyn()));
            }
        }
        let gamma = ndarray::ArrayViewMut0::from_shape((), std::slice::from_mut(&mut self.gamma))
            .expect("one element for a 0-d view");
        out.push(("gamma.scale".into(), gamma.into_dyn()));
        out
    }
}

/// Parameters rearranged for the kernels: the three projections stacked into one GEMM.
#[derive(Clone, Debug)]
pub(crate) struct Compiled {
    /// `[W_q; W_k; W_v]`, (2·C_qk + C) × C, packed once for the GEMM kernel.
    pub(crate) w_proj: Weights,
    /// `[b_q; b_k; b_v]` (zeros for a missing bias).
    pub(crate) b_proj: Vec<f32>,
    pub(crate) gamma: f32,
}

impl Compiled {
    pub(crate) fn new(config: &CrissCrossConfig, params: &CrissCrossParameters) -> Self {
        let width = config.projection_width();
        let mut w = Vec::with_capacity(width * config.in_channels);
        let mut b = Vec::with_capacity(width);
        for conv in [&params.query, &params.key, &params.value] {
            w.extend(conv.weight.iter());
            match &conv.bias {
                Some(bias) => b.extend(bias.iter()),
                None => b.extend(std::iter::repeat_n(0.0, conv.weight.nrows())),
            }
        }
        Compiled { w_proj: Weights::new(w, width, config.in_channels), b_proj: b, gamma: params.gamma }
    }
}
