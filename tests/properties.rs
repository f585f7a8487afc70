//! Property tests on random small configurations in all four modes.

mod common;

use common::{bits, max_err, on_1_2_3_threads, random_params, reference, Rng};
use ndarray::{s, Array5, Axis};
use nonlocal::{Mode, NonLocalBlock, NonLocalConfig};
use proptest::prelude::*;

/// A random configuration and input shape that fits it.
#[derive(Clone, Debug)]
struct Case {
    config: NonLocalConfig,
    shape: (usize, usize, usize, usize, usize),
    seed: u64,
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::EmbeddedGaussian), Just(Mode::Gaussian), Just(Mode::DotProduct), Just(Mode::Concatenation)]
}

fn case(pooling: bool) -> impl Strategy<Value = Case> {
    let kernel = if pooling {
        prop_oneof![Just(Some([1, 2, 2])), Just(Some([2, 2, 2])), Just(Some([1, 1, 2])), Just(Some([1, 3, 1]))].boxed()
    } else {
        Just(None).boxed()
    };
    (
        mode(),
        1usize..10,
        1usize..6,
        kernel,
        any::<bool>(),
        any::<bool>(),
        1usize..4,
        0usize..3,
        0usize..5,
        0usize..5,
        any::<u64>(),
    )
        .prop_map(|(mode, c, ci, sub, bn, scale, b, dt, dh, dw, seed)| {
            let k = sub.unwrap_or([1, 1, 1]);
            let config =
                NonLocalConfig::new(c).inter_channels(ci).mode(mode).sub_sample(sub).bn_layer(bn).use_scale(scale);
            Case { config, shape: (b, k[0] + dt, k[1] + dh, k[2] + dw, c), seed }
        })
}

fn build(case: &Case) -> (NonLocalBlock, Array5<f32>) {
    let mut rng = Rng::new(case.seed);
    let params = random_params(&case.config, &mut rng);
    let block = NonLocalBlock::from_parameters(case.config.clone(), params).unwrap();
    let x = rng.input(case.shape, 1.5);
    (block, x)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fast_path_equals_reference(case in prop_oneof![case(true), case(false)]) {
        let (block, x) = build(&case);
        let (want, want_attention) = reference::forward(block.config(), block.parameters(), x.view());
        let got = block.forward(&x).unwrap();
        let (err, tol) = max_err(&got, &want);
        prop_assert!(err <= tol, "output error {} > {}", err, tol);
        let attention = block.attention(&x).unwrap();
        let (err, _) = max_err(&attention, &want_attention);
        prop_assert!(err <= 5e-5, "attention error {}", err);
    }

    #[test]
    fn permuting_positions_permutes_the_output(case in case(false), perm_seed in any::<u64>()) {
        let (block, x) = build(&case);
        let (b, t, h, w, c) = x.dim();
        let n = t * h * w;
        // A random permutation of the N positions (Fisher–Yates).
        let mut rng = Rng::new(perm_seed);
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            perm.swap(i, rng.range(0, i));
        }
        let flat = x.to_shape((b, n, c)).unwrap();
        let permuted = Array5::from_shape_vec((b, t, h, w, c), flat.select(Axis(1), &perm).iter().copied().collect()).unwrap();
        let z = block.forward(&x).unwrap();
        let z_perm = block.forward(&permuted).unwrap();
        let want = z.to_shape((b, n, c)).unwrap().select(Axis(1), &perm);
        let got = z_perm.to_shape((b, n, c)).unwrap().to_owned();
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let err = got.iter().zip(want.iter()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        prop_assert!(err <= 1e-5 * scale, "permutation error {}", err);
    }

    #[test]
    fn a_new_block_is_the_identity(case in prop_oneof![case(true), case(false)]) {
        // NonLocalBlock::new zeroes the last layer (BatchNorm γ = β = 0, or W_z): z = x exactly,
        // whatever the attention computes.
        let (_, x) = build(&case);
        let block = NonLocalBlock::new(case.config.clone()).unwrap();
        prop_assert_eq!(block.forward(&x).unwrap(), x);
    }

    #[test]
    fn a_zero_w_z_leaves_the_residual_and_the_batchnorm_shift(case in prop_oneof![case(true), case(false)]) {
        // With W_z's weight zero, z_i = x_i + shift per channel: the W_z bias through BatchNorm,
        // (b − μ)·γ/√(var + eps) + β (or b alone), in f64 here. Nothing of the attention leaks.
        let (block, x) = build(&case);
        let mut params = block.parameters().clone();
        params.w_z.weight.fill(0.0);
        let c = case.config.in_channels;
        let shift: Vec<f64> = (0..c)
            .map(|o| {
                let b = params.w_z.bias.as_ref().map_or(0.0, |b| b[o] as f64);
                match &params.bn {
                    Some(bn) => {
                        let s = bn.weight[o] as f64 / (bn.running_var[o] as f64 + case.config.bn_eps).sqrt();
                        (b - bn.running_mean[o] as f64) * s + bn.bias[o] as f64
                    }
                    None => b,
                }
            })
            .collect();
        let block = NonLocalBlock::from_parameters(case.config.clone(), params).unwrap();
        let z = block.forward(&x).unwrap();
        let mut want = x.mapv(f64::from);
        want.lanes_mut(Axis(4)).into_iter().for_each(|mut lane| lane.iter_mut().zip(&shift).for_each(|(v, s)| *v += s));
        let (err, _) = max_err(&z, &want);
        prop_assert!(err <= 1e-6 * (1.0 + want.iter().fold(0.0f64, |m, v| m.max(v.abs()))), "error {}", err);
    }

    #[test]
    fn bits_do_not_depend_on_thread_count(case in prop_oneof![case(true), case(false)]) {
        let (block, x) = build(&case);
        let runs = on_1_2_3_threads(|| bits(block.forward(&x).unwrap().iter()));
        prop_assert_eq!(&runs[0], &runs[1]);
        prop_assert_eq!(&runs[0], &runs[2]);
    }

    #[test]
    fn strided_views_equal_contiguous_copies(case in prop_oneof![case(true), case(false)], step in 1usize..3, offset in 0usize..2) {
        let (block, x) = build(&case);
        let (b, t, h, w, c) = x.dim();
        // Embed x in a larger array and take it back out as a strided view.
        let mut big = Array5::<f32>::from_elem((b, t, h * step + offset, w * step + offset, c + 2), f32::NAN);
        big.slice_mut(s![.., .., offset..;step, offset..;step, 1..c + 1]).assign(&x);
        let view = big.slice(s![.., .., offset..;step, offset..;step, 1..c + 1]);
        prop_assert_eq!(view.shape(), x.shape());
        prop_assert_eq!(block.forward(&view).unwrap(), block.forward(&x).unwrap());
    }
}

/// Larger shapes than the property tests reach, so that the parallel paths (several row
/// blocks, several query tiles) are covered by the thread-count check too.
#[test]
fn bits_do_not_depend_on_thread_count_at_larger_sizes() {
    for mode in Mode::ALL {
        let mut rng = Rng::new(41);
        let config = NonLocalConfig::new(24).mode(mode);
        let block = NonLocalBlock::from_parameters(config.clone(), random_params(&config, &mut rng)).unwrap();
        let x = rng.input((1, 3, 30, 34, 24), 1.0);
        let runs = on_1_2_3_threads(|| bits(block.forward(&x).unwrap().iter()));
        assert_eq!(runs[0], runs[1], "{mode}: 1 vs 2 threads");
        assert_eq!(runs[0], runs[2], "{mode}: 1 vs 3 threads");
    }
}
