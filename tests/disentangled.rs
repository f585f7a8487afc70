//! The disentangled non-local block (DNLNet) against its f64 reference on random shapes, its
//! gradients against finite differences of that reference, and its errors. The upstream
//! module's own cases (mmsegmentation) run in tests/golden.rs.

mod common;

use common::{bits, max_err, on_1_2_3_threads, random_params, reference, Rng};
use ndarray::{s, Array1, Array5, Axis};
use nonlocal::{
    Conv1x1, DisentangledConfig, DisentangledNonLocal, Error, Mode, NonLocalConfig, TensorFile, WeightKeys,
};

fn config(mode: Mode, c: usize, ci: usize, bn: bool, use_scale: bool, temperature: f32) -> DisentangledConfig {
    let non_local =
        NonLocalConfig::mmcv(c).inter_channels(ci).mode(mode).bn_layer(bn).use_scale(use_scale).conv_dims(2);
    DisentangledConfig::mmseg(c).non_local(non_local).temperature(temperature)
}

fn random_block(config: &DisentangledConfig, rng: &mut Rng) -> DisentangledNonLocal {
    let params = random_params(&config.non_local, rng);
    let c = config.non_local.in_channels;
    let mask = Conv1x1::new(rng.matrix(1, c, 1.0), Some(Array1::from_elem(1, 0.3)));
    DisentangledNonLocal::from_parameters(config.clone(), params, mask).unwrap()
}

fn assert_matches_reference(block: &DisentangledNonLocal, x: &Array5<f32>, what: &str) {
    let cfg = block.config();
    let want = reference::disentangled_forward(
        &cfg.non_local,
        block.parameters(),
        block.conv_mask(),
        cfg.temperature as f64,
        x.view(),
    );
    let got = block.forward(x).unwrap();
    let (err, tol) = max_err(&got, &want);
    assert!(err <= tol, "{what}: error {err:.3e} > {tol:.3e}");
}

#[test]
fn matches_the_reference_on_random_shapes_and_layouts() {
    let mut rng = Rng::new(1);
    for (mode, c, ci, bn, scale, t) in [
        (Mode::EmbeddedGaussian, 8, 4, true, true, 0.05),
        (Mode::EmbeddedGaussian, 7, 3, false, false, 0.5),
        (Mode::EmbeddedGaussian, 12, 5, true, true, 1.0),
        (Mode::DotProduct, 8, 4, true, true, 0.05),
        (Mode::DotProduct, 5, 6, false, false, 0.1),
    ] {
        let cfg = config(mode, c, ci, bn, scale, t);
        let block = random_block(&cfg, &mut rng);
        for (b, h, w) in [(1, 1, 1), (2, 5, 7), (1, 9, 1), (3, 4, 4), (1, 13, 11)] {
            let x = rng.input((b, 1, h, w, c), 1.5);
            assert_matches_reference(&block, &x, &format!("{mode} c={c} {b}x{h}x{w}"));
        }
        // Strided and permuted views give the contiguous result bit for bit.
        let x = rng.input((2, 1, 6, 5, c), 1.0);
        let want = block.forward(&x).unwrap();
        let mut big = Array5::<f32>::from_elem((2, 1, 12, 5, c + 3), f32::NAN);
        big.slice_mut(s![.., .., ..;2, .., 1..c + 1]).assign(&x);
        let view = big.slice(s![.., .., ..;2, .., 1..c + 1]);
        assert_eq!(bits(block.forward(&view).unwrap().iter()), bits(want.iter()), "{mode}: strided");
        let images = x.index_axis(Axis(1), 0);
        let fortran = images.to_owned().reversed_axes();
        let back = fortran.view().reversed_axes();
        assert_eq!(bits(block.forward_images(&back).unwrap().iter()), bits(want.iter()), "{mode}: permuted");
        let runs = on_1_2_3_threads(|| bits(block.forward(&x).unwrap().iter()));
        assert!(runs.windows(2).all(|w| w[0] == w[1]), "{mode}: thread count");
    }
}

