//! The plan of the forward pass, between the parameters and the kernels: the parameters
//! rearranged for the kernels once, when they are set ([`Compiled`]: projections stacked and
//! packed, BatchNorm folded, θ's fold prepared), the algebraic shortcuts and when each pays
//! (decided here and nowhere else), and one sample's projections and pooled keys
//! ([`Prepared`], from [`prepare()`]).

use std::sync::OnceLock;

use crate::config::{Mode, NonLocalConfig, Precision};
use crate::kernels::gemm::bf16_on_tiles;
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
    /// Whether the forward pass may fold θ into the keys (embedded Gaussian and dot product,
    /// pooled keys or C < C'), and what it needs then, made on its first use.
    theta_fold_pays: bool,
    theta_fold: OnceLock<ThetaFold>,
    /// C and C'.
    channels: (usize, usize),
    mode: Mode,
    /// The block's arithmetic (the cost model weighs bf16 products at twice the f32 rate).
    precision: Precision,
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
        let mut w_proj: Vec<f32> = Vec::with_capacity(3 * ci * c + c);
        let mut b_proj: Vec<f32> = Vec::with_capacity(3 * ci + 1);
        let mut push = |conv: &crate::params::Conv1x1| {
            match conv.weight.as_slice() {
                Some(rows) => w_proj.extend_from_slice(rows),
                None => w_proj.extend(conv.weight.iter()),
            }
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
        // `Precision::Bf16` keeps the logits' projections (θ, φ; dot product's θ) in f32: the θ
        // fold's φ rows too, and W_θᵀ. `Bf16Logits` projects them in bf16 (W_θᵀ stays f32).
        let precision = config.precision;
        let logit_rows = |rows: usize| if precision.bf16_logits() { 0 } else { rows };
        let uses_logits = matches!(config.mode, Mode::EmbeddedGaussian | Mode::DotProduct);
        let theta_fold_pays = uses_logits && fold_may_pay;
        // The leading projection rows that stay f32 in a bf16 block.
        let f32_rows = logit_rows(match config.mode {
            Mode::EmbeddedGaussian => 2 * ci,
            Mode::DotProduct => ci,
            Mode::Gaussian | Mode::Concatenation => 0,
        });
        // `Bf16Logits` multiplies `W_z` in bf16 too (as autocast's and OpenVINO's bf16 convolutions),
        // where it is applied to the N outputs; the other precisions keep it f32.
        let w_out_f32_rows = if precision.bf16_logits() { 0 } else { c };
        let w_proj = Weights::mixed(w_proj, proj_cols, c, precision, f32_rows);
        let w_out = Weights::mixed(w_out, c, ci, precision, w_out_f32_rows);
        Compiled {
            w_proj,
            b_proj,
            proj_cols,
            w_out,
            b_out,
            w_phi,
            bn_scale,
            theta_fold_pays,
            theta_fold: OnceLock::new(),
            channels: (c, ci),
            mode: config.mode,
            precision,
        }
    }

    /// What folding θ into the keys needs ([`ThetaFold`]), made on the first call; `None`
    /// where the fold never pays.
    pub(crate) fn theta_fold(&self) -> Option<&ThetaFold> {
        let (c, ci) = self.channels;
        let precision = self.precision;
        let logit_rows = |rows: usize| if precision.bf16_logits() { 0 } else { rows };
        let make = || {
            let w_proj = self.w_proj.values();
            ThetaFold {
                w_keys: Weights::mixed(w_proj[ci * c..].to_vec(), 2 * ci, c, precision, logit_rows(ci)),
                b_keys: self.b_proj[ci..].to_vec(),
                // W_θᵀ: f32 (near f32 on AMX tiles for `Bf16`), bf16 for `Bf16Logits` where bf16
                // products run on tiles (K' = φ·W_θ is rounded for the bf16 logits anyway).
                w_theta_t: Weights::mixed(
                    (0..c * ci).map(|i| w_proj[(i % ci) * c + i / ci]).collect(),
                    c,
                    ci,
                    precision,
                    if precision.bf16_logits() && bf16_on_tiles() { 0 } else { c },
                ),
                b_theta: self.b_proj[..ci].to_vec(),
            }
        };
        self.theta_fold_pays.then(|| self.theta_fold.get_or_init(make))
    }

    /// Whether the forward pass folds θ into the keys for N queries and M keys (see
    /// [`ThetaFold`]), in the modes that form logits `θ_i·φ_j` (embedded Gaussian, and dot
    /// product in its direct form): when the fold was prepared and costs less than projecting θ
    /// ([`Compiled::logit_costs`]), with few keys and many channels, as at video-res4.
    pub(crate) fn folds_theta(&self, n: usize, m: usize) -> bool {
        let uses_logits = match self.mode {
            Mode::EmbeddedGaussian => true,
            Mode::DotProduct => self.dot_product_direct(n, m),
            Mode::Gaussian | Mode::Concatenation => false,
        };
        let (fold, project) = self.logit_costs(n, m);
        self.theta_fold_pays && uses_logits && fold < project
    }

    /// The multiply-adds of the logits `θ_i·φ_j` with θ folded into the keys (`φ·W_θ`, then
    /// `x_i·(W_θᵀφ_j)`: M·C'·C + N·M·C) and with θ projected (N·C·C' + N·M·C').
    fn logit_costs(&self, n: usize, m: usize) -> (f64, f64) {
        let (c, ci) = self.channels;
        let (n, m, c, ci) = (n as f64, m as f64, c as f64, ci as f64);
        (m * ci * c + n * m * c, n * c * ci + n * m * ci)
    }

    /// The cost of the aggregation and output projection with `W_z` applied to the M values
    /// first (C·C'·M + N·M·C multiply-adds) and to the N outputs after (N·M·C' + N·C'·C), the
    /// aggregation's counted at `1 / value_rate` (how many times faster than `W_z`'s f32 ones
    /// its multiply-adds run).
    fn aggregation_costs(&self, n: usize, m: usize, value_rate: f64) -> (f64, f64) {
        let (c, ci) = self.channels;
        let (n, m, c, ci) = (n as f64, m as f64, c as f64, ci as f64);
        (c * ci * m + n * m * c / value_rate, n * m * ci / value_rate + n * ci * c)
    }

    /// Whether dot product's direct form applies `W_z` to the M values before the (f32)
    /// aggregation instead of to the N outputs after it (`W·Σ_j a_ij g_j = Σ_j a_ij (W g_j)`):
    /// with few keys and many channels.
    pub(crate) fn folds_values(&self, n: usize, m: usize) -> bool {
        let (fold, after) = self.aggregation_costs(n, m, 1.0);
        fold < after
    }

    /// [`Compiled::folds_values`] for the softmax modes, whose aggregation runs on bf16
    /// operands in a bf16 block: with `VDPBF16PS` at twice the rate of `W_z`'s f32 products
    /// (detect-res4 folds in bf16, not in f32); on AMX tiles at `W_z`'s own rate for
    /// `Bf16Logits` (`W_z` on the tiles too) and three times it for `Bf16` (`W_z` near f32:
    /// three tile products).
    pub(crate) fn folds_values_in_attention(&self, n: usize, m: usize) -> bool {
        let rate = match (self.precision, bf16_on_tiles()) {
            (Precision::F32, _) => 1.0,
            (_, false) => 2.0,
            (Precision::Bf16Logits, true) => 1.0,
            (_, true) => 3.0,
        };
        let (fold, after) = self.aggregation_costs(n, m, rate);
        fold < after
    }

    /// The precision `W_z` is applied to the values in when they are folded
    /// ([`Compiled::folds_values_in_attention`]): the block's where bf16 products run on tiles
    /// (`Bf16Logits`: bf16, `Bf16`: near f32), f32 elsewhere.
    pub(crate) fn value_fold_precision(&self) -> Precision {
        if bf16_on_tiles() {
            self.precision
        } else {
            Precision::F32
        }
    }

    /// Dot product: whether the direct form `(θφᵀ/M)·g`, with the cheaper of each fold, costs
    /// less than the association `θ·(φᵀg/M)` (N·C·C' for θ, M·C'² for `φᵀg`, then `φᵀg/M` folded
    /// into `W_z` (C'²·C + N·C'·C) or not (N·C'² + N·C'·C)). With few keys and many channels
    /// (video-res4: 1.34 instead of 1.96 G multiply-adds with the projections of φ and g); the
    /// N×M logits it forms are then no larger than the projections (M < C' or so).
    pub(crate) fn dot_product_direct(&self, n: usize, m: usize) -> bool {
        let (c, ci) = self.channels;
        let associated = {
            let (n, m, c, ci) = (n as f64, m as f64, c as f64, ci as f64);
            let tail = if self.folds_key_values_into_output(n as usize) { ci * ci * c } else { n * ci * ci };
            n * c * ci + m * ci * ci + tail + n * ci * c
        };
        let (fold, project) = self.logit_costs(n, m);
        let (fold_v, after) = self.aggregation_costs(n, m, 1.0);
        let logits = if self.theta_fold_pays { fold.min(project) } else { project };
        logits + fold_v.min(after) < associated
    }

    /// Whether dot product's association folds `φᵀg/M` into the output projection (C'²·C work
    /// instead of N·C'²): `z = x + θ·((φᵀg/M)·W_outᵀ) + b_out`, for more queries than channels.
    pub(crate) fn folds_key_values_into_output(&self, n: usize) -> bool {
        n > self.channels.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(mode: Mode, c: usize) -> Compiled {
        let config = NonLocalConfig::new(c).mode(mode);
        Compiled::new(&config, &Parameters::init(&config, 1))
    }

    #[test]
    fn the_shortcuts_are_taken_where_they_cost_less_on_the_bench_shapes() {
        // (C, N, M): video-res4, video-res3, detect-res4, video-res2 (1x2x2 pooling).
        let shapes = [(1024, 784, 196), (512, 3136, 784), (1024, 4200, 1050), (256, 25088, 6272)];
        for (i, &(c, n, m)) in shapes.iter().enumerate() {
            let res4 = i == 0;
            let eg = compiled(Mode::EmbeddedGaussian, c);
            assert_eq!((eg.folds_theta(n, m), eg.folds_values(n, m)), (res4, res4), "eg at {c}, {n}, {m}");
            let dp = compiled(Mode::DotProduct, c);
            assert_eq!(dp.dot_product_direct(n, m), res4, "dp at {c}, {n}, {m}");
            assert_eq!(dp.folds_theta(n, m), res4, "dp θ fold at {c}, {n}, {m}");
            // Gaussian has no θ to fold; concatenation never forms logits.
            assert!(!compiled(Mode::Gaussian, c).folds_theta(n, m));
            assert!(!compiled(Mode::Concatenation, c).folds_theta(n, m));
        }
    }

    #[test]
    fn bf16_blocks_fold_the_values_where_the_cheaper_aggregation_pays() {
        let shapes = [(1024, 784, 196), (512, 3136, 784), (1024, 4200, 1050), (256, 25088, 6272)];
        for (i, &(c, n, m)) in shapes.iter().enumerate() {
            for mode in [Mode::EmbeddedGaussian, Mode::Gaussian] {
                let f32_block = compiled(mode, c);
                assert_eq!(f32_block.folds_values_in_attention(n, m), f32_block.folds_values(n, m));
                for precision in [Precision::Bf16, Precision::Bf16Logits] {
                    let config = NonLocalConfig::new(c).mode(mode).precision(precision);
                    let bf16 = Compiled::new(&config, &Parameters::init(&config, 1));
                    // video-res4 folds in every precision; detect-res4 only where the
                    // aggregation runs faster than W_z (VDPBF16PS: 2.81 against 3.33 G
                    // f32-equivalent multiply-adds; `Bf16Logits` on AMX tiles runs both at one
                    // rate: 5.07 against 4.46); video-res3 (0.733 against 0.726) only for `Bf16`
                    // on tiles (W_z at a third of the aggregation's rate: 0.52 against 0.62);
                    // video-res2 never.
                    let tiles = bf16_on_tiles();
                    let want = match i {
                        0 => true,
                        1 => tiles && precision == Precision::Bf16,
                        2 => !(tiles && precision == Precision::Bf16Logits),
                        _ => false,
                    };
                    assert_eq!(bf16.folds_values_in_attention(n, m), want, "{mode:?} {precision:?} at {c}, {n}, {m}");
                    // Dot product's direct aggregation is f32 in every precision.
                    assert_eq!(bf16.folds_values(n, m), i == 0);
                }
            }
        }
    }
}
