//! The plan of the forward pass, between the parameters and the kernels: the parameters
//! rearranged for the kernels once, when they are set ([`Compiled`]: projections stacked and
//! packed, BatchNorm folded, θ's fold prepared), the algebraic shortcuts and when each pays
//! (decided here and nowhere else), and one sample's projections and pooled keys
//! ([`Prepared`], from [`prepare`]).

use crate::config::{Mode, NonLocalConfig};
use crate::params::Parameters;

mod prepare;
mod weights;

pub(crate) use prepare::{prepare, Columns, Prepared, Purpose};
pub(crate) use weights::Weights;

/// Parameters rearranged for the kernels: projections stacked, BatchNorm folded.
#[derive(Clone, Debug)]
pub(crate) struct Compiled {
    /// Stacked projection weights, `proj_cols` × C, and their bias.
    pub(crate) w_proj: Weights,
    pub(crate) b_proj: Vec<f32>,
    pub(crate) proj_cols: usize,
    /// `W_z` with BatchNorm folded in: C × C', and the folded bias (C).
    pub(crate) w_out: Weights,
    pub(crate) b_out: Vec<f32>,
    /// Concatenation: `w_φ` (C').
    pub(crate) w_phi: Vec<f32>,
    /// Per output channel, the BatchNorm factor γ/√(var + eps) (1 without BatchNorm).
    pub(crate) bn_scale: Vec<f32>,
    /// Embedded Gaussian: what the forward pass needs to fold θ into the keys.
    pub(crate) theta_fold: Option<ThetaFold>,
    /// C and C'.
    channels: (usize, usize),
}

/// Embedded Gaussian with θ folded into the keys, `θ_i·φ_j = x_i·(W_θᵀφ_j) + b_θ·φ_j`: the
/// queries are the input itself, so only φ and g are projected.
#[derive(Clone, Debug)]
pub(crate) struct ThetaFold {
    /// `[φ; g]` stacked (2C' × C), and their bias.
    pub(crate) w_keys: Weights,
    pub(crate) b_keys: Vec<f32>,
    /// `W_θᵀ` (C × C', so that `φ·W_θ` is its `apply`), and `b_θ` (C').
    pub(crate) w_theta_t: Weights,
    pub(crate) b_theta: Vec<f32>,
}

