//! The backward pass against central finite differences of the f64 reference, in every mode
//! with and without pooling and BatchNorm; plus determinism, stale contexts and weight export.

mod common;

use common::{bits, on_1_2_3_threads, random_params, reference, Rng};
use ndarray::{Array5, ArrayViewMutD};
use nonlocal::{Error, Mode, NonLocalBlock, NonLocalConfig, Parameters, TensorFile, WeightKeys};

/// L = Σ z ⊙ r in f64, from the reference implementation.
fn reference_loss(config: &NonLocalConfig, params: &Parameters, x: &Array5<f32>, r: &Array5<f32>) -> f64 {
    let (z, _) = reference::forward(config, params, x.view());
    z.iter().zip(r.iter()).map(|(a, &b)| a * b as f64).sum()
}

/// Central difference of the loss along one element, with the step actually taken in f32.
fn central_difference(mut loss_at: impl FnMut(f32) -> f64, value: f32, h: f32) -> f64 {
    let (up, down) = (value + h, value - h);
    (loss_at(up) - loss_at(down)) / (up as f64 - down as f64)
}

fn check_mode(mode: Mode, sub_sample: Option<[usize; 3]>, bn: bool, seed: u64) {
    let what = format!("{mode} sub_sample={sub_sample:?} bn={bn}");
    let mut rng = Rng::new(seed);
    let config = NonLocalConfig::new(5).inter_channels(3).mode(mode).sub_sample(sub_sample).bn_layer(bn);
    let params = random_params(&config, &mut rng);
    let block = NonLocalBlock::from_parameters(config.clone(), params.clone()).unwrap();
    let x = rng.input((2, 2, 4, 5, 5), 1.0);
    let r = rng.input((2, 2, 4, 5, 5), 1.0);
    let (z, ctx) = block.forward_train(&x).unwrap();
    // Dot product associates its products differently in inference (folded into W_z), so
    // the two forward passes agree to rounding, not to the bit.
    let z_inference = block.forward(&x).unwrap();
    let diff = z.iter().zip(z_inference.iter()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-5, "{what}: training forward differs by {diff}");
    let grads = block.backward(&ctx, &r).unwrap();
    // Concatenation's ReLU has kinks at a_i + b_j = 0: a wide step straddles some of the
    // N·M pairs and biases the difference (by ~4% at h = 1e-3 here), so step finely. The
    // reference runs in f64 and the step actually taken is used, so that is safe.
    let h = if mode == Mode::Concatenation { 1e-5f32 } else { 1e-3f32 };
    let tol = |fd: f64| 2e-3 * fd.abs().max(1.0);
    // The input: a spread of elements.
    for idx in (0..x.len()).step_by(37) {
        let mut xp = x.clone();
        let flat = xp.as_slice_mut().unwrap();
        let value = flat[idx];
        let fd = central_difference(
            |v| {
                let mut xv = x.clone();
                xv.as_slice_mut().unwrap()[idx] = v;
                reference_loss(&config, &params, &xv, &r)
            },
            value,
            h,
        );
        let got = grads.input.as_slice().unwrap()[idx] as f64;
        assert!((fd - got).abs() <= tol(fd), "{what}: input[{idx}] fd {fd} vs {got}");
    }
    // Every trainable tensor: a few elements each.
    let named = grads.params.named();
    let mut probe = params.clone();
    let names: Vec<String> = probe.trainable_mut().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, named.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), "{what}: gradient names");
    for (t, (name, grad)) in named.iter().enumerate() {
        let len = grad.len();
        for idx in [0, len / 2, len - 1] {
            let value = params.clone().trainable_mut()[t].1.iter().nth(idx).copied().unwrap();
            let fd = central_difference(
                |v| {
                    let mut p = params.clone();
                    set_element(&mut p.trainable_mut()[t].1, idx, v);
                    reference_loss(&config, &p, &x, &r)
                },
                value,
                h,
            );
            let got = grad.iter().nth(idx).copied().unwrap() as f64;
            assert!((fd - got).abs() <= tol(fd), "{what}: {name}[{idx}] fd {fd} vs {got}");
        }
    }
}

