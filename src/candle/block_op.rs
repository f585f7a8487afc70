//! The whole block as one custom candle op on the CPU: [`NonLocalBlock`]'s own forward (and
//! `forward_train` + `backward` when gradients are needed), so the candle layer runs at the
//! native block's speed.
//!
//! **Why one op.** Candle's backward adds every gradient into a fresh zero tensor
//! (`or_insert` + `add`) and pads the gradient of every `narrow` with a concatenation: a
//! chain of small ops (projection, narrows of it, pooling, attention, output) pays several
//! full passes over N×C' tensors per op in the backward pass, which measured 1.8× the native
//! `forward_train` + `backward` at video-res3 (commit "candle feature: …" had that chain).
//! As one op, the only N-sized gradients candle handles are those of the output and of the
//! input.
//!
//! **What it keeps for the backward pass.** The op's `cpu_fwd` runs the channels-first
//! training pass (`forward_train_channels_first`'s, on the storage itself) and keeps the
//! block and its [`TrainContext`] (O(N·C): the projections, pooled keys,
//! y and one log-sum-exp per query, never N×M) inside the op itself, which candle holds in
//! the graph for `bwd`; `bwd` reads the output gradient channels-first the same way. Neither
//! direction copies the input: the GEMMs read the channel-major storage through strides, and
//! the output and ∂L/∂x, computed position-major, are written channel-major straight into
//! the tensors candle gets by one pass of register transposes. When neither
//! the input nor a parameter needs a gradient, the layer runs [`CachedBlock`] instead: the
//! inference `forward` (with its folds) of a block it keeps while the parameters' bits stay
//! those it was built from (checked by one comparison, no concatenation).
//!
//! **Parameters** travel as one flat f32 tensor (their concatenation, a candle op whose
//! backward hands each parameter its slice of the gradient), in the order of
//! [`ParameterGradients::named`](crate::ParameterGradients::named), the BatchNorm running
//! statistics last (detached).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use ndarray::{Array1, Array2, ArrayView5, ShapeBuilder};

use super::views::{collapsed, f32_data, with_cpu_f32};
use crate::block::{Layout as InputLayout, NonLocalBlock, Order, TrainContext};
use crate::config::NonLocalConfig;
use crate::kernels::microkernel::Word;
use crate::params::{BatchNorm, Conv1x1, Parameters};
use crate::workspace::Workspace;

/// Which optional parameters the flat tensor holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Present {
    pub(crate) theta_phi: bool,
    pub(crate) bias: [bool; 4],
    pub(crate) bn: bool,
    pub(crate) concat: bool,
}

/// The entries of the flat parameter tensor: name and element count, in order.
pub(crate) fn entries(config: &NonLocalConfig, present: Present) -> Vec<(&'static str, usize)> {
    let (c, ci) = (config.in_channels, config.inter_channels);
    let mut out = Vec::new();
    let convs: [(&str, &str, usize, usize); 4] = [
        ("theta.weight", "theta.bias", ci, c),
        ("phi.weight", "phi.bias", ci, c),
        ("g.weight", "g.bias", ci, c),
        ("w_z.weight", "w_z.bias", c, ci),
    ];
    for (i, (w, b, o, inp)) in convs.into_iter().enumerate() {
        if i < 2 && !present.theta_phi {
            continue;
        }
        out.push((w, o * inp));
        if present.bias[i] {
            out.push((b, o));
        }
    }
    if present.bn {
        out.extend([("bn.weight", c), ("bn.bias", c)]);
    }
    if present.concat {
        out.push(("concat_project", 2 * ci));
    }
    if present.bn {
        out.extend([("bn.running_mean", c), ("bn.running_var", c)]);
    }
    out
}

/// The inference block a layer keeps, with the flat parameters it was built from.
pub(crate) type BlockCache = Arc<Mutex<Option<(Vec<f32>, NonLocalBlock)>>>;