/// L = Σ z ⊙ r in f64, from the reference.
fn loss(block: &DisentangledNonLocal, x: &Array5<f32>, r: &Array5<f32>) -> f64 {
    let cfg = block.config();
    let z = reference::disentangled_forward(
        &cfg.non_local,
        block.parameters(),
        block.conv_mask(),
        cfg.temperature as f64,
        x.view(),
    );
    z.iter().zip(r).map(|(a, &b)| a * b as f64).sum()
}

#[test]
fn gradients_match_finite_differences_of_the_reference() {
    let mut rng = Rng::new(2);
    for (mode, bn, t) in
        [(Mode::EmbeddedGaussian, true, 0.5), (Mode::EmbeddedGaussian, false, 1.0), (Mode::DotProduct, true, 1.0)]
    {
        let cfg = config(mode, 5, 3, bn, true, t);
        let block = random_block(&cfg, &mut rng);
        let x = rng.input((2, 1, 3, 4, 5), 1.0);
        let r = rng.input((2, 1, 3, 4, 5), 1.0);
        let (_, ctx) = block.forward_train(&x).unwrap();
        let grads = block.backward(&ctx, &r).unwrap();
        let h = 1e-2f32;
        let check = |got: f32, fd: f64, what: &str| {
            assert!((got as f64 - fd).abs() <= 2e-3 * (1.0 + fd.abs()), "{mode} bn={bn}: {what}: {got} vs {fd}");
        };
        // The input, at a few positions.
        for idx in [[0, 0, 0, 0, 0], [1, 0, 2, 3, 4], [0, 0, 1, 2, 1]] {
            let at = |v: f32| {
                let mut x2 = x.clone();
                x2[idx] = v;
                loss(&block, &x2, &r)
            };
            let fd = (at(x[idx] + h) - at(x[idx] - h)) / (2.0 * h as f64);
            check(grads.input[idx], fd, &format!("input {idx:?}"));
        }
        // Every parameter tensor, first element; the mask's weight.
        let mut params = block.parameters().clone();
        for (name, grad) in grads.params.named() {
            let first = grad.iter().next().copied().unwrap();
            let value =
                params.trainable_mut().into_iter().find(|(n, _)| *n == name).unwrap().1.iter().next().copied().unwrap();
            let at = |v: f32| {
                let mut p = params.clone();
                *p.trainable_mut().into_iter().find(|(n, _)| *n == name).unwrap().1.iter_mut().next().unwrap() = v;
                let b = DisentangledNonLocal::from_parameters(cfg.clone(), p, block.conv_mask().clone()).unwrap();
                loss(&b, &x, &r)
            };
            let fd = (at(value + h) - at(value - h)) / (2.0 * h as f64);
            check(first, fd, &name);
        }
        params = block.parameters().clone();
        for (i, &got) in grads.conv_mask.weight.iter().enumerate().take(3) {
            let at = |v: f32| {
                let mut mask = block.conv_mask().clone();
                mask.weight[[0, i]] = v;
                let b = DisentangledNonLocal::from_parameters(cfg.clone(), params.clone(), mask).unwrap();
                loss(&b, &x, &r)
            };
            let w = block.conv_mask().weight[[0, i]];
            check(got, (at(w + h) - at(w - h)) / (2.0 * h as f64), &format!("conv_mask.weight[{i}]"));
        }
        // A softmax ignores a shift: the mask's bias gets no gradient, nor do θ's and φ's biases.
        let zero = |v: &f32| v.abs() < 1e-5;
        assert!(grads.conv_mask.bias.as_ref().unwrap().iter().all(zero), "{mode}: mask bias");
        assert!(grads.params.theta.as_ref().unwrap().bias.as_ref().unwrap().iter().all(zero), "{mode}: θ bias");
        // Bits do not depend on the thread count.
        let runs = on_1_2_3_threads(|| {
            let (_, ctx) = block.forward_train(&x).unwrap();
            let g = block.backward(&ctx, &r).unwrap();
            bits(g.input.iter().chain(g.conv_mask.weight.iter()))
        });
        assert!(runs.windows(2).all(|w| w[0] == w[1]), "{mode}: thread count");
    }
}

