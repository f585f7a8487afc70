//! Helpers shared by the integration tests: a seeded generator, random blocks and inputs,
//! and comparison with the f64 reference.
#![allow(dead_code)]

#[path = "../oracle/golden.rs"]
pub mod golden;
#[path = "../oracle/reference.rs"]
pub mod reference;

use ndarray::{Array1, Array2, Array5, ArrayBase, ArrayView5, Data, Dimension};
use nonlocal::{BatchNorm, Conv1x1, Mode, NonLocalBlock, NonLocalConfig, Parameters};

/// xorshift64*: small, seeded, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [−amp, amp).
    pub fn uniform(&mut self, amp: f32) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
    }

    /// Uniform integer in lo..=hi.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    pub fn matrix(&mut self, rows: usize, cols: usize, amp: f32) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |_| self.uniform(amp))
    }

    pub fn vector(&mut self, len: usize, amp: f32) -> Array1<f32> {
        Array1::from_shape_fn(len, |_| self.uniform(amp))
    }

    pub fn input(&mut self, shape: (usize, usize, usize, usize, usize), amp: f32) -> Array5<f32> {
        Array5::from_shape_fn(shape, |_| self.uniform(amp))
    }
}

/// Parameters with every part random and non-trivial, BatchNorm included.
pub fn random_params(config: &NonLocalConfig, rng: &mut Rng) -> Parameters {
    let (c, ci) = (config.in_channels, config.inter_channels);
    let amp = 1.0 / (c as f32).sqrt();
    let conv = |out: usize, inp: usize, rng: &mut Rng| {
        Conv1x1::new(rng.matrix(out, inp, 1.0 / (inp as f32).sqrt()), Some(rng.vector(out, 0.2)))
    };
    let theta_phi = config.mode != Mode::Gaussian;
    let theta = theta_phi.then(|| conv(ci, c, rng));
    let phi = theta_phi.then(|| conv(ci, c, rng));
    let g = conv(ci, c, rng);
    let w_z = conv(c, ci, rng);
    let bn = config.bn_layer.then(|| BatchNorm {
        weight: rng.vector(c, 1.0) + 0.5,
        bias: rng.vector(c, 0.3),
        running_mean: rng.vector(c, 0.2),
        running_var: rng.vector(c, 0.4).mapv(|v| v + 0.8),
    });
    let concat_project = (config.mode == Mode::Concatenation).then(|| rng.vector(2 * ci, amp.max(0.3)));
    Parameters { theta, phi, g, w_z, bn, concat_project }
}

pub fn random_block(config: NonLocalConfig, rng: &mut Rng) -> NonLocalBlock {
    let params = random_params(&config, rng);
    NonLocalBlock::from_parameters(config, params).expect("random parameters fit their config")
}

/// Max |got − want| and the golden tolerance 1e-4·max(1, max|want|) (NaN counts as ∞).
///
/// # Panics
/// When the shapes differ: a comparison of the overlap would pass a truncated output.
pub fn max_err<S1, S2, D1, D2>(got: &ArrayBase<S1, D1>, want: &ArrayBase<S2, D2>) -> (f64, f64)
where
    S1: Data<Elem = f32>,
    S2: Data<Elem = f64>,
    D1: Dimension,
    D2: Dimension,
{
    assert_eq!(got.shape(), want.shape(), "max_err: shapes differ");
    let mut err = 0.0f64;
    let mut scale = 1.0f64;
    for (&g, &w) in got.iter().zip(want.iter()) {
        let d = (g as f64 - w).abs();
        err = if d.is_nan() { f64::INFINITY } else { err.max(d) };
        scale = scale.max(w.abs());
    }
    (err, 1e-4 * scale)
}

/// Asserts the block's output and attention match the f64 reference.
pub fn assert_matches_reference(block: &NonLocalBlock, x: ArrayView5<'_, f32>, what: &str) {
    let (want, want_attention) = reference::forward(block.config(), block.parameters(), x);
    let got = block.forward(&x).expect("forward");
    assert_eq!(got.shape(), want.shape());
    let (err, tol) = max_err(&got, &want);
    assert!(err <= tol, "{what}: output error {err:.3e} > {tol:.3e}");
    let attention = block.attention(&x).expect("attention");
    assert_eq!(attention.shape(), want_attention.shape());
    let (err, _) = max_err(&attention, &want_attention);
    assert!(err <= 5e-5, "{what}: attention error {err:.3e}");
}

/// Runs `f` in local rayon pools of 1, 2 and 3 threads and returns the three results.
pub fn on_1_2_3_threads<T: Send>(f: impl Fn() -> T + Sync) -> Vec<T> {
    [1, 2, 3]
        .iter()
        .map(|&threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
            pool.install(&f)
        })
        .collect()
}

/// The bit patterns of f32 values, for exact comparisons.
pub fn bits<'a>(values: impl IntoIterator<Item = &'a f32>) -> Vec<u32> {
    values.into_iter().map(|v| v.to_bits()).collect()
}