fn set_element(t: &mut ArrayViewMutD<'_, f32>, idx: usize, v: f32) {
    *t.iter_mut().nth(idx).unwrap() = v;
}

#[test]
fn gradients_match_finite_differences_in_every_configuration() {
    let mut seed = 100;
    for mode in Mode::ALL {
        for sub in [None, Some([1, 2, 2]), Some([2, 2, 2])] {
            for bn in [true, false] {
                check_mode(mode, sub, bn, seed);
                seed += 1;
            }
        }
    }
}

/// Largest |value| of a named parameter gradient.
fn largest(grads: &nonlocal::ParameterGradients, name: &str) -> f32 {
    let named = grads.named();
    let (_, g) = named.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no gradient {name}"));
    g.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Gradients that vanish in exact arithmetic come out 0 or within rounding of it, not as
/// noise of the size of the tolerance: with a single key the softmax weight is 1 whatever the
/// logits, so θ and φ get no gradient; in embedded Gaussian φ's bias shifts every logit of a
/// query alike, so its gradient is 0 with any number of keys. (The first read ~1e-4 of noise
/// at these sizes, against tolerances of 1e-4, while D_i came from the forward pass's y.)
#[test]
fn gradients_that_vanish_in_exact_arithmetic_come_out_zero() {
    let mut rng = Rng::new(7);
    // One key: clips of 2 frames of 9×9 pooled 2×9×9; logits made large.
    let config = NonLocalConfig::new(64).sub_sample(Some([2, 9, 9]));
    let mut params = random_params(&config, &mut rng);
    for conv in [params.theta.as_mut(), params.phi.as_mut()].into_iter().flatten() {
        conv.weight.mapv_inplace(|w| 4.0 * w);
    }
    let block = NonLocalBlock::from_parameters(config, params).unwrap();
    let x = rng.input((2, 2, 9, 9, 64), 1.0);
    let r = rng.input((2, 2, 9, 9, 64), 1.0);
    let (_, ctx) = block.forward_train(&x).unwrap();
    let grads = block.backward(&ctx, &r).unwrap();
    let scale = largest(&grads.params, "g.weight");
    assert!(scale > 1.0, "the value gradient is not trivial ({scale})");
    for name in ["theta.weight", "theta.bias", "phi.weight", "phi.bias"] {
        let got = largest(&grads.params, name);
        assert!(got <= 1e-6 * scale, "one key: {name} gradient {got} (g.weight's {scale})");
    }
    // φ's bias with many keys (several key tiles): exactly 0, as the reference shows.
    let config = NonLocalConfig::new(6).inter_channels(4).sub_sample(Some([1, 2, 2]));
    let params = random_params(&config, &mut rng);
    let block = NonLocalBlock::from_parameters(config.clone(), params.clone()).unwrap();
    let x = rng.input((1, 3, 24, 30, 6), 1.0);
    let r = rng.input((1, 3, 24, 30, 6), 1.0);
    let (_, ctx) = block.forward_train(&x).unwrap();
    let grads = block.backward(&ctx, &r).unwrap();
    assert_eq!(largest(&grads.params, "phi.bias"), 0.0);
    assert!(largest(&grads.params, "phi.weight") > 1e-3);
    let bias = params.phi.as_ref().unwrap().bias.as_ref().unwrap()[1];
    let fd = central_difference(
        |v| {
            let mut p = params.clone();
            p.phi.as_mut().unwrap().bias.as_mut().unwrap()[1] = v;
            reference_loss(&config, &p, &x, &r)
        },
        bias,
        1e-2,
    );
    assert!(fd.abs() < 1e-6, "the reference's loss moves with φ's bias: {fd}");
}

/// The output and every gradient, bit for bit, on 1, 2 and 3 threads, channels-last and
/// channels-first.
#[test]
fn gradient_bits_do_not_depend_on_thread_count() {
    for mode in Mode::ALL {
        for channels_first in [false, true] {
            let mut rng = Rng::new(7);
            let config = NonLocalConfig::new(12).mode(mode);
            let block = NonLocalBlock::from_parameters(config.clone(), random_params(&config, &mut rng)).unwrap();
            // 2·20·24 = 960 queries: several query tiles and backward chunks.
            let shape = if channels_first { (1, 12, 2, 20, 24) } else { (1, 2, 20, 24, 12) };
            let x = rng.input(shape, 1.0);
            let r = rng.input(shape, 1.0);
            let runs = on_1_2_3_threads(|| {
                let (z, g) = if channels_first {
                    let (z, ctx) = block.forward_train_channels_first(&x).unwrap();
                    (z, block.backward_channels_first(&ctx, &r).unwrap())
                } else {
                    let (z, ctx) = block.forward_train(&x).unwrap();
                    (z, block.backward(&ctx, &r).unwrap())
                };
                let mut all = bits(z.iter());
                all.extend(bits(g.input.iter()));
                for (_, t) in g.params.named() {
                    all.extend(bits(t.iter()));
                }
                all
            });
            let what = if channels_first { "channels-first" } else { "channels-last" };
            assert_eq!(runs[0], runs[1], "{mode} {what}: 1 vs 2 threads");
            assert_eq!(runs[0], runs[2], "{mode} {what}: 1 vs 3 threads");
        }
    }
}

#[test]
fn stale_context_and_wrong_gradient_shape_are_errors() {
    let mut rng = Rng::new(3);
    let config = NonLocalConfig::new(4);
    let mut block = NonLocalBlock::from_parameters(config.clone(), random_params(&config, &mut rng)).unwrap();
    let x = rng.input((1, 1, 4, 4, 4), 1.0);
    let (z, ctx) = block.forward_train(&x).unwrap();
    let wrong = Array5::<f32>::zeros((1, 1, 4, 2, 4));
    assert!(matches!(block.backward(&ctx, &wrong), Err(Error::WrongShape { .. })));
    block.set_parameters(random_params(&config, &mut rng)).unwrap();
    assert!(matches!(block.backward(&ctx, &z), Err(Error::StaleContext)));
}

#[test]
fn update_parameters_pairs_gradients_by_name() {
    let mut rng = Rng::new(13);
    for mode in Mode::ALL {
        let config = NonLocalConfig::new(6).inter_channels(3).mode(mode);
        let mut block = NonLocalBlock::from_parameters(config.clone(), random_params(&config, &mut rng)).unwrap();
        let x = rng.input((2, 2, 4, 4, 6), 1.0);
        let r = rng.input((2, 2, 4, 4, 6), 1.0);
        let (_, ctx) = block.forward_train(&x).unwrap();
        let grads = block.backward(&ctx, &r).unwrap();
        // The same SGD step through a cloned Parameters and set_parameters, paired by name.
        let mut expected = block.parameters().clone();
        let named = grads.params.named();
        for (name, mut p) in expected.trainable_mut() {
            let (_, g) = named.iter().find(|(n, _)| *n == name).unwrap();
            p.zip_mut_with(g, |p, &g| *p -= 0.1 * g);
        }
        let mut reference_block = block.clone();
        reference_block.set_parameters(expected.clone()).unwrap();
        let mut seen = Vec::new();
        block
            .update_parameters(&grads.params, |name, mut p, g| {
                assert_eq!(p.shape(), g.shape(), "{mode}: {name}");
                seen.push(name.to_string());
                p.scaled_add(-0.1, &g);
            })
            .unwrap();
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(seen, names, "{mode}: every trainable tensor once, in order");
        assert_eq!(block.parameters(), &expected, "{mode}: parameters");
        // The prepared state follows: outputs equal a block built from the new parameters.
        assert_eq!(block.forward(&x).unwrap(), reference_block.forward(&x).unwrap(), "{mode}: output");
        assert!(matches!(block.backward(&ctx, &r), Err(Error::StaleContext)), "{mode}: stale context");
    }
}

#[test]
fn update_parameters_rejects_gradients_of_another_block() {
    let mut rng = Rng::new(17);
    let config = NonLocalConfig::new(6).inter_channels(3);
    let mut block = NonLocalBlock::from_parameters(config.clone(), random_params(&config, &mut rng)).unwrap();
    let before = block.parameters().clone();
    let grads_of = |config: NonLocalConfig, rng: &mut Rng| {
        let block = NonLocalBlock::from_parameters(config.clone(), random_params(&config, rng)).unwrap();
        let x = rng.input((1, 1, 4, 4, config.in_channels), 1.0);
        let (z, ctx) = block.forward_train(&x).unwrap();
        block.backward(&ctx, &z).unwrap().params
    };
    let never = |_: &str, _: ndarray::ArrayViewMutD<'_, f32>, _: ndarray::ArrayViewD<'_, f32>| panic!("called");
    // Gaussian mode has no θ, φ gradients: the first missing one is named.
    let gaussian = grads_of(config.clone().mode(Mode::Gaussian), &mut rng);
    let err = block.update_parameters(&gaussian, never).unwrap_err();
    assert!(matches!(&err, Error::MissingKey { key } if key.starts_with("theta.weight")), "{err}");
    // BatchNorm gradients for a block without BatchNorm: extra gradients are named too.
    let mut no_bn = NonLocalBlock::from_parameters(
        config.clone().bn_layer(false),
        random_params(&config.clone().bn_layer(false), &mut rng),
    )
    .unwrap();
    let with_bn = grads_of(config.clone(), &mut rng);
    let err = no_bn.update_parameters(&with_bn, never).unwrap_err();
    assert!(matches!(&err, Error::MissingKey { key } if key.starts_with("bn.")), "{err}");
    // Other channel counts: the shapes differ.
    let wider = grads_of(NonLocalConfig::new(8).inter_channels(3), &mut rng);
    let err = block.update_parameters(&wider, never).unwrap_err();
    assert!(matches!(&err, Error::WrongShape { key, .. } if key == "theta.weight"), "{err}");
    assert_eq!(block.parameters(), &before, "nothing changed");
    // A diverging step is reported, naming the tensor.
    let own = grads_of(config, &mut rng);
    let err = block
        .update_parameters(&own, |name, mut p, _| {
            if name == "g.bias" {
                p.fill(f32::NAN)
            }
        })
        .unwrap_err();
    assert!(matches!(&err, Error::InvalidParameter { key, .. } if key == "g.bias"), "{err}");
}

#[test]
fn export_round_trips_under_the_loaded_keys() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for (file, keys, config) in [
        ("eg_video.safetensors", WeightKeys::alexhex7(), NonLocalConfig::new(8).inter_channels(4)),
        (
            "eg_checkpoint_prefix.safetensors",
            WeightKeys::mmcv().with_prefix("backbone.layer3.1.non_local_block."),
            NonLocalConfig::new(8).inter_channels(4).use_scale(true).conv_dims(2),
        ),
        (
            "concat_mmcv.safetensors",
            WeightKeys::mmcv(),
            NonLocalConfig::new(8).inter_channels(4).mode(Mode::Concatenation),
        ),
        (
            "gauss_nopool.safetensors",
            WeightKeys::alexhex7(),
            NonLocalConfig::new(6).inter_channels(3).mode(Mode::Gaussian).sub_sample(None).bn_layer(false),
        ),
    ] {
        let original = TensorFile::open(dir.join(file)).unwrap();
        let block = NonLocalBlock::from_checkpoint(config.clone(), &original, &keys).unwrap();
        let exported = TensorFile::from_bytes(block.to_safetensors().unwrap()).unwrap();
        // Exactly the parameter keys of the original (not its input/output or other tensors).
        let param_keys: Vec<&str> = original
            .keys()
            .into_iter()
            .filter(|k| k.starts_with(&keys.prefix) && !["input", "output", "attention"].contains(k))
            .collect();
        assert_eq!(exported.keys(), param_keys, "{file}: exported keys");
        for key in exported.keys() {
            assert_eq!(exported.shape(key).unwrap(), original.shape(key).unwrap(), "{file}: {key} shape");
            if !key.ends_with("num_batches_tracked") {
                assert_eq!(exported.tensor(key).unwrap(), original.tensor(key).unwrap(), "{file}: {key} values");
            }
        }
        let reloaded = NonLocalBlock::from_checkpoint(config, &exported, &keys).unwrap();
        assert_eq!(reloaded.parameters(), block.parameters(), "{file}: round trip");
    }
}

