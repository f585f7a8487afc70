//! A plain f64 implementation of the block, straight from the definitions: slow, obviously
//! right, and what the tests compare the fast kernels with (a test oracle outside the library,
//! included by the tests with `#[path]`). It builds the whole N×M attention
//! matrix, so use it on small inputs only.

use ndarray::{Array2, Array3, Array5, ArrayView5};

use nonlocal::{Conv1x1, Mode, NonLocalConfig, Parameters};

/// The output (B, T, H, W, C) and the attention weights (B, N, M) of the block, in f64.
///
/// `x` must fit the configuration (channels, sizes at least the pool kernel); this function
/// panics otherwise — it is a test oracle, not an API for untrusted input.
pub fn forward(config: &NonLocalConfig, params: &Parameters, x: ArrayView5<'_, f32>) -> (Array5<f64>, Array3<f64>) {
    let (b, t, h, w, c) = x.dim();
    let n = t * h * w;
    let kernel = config.pool_kernel();
    let key_grid = [t / kernel[0], h / kernel[1], w / kernel[2]];
    let m = key_grid.iter().product::<usize>();
    let mut out = Array5::<f64>::zeros((b, t, h, w, c));
    let mut attention = Array3::<f64>::zeros((b, n, m));
    for s in 0..b {
        // Positions in (t, h, w) row-major order.
        let xs = Array2::from_shape_fn((n, c), |(i, ch)| x[[s, i / (h * w), (i / w) % h, i % w, ch]] as f64);
        let pool = |feat: &Array2<f64>| -> Array2<f64> {
            if config.sub_sample.is_none() {
                return feat.clone();
            }
            Array2::from_shape_fn((m, feat.ncols()), |(j, ch)| {
                let (to, ho, wo) = (j / (key_grid[1] * key_grid[2]), (j / key_grid[2]) % key_grid[1], j % key_grid[2]);
                let mut best = f64::NEG_INFINITY;
                for dt in 0..kernel[0] {
                    for dh in 0..kernel[1] {
                        for dw in 0..kernel[2] {
                            let i = ((to * kernel[0] + dt) * h + ho * kernel[1] + dh) * w + wo * kernel[2] + dw;
                            best = best.max(feat[[i, ch]]);
                        }
                    }
                }
                best
            })
        };
        let g = pool(&conv(&params.g, &xs));
        let a: Array2<f64> = match config.mode {
            Mode::EmbeddedGaussian | Mode::DotProduct => {
                let theta = conv(params.theta.as_ref().expect("θ"), &xs);
                let phi = pool(&conv(params.phi.as_ref().expect("φ"), &xs));
                let logits = theta.dot(&phi.t());
                if config.mode == Mode::DotProduct {
                    logits / m as f64
                } else {
                    let scale = if config.use_scale { 1.0 / (config.inter_channels as f64).sqrt() } else { 1.0 };
                    softmax_rows(logits * scale)
                }
            }
            Mode::Gaussian => softmax_rows(xs.dot(&pool(&xs).t())),
            Mode::Concatenation => {
                let theta = conv(params.theta.as_ref().expect("θ"), &xs);
                let phi = pool(&conv(params.phi.as_ref().expect("φ"), &xs));
                let wp = params.concat_project.as_ref().expect("concat projection");
                let ci = config.inter_channels;
                Array2::from_shape_fn((n, m), |(i, j)| {
                    let mut v = 0.0;
                    for k in 0..ci {
                        v += wp[k] as f64 * theta[[i, k]] + wp[ci + k] as f64 * phi[[j, k]];
                    }
                    v.max(0.0) / m as f64
                })
            }
        };
        let y = a.dot(&g);
        let mut z = conv(&params.w_z, &y);
        if let Some(bn) = &params.bn {
            for ch in 0..c {
                let inv = 1.0 / (bn.running_var[ch] as f64 + config.bn_eps).sqrt();
                z.column_mut(ch).mapv_inplace(|v| {
                    (v - bn.running_mean[ch] as f64) * inv * bn.weight[ch] as f64 + bn.bias[ch] as f64
                });
            }
        }
        for i in 0..n {
            for ch in 0..c {
                out[[s, i / (h * w), (i / w) % h, i % w, ch]] = z[[i, ch]] + xs[[i, ch]];
            }
        }
        attention.index_axis_mut(ndarray::Axis(0), s).assign(&a);
    }
    (out, attention)
}

