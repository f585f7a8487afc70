//! The per-sample plan of the forward pass: parameters rearranged for the kernels
//! ([`Compiled`]), where each quantity sits among the projection columns ([`Columns`]), and
//! the projections and pooled keys of one sample ([`Prepared`]).

use rayon::prelude::*;

use crate::config::{Mode, NonLocalConfig};
use crate::error::Result;
use crate::kernels::concat::key_scores;
use crate::kernels::gemm::{row_block, MatMut, MatRef, Weights};
use crate::kernels::pool::{max_pool, pooled_grid};
use crate::params::Parameters;
use crate::workspace::{Scratch, Workspace};

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

/// Where each quantity sits among the projection columns, per mode.
///
/// - embedded Gaussian, dot product: `[θ | φ | g]`;
/// - Gaussian: `[g]`;
/// - concatenation: `[φ | g | a]` with `a = w_θ·θ` folded into one column `(W_θᵀ w_θ)·x`.
///
/// The key-side columns (φ and g) are contiguous, `key_start..key_start + key_width`: only
/// they are pooled.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Columns {
    pub(crate) theta: Option<usize>,
    pub(crate) phi: Option<usize>,
    pub(crate) g: usize,
    pub(crate) a: Option<usize>,
    pub(crate) key_start: usize,
    pub(crate) key_width: usize,
}

impl Columns {
    pub(crate) fn of(mode: Mode, ci: usize) -> Self {
        match mode {
            Mode::EmbeddedGaussian | Mode::DotProduct => {
                Columns { theta: Some(0), phi: Some(ci), g: 2 * ci, a: None, key_start: ci, key_width: 2 * ci }
            }
            Mode::Gaussian => Columns { theta: None, phi: None, g: 0, a: None, key_start: 0, key_width: ci },
            Mode::Concatenation => {
                Columns { theta: None, phi: Some(0), g: ci, a: Some(2 * ci), key_start: 0, key_width: 2 * ci }
            }
        }
    }

    /// `[φ | g]` alone: the projection of [`ThetaFold`].
    fn theta_folded(ci: usize) -> Self {
        Columns { theta: None, phi: Some(0), g: ci, a: None, key_start: 0, key_width: 2 * ci }
    }
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
        let theta_fold = (config.mode == Mode::EmbeddedGaussian && fold_may_pay).then(|| ThetaFold {
            w_keys: Weights::new(w_proj[ci * c..].to_vec(), 2 * ci, c),
            b_keys: b_proj[ci..].to_vec(),
            w_theta_t: Weights::new((0..c * ci).map(|i| w_proj[(i % ci) * c + i / ci]).collect(), c, ci),
            b_theta: b_proj[..ci].to_vec(),
        });
        let (w_proj, w_out) = (Weights::new(w_proj, proj_cols, c), Weights::new(w_out, c, ci));
        Compiled { w_proj, b_proj, proj_cols, w_out, b_out, w_phi, bn_scale, theta_fold }
    }
}

/// Per-sample intermediate results: the projections and the pooled keys and values.
pub(crate) struct Prepared<'a> {
    pub(crate) x: MatRef<'a>,
    /// N × `proj_cols` row-major.
    pub(crate) proj: Scratch<'a>,
    pub(crate) proj_cols: usize,
    /// The pooled key-side columns (M × `cols.key_width`), when sub-sampling.
    pub(crate) pooled: Option<Scratch<'a>>,
    /// Gaussian mode with sub-sampling: the pooled input, M × C.
    pub(crate) pooled_x: Option<Scratch<'a>>,
    pub(crate) m: usize,
    pub(crate) cols: Columns,
    pub(crate) ci: usize,
}

impl Prepared<'_> {
    pub(crate) fn proj_view(&self) -> MatRef<'_> {
        MatRef::new(&self.proj, 0, self.x.rows(), self.proj_cols, self.proj_cols)
    }

    /// The key-side columns (φ, g), pooled when sub-sampling; column 0 is `key_start`.
    pub(crate) fn key_side(&self) -> MatRef<'_> {
        let (start, width) = (self.cols.key_start, self.cols.key_width);
        match &self.pooled {
            Some(pooled) => MatRef::new(pooled, 0, self.m, width, width),
            None => self.proj_view().cols_range(start, start + width),
        }
    }

    pub(crate) fn queries(&self) -> MatRef<'_> {
        match self.cols.theta {
            Some(t) => self.proj_view().cols_range(t, t + self.ci),
            None => self.x,
        }
    }

    pub(crate) fn keys(&self) -> MatRef<'_> {
        let start = self.cols.key_start;
        match (self.cols.phi, &self.pooled_x) {
            (Some(p), _) => self.key_side().cols_range(p - start, p - start + self.ci),
            (None, None) => self.x,
            (None, Some(px)) => MatRef::new(px, 0, self.m, self.x.cols(), self.x.cols()),
        }
    }

    pub(crate) fn values(&self) -> MatRef<'_> {
        let g = self.cols.g - self.cols.key_start;
        self.key_side().cols_range(g, g + self.ci)
    }

    /// Concatenation: `a_i = w_θ·θ_i` as an N × 1 view.
    pub(crate) fn concat_a(&self) -> MatRef<'_> {
        let a = self.cols.a.expect("concatenation has an `a` column");
        self.proj_view().cols_range(a, a + 1)
    }

    /// Concatenation: `b_j = w_φ·φ_j` for every key.
    pub(crate) fn concat_b(&self, w_phi: &[f32]) -> Vec<f32> {
        key_scores(self.keys(), w_phi)
    }
}

/// Projections and pooling for one sample `x` (N × C) on the grid `grid`, buffers from
/// `workspace`; with `fold_theta` (embedded Gaussian only), φ and g alone (see [`ThetaFold`]).
pub(crate) fn prepare<'a>(
    config: &NonLocalConfig,
    compiled: &Compiled,
    workspace: &'a Workspace,
    (x, grid): (MatRef<'a>, [usize; 3]),
    fold_theta: bool,
) -> Result<Prepared<'a>> {
    let (n, c) = (x.rows(), x.cols());
    let (weights, bias, cols) = match (&compiled.theta_fold, fold_theta) {
        (Some(fold), true) => (&fold.w_keys, &fold.b_keys, Columns::theta_folded(config.inter_channels)),
        _ => (&compiled.w_proj, &compiled.b_proj, Columns::of(config.mode, config.inter_channels)),
    };
    let k = bias.len();
    let mut proj = workspace.take(n * k, "projections")?;
    proj.par_chunks_mut(row_block(n, 64) * k).for_each(|rows| {
        rows.chunks_mut(k).for_each(|row| row.copy_from_slice(bias));
    });
    weights.apply(x, 1.0, &mut MatMut::new(&mut proj, n, k, k));
    let kernel = config.pool_kernel();
    let m: usize = pooled_grid(grid, kernel).iter().product();
    let (mut pooled, mut pooled_x) = (None, None);
    if config.sub_sample.is_some() {
        let (start, width) = (cols.key_start, cols.key_width);
        let mut buf = workspace.take(m * width, "pooled projections")?;
        let key_cols = MatRef::new(&proj, 0, n, k, k).cols_range(start, start + width);
        max_pool(key_cols, grid, kernel, &mut buf);
        pooled = Some(buf);
        if config.mode == Mode::Gaussian {
            let mut buf = workspace.take(m * c, "pooled input")?;
            max_pool(x, grid, kernel, &mut buf);
            pooled_x = Some(buf);
        }
    }
    Ok(Prepared { x, proj, proj_cols: k, pooled, pooled_x, m, cols, ci: config.inter_channels })
}
