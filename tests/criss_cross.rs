//! Criss-cross attention (mmcv's `CrissCrossAttention`) against a plain f64 implementation
//! written from the definition, the PyTorch golden case, finite differences of the f64
//! implementation for the backward pass, thread-count determinism, layouts and every error.

mod common;

use common::{bits, on_1_2_3_threads, Rng};
use ndarray::{s, Array1, Array4, Array5, ArrayViewMutD, Axis, Ix5};
use nonlocal::{Conv1x1, CrissCrossAttention, CrissCrossConfig, CrissCrossParameters, Error, TensorFile, WeightKeys};

/// The block straight from its definition, in f64: the H + W energies of every position
/// built explicitly (column first, −∞ on the position itself, then the row), one softmax,
/// the weighted sum of the values, `z = x + γ·y`, applied `recurrence` times.
mod reference {
    use ndarray::{Array4, ArrayView4};
    use nonlocal::{Conv1x1, CrissCrossConfig, CrissCrossParameters};

    /// A 1x1 convolution of (B, H, W, C_in) into (B, H, W, C_out).
    fn conv(conv: &Conv1x1, x: &Array4<f64>) -> Array4<f64> {
        let (b, h, w, c) = x.dim();
        Array4::from_shape_fn((b, h, w, conv.weight.nrows()), |(bi, hi, wi, o)| {
            let bias = conv.bias.as_ref().map_or(0.0, |bias| bias[o] as f64);
            bias + (0..c).map(|i| conv.weight[[o, i]] as f64 * x[[bi, hi, wi, i]]).sum::<f64>()
        })
    }

