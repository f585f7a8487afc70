//! Every mode against the plain f64 reference: random shapes, odd sizes, batches, pooling
//! variants and strided views.

mod common;

use common::{assert_matches_reference, random_block, Rng};
use ndarray::{s, Array5, Axis};
use nonlocal::{Mode, NonLocalConfig};

fn config(mode: Mode, c: usize, ci: usize, sub_sample: Option<[usize; 3]>, bn: bool) -> NonLocalConfig {
    NonLocalConfig::new(c).mode(mode).inter_channels(ci).sub_sample(sub_sample).bn_layer(bn)
}

#[test]
fn every_mode_matches_reference_on_random_shapes() {
    let mut rng = Rng::new(7);
    for mode in Mode::ALL {
        for case in 0..6 {
            let c = rng.range(1, 12);
            let ci = rng.range(1, 7);
            let sub = [None, Some([1, 2, 2]), Some([2, 2, 2]), Some([1, 1, 2]), Some([1, 3, 2]), Some([1, 2, 2])][case];
            let kernel = sub.unwrap_or([1, 1, 1]);
            let shape = (rng.range(1, 3), rng.range(kernel[0], 3), rng.range(kernel[1], 7), rng.range(kernel[2], 7), c);
            let bn = case % 2 == 0;
            let mut block = random_block(config(mode, c, ci, sub, bn), &mut rng);
            if mode == Mode::EmbeddedGaussian && case % 3 == 1 {
                block = random_block(block.config().clone().use_scale(true), &mut rng);
            }
            let x = rng.input(shape, 1.5);
            assert_matches_reference(&block, x.view(), &format!("{mode} case {case} shape {shape:?} sub {sub:?}"));
        }
    }
}

#[test]
fn odd_sizes_floor_like_pytorch() {
    let mut rng = Rng::new(11);
    for mode in Mode::ALL {
        // 3x7x5 with kernel 2x2x2: the last frame, row and column are dropped from the keys.
        let block = random_block(config(mode, 5, 3, Some([2, 2, 2]), true), &mut rng);
        let x = rng.input((2, 3, 7, 5, 5), 1.0);
        assert_matches_reference(&block, x.view(), &format!("{mode} odd sizes"));
        assert_eq!(block.key_grid([3, 7, 5]), [1, 3, 2]);
    }
}

#[test]
fn many_keys_cross_key_tiles() {
    // M = 24·24·2 = 1152 keys without pooling: more than two key tiles of the fused kernel.
    let mut rng = Rng::new(13);
    for mode in [Mode::EmbeddedGaussian, Mode::Gaussian, Mode::DotProduct, Mode::Concatenation] {
        let block = random_block(config(mode, 6, 4, None, true), &mut rng);
        let x = rng.input((1, 2, 24, 24, 6), 2.0);
        assert_matches_reference(&block, x.view(), &format!("{mode} many keys"));
    }
}

#[test]
fn strided_and_permuted_views_equal_their_contiguous_copies() {
    let mut rng = Rng::new(17);
    for mode in Mode::ALL {
        let block = random_block(config(mode, 6, 3, Some([1, 2, 2]), true), &mut rng);
        let big = rng.input((3, 4, 9, 10, 12), 1.0);
        let views =
            [big.slice(s![..;2, .., ..;2, 1.., ..;2]).to_owned(), big.slice(s![1.., 1..3, 1.., ..;2, 6..]).to_owned()];
        let strided = [big.slice(s![..;2, .., ..;2, 1.., ..;2]), big.slice(s![1.., 1..3, 1.., ..;2, 6..])];
        for (view, owned) in strided.iter().zip(&views) {
            let a = block.forward(view).unwrap();
            let b = block.forward(owned).unwrap();
            assert_eq!(a, b, "{mode}: strided view differs from its copy");
            assert_matches_reference(&block, view.view(), &format!("{mode} strided"));
        }
        // Channels-first memory viewed as channels-last: every axis strided.
        let cf = rng.input((2, 6, 2, 4, 6), 1.0);
        let view = cf.view().permuted_axes([0, 2, 3, 4, 1]);
        let a = block.forward(&view).unwrap();
        let b = block.forward(&view.to_owned()).unwrap();
        assert_eq!(a, b, "{mode}: permuted view differs from its copy");
        // Reversed axes: negative strides.
        let mut rev = cf.view().permuted_axes([0, 2, 3, 4, 1]);
        rev.invert_axis(Axis(3));
        rev.invert_axis(Axis(4));
        assert_eq!(block.forward(&rev).unwrap(), block.forward(&rev.to_owned()).unwrap());
    }
}

