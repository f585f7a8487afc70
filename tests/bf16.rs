//! `Precision::Bf16` and `Precision::Bf16Logits` at the block level: every mode against the f64
//! reference within a stated bound on random shapes (wide channels and many keys among them),
//! bit-identical for any thread count, and training and attention maps exactly the f32 block's.

mod common;

use common::{bits, max_err, on_1_2_3_threads, random_params, reference, Rng};
use ndarray::Array5;
use nonlocal::{Mode, NonLocalBlock, NonLocalConfig, Precision};

/// The bound these tests hold bf16 blocks to: `max |z − z_ref| ≤ BOUND · max(1, max |z_ref|)`,
/// twice the floor of the golden accuracy contract (4e-3).
const BOUND: f64 = 8e-3;

/// An input shape (B, T, H, W, C).
type Shape = (usize, usize, usize, usize, usize);

/// The bound for [`Precision::Bf16Logits`] blocks, which round the logits' operands as
/// PyTorch's autocast does: twice [`BOUND`] (their worst here is 3.2e-3, in Gaussian mode).
const LOGITS_BOUND: f64 = 1.6e-2;

/// The bf16 precisions and the bound each is held to here.
const BF16_PRECISIONS: [(Precision, f64); 2] = [(Precision::Bf16, BOUND), (Precision::Bf16Logits, LOGITS_BOUND)];

/// A random block in f32 and in `precision` (the same parameters).
fn pair_in(config: NonLocalConfig, seed: u64, precision: Precision) -> [NonLocalBlock; 2] {
    let mut rng = Rng::new(seed);
    let params = random_params(&config, &mut rng);
    let f32_block = NonLocalBlock::from_parameters(config.clone(), params.clone()).expect("valid parameters");
    let bf16_block = NonLocalBlock::from_parameters(config.precision(precision), params).expect("valid parameters");
    [f32_block, bf16_block]
}

/// Configurations and shapes: every mode, odd channel counts, pooling or not, batches, a wide
/// block and one with many keys, large logits.
fn cases() -> Vec<(NonLocalConfig, Shape, f32)> {
    let mut out = Vec::new();
    let mut rng = Rng::new(0xBF16);
    for mode in Mode::ALL {
        for (c, ci, sub, shape, amp) in [
            (7, 3, Some([1, 2, 2]), (2, 2, 5, 7, 7), 1.0),
            (16, 8, None, (1, 1, 9, 6, 16), 1.5),
            (33, 17, Some([2, 2, 2]), (1, 4, 6, 5, 33), 1.0),
            // Wide: 96 channels (logits up to tens without scaling).
            (96, 48, Some([1, 2, 2]), (1, 2, 10, 10, 96), 1.2),
            // Many keys: 1320 of them.
            (24, 12, Some([1, 2, 2]), (1, 3, 40, 44, 24), 1.0),
        ] {
            let config = NonLocalConfig::new(c)
                .inter_channels(ci)
                .mode(mode)
                .sub_sample(sub)
                .use_scale(rng.range(0, 1) == 1)
                .bn_layer(rng.range(0, 3) != 0);
            out.push((config, shape, amp));
        }
    }
    out
}

#[test]
fn bf16_blocks_are_within_the_bound_of_the_f64_reference_in_every_mode() {
    let mut worst = [0.0f64; BF16_PRECISIONS.len()];
    for (i, (config, shape, amp)) in cases().into_iter().enumerate() {
        let x = Rng::new(200 + i as u64).input(shape, amp);
        let mut want = None;
        for (k, (precision, bound)) in BF16_PRECISIONS.into_iter().enumerate() {
            let what = format!(
                "{precision} {:?} C={} C'={} {:?} {shape:?}",
                config.mode, config.in_channels, config.inter_channels, config.sub_sample
            );
            let [f32_block, bf16_block] = pair_in(config.clone(), 100 + i as u64, precision);
            // The same parameters for every precision: one reference.
            let want = want.get_or_insert_with(|| reference::forward(&config, f32_block.parameters(), x.view()).0);
            let got = bf16_block.forward(&x).expect("forward");
            let (err, tol) = max_err(&got, want);
            let relative = err / (tol / 1e-4);
            worst[k] = worst[k].max(relative);
            assert!(relative <= bound, "{what}: bf16 error {relative:.2e} of max(1, max|z|)");
            // Not the f32 result: the bf16 path did run.
            let f32_out = f32_block.forward(&x).expect("forward");
            assert_ne!(bits(&got), bits(&f32_out), "{what}: bf16 gave the f32 bits");
        }
    }
    for ((precision, bound), worst) in BF16_PRECISIONS.into_iter().zip(worst) {
        eprintln!("{precision}: worst {worst:.3e} of max(1, max|z|), bound {bound:.1e}");
    }
}