    /// One application of the block.
    pub fn apply(params: &CrissCrossParameters, x: &Array4<f64>) -> Array4<f64> {
        let (q, k, v) = (conv(&params.query, x), conv(&params.key, x), conv(&params.value, x));
        let (b, h, w, c) = x.dim();
        let qk = q.dim().3;
        let mut z = x.clone();
        for bi in 0..b {
            for hi in 0..h {
                for wi in 0..w {
                    let keys: Vec<(usize, usize)> =
                        (0..h).map(|hj| (hj, wi)).chain((0..w).map(|wj| (hi, wj))).collect();
                    let energies: Vec<f64> = keys
                        .iter()
                        .enumerate()
                        .map(|(j, &(hj, wj))| match j == hi {
                            true => f64::NEG_INFINITY,
                            false => (0..qk).map(|d| q[[bi, hi, wi, d]] * k[[bi, hj, wj, d]]).sum(),
                        })
                        .collect();
                    let max = energies.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = energies.iter().map(|&v| (v - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for ch in 0..c {
                        let y: f64 = keys.iter().zip(&e).map(|(&(hj, wj), &a)| a / sum * v[[bi, hj, wj, ch]]).sum();
                        z[[bi, hi, wi, ch]] += params.gamma as f64 * y;
                    }
                }
            }
        }
        z
    }

    /// The block applied `config.recurrence` times to image maps (B, H, W, C).
    pub fn forward(config: &CrissCrossConfig, params: &CrissCrossParameters, x: ArrayView4<'_, f32>) -> Array4<f64> {
        let mut z = x.mapv(f64::from);
        for _ in 0..config.recurrence {
            z = apply(params, &z);
        }
        z
    }
}

/// Random parameters with logits of a few units and a non-zero γ.
fn random_params(config: &CrissCrossConfig, rng: &mut Rng) -> CrissCrossParameters {
    let (c, qk) = (config.in_channels, config.qk_channels);
    let amp = 2.0 / (c as f32).sqrt();
    let mut conv = |out: usize| Conv1x1::new(rng.matrix(out, c, amp), Some(rng.vector(out, 0.3)));
    let (query, key, value) = (conv(qk), conv(qk), conv(c));
    CrissCrossParameters { query, key, value, gamma: 0.5 + rng.uniform(0.3) }
}

fn random_block(config: CrissCrossConfig, rng: &mut Rng) -> CrissCrossAttention {
    let params = random_params(&config, rng);
    CrissCrossAttention::from_parameters(config, params).expect("random parameters fit their config")
}

fn images(rng: &mut Rng, shape: (usize, usize, usize, usize)) -> Array4<f32> {
    Array4::from_shape_fn(shape, |_| rng.uniform(1.0))
}

/// max |got − want| and the tolerance 1e-4·max(1, max |want|) (NaN counts as ∞).
fn max_err<'a>(got: impl IntoIterator<Item = &'a f32>, want: impl IntoIterator<Item = &'a f64>) -> (f64, f64) {
    let (mut err, mut scale) = (0.0f64, 1.0f64);
    for (&g, &w) in got.into_iter().zip(want) {
        let d = (g as f64 - w).abs();
        err = if d.is_nan() { f64::INFINITY } else { err.max(d) };
        scale = scale.max(w.abs());
    }
    (err, 1e-4 * scale)
}

#[test]
fn forward_matches_the_reference_on_random_shapes() {
    let mut rng = Rng::new(1);
    // (B, H, W, C, qk, recurrence): H or W = 1, H ≠ W, B > 1, C not a multiple of 8, below 8
    // channels, qk > C / 8, recurrence 2 and 3.
    let cases = [
        (1, 7, 8, 16, 2, 1),
        (2, 5, 3, 13, 1, 1),
        (1, 1, 6, 8, 1, 1),
        (1, 6, 1, 8, 1, 1),
        (1, 1, 1, 5, 1, 1),
        (3, 4, 4, 5, 1, 2),
        (1, 9, 4, 10, 4, 1),
        (2, 6, 11, 24, 3, 2),
        (1, 3, 5, 7, 2, 3),
        (1, 17, 13, 33, 4, 2),
    ];
    for (b, h, w, c, qk, r) in cases {
        let config = CrissCrossConfig::new(c).qk_channels(qk).recurrence(r);
        let block = random_block(config.clone(), &mut rng);
        let x = images(&mut rng, (b, h, w, c));
        let want = reference::forward(&config, block.parameters(), x.view());
        let got = block.forward_images(&x).unwrap();
        let (err, tol) = max_err(got.iter(), want.iter());
        assert!(err <= tol, "{b}x{h}x{w}x{c} qk={qk} r={r}: error {err:.3e} > {tol:.3e}");
    }
    // Shapes drawn at random.
    for _ in 0..12 {
        let (b, h, w, c) = (rng.range(1, 2), rng.range(1, 12), rng.range(1, 12), rng.range(1, 20));
        let config = CrissCrossConfig::new(c).qk_channels(rng.range(1, 4)).recurrence(rng.range(1, 2));
        let block = random_block(config.clone(), &mut rng);
        let x = images(&mut rng, (b, h, w, c));
        let want = reference::forward(&config, block.parameters(), x.view());
        let got = block.forward_images(&x).unwrap();
        let (err, tol) = max_err(got.iter(), want.iter());
        assert!(err <= tol, "{b}x{h}x{w}x{c} {config:?}: error {err:.3e} > {tol:.3e}");
    }
}

#[test]
fn below_eight_channels_the_query_width_must_be_chosen() {
    // mmcv's in_channels // 8 is 0 there: its module is built but cannot run.
    let config = CrissCrossConfig::new(7);
    assert_eq!(config.qk_channels, 0);
    let e = CrissCrossAttention::new(config.clone()).unwrap_err();
    assert!(matches!(&e, Error::InvalidConfig { reason } if reason.contains("qk_channels")), "{e}");
    let mut rng = Rng::new(2);
    let block = random_block(config.qk_channels(1), &mut rng);
    let x = images(&mut rng, (1, 3, 4, 7));
    let want = reference::forward(block.config(), block.parameters(), x.view());
    let (err, tol) = max_err(block.forward_images(&x).unwrap().iter(), want.iter());
    assert!(err <= tol, "error {err:.3e}");
}

/// The criss-cross cases among the family's golden files (`block` = `criss_cross`).
fn golden_cases() -> Vec<(std::path::PathBuf, TensorFile)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/family");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/data/family exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("corrupt_"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| (p.clone(), TensorFile::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))))
        .filter(|(_, f)| f.metadata().get("block").is_some_and(|b| b == "criss_cross"))
        .collect()
}

/// The block a golden file describes, from its metadata and parameters.
fn golden_block(file: &TensorFile) -> CrissCrossAttention {
    let meta = |key: &str| file.metadata().get(key).unwrap_or_else(|| panic!("metadata {key}")).clone();
    assert_eq!(meta("naming"), "mmcv");
    let number = |key: &str| meta(key).parse::<usize>().unwrap();
    let config = CrissCrossConfig::new(number("in_channels"))
        .qk_channels(number("qk_channels"))
        .recurrence(number("recurrence"));
    let keys = WeightKeys::mmcv().with_prefix(meta("prefix"));
    CrissCrossAttention::from_checkpoint(config, file, &keys).unwrap()
}