#[test]
fn export_converts_between_key_schemes() {
    let mut rng = Rng::new(21);
    for (bn, mode) in [(false, Mode::EmbeddedGaussian), (true, Mode::Concatenation), (false, Mode::Gaussian)] {
        let config =
            NonLocalConfig::new(6).inter_channels(3).mode(mode).bn_layer(bn).conv_dims(1).sub_sample(Some([1, 1, 2]));
        let block = NonLocalBlock::from_parameters(config.clone(), random_params(&config, &mut rng)).unwrap();
        let x = rng.input((1, 1, 1, 10, 6), 1.0);
        let keys = WeightKeys::mmcv().with_prefix("neck.nl.");
        let file = TensorFile::from_bytes(block.to_safetensors_with_keys(&keys).unwrap()).unwrap();
        assert_eq!(nonlocal::detect_naming(&file, "neck.nl.").unwrap(), nonlocal::Naming::Mmcv);
        // mmcv's conv_out has a bias exactly when no BatchNorm follows: the random parameters
        // always carry one, which is folded into the BatchNorm's running mean when it follows.
        assert_eq!(file.contains("neck.nl.conv_out.conv.bias"), !bn);
        assert_eq!(file.contains("neck.nl.conv_out.bn.weight"), bn);
        assert_eq!(file.shape("neck.nl.g.0.conv.weight").unwrap(), &[3, 6, 1]);
        let loaded = NonLocalBlock::from_checkpoint(config, &file, &keys).unwrap();
        assert_eq!(loaded.weight_keys(), Some(&keys));
        let (got, want) = (loaded.forward(&x).unwrap(), block.forward(&x).unwrap());
        if bn {
            // The same function; the folded shift may round differently in its last bit.
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err <= 1e-6 * want.iter().fold(1.0f32, |m, v| m.max(v.abs())), "fold changed the output by {err}");
            let bias = block.parameters().w_z.bias.as_ref().unwrap();
            let mean = block.parameters().bn.as_ref().unwrap().running_mean.clone();
            let folded = loaded.parameters().bn.as_ref().unwrap().running_mean.clone();
            assert_eq!(folded, &mean - bias);
            assert!(loaded.parameters().w_z.bias.is_none());
        } else {
            assert_eq!(got, want);
        }
    }
}