/// Whether `parts`, laid end to end, hold exactly the bits of `values` (a part not contiguous
/// on the CPU counts as different: the caller rebuilds).
pub(crate) fn same_bits(values: &[f32], parts: &[Tensor]) -> bool {
    let mut at = 0;
    for part in parts {
        let len = part.elem_count();
        let Some(want) = values.get(at..at + len) else { return false };
        at += len;
        let same = with_cpu_f32(part, "parameter", |data, layout| {
            let start = layout.start_offset();
            Ok(layout.is_contiguous() && data.get(start..start + len).is_some_and(|got| u32::of(got) == u32::of(want)))
        });
        if !matches!(same, Ok(true)) {
            return false;
        }
    }
    at == values.len()
}

/// The block on channels-first input (B, C, positions…) with flat parameters, trained:
/// `forward_train`, keeping what `bwd` needs.
pub(crate) struct BlockOp {
    pub(crate) config: NonLocalConfig,
    pub(crate) present: Present,
    /// The layer's scratch buffers, kept between calls (fresh pages for every projection and
    /// gradient buffer would cost more than some of the passes that fill them).
    pub(crate) workspace: Arc<Workspace>,
    pub(crate) saved: Mutex<Option<(NonLocalBlock, TrainContext)>>,
}

/// The layer's inference block (built by the layer, see [`BlockCache`]) on channels-first
/// input, without backward.
pub(crate) struct CachedBlock {
    pub(crate) cache: BlockCache,
}

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

pub(crate) fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("nonlocal: a lock was poisoned by a panic".into())
}

/// The block of the flat f32 parameter values (the order of [`entries`]), on `workspace`.
///
/// # Errors
/// When there are not as many values as `entries` says, or the block rejects them.
pub(crate) fn block_from_flat(
    config: &NonLocalConfig,
    present: Present,
    flat: &[f32],
    workspace: &Arc<Workspace>,
) -> Result<NonLocalBlock> {
    let mut block = NonLocalBlock::from_parameters(config.clone(), parameters(config, present, flat)?).map_err(wrap)?;
    block.share_workspace(Arc::clone(workspace));
    Ok(block)
}

/// Parameters from the flat f32 values.
fn parameters(config: &NonLocalConfig, present: Present, flat: &[f32]) -> Result<Parameters> {
    let entries = entries(config, present);
    let total: usize = entries.iter().map(|e| e.1).sum();
    if flat.len() != total {
        candle_core::bail!("nonlocal: {} parameter values, expected {total}", flat.len());
    }
    let (c, ci) = (config.in_channels, config.inter_channels);
    let mut at = 0;
    let mut take = |len: usize| {
        let part = &flat[at..at + len];
        at += len;
        part.to_vec()
    };
    let mut values = std::collections::HashMap::new();
    for (name, len) in &entries {
        values.insert(*name, take(*len));
    }
    let mut conv = |name: &str, out: usize, inp: usize| -> Option<Conv1x1> {
        let weight = values.remove(format!("{name}.weight").as_str())?;
        let bias = values.remove(format!("{name}.bias").as_str()).map(Array1::from_vec);
        Some(Conv1x1 { weight: Array2::from_shape_vec((out, inp), weight).expect("sized by entries"), bias })
    };
    let theta = conv("theta", ci, c);
    let phi = conv("phi", ci, c);
    let g = conv("g", ci, c).expect("g is always present");
    let w_z = conv("w_z", c, ci).expect("W_z is always present");
    let mut vector = |name: &str| values.remove(name).map(Array1::from_vec);
    let bn = match (vector("bn.weight"), vector("bn.bias"), vector("bn.running_mean"), vector("bn.running_var")) {
        (Some(weight), Some(bias), Some(running_mean), Some(running_var)) => {
            Some(BatchNorm { weight, bias, running_mean, running_var })
        }
        _ => None,
    };
    let concat_project = vector("concat_project");
    Ok(Parameters { theta, phi, g, w_z, bn, concat_project })
}

/// A channels-first tensor's storage (B, C, positions…) viewed as (B, C, T, H, W).
fn channels_first<'a>(data: &'a [f32], layout: &Layout) -> Result<ArrayView5<'a, f32>> {
    Ok(clips(data, layout)?.permuted_axes([0, 4, 1, 2, 3]))
}