#[test]
fn the_mmcv_golden_cases_pass() {
    let cases = golden_cases();
    let mut gradient_cases = 0;
    for (path, file) in &cases {
        let what = path.file_name().unwrap().to_string_lossy();
        let block = golden_block(file);
        assert!(block.parameters().gamma != 0.0, "{what}: the case has a non-zero γ");
        let x = file.tensor_as::<Ix5>("input").unwrap();
        let want = file.tensor_as::<Ix5>("output").unwrap().mapv(f64::from);
        let got = block.forward(&x).unwrap();
        let (err, tol) = max_err(got.iter(), want.iter());
        assert!(err <= tol, "{what}: output error {err:.3e} > {tol:.3e}");
        // The same through the image entry point, forward_into and the training forward.
        let images = x.index_axis(Axis(1), 0);
        assert_eq!(bits(block.forward_images(&images).unwrap().iter()), bits(got.iter()), "{what}");
        let mut into = Array5::<f32>::from_elem(x.raw_dim(), f32::NAN);
        block.forward_into(&x, &mut into).unwrap();
        assert_eq!(bits(into.iter()), bits(got.iter()), "{what}");
        let (trained, ctx) = block.forward_train(&x).unwrap();
        assert_eq!(bits(trained.iter()), bits(got.iter()), "{what}");
        if !file.contains("grad_output") {
            continue;
        }
        // PyTorch autograd's gradients of sum(output * grad_output), per tensor.
        gradient_cases += 1;
        let grads = block.backward(&ctx, &file.tensor_as::<Ix5>("grad_output").unwrap()).unwrap();
        let want = file.tensor("grad_input").unwrap().mapv(f64::from);
        let (err, tol) = max_err(grads.input.iter(), want.iter());
        assert!(err <= tol, "{what}: grad_input error {err:.3e} > {tol:.3e}");
        let named = grads.params.named();
        assert_eq!(named.len(), 7, "{what}");
        for (name, got) in named {
            let want = file.tensor(&format!("grad.{name}")).unwrap();
            assert_eq!(got.shape(), want.shape(), "{what}: grad.{name}");
            let want = want.mapv(f64::from);
            let (err, tol) = max_err(got.iter(), want.iter());
            assert!(err <= tol, "{what}: grad.{name} error {err:.3e} > {tol:.3e}");
        }
    }
    assert!(cases.len() >= 3 && gradient_cases >= 2, "{} cases, {gradient_cases} with gradients", cases.len());
}

#[test]
fn strided_and_permuted_inputs_give_the_contiguous_results() {
    let mut rng = Rng::new(3);
    let config = CrissCrossConfig::new(12).qk_channels(3).recurrence(2);
    let block = random_block(config, &mut rng);
    // Channels-first storage, permuted to channels last: the channel stride is H·W.
    let channels_first = Array4::from_shape_fn((2, 12, 5, 7), |_| rng.uniform(1.0));
    let permuted = channels_first.view().permuted_axes([0, 2, 3, 1]);
    let want = block.forward_images(&permuted.to_owned()).unwrap();
    assert_eq!(bits(block.forward_images(&permuted).unwrap().iter()), bits(want.iter()));
    // Every other row and every third column of a larger map.
    let big = images(&mut rng, (2, 10, 20, 12));
    let strided = big.slice(s![.., ..;2, 1..;3, ..]);
    let want = block.forward_images(&strided.to_owned()).unwrap();
    assert_eq!(bits(block.forward_images(&strided).unwrap().iter()), bits(want.iter()));
    // A clip view of the same, and forward_into a strided output.
    let clips = strided.insert_axis(Axis(1));
    let mut out_big = Array5::<f32>::from_elem((2, 1, 5, 7, 24), f32::NAN);
    let mut out = out_big.slice_mut(s![.., .., .., .., ..;2]);
    block.forward_into(&clips, &mut out).unwrap();
    assert_eq!(bits(out.iter()), bits(want.iter()));
    assert!(out_big.slice(s![.., .., .., .., 1..;2]).iter().all(|v| v.is_nan()), "written outside the view");
}

#[test]
fn zero_gamma_is_the_identity_and_a_new_block_starts_there() {
    let mut rng = Rng::new(4);
    let config = CrissCrossConfig::new(16).recurrence(2);
    let mut params = random_params(&config, &mut rng);
    params.gamma = 0.0;
    let block = CrissCrossAttention::from_parameters(config.clone(), params).unwrap();
    let x = images(&mut rng, (2, 6, 5, 16));
    assert_eq!(block.forward_images(&x).unwrap(), x);
    assert_eq!(CrissCrossAttention::new(config).unwrap().forward_images(&x).unwrap(), x);
}

