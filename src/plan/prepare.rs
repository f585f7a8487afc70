//! One sample's projections and pooled keys, and the views the kernels take of them.

use super::Compiled;
use crate::config::{Mode, NonLocalConfig, Precision};
use crate::error::Result;
use crate::kernels::concat::key_scores;
use crate::kernels::pool::{max_pool, pooled_grid};
use crate::kernels::views::{MatMut, MatRef};
use crate::workspace::{Scratch, Workspace};

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

    /// `[φ | g]` alone: the projection of [`ThetaFold`](super::ThetaFold).
    fn theta_folded(ci: usize) -> Self {
        Columns { theta: None, phi: Some(0), g: ci, a: None, key_start: 0, key_width: 2 * ci }
    }
}

/// What a sample is prepared for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// The forward pass: with every shortcut the plan finds cheaper (θ folded into the keys),
    /// in the block's precision.
    Inference,
    /// Quantities as the definition has them (θ projected), in f32 whatever the block's
    /// precision: the attention maps, and training, whose backward pass needs θ.
    Exact,
}

impl Purpose {
    /// The precision of the products for this purpose on a block configured with `precision`.
    pub(crate) fn precision(self, precision: Precision) -> Precision {
        match self {
            Purpose::Inference => precision,
            Purpose::Exact => Precision::F32,
        }
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
    /// With θ folded into the keys: `K' = φ·W_θ` (M × C) and one logit offset `b_θ·φ_j` per key.
    folded: Option<(Scratch<'a>, Vec<f32>)>,
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

    /// The softmax modes' queries, keys and per-key logit offsets: `(x, φ·W_θ, b_θ·φ)` when
    /// θ is folded into the keys, else `(θ, φ, none)` (Gaussian: the input and its pooled
    /// copy).
    pub(crate) fn attention_operands(&self) -> (MatRef<'_>, MatRef<'_>, Option<&[f32]>) {
        match &self.folded {
            Some((keys, offsets)) => {
                let c = self.x.cols();
                (self.x, MatRef::new(keys, 0, self.m, c, c), Some(offsets))
            }
            None => (self.queries(), self.keys(), None),
        }
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
/// `workspace`; for [`Purpose::Inference`], θ folded into the keys where the plan says it pays
/// ([`Compiled::folds_theta`]): φ and g projected alone, then `K' = φ·W_θ` and the offsets.
pub(crate) fn prepare<'a>(
    config: &NonLocalConfig,
    compiled: &Compiled,
    workspace: &'a Workspace,
    (x, grid): (MatRef<'a>, [usize; 3]),
    purpose: Purpose,
) -> Result<Prepared<'a>> {
    let (n, c, ci) = (x.rows(), x.cols(), config.inter_channels);
    let kernel = config.pool_kernel();
    let m: usize = pooled_grid(grid, kernel).iter().product();
    let fold = match purpose == Purpose::Inference && compiled.folds_theta(n, m) {
        true => compiled.theta_fold(),
        false => None,
    };
    let (weights, bias, cols) = match fold {
        Some(fold) => (&fold.w_keys, &fold.b_keys, Columns::theta_folded(ci)),
        None => (&compiled.w_proj, &compiled.b_proj, Columns::of(config.mode, ci)),
    };
    let k = bias.len();
    let precision = purpose.precision(config.precision);
    let mut proj = workspace.take(n * k, "projections")?;
    weights.apply_bias(precision, x, bias, &mut MatMut::new(&mut proj, n, k, k), workspace);
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
    let mut prepared = Prepared { x, proj, proj_cols: k, pooled, pooled_x, m, cols, ci, folded: None };
    if let Some(fold) = fold {
        // θ_i·φ_j = x_i·(W_θᵀφ_j) + b_θ·φ_j: keys K' = φ·W_θ (M × C), one offset per key.
        let mut keys = workspace.take(m * c, "folded keys")?;
        fold.w_theta_t.apply(precision, prepared.keys(), 0.0, &mut MatMut::new(&mut keys, m, c, c), workspace);
        let phi = prepared.keys();
        let mut row = vec![0.0f32; ci];
        let offsets = (0..m)
            .map(|j| {
                phi.copy_row(j, &mut row);
                row.iter().zip(&fold.b_theta).map(|(a, b)| a * b).sum()
            })
            .collect();
        prepared.folded = Some((keys, offsets));
    }
    Ok(prepared)
}