/// A channels-first tensor's storage (B, C, positions…) viewed as clips (B, T, H, W, C).
fn clips<'a>(data: &'a [f32], layout: &Layout) -> Result<ArrayView5<'a, f32>> {
    let (dims, strides) = (layout.dims(), layout.stride());
    let spatial = dims.len() - 2;
    let mut shape = [dims[0], 1, 1, 1, dims[1]];
    let mut st = [strides[0], 0, 0, 0, strides[1]];
    shape[4 - spatial..4].copy_from_slice(&dims[2..]);
    st[4 - spatial..4].copy_from_slice(&strides[2..]);
    let base = data.get(layout.start_offset()..).unwrap_or(&[]);
    ArrayView5::from_shape(shape.strides(st), base)
        .map_err(|e| candle_core::Error::Msg(format!("nonlocal: layout {dims:?} strides {strides:?}: {e}")))
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "nonlocal-block"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sp: &CpuStorage, lp: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, p) = (f32_data(sx, "x")?, f32_data(sp, "parameters")?);
        let flat = p.get(lp.start_offset()..lp.start_offset() + lp.shape().elem_count()).unwrap_or(&[]);
        if !lp.is_contiguous() {
            candle_core::bail!("nonlocal: the flat parameters must be contiguous");
        }
        // Channels-first in, channels-first out: the block reads the storage through strides
        // and writes the result channel-major (register transposes of its output rows).
        let block = block_from_flat(&self.config, self.present, flat, &self.workspace)?;
        let x5 = block.check_input(clips(x, lx)?.into_dyn(), InputLayout::Clips).map_err(wrap)?;
        let mut z = crate::block::buffer(x5.len(), "output").map_err(wrap)?;
        // No copy of x in the context: candle keeps x for `bwd`, which reads it again.
        let ctx = block.forward_train_checked(x5, Order::ChannelMajor, &mut z, false).map_err(wrap)?;
        *self.saved.lock().map_err(|_| poisoned())? = Some((block, ctx));
        Ok((CpuStorage::F32(z), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().map_err(|_| poisoned())?;
        let Some((block, ctx)) = saved.as_ref() else {
            candle_core::bail!("nonlocal: backward of a block run without gradients");
        };
        let grad = collapsed(grad, 1, 1)?;
        // ∂L/∂x is channels-first like x: written channel-major by the backward's last pass.
        let mut dx = crate::block::buffer(x.elem_count(), "input gradient").map_err(wrap)?;
        let params_grad = with_cpu_f32(x, "x", |xd, xl| {
            with_cpu_f32(&grad, "output gradient", |data, layout| {
                let (dz, x5) = (clips(data, layout)?, clips(xd, xl)?);
                block.backward_checked(ctx, dz, Order::ChannelMajor, &mut dx, Some(x5)).map_err(wrap)
            })
        })?;
        let dx = Tensor::from_vec(dx, x.dims(), &candle_core::Device::Cpu)?;
        let named = params_grad.named();
        let mut flat = Vec::with_capacity(params.elem_count());
        for (name, len) in entries(&self.config, self.present) {
            match named.iter().find(|(n, _)| n == name) {
                Some((_, g)) => match g.as_slice() {
                    Some(values) => flat.extend_from_slice(values),
                    None => flat.extend(g.iter().copied()),
                },
                None => flat.extend(std::iter::repeat_n(0.0, len)),
            }
        }
        let dp = Tensor::from_vec(flat, params.dims(), &candle_core::Device::Cpu)?;
        Ok((x.track_op().then_some(dx), params.track_op().then_some(dp)))
    }
}

impl CustomOp1 for CachedBlock {
    fn name(&self) -> &'static str {
        "nonlocal-block"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(sx, "x")?;
        let cache = self.cache.lock().map_err(|_| poisoned())?;
        let Some((_, block)) = cache.as_ref() else {
            candle_core::bail!("nonlocal: the layer's block was not built before its op ran");
        };
        let z = block.forward_channels_first(&channels_first(x, lx)?).map_err(wrap)?;
        Ok((CpuStorage::F32(z.into_raw_vec_and_offset().0), lx.shape().clone()))
    }
}