#[test]
fn output_bits_do_not_depend_on_thread_count() {
    let mut rng = Rng::new(5);
    let config = CrissCrossConfig::new(40).recurrence(2);
    let block = random_block(config, &mut rng);
    let x = images(&mut rng, (2, 20, 27, 40));
    let runs = on_1_2_3_threads(|| bits(block.forward_images(&x).unwrap().iter()));
    assert_eq!(runs[0], runs[1], "1 vs 2 threads");
    assert_eq!(runs[0], runs[2], "1 vs 3 threads");
}

#[test]
fn nan_spreads_along_its_row_and_column_only() {
    let mut rng = Rng::new(6);
    let config = CrissCrossConfig::new(8);
    let block = random_block(config.clone(), &mut rng);
    let mut x = images(&mut rng, (2, 5, 6, 8));
    x[[0, 2, 3, 4]] = f32::NAN;
    let z = block.forward_images(&x).unwrap();
    for ((b, h, w, _), &v) in z.indexed_iter() {
        let on_cross = b == 0 && (h == 2 || w == 3);
        assert_eq!(v.is_nan(), on_cross, "z[{b}, {h}, {w}] = {v}");
    }
    // Applied twice, the cross of the cross is the whole image; the other sample is clean.
    let twice = CrissCrossAttention::from_parameters(config.recurrence(2), block.parameters().clone()).unwrap();
    let z = twice.forward_images(&x).unwrap();
    assert!(z.index_axis(Axis(0), 0).iter().all(|v| v.is_nan()));
    assert!(z.index_axis(Axis(0), 1).iter().all(|v| v.is_finite()));
    // Infinities do not panic either.
    x[[1, 0, 0, 0]] = f32::INFINITY;
    x[[1, 4, 5, 7]] = f32::NEG_INFINITY;
    let z = block.forward_images(&x).unwrap();
    assert!(!z[[1, 0, 0, 0]].is_finite());
}

/// L = Σ z ⊙ r in f64, from the reference.
fn reference_loss(config: &CrissCrossConfig, params: &CrissCrossParameters, x: &Array4<f32>, r: &Array4<f32>) -> f64 {
    let z = reference::forward(config, params, x.view());
    z.iter().zip(r.iter()).map(|(a, &b)| a * b as f64).sum()
}

/// Central difference of the loss along one element, with the step actually taken in f32.
fn central_difference(mut loss_at: impl FnMut(f32) -> f64, value: f32, h: f32) -> f64 {
    let (up, down) = (value + h, value - h);
    (loss_at(up) - loss_at(down)) / (up as f64 - down as f64)
}

fn set_element(t: &mut ArrayViewMutD<'_, f32>, idx: usize, v: f32) {
    *t.iter_mut().nth(idx).unwrap() = v;
}

#[test]
fn gradients_match_finite_differences() {
    // (B, H, W, C, qk, recurrence)
    let cases = [(2, 4, 5, 9, 2, 1), (1, 3, 4, 8, 1, 2), (1, 1, 4, 6, 2, 1), (1, 5, 1, 4, 1, 2), (1, 4, 3, 10, 3, 3)];
    for (seed, (b, h, w, c, qk, rec)) in cases.into_iter().enumerate() {
        let what = format!("{b}x{h}x{w}x{c} qk={qk} r={rec}");
        let mut rng = Rng::new(100 + seed as u64);
        let config = CrissCrossConfig::new(c).qk_channels(qk).recurrence(rec);
        let params = random_params(&config, &mut rng);
        let block = CrissCrossAttention::from_parameters(config.clone(), params.clone()).unwrap();
        let x = images(&mut rng, (b, h, w, c));
        let r = images(&mut rng, (b, h, w, c));
        let (z, ctx) = block.forward_train(&x).unwrap();
        assert_eq!(bits(z.iter()), bits(block.forward_images(&x).unwrap().iter()), "{what}: training forward");
        let grads = block.backward(&ctx, &r).unwrap();
        let (step, tol) = (1e-3f32, |fd: f64| 2e-3 * fd.abs().max(1.0));
        for idx in (0..x.len()).step_by(7) {
            let fd = central_difference(
                |v| {
                    let mut xv = x.clone();
                    xv.as_slice_mut().unwrap()[idx] = v;
                    reference_loss(&config, &params, &xv, &r)
                },
                x.as_slice().unwrap()[idx],
                step,
            );
            let got = grads.input.as_slice().unwrap()[idx] as f64;
            assert!((fd - got).abs() <= tol(fd), "{what}: input[{idx}] fd {fd} vs {got}");
        }
        let named = grads.params.named();
        for (t, (name, grad)) in named.iter().enumerate() {
            let len = grad.len();
            let picks: Vec<usize> = if len == 0 { vec![] } else { vec![0, len / 3, len / 2, len - 1] };
            for idx in picks {
                let value = params.clone().trainable_mut()[t].1.iter().nth(idx).copied().unwrap();
                let fd = central_difference(
                    |v| {
                        let mut p = params.clone();
                        set_element(&mut p.trainable_mut()[t].1, idx, v);
                        reference_loss(&config, &p, &x, &r)
                    },
                    value,
                    step,
                );
                let got = grad.iter().nth(idx).copied().unwrap() as f64;
                assert!((fd - got).abs() <= tol(fd), "{what}: {name}[{idx}] fd {fd} vs {got}");
            }
        }
    }
}