impl Compiled {
    pub(crate) fn new(config: &NonLocalConfig, params: &Parameters) -> Self {
        let (c, ci) = (config.in_channels, config.inter_channels);
        let mut w_proj: Vec<f32> = Vec::new();
        let mut b_proj: Vec<f32> = Vec::new();
        let mut push = |conv: &crate::params::Conv1x1| {
            w_proj.extend(conv.weight.iter());
            match &conv.bias {
                Some(b) => b_proj.extend(b.iter()),
                None => b_proj.extend(std::iter::repeat_n(0.0, conv.weight.nrows())),
            }
        };
        let mut w_phi = Vec::new();
        match config.mode {
            Mode::EmbeddedGaussian | Mode::DotProduct => {
                push(params.theta.as_ref().expect("validated: θ present"));
                push(params.phi.as_ref().expect("validated: φ present"));
                push(&params.g);
            }
            Mode::Gaussian => push(&params.g),
            Mode::Concatenation => {
                push(params.phi.as_ref().expect("validated: φ present"));
                push(&params.g);
                let project = params.concat_project.as_ref().expect("validated: projection present");
                let theta = params.theta.as_ref().expect("validated: θ present");
                // a_i = w_θ·(W_θ x_i + b_θ) = (W_θᵀ w_θ)·x_i + w_θ·b_θ: one column instead of C'.
                for col in 0..c {
                    let u: f64 = (0..ci).map(|o| project[o] as f64 * theta.weight[[o, col]] as f64).sum();
                    w_proj.push(u as f32);
                }
                let bias: f64 = match &theta.bias {
                    Some(b) => (0..ci).map(|o| project[o] as f64 * b[o] as f64).sum(),
                    None => 0.0,
                };
                b_proj.push(bias as f32);
                w_phi = project.iter().skip(ci).copied().collect();
            }
        }
        let proj_cols = b_proj.len();
        // BatchNorm folding, in f64: W' = W·γ/√(var+eps), b' = (b − mean)·γ/√(var+eps) + β.
        let mut w_out = Vec::with_capacity(c * ci);
        let mut b_out = Vec::with_capacity(c);
        let mut bn_scale = Vec::with_capacity(c);
        for o in 0..c {
            let bias = params.w_z.bias.as_ref().map_or(0.0, |b| b[o] as f64);
            let (scale, shift) = match &params.bn {
                Some(bn) => {
                    let s = bn.weight[o] as f64 / (bn.running_var[o] as f64 + config.bn_eps).sqrt();
                    (s, (bias - bn.running_mean[o] as f64) * s + bn.bias[o] as f64)
                }
                None => (1.0, bias),
            };
            w_out.extend((0..ci).map(|i| (params.w_z.weight[[o, i]] as f64 * scale) as f32));
            b_out.push(shift as f32);
            bn_scale.push(scale as f32);
        }
        // The fold pays only with fewer keys than queries (pooling) or C < C'.
        let fold_may_pay = config.sub_sample.is_some() || c < ci;
        // bf16 blocks keep the logits' projections (θ, φ; dot product's θ) in f32 (see
        // `Precision::Bf16`): the θ fold's φ rows too, and W_θᵀ.
        let precision = config.precision;
        let theta_fold = (config.mode == Mode::EmbeddedGaussian && fold_may_pay).then(|| ThetaFold {
            w_keys: Weights::mixed(w_proj[ci * c..].to_vec(), 2 * ci, c, precision, ci),
            b_keys: b_proj[ci..].to_vec(),
            w_theta_t: Weights::new((0..c * ci).map(|i| w_proj[(i % ci) * c + i / ci]).collect(), c, ci),
            b_theta: b_proj[..ci].to_vec(),
        });
        // The leading projection rows that stay f32 in a bf16 block.
        let f32_rows = match config.mode {
            Mode::EmbeddedGaussian => 2 * ci,
            Mode::DotProduct => ci,
            Mode::Gaussian | Mode::Concatenation => 0,
        };
        let (w_proj, w_out) = (Weights::mixed(w_proj, proj_cols, c, precision, f32_rows), Weights::new(w_out, c, ci));
        Compiled { w_proj, b_proj, proj_cols, w_out, b_out, w_phi, bn_scale, theta_fold, channels: (c, ci) }
    }

    /// Whether the forward pass folds θ into the keys for N queries and M keys (see
    /// [`ThetaFold`]): when the fold was prepared and costs less than projecting θ (M·C'·C
    /// multiply-adds for `φ·W_θ`, then N·M·C for the logits `x_i·(W_θᵀφ_j)`, against N·C·C'
    /// for θ and N·M·C' for `θ_i·φ_j`): with few keys and many channels, as at video-res4.
    pub(crate) fn folds_theta(&self, n: usize, m: usize) -> bool {
        let (c, ci) = self.channels;
        let (n, m, c, ci) = (n as f64, m as f64, c as f64, ci as f64);
        self.theta_fold.is_some() && m * ci * c + n * m * c < n * c * ci + n * m * ci
    }

    /// Whether the softmax modes apply `W_z` to the M values before the aggregation instead of
    /// to the N outputs after it (`W·Σ_j a_ij g_j = Σ_j a_ij (W g_j)`): when C·C'·M + N·M·C
    /// multiply-adds cost less than N·M·C' + N·C'·C, with few keys and many channels.
    pub(crate) fn folds_values(&self, n: usize, m: usize) -> bool {
        let (c, ci) = self.channels;
        let (n, m, c, ci) = (n as f64, m as f64, c as f64, ci as f64);
        c * ci * m + n * m * c < n * m * ci + n * ci * c
    }

    /// Whether dot product folds `φᵀg/M` into the output projection (C'²·C work instead of
    /// N·C'²): `z = x + θ·((φᵀg/M)·W_outᵀ) + b_out`, for more queries than channels.
    pub(crate) fn folds_key_values_into_output(&self, n: usize) -> bool {
        n > self.channels.0
    }
}
