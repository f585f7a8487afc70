//! `--candle`: the candle layer on the native block's parameters (feature `candle`).

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ndarray::Array5;
use nonlocal::candle::NonLocal;
use nonlocal::{NonLocalBlock, WeightKeys};

use crate::{interleaved_medians, peak_mb, Args};

/// One case with `--candle`: the native block, the candle layer and the plain-candle layer in
/// turn within each repetition (so a change of machine load moves all three alike), forward
/// and with `--backward` training, each line with its backend and heap peak.
/// `case` is (shape name, mode name, nominal FLOPs, sgemm peak GFLOP/s).
pub fn bench_case(
    args: &Args,
    block: &NonLocalBlock,
    x: &Array5<f32>,
    grad_output: &Array5<f32>,
    case: (&str, &str, f64, f64),
) {
    let (name, mode_name, flops, peak) = case;
    let report = |backend: &str, pass: &str, median: f64, flops: f64, heap: f64| {
        let gflops = flops / median / 1e9;
        println!(
            "shape={name} mode={mode_name} backend={backend}{pass} ms={:.2} gflops={gflops:.1} sgemm_gflops={peak:.1} pct_peak={:.1} peak_mb={heap:.1}",
            median * 1e3,
            100.0 * gflops / peak,
        );
    };
    let layer = Layer::new(block, x, grad_output);
    let backends = ["native", "candle", "native-channels-first", "candle-plain"];
    let mut forward = || {
        std::hint::black_box(block.forward(x).expect("bench forward"));
    };
    // The native block on PyTorch's layout, as the candle op runs it.
    let (x_cf, g_cf) = (first(x), first(grad_output));
    let mut forward_cf = || {
        std::hint::black_box(block.forward_channels_first(&x_cf).expect("bench forward"));
    };
    let (mut candle, mut plain) = (|| layer.forward(false), || layer.forward(true));
    // candle-plain on its own after the others: its N×M buffers would change how the C
    // allocator treats theirs from one repetition to the next.
    let mut runs: [&mut dyn FnMut(); 3] = [&mut forward, &mut candle, &mut forward_cf];
    let mut medians = interleaved_medians(args.reps, &mut runs);
    medians.extend(interleaved_medians(args.reps, &mut [&mut plain as &mut dyn FnMut()]));
    let mut runs: [&mut dyn FnMut(); 4] = [&mut forward, &mut candle, &mut forward_cf, &mut plain];
    for ((backend, (median, _)), run) in backends.iter().zip(medians).zip(runs.iter_mut()) {
        report(backend, "", median, flops, peak_mb(run));
    }
    if args.backward {
        let mut train = || {
            let (z, ctx) = block.forward_train(x).expect("bench forward_train");
            std::hint::black_box(z);
            std::hint::black_box(block.backward(&ctx, grad_output).expect("bench backward"));
        };
        let (mut candle, mut plain) = (|| layer.train(false, Loss::Dot), || layer.train(true, Loss::Dot));
        let mut injected = || layer.train(false, Loss::Injected);
        let mut train_cf = || {
            let (z, ctx) = block.forward_train_channels_first(&x_cf).expect("bench forward_train");
            std::hint::black_box(z);
            std::hint::black_box(block.backward_channels_first(&ctx, &g_cf).expect("bench backward"));
        };
        let mut runs: [&mut dyn FnMut(); 4] = [&mut train, &mut candle, &mut injected, &mut train_cf];
        let mut medians = interleaved_medians(args.reps, &mut runs);
        medians.insert(2, interleaved_medians(args.reps, &mut [&mut plain as &mut dyn FnMut()])[0]);
        let mut runs: [&mut dyn FnMut(); 5] = [&mut train, &mut candle, &mut plain, &mut injected, &mut train_cf];
        let backends = ["native", "candle", "candle-plain", "candle-injected", "native-channels-first"];
        for ((backend, (median, _)), run) in backends.iter().zip(medians).zip(runs.iter_mut()) {
            report(backend, " pass=train", median, 3.0 * flops, peak_mb(run));
        }
    }
}

/// The layer twice, on plain tensors (inference: nothing tracks gradients) and on
/// `Var`s (training), its input (channels-first; a `Var` for training, as the output of
/// earlier layers would be) and the output gradient.
pub struct Layer {
    inference: NonLocal,
    trainable: NonLocal,
    x: Tensor,
    x_var: Var,
    grad_output: Tensor,
    _varmap: VarMap,
}

/// (B, T, H, W, C) → (B, C, T, H, W), standard layout.
fn first(x: &Array5<f32>) -> Array5<f32> {
    x.view().permuted_axes([0, 4, 1, 2, 3]).as_standard_layout().into_owned()
}

/// (B, T, H, W, C) → (B, C, T, H, W), contiguous.
fn channels_first(x: &Array5<f32>) -> Tensor {
    let shape = x.shape().to_vec();
    let t = Tensor::from_vec(x.iter().copied().collect(), shape, &Device::Cpu).expect("input tensor");
    t.permute((0, 4, 1, 2, 3)).and_then(|t| t.contiguous()).expect("channels-first copy")
}

impl Layer {
    pub fn new(block: &NonLocalBlock, x: &Array5<f32>, grad_output: &Array5<f32>) -> Layer {
        let bytes = block.to_safetensors_with_keys(&WeightKeys::alexhex7()).expect("parameters");
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("safetensors");
        let varmap = VarMap::new();
        for (key, t) in &tensors {
            if t.dtype() == DType::F32 {
                let var = Var::from_tensor(t).expect("variable");
                varmap.data().lock().expect("lock").insert(key.clone(), var);
            }
        }
        let config = block.config().clone();
        let naming = nonlocal::Naming::AlexHex7;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let inference = NonLocal::new(config.clone(), naming, vb).expect("candle layer");
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let trainable = NonLocal::new(config, naming, vb).expect("candle layer");
        let x = channels_first(x);
        let x_var = Var::from_tensor(&x).expect("input variable");
        Layer { inference, trainable, x, x_var, grad_output: channels_first(grad_output), _varmap: varmap }
    }

    pub fn forward(&self, plain: bool) {
        let layer = &self.inference;
        let z = if plain { layer.forward_plain(&self.x) } else { layer.forward(&self.x) };
        std::hint::black_box(z.expect("candle forward"));
    }

    pub fn train(&self, plain: bool, loss: Loss) {
        let (layer, x) = (&self.trainable, self.x_var.as_tensor());
        let z = if plain { layer.forward_plain(x) } else { layer.forward(x) }.expect("candle forward");
        let loss = match loss {
            Loss::Dot => (z * &self.grad_output).and_then(|p| p.sum_all()),
            Loss::Injected => z.apply_op1(InjectGradient(self.grad_output.clone())),
        }
        .expect("loss");
        std::hint::black_box(loss.backward().expect("candle backward"));
    }
}

/// How a training step hands the output gradient to candle's `backward()`.
#[derive(Clone, Copy)]
pub enum Loss {
    /// `Σ z ⊙ grad_output`: what a model's loss costs (a product, a sum, and their backward).
    Dot,
    /// [`InjectGradient`]: the output gradient alone, as the native step is given it.
    Injected,
}

/// A scalar op whose backward hands its input exactly the given gradient: the layer's own
/// forward + backward through candle, without the loss's arithmetic (the native training step
/// is handed `grad_output` the same way).
struct InjectGradient(Tensor);

impl CustomOp1 for InjectGradient {
    fn name(&self) -> &'static str {
        "inject-gradient"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // The loss is the root: its gradient is 1, so the input's is the given one.
        Ok(Some(self.0.clone()))
    }
}