/// Gradients that vanish in exact arithmetic come out 0 or within rounding of it: the key
/// bias shifts every energy of a query alike (exactly 0, on any map), and on a 1 × 1 map each
/// position is its only key, so the query and key convolutions get no gradient.
#[test]
fn gradients_that_vanish_in_exact_arithmetic_come_out_zero() {
    let mut rng = Rng::new(9);
    let largest = |g: &nonlocal::CrissCrossParameterGradients, name: &str| {
        let named = g.named();
        let (_, t) = named.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no gradient {name}"));
        t.iter().fold(0.0f32, |m, v| m.max(v.abs()))
    };
    for (h, w, rec) in [(1, 1, 3), (1, 7, 2), (6, 5, 2)] {
        let config = CrissCrossConfig::new(96).recurrence(rec);
        let mut params = random_params(&config, &mut rng);
        // Energies of tens of units.
        params.query.weight.mapv_inplace(|v| 3.0 * v);
        params.key.weight.mapv_inplace(|v| 3.0 * v);
        let block = CrissCrossAttention::from_parameters(config.clone(), params.clone()).unwrap();
        let x = images(&mut rng, (3, h, w, 96));
        let r = images(&mut rng, (3, h, w, 96));
        let (_, ctx) = block.forward_train(&x).unwrap();
        let grads = block.backward(&ctx, &r).unwrap();
        let scale = largest(&grads.params, "value_conv.weight");
        assert!(scale > 0.1, "{h}x{w}: the value gradient is not trivial ({scale})");
        assert_eq!(largest(&grads.params, "key_conv.bias"), 0.0, "{h}x{w}");
        if h * w == 1 {
            for name in ["query_conv.weight", "query_conv.bias", "key_conv.weight"] {
                let got = largest(&grads.params, name);
                assert!(got <= 1e-6 * scale, "one key: {name} gradient {got} (value_conv.weight's {scale})");
            }
        }
        // The reference agrees that the key bias does not move the loss.
        let fd = central_difference(
            |v| {
                let mut p = params.clone();
                p.key.bias.as_mut().unwrap()[0] = v;
                reference_loss(&config, &p, &x, &r)
            },
            params.key.bias.as_ref().unwrap()[0],
            1e-2,
        );
        assert!(fd.abs() < 1e-6, "{h}x{w}: the reference's loss moves with the key bias: {fd}");
    }
}

#[test]
fn gradient_bits_do_not_depend_on_thread_count() {
    let mut rng = Rng::new(7);
    let config = CrissCrossConfig::new(24).qk_channels(3).recurrence(2);
    let block = random_block(config, &mut rng);
    let x = images(&mut rng, (2, 20, 24, 24));
    let r = images(&mut rng, (2, 20, 24, 24));
    let runs = on_1_2_3_threads(|| {
        let (_, ctx) = block.forward_train(&x).unwrap();
        let g = block.backward(&ctx, &r).unwrap();
        let mut all = bits(g.input.iter());
        for (_, t) in g.params.named() {
            all.extend(bits(t.iter()));
        }
        all
    });
    assert_eq!(runs[0], runs[1], "1 vs 2 threads");
    assert_eq!(runs[0], runs[2], "1 vs 3 threads");
}