/// Applies a 1x1 conv to every row of `x` (positions × in): positions × out.
pub fn conv(conv: &Conv1x1, x: &Array2<f64>) -> Array2<f64> {
    let w = conv.weight.mapv(f64::from);
    let mut y = x.dot(&w.t());
    if let Some(b) = &conv.bias {
        for mut row in y.rows_mut() {
            row.iter_mut().zip(b.iter()).for_each(|(v, &bb)| *v += bb as f64);
        }
    }
    y
}

/// Row-wise softmax, stabilised by the row maximum.
pub fn softmax_rows(mut logits: Array2<f64>) -> Array2<f64> {
    for mut row in logits.rows_mut() {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        row.mapv_inplace(|v| (v - max).exp());
        let total = row.sum();
        row.mapv_inplace(|v| v / total);
    }
    logits
}

/// The disentangled non-local block (mmsegmentation's `DisentangledNonLocal2d`) in f64,
/// straight from its definition: θ and φ whitened over positions, logits `θ̂·φ̂ᵀ·s/T` with a
/// softmax (embedded Gaussian) or `/N` (dot product), plus the unary term
/// `softmax(conv_mask(x))·g` added to every y before `W_z` (and BatchNorm). Clips (B, 1, H, W, C).
pub fn disentangled_forward(
    config: &NonLocalConfig,
    params: &Parameters,
    mask: &Conv1x1,
    temperature: f64,
    x: ArrayView5<'_, f32>,
) -> Array5<f64> {
    let (b, t, h, w, c) = x.dim();
    let n = t * h * w;
    let mut out = Array5::<f64>::zeros((b, t, h, w, c));
    for s in 0..b {
        let xs = Array2::from_shape_fn((n, c), |(i, ch)| x[[s, i / (h * w), (i / w) % h, i % w, ch]] as f64);
        let whiten = |m: Array2<f64>| {
            let mean = m.mean_axis(ndarray::Axis(0)).expect("positions");
            m - &mean
        };
        let theta = whiten(conv(params.theta.as_ref().expect("θ"), &xs));
        let phi = whiten(conv(params.phi.as_ref().expect("φ"), &xs));
        let g = conv(&params.g, &xs);
        let logits = theta.dot(&phi.t());
        let a = if config.mode == Mode::DotProduct {
            logits / n as f64
        } else {
            let scale = if config.use_scale { 1.0 / (config.inter_channels as f64).sqrt() } else { 1.0 };
            softmax_rows(logits * scale / temperature)
        };
        let m = conv(mask, &xs); // N × 1
        let unary_w = softmax_rows(m.t().to_owned()); // 1 × N
        let unary = unary_w.dot(&g); // 1 × C'
        let y = a.dot(&g) + unary.row(0);
        let mut z = conv(&params.w_z, &y);
        if let Some(bn) = &params.bn {
            for ch in 0..c {
                let inv = 1.0 / (bn.running_var[ch] as f64 + config.bn_eps).sqrt();
                z.column_mut(ch).mapv_inplace(|v| {
                    (v - bn.running_mean[ch] as f64) * inv * bn.weight[ch] as f64 + bn.bias[ch] as f64
                });
            }
        }
        for i in 0..n {
            for ch in 0..c {
                out[[s, i / (h * w), (i / w) % h, i % w, ch]] = z[[i, ch]] + xs[[i, ch]];
            }
        }
    }
    out
}
