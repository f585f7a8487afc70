//! Trains a non-local block on a task no local operation can solve, with Adam written here.
//!
//! ```text
//! cargo run --release --example finetune
//! ```
//!
//! **The task.** Each clip has 4 frames of 8×8 cells and 6 channels. One object appears once
//! per frame at a random cell (channel 0 = 1 there). In frame 0 only, it is marked as the
//! source (channel 1 = 1) and carries two random features (channels 2, 3). The target copies
//! those two features into channels 4, 5 at the object's cell in *every* frame (zero
//! elsewhere); all other channels stay as they are. A local (per-cell) operation sees the
//! same input at the object's cell in frames 1–3 whatever the features are, so it cannot do
//! better than predicting their mean (the "local bound" printed below). The non-local block
//! can learn to let object cells attend to the source cell and copy its features.
//!
//! Loss: mean squared error over all outputs. Progress is printed every epoch; the run ends
//! with the loss before and after training.

use std::collections::HashMap;

use ndarray::{Array5, ArrayD, Zip};
use nonlocal::{Mode, NonLocalBlock, NonLocalConfig, ParameterGradients};

const T: usize = 4;
const H: usize = 8;
const W: usize = 8;
const C: usize = 6;
const BATCH: usize = 16;
const EPOCHS: usize = 30;
const STEPS_PER_EPOCH: usize = 20;

/// xorshift64*, seeded: the same run every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A batch of clips and their targets.
fn batch(rng: &mut Rng) -> (Array5<f32>, Array5<f32>) {
    let mut x = Array5::<f32>::zeros((BATCH, T, H, W, C));
    let mut target = Array5::<f32>::zeros((BATCH, T, H, W, C));
    for b in 0..BATCH {
        let features = [rng.uniform(), rng.uniform()];
        for t in 0..T {
            let (h, w) = (rng.below(H), rng.below(W));
            x[[b, t, h, w, 0]] = 1.0;
            if t == 0 {
                x[[b, t, h, w, 1]] = 1.0;
                x[[b, t, h, w, 2]] = features[0];
                x[[b, t, h, w, 3]] = features[1];
            }
            target[[b, t, h, w, 4]] = features[0];
            target[[b, t, h, w, 5]] = features[1];
        }
    }
    // Everything but channels 4 and 5 passes through unchanged.
    for c in 0..4 {
        target.index_axis_mut(ndarray::Axis(4), c).assign(&x.index_axis(ndarray::Axis(4), c));
    }
    (x, target)
}

fn mse(z: &Array5<f32>, target: &Array5<f32>) -> f32 {
    z.iter().zip(target.iter()).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / z.len() as f32
}

/// Adam (Kingma & Ba): a pair of moment estimates per trainable tensor, kept by its name.
struct Adam {
    lr: f32,
    step: i32,
    moments: HashMap<String, (ArrayD<f32>, ArrayD<f32>)>,
}

impl Adam {
    fn new(lr: f32) -> Self {
        Adam { lr, step: 0, moments: HashMap::new() }
    }

    /// One step on every parameter of `block`, in place.
    fn step(&mut self, block: &mut NonLocalBlock, grads: &ParameterGradients) -> nonlocal::Result<()> {
        let (b1, b2, eps, lr) = (0.9f32, 0.999f32, 1e-8f32, self.lr);
        self.step += 1;
        let (c1, c2) = (1.0 - b1.powi(self.step), 1.0 - b2.powi(self.step));
        block.update_parameters(grads, |name, mut p, g| {
            let (m, v) = self
                .moments
                .entry(name.to_string())
                .or_insert_with(|| (ArrayD::zeros(p.raw_dim()), ArrayD::zeros(p.raw_dim())));
            Zip::from(&mut p).and(&g).and(m).and(v).for_each(|p, &g, m, v| {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
            });
        })
    }
}

fn main() -> Result<(), nonlocal::Error> {
    let config = NonLocalConfig::new(C).inter_channels(4).mode(Mode::EmbeddedGaussian).sub_sample(None);
    let mut block = NonLocalBlock::new(config)?;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (x_eval, target_eval) = batch(&mut rng);
    let before = mse(&block.forward(&x_eval)?, &target_eval);
    // The best a local operation can do: predict 0 (the features' mean) for channels 4, 5 at
    // the object cells of frames 1–3; frame 0's cell can copy its own features.
    let local_bound = {
        let mut best_local = x_eval.clone();
        for b in 0..BATCH {
            for h in 0..H {
                for w in 0..W {
                    if x_eval[[b, 0, h, w, 1]] == 1.0 {
                        best_local[[b, 0, h, w, 4]] = x_eval[[b, 0, h, w, 2]];
                        best_local[[b, 0, h, w, 5]] = x_eval[[b, 0, h, w, 3]];
                    }
                }
            }
        }
        mse(&best_local, &target_eval)
    };
    println!("task: copy a marked object's features to every frame ({T} frames of {H}x{W}, batch {BATCH})");
    println!("loss before training {before:.3e}; the best local (per-cell) operation reaches {local_bound:.3e}");
    let start = std::time::Instant::now();
    let mut adam = Adam::new(0.02);
    for epoch in 1..=EPOCHS {
        let mut epoch_loss = 0.0;
        for _ in 0..STEPS_PER_EPOCH {
            let (x, target) = batch(&mut rng);
            let (z, ctx) = block.forward_train(&x)?;
            epoch_loss += mse(&z, &target);
            // ∂(mean squared error)/∂z.
            let scale = 2.0 / z.len() as f32;
            let grad = (&z - &target) * scale;
            let grads = block.backward(&ctx, &grad)?;
            adam.step(&mut block, &grads.params)?;
        }
        let eval = mse(&block.forward(&x_eval)?, &target_eval);
        println!(
            "epoch {epoch:2}: train loss {:.3e}  eval loss {eval:.3e}  ({:.1} s)",
            epoch_loss / STEPS_PER_EPOCH as f32,
            start.elapsed().as_secs_f64()
        );
    }
    let after = mse(&block.forward(&x_eval)?, &target_eval);
    println!("loss before {before:.3e} -> after {after:.3e} (local bound {local_bound:.3e})");
    Ok(())
}