#[test]
fn gradient_names_and_shapes_are_mmcv_keys_and_pytorch_shapes() {
    let mut rng = Rng::new(8);
    let config = CrissCrossConfig::new(16);
    let mut block = random_block(config, &mut rng);
    let x = images(&mut rng, (1, 4, 5, 16));
    let (z, ctx) = block.forward_train(&x).unwrap();
    let grads = block.backward(&ctx, &z).unwrap();
    let named: Vec<(String, Vec<usize>)> =
        grads.params.named().into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
    let want: Vec<(String, Vec<usize>)> = [
        ("query_conv.weight", vec![2, 16, 1, 1]),
        ("query_conv.bias", vec![2]),
        ("key_conv.weight", vec![2, 16, 1, 1]),
        ("key_conv.bias", vec![2]),
        ("value_conv.weight", vec![16, 16, 1, 1]),
        ("value_conv.bias", vec![16]),
        ("gamma.scale", vec![]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    assert_eq!(named, want);
    // An SGD step by name equals the step applied by hand.
    let mut expected = block.parameters().clone();
    let lr = 0.05;
    expected.gamma -= lr * grads.params.gamma;
    expected.value.weight.scaled_add(-lr, &grads.params.value.weight);
    expected.query.bias.as_mut().unwrap().scaled_add(-lr, grads.params.query.bias.as_ref().unwrap());
    block
        .update_parameters(&grads.params, |name, mut p, g| {
            if matches!(name, "gamma.scale" | "value_conv.weight" | "query_conv.bias") {
                p.scaled_add(-lr, &g)
            }
        })
        .unwrap();
    assert_eq!(block.parameters(), &expected);
    // The old context is stale now.
    assert!(matches!(block.backward(&ctx, &z), Err(Error::StaleContext)));
}

#[test]
fn training_lowers_the_loss() {
    // Fit the block to a target made by other parameters: SGD steps on mean (z − t)²/2.
    let mut rng = Rng::new(9);
    let config = CrissCrossConfig::new(8).qk_channels(2).recurrence(2);
    let teacher = random_block(config.clone(), &mut rng);
    let mut student = random_block(config, &mut rng);
    let x = images(&mut rng, (2, 6, 7, 8));
    let target = teacher.forward_images(&x).unwrap();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let (z, ctx) = student.forward_train(&x).unwrap();
        let diff = &z - &target;
        let len = diff.len() as f32;
        losses.push(diff.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 2.0 / len as f64);
        let grads = student.backward(&ctx, &(diff / len)).unwrap();
        student.update_parameters(&grads.params, |_, mut p, g| p.scaled_add(-0.5, &g)).unwrap();
    }
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "every step lowers the loss: {losses:?}");
    assert!(losses[29] < 0.65 * losses[0], "losses {losses:?}");
}

#[test]
fn backward_refuses_a_wrong_gradient_shape() {
    let mut rng = Rng::new(10);
    let block = random_block(CrissCrossConfig::new(8), &mut rng);
    let x = images(&mut rng, (1, 3, 4, 8));
    let (_, ctx) = block.forward_train(&x).unwrap();
    let wrong = Array4::<f32>::zeros((1, 4, 3, 8));
    assert!(matches!(block.backward(&ctx, &wrong), Err(Error::WrongShape { .. })));
    // Clips train too, with gradients of the clip's shape.
    let clips = x.view().insert_axis(Axis(1));
    let (z, ctx) = block.forward_train(&clips).unwrap();
    assert_eq!(block.backward(&ctx, &z).unwrap().input.shape(), &[1, 1, 3, 4, 8]);
}

/// A safetensors file from (key, shape, values).
fn file_with(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> TensorFile {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, shape, _), b)| {
            (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).unwrap())
        })
        .collect();
    TensorFile::from_bytes(safetensors::serialize(views, None).unwrap()).unwrap()
}

/// The tensors of an mmcv checkpoint of `params`, under `prefix`.
fn checkpoint(params: &CrissCrossParameters, prefix: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for (stem, conv) in [("query_conv", &params.query), ("key_conv", &params.key), ("value_conv", &params.value)] {
        let (o, i) = conv.weight.dim();
        out.push((format!("{prefix}{stem}.weight"), vec![o, i, 1, 1], conv.weight.iter().copied().collect()));
        out.push((format!("{prefix}{stem}.bias"), vec![o], conv.bias.as_ref().unwrap().to_vec()));
    }
    out.push((format!("{prefix}gamma.scale"), vec![], vec![params.gamma]));
    out.push(("decode_head.conv_seg.weight".into(), vec![3, 2], vec![0.0; 6]));
    out
}