#[test]
fn bf16_logits_round_more_than_bf16_in_every_mode() {
    // Bf16Logits also rounds the logits' operands (in the modes that form logits) and W_z's
    // where it is applied to the outputs (every mode): the results differ from Bf16's, and
    // channels-first (W_z in f32 there) differs from channels-last only by that rounding.
    for (i, (config, shape, amp)) in cases().into_iter().enumerate().filter(|(i, _)| i % 5 == 1) {
        let [_, bf16] = pair_in(config.clone(), 900 + i as u64, Precision::Bf16);
        let [_, logits] = pair_in(config.clone(), 900 + i as u64, Precision::Bf16Logits);
        let x = Rng::new(950 + i as u64).input(shape, amp);
        let z = logits.forward(&x).unwrap();
        assert_ne!(bits(&bf16.forward(&x).unwrap()), bits(&z), "{:?}", config.mode);
        let first = logits.forward_channels_first(&x.view().permuted_axes([0, 4, 1, 2, 3])).unwrap();
        let first = first.permuted_axes([0, 2, 3, 4, 1]);
        let scale = z.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = z.iter().zip(first.iter()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 2e-2 * scale, "{:?}: channels-first differs by {diff} (scale {scale})", config.mode);
    }
}

#[test]
fn bf16_results_do_not_depend_on_the_thread_count() {
    for (precision, _) in BF16_PRECISIONS {
        for (i, (config, shape, amp)) in cases().into_iter().enumerate().filter(|(i, _)| i % 5 != 4) {
            let [_, block] = pair_in(config, 300 + i as u64, precision);
            let x = Rng::new(400 + i as u64).input(shape, amp);
            let runs = on_1_2_3_threads(|| bits(&block.forward(&x).expect("forward")));
            assert!(runs.windows(2).all(|w| w[0] == w[1]), "{precision} case {i}: depends on the thread count");
        }
    }
}

#[test]
fn training_and_attention_maps_of_a_bf16_block_are_the_f32_blocks() {
    // forward_train, backward, attention and attention_rows run in f32 on a bf16 block: the
    // same bits as on the f32 block with the same parameters.
    for (i, (mode, (precision, bound))) in
        Mode::ALL.into_iter().flat_map(|m| BF16_PRECISIONS.map(|p| (m, p))).enumerate()
    {
        let config = NonLocalConfig::new(12).inter_channels(6).mode(mode);
        let shape = (2, 2, 6, 5, 12);
        let [f32_block, bf16_block] = pair_in(config, 500 + i as u64, precision);
        let x = Rng::new(600 + i as u64).input(shape, 1.0);
        let dz = Rng::new(700 + i as u64).input(shape, 1.0);
        let train = |block: &NonLocalBlock| {
            let (z, ctx) = block.forward_train(&x).expect("forward_train");
            let grads = block.backward(&ctx, &dz).expect("backward");
            let mut all = bits(&z);
            all.extend(bits(&grads.input));
            for (name, g) in grads.params.named() {
                all.extend(bits(&g));
                all.extend(name.bytes().map(u32::from));
            }
            all
        };
        assert_eq!(train(&bf16_block), train(&f32_block), "{precision} {mode:?}: training differs");
        assert_eq!(bits(&bf16_block.attention(&x).unwrap()), bits(&f32_block.attention(&x).unwrap()), "{mode:?}");
        let rows = [0, 7, 59];
        let (a, b) = (bf16_block.attention_rows(&x, &rows).unwrap(), f32_block.attention_rows(&x, &rows).unwrap());
        assert_eq!(bits(&a), bits(&b), "{mode:?}: attention rows");
        // The forward pass itself does differ (the bf16 path ran) and is close.
        let (z16, z32) = (bf16_block.forward(&x).unwrap(), f32_block.forward(&x).unwrap());
        assert_ne!(bits(&z16), bits(&z32), "{mode:?}");
        let err = z16.iter().zip(&z32).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let scale = z32.iter().fold(1f32, |m, v| m.max(v.abs()));
        assert!((err / scale) as f64 <= bound, "{precision} {mode:?}: {err} against {scale}");
    }
}

#[test]
fn bf16_handles_every_input_layout_and_entry_point_alike() {
    let config = NonLocalConfig::new(8).inter_channels(4).conv_dims(2).sub_sample(Some([1, 2, 2]));
    for (precision, _) in BF16_PRECISIONS {
        let [_, block] = pair_in(config.clone(), 800, precision);
        let x = Rng::new(801).input((2, 1, 6, 6, 8), 1.0);
        let z = block.forward(&x).unwrap();
        let images = x.index_axis(ndarray::Axis(1), 0).to_owned();
        assert_eq!(bits(&block.forward_images(&images).unwrap()), bits(&z), "{precision}");
        let mut into = Array5::<f32>::zeros(x.raw_dim());
        block.forward_into(&x, &mut into).unwrap();
        assert_eq!(bits(&into), bits(&z), "{precision}");
        // A permuted (channels-first in memory) view gives the same bits as the contiguous input.
        let permuted = x.clone().permuted_axes([0, 4, 1, 2, 3]).as_standard_layout().to_owned();
        let view = permuted.view().permuted_axes([0, 2, 3, 4, 1]);
        assert_eq!(bits(&block.forward(&view).unwrap()), bits(&z), "{precision}");
    }
}
