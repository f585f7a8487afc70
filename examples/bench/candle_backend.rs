//! `--candle`: the candle layer on the native block's parameters (feature `candle`).

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ndarray::Array5;
use nonlocal::candle::NonLocal;
use nonlocal::{NonLocalBlock, WeightKeys};

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

    pub fn train(&self, plain: bool) {
        let (layer, x) = (&self.trainable, self.x_var.as_tensor());
        let z = if plain { layer.forward_plain(x) } else { layer.forward(x) };
        let loss = (z.expect("candle forward") * &self.grad_output).and_then(|p| p.sum_all()).expect("loss");
        std::hint::black_box(loss.backward().expect("candle backward"));
    }
}
