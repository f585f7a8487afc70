//! A small candle model with a non-local layer, trained with candle's AdamW on a task that
//! needs non-local information, saved and reloaded.
//!
//! ```text
//! cargo run --release --features candle --example candle_model
//! ```
//!
//! **The task.** Images of 8×8 cells, 4 input channels. A few object cells are marked
//! (channel 0 = 1); one of them is the source (channel 1 = 1) and carries two random features
//! (channels 2, 3). The target has 2 channels: the source's features at every object cell,
//! zero elsewhere. The objects are scattered over the image, so a stack of 3×3 convolutions
//! (receptive field 5×5 here) cannot reach the source from most of them; the best such
//! model predicts the features' mean (zero) away from the source, the "local bound" printed.
//!
//! **The model.** conv 3×3 (4 → 16) + ReLU, conv 3×3 (16 → 16) + ReLU, the non-local layer
//! (`nonlocal::candle::NonLocal`, 2-d, embedded Gaussian, mmcv keys under `nl`), conv 1×1
//! (16 → 2). Everything is built from one `VarBuilder` over a `VarMap` and trained with
//! `candle_nn::AdamW`; the loss (mean squared error) is printed as it falls. The trained
//! `VarMap` is saved with `VarMap::save`, loaded into a freshly built model with
//! `VarMap::load`, and the reloaded model's output is checked to be the same, bit for bit.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use nonlocal::candle::NonLocal;
use nonlocal::{Mode, Naming, NonLocalConfig};

const SIZE: usize = 8;
const OBJECTS: usize = 4;
const BATCH: usize = 16;
const STEPS: usize = 300;

/// The model: two conv stages, the non-local layer, a 1×1 head.
struct Model {
    stem: [Conv2d; 2],
    nl: NonLocal,
    head: Conv2d,
}

impl Model {
    fn new(vb: &VarBuilder<'_>) -> Result<Model> {
        let pad = Conv2dConfig { padding: 1, ..Default::default() };
        let stem = [conv2d(4, 16, 3, pad, vb.pp("stem.0"))?, conv2d(16, 16, 3, pad, vb.pp("stem.1"))?];
        let config = NonLocalConfig::new(16).mode(Mode::EmbeddedGaussian).conv_dims(2).sub_sample(None).use_scale(true);
        let nl = NonLocal::new(config, Naming::Mmcv, vb.pp("nl"))?;
        let head = conv2d(16, 2, 1, Default::default(), vb.pp("head"))?;
        Ok(Model { stem, nl, head })
    }
}

impl Module for Model {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.stem[0].forward(x)?.relu()?;
        let x = self.stem[1].forward(&x)?.relu()?;
        self.head.forward(&self.nl.forward(&x)?)
    }
}

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

/// A batch: inputs (B, 4, 8, 8), targets (B, 2, 8, 8), and the local bound's prediction.
fn batch(rng: &mut Rng) -> Result<(Tensor, Tensor, Tensor)> {
    let cells = SIZE * SIZE;
    let (mut x, mut target, mut local) =
        (vec![0.0f32; BATCH * 4 * cells], vec![0.0f32; BATCH * 2 * cells], vec![0.0f32; BATCH * 2 * cells]);
    for b in 0..BATCH {
        let features = [rng.uniform(), rng.uniform()];
        let mut chosen = Vec::new();
        while chosen.len() < OBJECTS {
            let cell = rng.below(cells);
            if !chosen.contains(&cell) {
                chosen.push(cell);
            }
        }
        for (i, &cell) in chosen.iter().enumerate() {
            x[(b * 4) * cells + cell] = 1.0;
            for (f, &value) in features.iter().enumerate() {
                target[(b * 2 + f) * cells + cell] = value;
            }
            if i == 0 {
                x[(b * 4 + 1) * cells + cell] = 1.0;
                for (f, &value) in features.iter().enumerate() {
                    x[(b * 4 + 2 + f) * cells + cell] = value;
                    local[(b * 2 + f) * cells + cell] = value;
                }
            }
        }
    }
    let t = |v: Vec<f32>, c: usize| Tensor::from_vec(v, (BATCH, c, SIZE, SIZE), &Device::Cpu);
    Ok((t(x, 4)?, t(target, 2)?, t(local, 2)?))
}

fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

fn main() -> Result<()> {
    // Candle allocates a fresh tensor per op and per gradient: let glibc keep freed memory
    // for the next step instead of faulting it in again (see `nonlocal::keep_freed_memory`).
    nonlocal::keep_freed_memory();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Model::new(&vb)?;
    let mut rng = Rng(0x5eed_c0de_1234_0001);
    let (x_eval, target_eval, local_eval) = batch(&mut rng)?;
    let scalar = |t: Tensor| t.to_scalar::<f32>();
    let before = scalar(mse(&model.forward(&x_eval)?, &target_eval)?)?;
    let local_bound = scalar(mse(&local_eval, &target_eval)?)?;
    println!(
        "task: copy the source's features to {OBJECTS} objects scattered over {SIZE}x{SIZE} images (batch {BATCH})"
    );
    println!("loss before training {before:.3e}; the best local model reaches about {local_bound:.3e}");
    let params = ParamsAdamW { lr: 3e-3, weight_decay: 0.0, ..Default::default() };
    let mut opt = candle_nn::AdamW::new(varmap.all_vars(), params)?;
    let start = std::time::Instant::now();
    for step in 1..=STEPS {
        let (x, target, _) = batch(&mut rng)?;
        let loss = mse(&model.forward(&x)?, &target)?;
        opt.backward_step(&loss)?;
        if step % 25 == 0 {
            let eval = scalar(mse(&model.forward(&x_eval)?, &target_eval)?)?;
            println!(
                "step {step:3}: train loss {:.3e}  eval loss {eval:.3e}  ({:.1} s)",
                scalar(loss)?,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let after = model.forward(&x_eval)?;
    let after_loss = scalar(mse(&after, &target_eval)?)?;
    println!("loss before {before:.3e} -> after {after_loss:.3e} (local bound {local_bound:.3e})");

    let path = std::env::temp_dir().join("nonlocal_candle_model.safetensors");
    varmap.save(&path)?;
    let mut reloaded_vars = VarMap::new();
    let reloaded = Model::new(&VarBuilder::from_varmap(&reloaded_vars, DType::F32, &Device::Cpu))?;
    reloaded_vars.load(&path)?;
    let again = reloaded.forward(&x_eval)?;
    let diff = (&again - &after)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!(
        "saved {} tensors to {}; reloaded model's output differs by {diff:e}",
        varmap.all_vars().len(),
        path.display()
    );
    if diff != 0.0 {
        candle_core::bail!("the reloaded model gives another output");
    }
    Ok(())
}