#[test]
fn images_and_sequences_are_clips_of_one_frame_or_row() {
    let mut rng = Rng::new(19);
    for mode in Mode::ALL {
        let block = random_block(config(mode, 4, 2, Some([1, 2, 2]), true).conv_dims(2), &mut rng);
        let clips: Array5<f32> = rng.input((2, 1, 4, 6, 4), 1.0);
        let images = clips.index_axis(Axis(1), 0);
        let z = block.forward_images(&images).unwrap();
        assert_eq!(z.shape(), images.shape());
        assert_eq!(z, block.forward(&clips).unwrap().index_axis(Axis(1), 0));
        assert_matches_reference(&block, clips.view(), &format!("{mode} images"));
        // The two images do not attend to each other: each alone gives the same output.
        for b in 0..2 {
            let alone = block.forward_images(&images.slice(s![b..b + 1, .., .., ..])).unwrap();
            assert_eq!(alone.index_axis(Axis(0), 0), z.index_axis(Axis(0), b), "{mode} image {b}");
        }
        // Dynamic-rank arrays take the same path.
        assert_eq!(block.forward_images(&images.to_owned().into_dyn()).unwrap(), z.clone().into_dyn());

        let block = random_block(config(mode, 4, 2, Some([1, 1, 2]), true).conv_dims(1), &mut rng);
        let rows: Array5<f32> = rng.input((3, 1, 1, 9, 4), 1.0);
        let sequences = rows.index_axis(Axis(1), 0).index_axis_move(Axis(1), 0);
        let z = block.forward_sequences(&sequences).unwrap();
        assert_eq!(z.shape(), &[3, 9, 4]);
        assert_eq!(z, block.forward(&rows).unwrap().index_axis(Axis(1), 0).index_axis(Axis(1), 0));
        assert_matches_reference(&block, rows.view(), &format!("{mode} sequences"));
    }
}

#[test]
fn key_regions_are_the_pooling_windows() {
    // Gaussian mode: key j is the input max-pooled over key_region(j), and query i's
    // attention is softmax_j(x_i · key_j). Built from the conversions, it must match.
    let mut rng = Rng::new(37);
    for sub in [Some([1, 2, 2]), Some([2, 2, 3]), None] {
        let block = random_block(config(Mode::Gaussian, 3, 2, sub, true), &mut rng);
        let x = rng.input((1, 4, 5, 7, 3), 1.0);
        let grid = [4, 5, 7];
        let m: usize = block.key_grid(grid).iter().product();
        let keys: Vec<[f64; 3]> = (0..m)
            .map(|j| {
                let [t, h, w] = block.key_region(grid, j).unwrap();
                let window = x.slice(s![0, t, h, w, ..]);
                std::array::from_fn(|c| window.index_axis(Axis(3), c).fold(f64::MIN, |a, &v| a.max(v as f64)))
            })
            .collect();
        for position in [[0, 0, 0], [3, 4, 6], [1, 2, 5]] {
            let i = block.query_index(grid, position).unwrap();
            let row = block.attention_rows(&x, &[i]).unwrap();
            let [t, h, w] = position;
            let logits: Vec<f64> =
                keys.iter().map(|k| (0..3).map(|c| x[[0, t, h, w, c]] as f64 * k[c]).sum()).collect();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            for (j, l) in logits.iter().enumerate() {
                let want = (l - max).exp() / total;
                let got = row[[0, 0, j]] as f64;
                assert!((got - want).abs() < 1e-5, "{sub:?} query {position:?} key {j}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn attention_rows_match_the_full_map() {
    let mut rng = Rng::new(23);
    for mode in Mode::ALL {
        let block = random_block(config(mode, 6, 3, Some([1, 2, 2]), true), &mut rng);
        let x = rng.input((2, 2, 6, 8, 6), 1.0);
        let full = block.attention(&x).unwrap();
        let rows = block.attention_rows(&x, &[95, 0, 17, 17]).unwrap();
        assert_eq!(rows.shape(), &[2, 4, 24]);
        for (r, &q) in [95usize, 0, 17, 17].iter().enumerate() {
            assert_eq!(rows.slice(s![.., r, ..]), full.slice(s![.., q, ..]), "{mode} query {q}");
        }
        if mode.is_softmax() {
            for row in full.lanes(Axis(2)) {
                assert!((row.sum() - 1.0).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn large_logits_stay_exact() {
    // Inputs scaled by 40: logits in the thousands. The softmax must not overflow.
    let mut rng = Rng::new(29);
    for mode in [Mode::EmbeddedGaussian, Mode::Gaussian] {
        let block = random_block(config(mode, 8, 4, Some([1, 2, 2]), true), &mut rng);
        let x = rng.input((1, 2, 6, 6, 8), 1.0) * 40.0;
        let z = block.forward(&x).unwrap();
        assert!(z.iter().all(|v| v.is_finite()));
        assert_matches_reference(&block, x.view(), &format!("{mode} large logits"));
    }
}

#[test]
fn wide_channels_with_few_keys() {
    // Many channels, few keys: the softmax modes apply W_z to the keys' values before the
    // aggregation instead of to the outputs after it, and with pooling (24 queries, 6 keys)
    // embedded Gaussian folds θ into the keys (logits x_i·(W_θᵀφ_j) + b_θ·φ_j).
    let mut rng = Rng::new(31);
    for mode in Mode::ALL {
        for sub in [Some([1, 2, 2]), None] {
            let block = random_block(config(mode, 40, 20, sub, true), &mut rng);
            let x = rng.input((2, 1, 4, 6, 40), 1.0);
            assert_matches_reference(&block, x.view(), &format!("{mode} wide, {sub:?}"));
        }
    }
    // Dot product's direct form without either fold: few queries, no pooling, C' near C.
    let block = random_block(config(Mode::DotProduct, 40, 32, None, true), &mut rng);
    let x = rng.input((2, 1, 4, 4, 40), 1.0);
    assert_matches_reference(&block, x.view(), "dot product, direct without folds");
}