#[test]
fn checkpoints_load_under_a_prefix_and_every_bad_key_is_a_typed_error() {
    let mut rng = Rng::new(11);
    let config = CrissCrossConfig::new(16);
    let params = random_params(&config, &mut rng);
    let prefix = "decode_head.cca.";
    let keys = WeightKeys::mmcv().with_prefix(prefix);
    let good = checkpoint(&params, prefix);
    let block = CrissCrossAttention::from_checkpoint(config.clone(), &file_with(&good), &keys).unwrap();
    assert_eq!(block.parameters(), &params);
    assert_eq!(block.weight_keys(), Some(&keys));
    let load = |tensors: &[(String, Vec<usize>, Vec<f32>)], config: &CrissCrossConfig, keys: &WeightKeys| {
        CrissCrossAttention::from_checkpoint(config.clone(), &file_with(tensors), keys).unwrap_err()
    };
    // γ stored with shape (1) loads too.
    let mut one = good.clone();
    one[6].1 = vec![1];
    CrissCrossAttention::from_checkpoint(config.clone(), &file_with(&one), &keys).unwrap();
    // Other key schemes and missing prefixes.
    let e = load(&good, &config, &WeightKeys::alexhex7().with_prefix(prefix));
    assert!(matches!(&e, Error::InvalidConfig { reason } if reason.contains("mmcv")), "{e}");
    let e = load(&good, &config, &WeightKeys::mmcv());
    assert!(matches!(&e, Error::MissingKey { key } if key == "query_conv.weight"), "{e}");
    // Each key missing in turn.
    for skip in 0..7 {
        let mut t = good.clone();
        let gone = t.remove(skip).0;
        let e = load(&t, &config, &keys);
        assert!(matches!(&e, Error::MissingKey { key } if *key == gone), "{gone}: {e}");
    }
    // Wrong shapes: channels of another configuration, a weight without its 1x1, γ a vector.
    let e = load(&good, &CrissCrossConfig::new(16).qk_channels(4), &keys);
    assert!(
        matches!(&e, Error::WrongShape { key, expected, actual }
            if key == "decode_head.cca.query_conv.weight" && expected == &[4, 16, 1, 1] && actual == &[2, 16, 1, 1]),
        "{e}"
    );
    let e = load(&good, &CrissCrossConfig::new(24), &keys);
    assert!(matches!(&e, Error::WrongShape { .. }), "{e}");
    let mut flat = good.clone();
    flat[4].1 = vec![16, 16];
    let e = load(&flat, &config, &keys);
    assert!(matches!(&e, Error::WrongShape { key, .. } if key.ends_with("value_conv.weight")), "{e}");
    let mut bias = good.clone();
    bias[3] = (bias[3].0.clone(), vec![3], vec![0.0; 3]);
    let e = load(&bias, &config, &keys);
    assert!(matches!(&e, Error::WrongShape { key, .. } if key.ends_with("key_conv.bias")), "{e}");
    let mut gamma = good.clone();
    gamma[6] = (gamma[6].0.clone(), vec![2], vec![0.5, 0.5]);
    let e = load(&gamma, &config, &keys);
    assert!(matches!(&e, Error::WrongShape { key, .. } if key.ends_with("gamma.scale")), "{e}");
    // Non-finite values, named with the prefix.
    let mut nan = good.clone();
    nan[6].2 = vec![f32::NAN];
    let e = load(&nan, &config, &keys);
    assert!(matches!(&e, Error::InvalidParameter { key, .. } if key == "decode_head.cca.gamma.scale"), "{e}");
    let mut inf = good.clone();
    inf[5].2[3] = f32::INFINITY;
    let e = load(&inf, &config, &keys);
    assert!(matches!(&e, Error::InvalidParameter { key, .. } if key == "decode_head.cca.value_conv.bias"), "{e}");
    // A bad configuration comes first.
    let e = load(&good, &CrissCrossConfig::new(16).recurrence(0), &keys);
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
}