/// The largest difference between two equally shaped f32 arrays, relative to the larger
/// magnitude in `want` (at least 1).
fn rel_diff<D: ndarray::Dimension>(got: &ndarray::ArrayView<'_, f32, D>, want: &ndarray::ArrayView<'_, f32, D>) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    got.iter().zip(want.iter()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

#[test]
fn channels_first_training_matches_channels_last() {
    // (C, C', grid): odd sizes (pooling floors) and one large enough for the parallel GEMMs.
    let shapes = [(7, 3, [3, 5, 7]), (64, 32, [2, 9, 13])];
    let mut seed = 300;
    for mode in Mode::ALL {
        for sub in [None, Some([1, 2, 2]), Some([2, 2, 2])] {
            for &(c, ci, [t, h, w]) in &shapes {
                seed += 1;
                let what = format!("{mode} sub_sample={sub:?} C={c}");
                let mut rng = Rng::new(seed);
                let config = NonLocalConfig::new(c).inter_channels(ci).mode(mode).sub_sample(sub);
                let block = NonLocalBlock::from_parameters(config.clone(), random_params(&config, &mut rng)).unwrap();
                let x = rng.input((2, t, h, w, c), 1.0);
                let r = rng.input((2, t, h, w, c), 1.0);
                let to_cf = |a: &Array5<f32>| a.view().permuted_axes([0, 4, 1, 2, 3]).as_standard_layout().to_owned();
                let (x_cf, r_cf) = (to_cf(&x), to_cf(&r));
                let (z, ctx) = block.forward_train(&x).unwrap();
                let want = block.backward(&ctx, &r).unwrap();
                let (z_cf, ctx_cf) = block.forward_train_channels_first(&x_cf).unwrap();
                let z_back = z_cf.view().permuted_axes([0, 2, 3, 4, 1]);
                let d = rel_diff(&z_back, &z.view());
                assert!(d <= 1e-6, "{what}: output differs by {d}");
                // A strided channels-first view (of the channels-last array) gives the same bits.
                let (z_view, _) = block.forward_train_channels_first(&x.view().permuted_axes([0, 4, 1, 2, 3])).unwrap();
                assert_eq!(bits(z_view.iter()), bits(z_cf.iter()), "{what}: strided input");
                let check = |got: &nonlocal::Gradients<ndarray::Ix5>, channels_first: bool, how: &str| {
                    let input =
                        if channels_first { got.input.view().permuted_axes([0, 2, 3, 4, 1]) } else { got.input.view() };
                    let d = rel_diff(&input, &want.input.view());
                    assert!(d <= 1e-6, "{what} {how}: input gradient differs by {d}");
                    for ((name, g), (_, w)) in got.params.named().iter().zip(want.params.named()) {
                        let d = rel_diff(&g.view(), &w.view());
                        assert!(d <= 1e-6, "{what} {how}: {name} gradient differs by {d}");
                    }
                };
                let got = block.backward_channels_first(&ctx_cf, &r_cf).unwrap();
                check(&got, true, "channels-first");
                // Each backward takes either forward's context, and strided gradients.
                check(&block.backward(&ctx_cf, &r).unwrap(), false, "channels-first context, channels-last gradient");
                let r_view = r.view().permuted_axes([0, 4, 1, 2, 3]);
                let mixed = block.backward_channels_first(&ctx, &r_view).unwrap();
                check(&mixed, true, "channels-last context, strided channels-first gradient");
                assert_eq!(bits(mixed.input.iter()), bits(got.input.iter()), "{what}: context layout changes bits");
            }
        }
    }
}

#[test]
fn channels_first_training_errors() {
    let mut rng = Rng::new(5);
    let config = NonLocalConfig::new(4);
    let mut block = NonLocalBlock::from_parameters(config.clone(), random_params(&config, &mut rng)).unwrap();
    let x = rng.input((1, 4, 2, 4, 4), 1.0);
    let (z, ctx) = block.forward_train_channels_first(&x).unwrap();
    let wrong = Array5::<f32>::zeros((1, 4, 2, 4, 2));
    match block.backward_channels_first(&ctx, &wrong) {
        Err(Error::WrongShape { expected, actual, .. }) => {
            assert_eq!((expected, actual), (vec![1, 4, 2, 4, 4], vec![1, 4, 2, 4, 2]));
        }
        other => panic!("wrong gradient shape: {other:?}"),
    }
    // A channels-first gradient is the wrong shape for the channels-last backward.
    assert!(matches!(block.backward(&ctx, &z), Err(Error::WrongShape { .. })));
    assert!(matches!(
        block.forward_train_channels_first(&x.view().permuted_axes([0, 2, 3, 4, 1])),
        Err(Error::InputChannels { .. })
    ));
    block.set_parameters(random_params(&config, &mut rng)).unwrap();
    assert!(matches!(block.backward_channels_first(&ctx, &z), Err(Error::StaleContext)));
}
