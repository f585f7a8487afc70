//! Contracts of the public API beyond the numbers: one block shared by threads, the buffers it
//! keeps, and `forward_into` into outputs of any layout.

mod common;

use common::{bits, random_block, Rng};
use ndarray::{s, Array5, ShapeBuilder};
use nonlocal::{Mode, NonLocalBlock, NonLocalConfig};

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn one_block_serves_four_threads_at_once_with_the_single_threaded_bits() {
    assert_send_sync::<NonLocalBlock>();
    let mut rng = Rng::new(3);
    for mode in Mode::ALL {
        let block = random_block(NonLocalConfig::new(24).mode(mode), &mut rng);
        // A different input per thread, so buffers crossing between calls would show.
        let inputs: Vec<Array5<f32>> = (0..4).map(|_| rng.input((2, 2, 12, 14, 24), 1.0)).collect();
        let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let want: Vec<Vec<u32>> =
            inputs.iter().map(|x| single.install(|| bits(block.forward(x).unwrap().iter()))).collect();
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|scope| {
            for (x, want) in inputs.iter().zip(&want) {
                let (block, barrier) = (&block, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    for round in 0..4 {
                        let got = bits(block.forward(x).unwrap().iter());
                        assert!(got == *want, "{mode}: round {round} differs from the single-threaded run");
                    }
                });
            }
        });
        // Released buffers are allocated again: same results.
        block.release_buffers();
        assert_eq!(bits(block.forward(&inputs[0]).unwrap().iter()), want[0], "{mode}: after release_buffers");
        // A clone shares the block's buffers and computes the same.
        assert_eq!(bits(block.clone().forward(&inputs[1]).unwrap().iter()), want[1], "{mode}: clone");
    }
}

#[test]
fn forward_into_equals_forward_for_contiguous_strided_and_permuted_outputs() {
    let mut rng = Rng::new(4);
    for mode in Mode::ALL {
        let block = random_block(NonLocalConfig::new(6).inter_channels(3).mode(mode), &mut rng);
        let x = rng.input((2, 2, 6, 8, 6), 1.0);
        let want = block.forward(&x).unwrap();
        // Contiguous, pre-filled with NaN: every element is written.
        let mut out = Array5::<f32>::from_elem(x.raw_dim(), f32::NAN);
        block.forward_into(&x, &mut out).unwrap();
        assert_eq!(bits(out.iter()), bits(want.iter()), "{mode}: contiguous");
        // Column-major (no contiguous row-major slice).
        let mut out = Array5::<f32>::from_elem(x.raw_dim().f(), f32::NAN);
        block.forward_into(&x, &mut out).unwrap();
        assert_eq!(bits(out.iter()), bits(want.iter()), "{mode}: column-major");
        // A strided window of a larger array: the rest is left alone.
        let mut big = Array5::<f32>::from_elem((2, 2, 12, 8, 9), -7.0);
        let mut window = big.slice_mut(s![.., .., ..;2, .., 1..7]);
        block.forward_into(&x, &mut window).unwrap();
        assert_eq!(bits(window.iter()), bits(want.iter()), "{mode}: strided window");
        let mut untouched = big.clone();
        untouched.slice_mut(s![.., .., ..;2, .., 1..7]).fill(-7.0);
        assert!(untouched.iter().all(|&v| v == -7.0), "{mode}: wrote outside the window");
    }
}