#[test]
fn bad_inputs_configurations_and_parameters_are_typed_errors() {
    let mut rng = Rng::new(12);
    let config = CrissCrossConfig::new(8);
    let block = random_block(config.clone(), &mut rng);
    let x4 = images(&mut rng, (2, 3, 4, 8));
    let x5 = x4.clone().insert_axis(Axis(1));
    // Ranks: images to forward_images, clips to forward, nothing else.
    assert!(matches!(block.forward(&x4), Err(Error::InputRank { actual: 4, .. })));
    assert!(matches!(block.forward_images(&x5), Err(Error::InputRank { actual: 5, .. })));
    assert!(matches!(block.forward_images(&ndarray::Array3::<f32>::zeros((2, 3, 8))), Err(Error::InputRank { .. })));
    let mut out4 = x4.clone();
    assert!(matches!(block.forward_into(&x4, &mut out4), Err(Error::InputRank { .. })));
    // Channels, with the channels-first hint.
    let channels_first = Array4::<f32>::zeros((2, 8, 3, 4));
    let e = block.forward_images(&channels_first).unwrap_err();
    assert!(matches!(e, Error::InputChannels { expected: 8, actual: 4, .. }), "{e}");
    assert!(e.to_string().contains("channels-first"), "{e}");
    // Empty axes.
    let e = block.forward_images(&Array4::<f32>::zeros((2, 0, 4, 8))).unwrap_err();
    assert!(matches!(e, Error::EmptyInput { axis: 1, name: "H", .. }), "{e}");
    let e = block.forward(&Array5::<f32>::zeros((0, 1, 3, 4, 8))).unwrap_err();
    assert!(matches!(e, Error::EmptyInput { axis: 0, name: "B", .. }), "{e}");
    // Clips of more than one frame: the block attends within one image.
    let e = block.forward(&Array5::<f32>::zeros((1, 2, 3, 4, 8))).unwrap_err();
    assert!(matches!(e, Error::LayoutMismatch { conv_dims: 2, grid: [2, 3, 4] }), "{e}");
    assert!(matches!(block.forward_train(&Array5::<f32>::zeros((1, 2, 3, 4, 8))), Err(Error::LayoutMismatch { .. })));
    // forward_into an output of another shape.
    let mut wrong = Array5::<f32>::zeros((2, 1, 3, 5, 8));
    assert!(matches!(block.forward_into(&x5, &mut wrong), Err(Error::WrongShape { .. })));
    // Sizes that cannot be held: a broadcast view claims 2^60 elements and no memory. Its
    // buffers fit the address space (5·2^59 bytes) but no machine: the allocation fails.
    let one = Array1::<f32>::zeros(8);
    let huge = one.broadcast((1 << 19, 1 << 19, 1 << 19, 8)).unwrap();
    assert!(
        matches!(block.forward_images(&huge), Err(Error::AllocationFailed { .. })),
        "{:?}",
        block.forward_images(&huge)
    );
    // 2^59 positions of 10 projection columns: the sizes overflow, nothing is allocated.
    let overflowing = one.broadcast((1 << 19, 1 << 20, 1 << 20, 8)).unwrap();
    assert!(matches!(block.forward_images(&overflowing), Err(Error::TooLarge { .. })));
    // Configurations.
    assert!(matches!(CrissCrossAttention::new(CrissCrossConfig::new(0)), Err(Error::InvalidConfig { .. })));
    assert!(matches!(CrissCrossAttention::new(config.clone().recurrence(0)), Err(Error::InvalidConfig { .. })));
    assert!(matches!(
        CrissCrossConfig::new(8).qk_channels(usize::MAX / 2).validate(),
        Err(Error::InvalidConfig { .. })
    ));
    // Parameters of the wrong shape or with non-finite values.
    let good = random_params(&config, &mut rng);
    let mut p = good.clone();
    p.query.weight = rng.matrix(2, 8, 1.0);
    let e = CrissCrossAttention::from_parameters(config.clone(), p).unwrap_err();
    assert!(
        matches!(&e, Error::WrongShape { key, expected, .. } if key == "query_conv.weight" && expected == &[1, 8]),
        "{e}"
    );
    let mut p = good.clone();
    p.value.bias = Some(rng.vector(7, 1.0));
    let e = CrissCrossAttention::from_parameters(config.clone(), p).unwrap_err();
    assert!(matches!(&e, Error::WrongShape { key, .. } if key == "value_conv.bias"), "{e}");
    let mut p = good.clone();
    p.key.weight[[0, 3]] = f32::NAN;
    let e = CrissCrossAttention::from_parameters(config.clone(), p).unwrap_err();
    assert!(matches!(&e, Error::InvalidParameter { key, .. } if key == "key_conv.weight"), "{e}");
    let mut p = good.clone();
    p.gamma = f32::INFINITY;
    let mut b = CrissCrossAttention::from_parameters(config.clone(), good.clone()).unwrap();
    assert!(matches!(b.set_parameters(p), Err(Error::InvalidParameter { .. })));
    assert_eq!(b.parameters(), &good, "a refused set_parameters leaves the block unchanged");
    // Convolutions without bias are fine.
    let mut p = good.clone();
    p.value.bias = None;
    let nb = CrissCrossAttention::from_parameters(config.clone(), p.clone()).unwrap();
    let want = reference::forward(&config, &p, x4.view());
    let (err, tol) = max_err(nb.forward_images(&x4).unwrap().iter(), want.iter());
    assert!(err <= tol, "no value bias: {err:.3e}");
    let (z, ctx) = nb.forward_train(&x4).unwrap();
    let names: Vec<String> = nb.backward(&ctx, &z).unwrap().params.named().into_iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n == "value_conv.bias"), "{names:?}");
    // update_parameters refuses gradients of another block.
    let (_, ctx) = b.forward_train(&x4).unwrap();
    let other = b.backward(&ctx, &x4).unwrap();
    let mut nb = nb;
    let e = nb.update_parameters(&other.params, |_, _, _| {}).unwrap_err();
    assert!(matches!(&e, Error::MissingKey { key } if key.starts_with("value_conv.bias")), "{e}");
}