#[test]
fn training_steps_reduce_the_loss_and_update_every_part() {
    let mut rng = Rng::new(3);
    let cfg = config(Mode::EmbeddedGaussian, 6, 3, true, true, 0.5);
    let mut block = random_block(&cfg, &mut rng);
    let x = rng.input((2, 1, 4, 5, 6), 1.0);
    let target = x.mapv(|v| 0.5 * v);
    let loss = |z: &Array5<f32>| (z - &target).mapv(|d| d * d).sum();
    let mask_before = block.conv_mask().weight.clone();
    let (z, ctx) = block.forward_train(&x).unwrap();
    let before = loss(&z);
    let grads = block.backward(&ctx, &((&z - &target) * 2.0)).unwrap();
    block.update_parameters(&grads, |_, mut p, g| p.scaled_add(-1e-3, &g)).unwrap();
    let after = loss(&block.forward(&x).unwrap());
    assert!(after < before, "{after} >= {before}");
    assert_ne!(block.conv_mask().weight, mask_before);
    // The old context is stale now.
    assert!(matches!(block.backward(&ctx, &z), Err(Error::StaleContext)));
}

#[test]
fn errors_are_typed() {
    // Modes and settings the upstream block does not have.
    for bad in [
        config(Mode::Gaussian, 4, 2, true, true, 0.05),
        config(Mode::EmbeddedGaussian, 4, 2, true, true, 0.0),
        config(Mode::EmbeddedGaussian, 4, 2, true, true, f32::NAN),
    ] {
        assert!(matches!(DisentangledNonLocal::new(bad), Err(Error::InvalidConfig { .. })));
    }
    let mut pooled = config(Mode::EmbeddedGaussian, 4, 2, true, true, 0.05);
    pooled.non_local.sub_sample = Some([1, 2, 2]);
    assert!(matches!(DisentangledNonLocal::new(pooled), Err(Error::InvalidConfig { .. })));
    // A mask of the wrong shape.
    let cfg = config(Mode::EmbeddedGaussian, 4, 2, true, true, 0.05);
    let mut rng = Rng::new(4);
    let params = random_params(&cfg.non_local, &mut rng);
    let mask = Conv1x1::new(rng.matrix(1, 5, 1.0), None);
    assert!(matches!(DisentangledNonLocal::from_parameters(cfg.clone(), params, mask), Err(Error::WrongShape { .. })));
    // A clip of two frames is not an image map; channels-first input is named.
    let block = DisentangledNonLocal::new(cfg.clone()).unwrap();
    assert!(matches!(block.forward(&Array5::<f32>::zeros((1, 2, 3, 3, 4))), Err(Error::LayoutMismatch { .. })));
    assert!(matches!(
        block.forward_images(&ndarray::Array4::<f32>::zeros((1, 4, 3, 5))),
        Err(Error::InputChannels { .. })
    ));
    // Loading: mmcv's keys only, and the mask's keys are required.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/family/dnl_mmseg.safetensors");
    let file = TensorFile::open(path).unwrap();
    let cfg16 = config(Mode::EmbeddedGaussian, 16, 8, true, true, 0.05);
    assert!(DisentangledNonLocal::from_checkpoint(cfg16.clone(), &file, &WeightKeys::mmcv()).is_ok());
    assert!(matches!(
        DisentangledNonLocal::from_checkpoint(cfg16.clone(), &file, &WeightKeys::alexhex7()),
        Err(Error::ConfigMismatch { what: "naming", .. })
    ));
    // The same file without conv_mask: a plain mmcv NonLocal2d.
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st.tensors().into_iter().filter(|(k, _)| !k.starts_with("conv_mask")).collect();
    let plain = TensorFile::from_bytes(safetensors::serialize(kept, None).unwrap()).unwrap();
    assert!(matches!(
        DisentangledNonLocal::from_checkpoint(cfg16, &plain, &WeightKeys::mmcv()),
        Err(Error::MissingKey { ref key }) if key == "conv_mask.weight"
    ));
}
