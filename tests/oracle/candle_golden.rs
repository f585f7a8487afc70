//! The golden-file harness for the candle layer (`examples/candle_golden`, `tests/candle.rs`):
//! each PyTorch reference case through [`NonLocal`], the input permuted to channels-first,
//! with the same report as the native harness ([`GoldenReport`]). A test oracle outside the
//! library, included with `#[path]` beside `golden.rs` (as the crate's module `golden`).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ndarray::{ArrayD, IxDyn};

use crate::golden::{compare, fnv1a64, GoldenCase, GoldenReport};
use nonlocal::candle::NonLocal;
use nonlocal::{Precision, TensorFile};

/// Tensors of a golden file that are not parameters.
const CASE_TENSORS: [&str; 5] = ["input", "output", "attention", "grad_output", "grad_input"];

fn wrap(e: nonlocal::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// A file tensor as a candle f32 tensor.
fn file_tensor(file: &TensorFile, key: &str) -> Result<Tensor> {
    let t = file.tensor(key).map_err(wrap)?;
    let shape = t.shape().to_vec();
    Tensor::from_vec(t.into_raw_vec_and_offset().0, shape, &Device::Cpu)
}

/// A candle tensor as an ndarray (row-major copy), for the crate's comparison.
fn to_array(t: &Tensor) -> Result<ArrayD<f32>> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(ArrayD::from_shape_vec(IxDyn(t.dims()), values).expect("element count of the tensor's own shape"))
}

/// Every float tensor of `file` that is not one of the case's tensors, as a variable.
fn parameters(file: &TensorFile) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut vars = varmap.data().lock().expect("a new VarMap's lock");
        for key in file.keys() {
            if CASE_TENSORS.contains(&key) || key.starts_with("grad.") {
                continue;
            }
            // Integer tensors (num_batches_tracked) and other non-float entries are no
            // parameters of the block.
            let Ok(t) = file_tensor(file, key) else { continue };
            vars.insert(key.to_string(), Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

/// (B, T, H, W, C) → PyTorch's channels-first layout for `conv_dims` (a strided view).
fn channels_first(x: &Tensor, conv_dims: usize) -> Result<Tensor> {
    let mut t = x.permute((0, 4, 1, 2, 3))?;
    for _ in conv_dims..3 {
        t = t.squeeze(2)?;
    }
    Ok(t)
}

/// The inverse of [`channels_first`].
fn channels_last(z: &Tensor, conv_dims: usize) -> Result<Tensor> {
    let mut t = z.clone();
    for _ in conv_dims..3 {
        t = t.unsqueeze(2)?;
    }
    t.permute((0, 2, 3, 4, 1))
}

/// Runs `case` through the candle layer: output, attention map (through
/// [`NonLocal::attention_map`]) and, in gradient cases, ∂L/∂input and every parameter's
/// gradient by candle's autograd, each compared with the file as the native harness does.
///
/// # Errors
/// Unreadable tensors, a block that does not load, shapes that disagree, a gradient the file
/// has and the layer does not (or the other way round).
pub fn check(case: &GoldenCase) -> Result<GoldenReport> {
    let weights = case.weights.as_deref().unwrap_or(&case.file);
    let varmap = parameters(weights)?;
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let prefix = case.keys.prefix.trim_end_matches('.');
    let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
    let config = case.config().filter(|_| matches!(case.spec, crate::golden::Spec::NonLocal(_)));
    let config = config.ok_or_else(|| candle_core::Error::Msg("the candle layer runs non-local cases".into()))?;
    let dims = config.conv_dims;
    let block = NonLocal::new(config.clone(), case.keys.naming, vb)?;
    let x = Var::from_tensor(&file_tensor(&case.file, "input")?)?;
    if x.rank() != 5 {
        candle_core::bail!("input has shape {:?}, expected (B, T, H, W, C)", x.dims());
    }
    let xcf = channels_first(x.as_tensor(), dims)?;
    let z = channels_last(&candle_core::Module::forward(&block, &xcf)?, dims)?;
    let got = to_array(&z)?;
    let bits = fnv1a64(got.iter().copied());
    let want = case.file.tensor("output").map_err(wrap)?;
    let (output_err, tol) = compare("output", &got, &want).map_err(wrap)?;
    let attention_err = if case.file.contains("attention") {
        let got = to_array(&block.attention_map(&xcf)?)?;
        Some(compare("attention", &got, &case.file.tensor("attention").map_err(wrap)?).map_err(wrap)?.0)
    } else {
        None
    };
    let (grad_input, grad_param_err) = if case.file.contains("grad_output") {
        let loss = (&z * file_tensor(&case.file, "grad_output")?)?.sum_all()?;
        let grads = loss.backward()?;
        let dx = grads.get(x.as_tensor()).ok_or_else(|| candle_core::Error::Msg("no input gradient".into()))?;
        let input_err =
            compare("grad_input", &to_array(dx)?, &case.file.tensor("grad_input").map_err(wrap)?).map_err(wrap)?;
        let vars: HashMap<String, Var> = varmap.data().lock().expect("VarMap lock").clone();
        let mut worst = 0.0f32;
        let mut seen = 0;
        for key in case.file.keys().into_iter().filter(|k| k.starts_with("grad.")) {
            let name = &key["grad.".len()..];
            let var = vars.get(name).ok_or_else(|| candle_core::Error::Msg(format!("{key}: no parameter {name}")))?;
            let got =
                grads.get(var.as_tensor()).ok_or_else(|| candle_core::Error::Msg(format!("{key}: no gradient")))?;
            let (err, tol) = compare(key, &to_array(got)?, &case.file.tensor(key).map_err(wrap)?).map_err(wrap)?;
            worst = worst.max(err / tol * 1e-4);
            seen += 1;
        }
        let with_grad = vars.values().filter(|v| grads.get(v.as_tensor()).is_some()).count();
        if with_grad != seen {
            candle_core::bail!("the layer has {with_grad} parameter gradients, the file {seen}");
        }
        (Some(input_err), Some(worst))
    } else {
        (None, None)
    };
    // The layer runs in f32: the scale of the relative error is the tolerance's 1e-4 factor.
    let scale = tol / 1e-4;
    Ok(GoldenReport {
        precision: Precision::F32,
        output_err,
        tol,
        scale,
        torch_err: None,
        attention_err,
        bits,
        grad_input,
        grad_param_err,
    })
}
