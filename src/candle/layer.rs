//! [`NonLocal`]: the non-local block as a candle layer, its parameters read from a
//! `VarBuilder` under PyTorch's keys.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use std::sync::{Arc, Mutex};

use super::block_op::{block_from_flat, poisoned, same_bits, BlockCache, BlockOp, CachedBlock, Present};
use super::views::collapsible;
use crate::config::{Mode, NonLocalConfig};
use crate::load::{Naming, WeightKeys};
use crate::workspace::Workspace;

/// A 1x1(x1) convolution's weight as (out, in) and its bias.
#[derive(Clone, Debug)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// BatchNorm in inference form; the running statistics are detached (never trained).
#[derive(Clone, Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

/// A non-local block (Wang et al., CVPR 2018) as a candle layer: `z = BN(W_z·y) + x` with
/// `y_i = Σ_j f(x_i, x_j)·g(x_j) / C(x)`, in the four modes of [`Mode`].
///
/// Built from a [`NonLocalConfig`] and a [`VarBuilder`] holding the parameters under the
/// keys of AlexHex7's `Non-local_pytorch` or mmcv's `NonLocal1d/2d/3d` ([`Naming`]) at the
/// builder's prefix, with PyTorch's shapes: `theta.weight` (C', C, 1, 1, 1) for a 3-d block
/// (`conv_dims` trailing 1s), `phi.0.weight` when pooled, `W.0.weight` and `W.1.*` with
/// BatchNorm, or mmcv's `theta.conv.weight`, `conv_out.conv.weight`, `conv_out.bn.*`,
/// `concat_project.conv.weight`. The same call loads a safetensors file, a `.pth` or a
/// [`candle_nn::VarMap`] being trained (fresh variables start as PyTorch's do: θ, φ, g
/// uniform in ±1/√fan_in and the last layer zero, so a new block is the identity).
///
/// # Shapes
/// `forward` takes PyTorch's channels-first layout for the block's `conv_dims`: (B, C, L)
/// for 1, (B, C, H, W) for 2, (B, C, T, H, W) for 3, with any strides, and returns the
/// same shape (contiguous).
///
/// # Speed and memory
/// On the CPU the block is one custom candle op that runs the crate's own block: its
/// inference pass when nothing needs a gradient (parameters loaded as plain tensors, an
/// input that is no `Var`'s descendant) — `NonLocalBlock::forward_channels_first`, which
/// writes the channels-first output directly, on a block kept while the parameters stay the
/// same — else `forward_train`, keeping the O(N·C) training
/// context (projections, pooled keys, y, one log-sum-exp per query) inside the op for its
/// `bwd`, which runs the exact backward pass for the input and every parameter. Nothing of
/// size N×M exists, forward or backward: the softmax modes use the fused online-softmax
/// kernel, dot product `θ·(φᵀg)/M`, concatenation sorted prefix sums. The parameters reach
/// the op as one concatenated f32 tensor, whose candle backward hands each `Var` its slice of
/// the gradient. BF16, F16 and F64 inputs and parameters are converted to f32 and the output
/// back. The op's backward is not itself differentiable (no second-order gradients).
/// On other devices, or through [`NonLocal::forward_plain`], the block is plain candle ops,
/// which form the N×M attention.
///
/// Candle's autograd allocates a fresh tensor for every op and every gradient of a step, and
/// glibc returns such memory to the kernel when it is freed, so each training step faults it
/// in again; a training program should call [`crate::keep_freed_memory`] first (in a loop of
/// candle steps at video-res3 it took the step from 2.1–2.4× the native one to 1.2–1.4×; see
/// the README).
///
/// BatchNorm is in inference form (running statistics frozen, as when fine-tuning): its
/// weight and bias are trained, the running statistics get no gradient.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use nonlocal::{candle::NonLocal, Naming, NonLocalConfig};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let block = NonLocal::new(NonLocalConfig::new(8), Naming::AlexHex7, vb.pp("nl"))?;
/// let x = Tensor::randn(0f32, 1., (2, 8, 3, 6, 6), &Device::Cpu)?; // (B, C, T, H, W)
/// let z = block.forward(&x)?;
/// assert_eq!(z.dims(), x.dims());
/// // A new block is the identity (BatchNorm γ = β = 0).
/// assert_eq!((z - &x)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
/// assert!(varmap.data().lock().unwrap().contains_key("nl.W.1.weight"));
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct NonLocal {
    config: NonLocalConfig,
    theta: Option<Conv>,
    phi: Option<Conv>,
    g: Conv,
    w_z: Conv,
    bn: Option<BatchNorm>,
    concat_project: Option<Tensor>,
    /// Scratch buffers of the CPU path, kept between calls (shared by clones).
    workspace: Arc<Workspace>,
    /// The inference block last built, with the parameters it was built from.
    cache: BlockCache,
}

fn uniform(bound: f64) -> Init {
    Init::Uniform { lo: -bound, up: bound }
}

/// A 1x1 convolution under `stem`: weight (out, in, 1 × dims) and, when `bias` says so or the
/// builder has one, its bias.
fn conv(
    vb: &VarBuilder<'_>,
    stem: &str,
    (out, inp, dims): (usize, usize, usize),
    init: Init,
    bias: bool,
) -> Result<Conv> {
    let mut shape = vec![out, inp];
    shape.resize(2 + dims, 1);
    let weight = vb.get_with_hints(shape, &format!("{stem}.weight"), init)?.reshape((out, inp))?;
    let bias_key = format!("{stem}.bias");
    let bias_init = match init {
        Init::Const(v) => Init::Const(v),
        _ => uniform(1.0 / (inp as f64).sqrt()),
    };
    let bias =
        (bias || vb.contains_tensor(&bias_key)).then(|| vb.get_with_hints(out, &bias_key, bias_init)).transpose()?;
    Ok(Conv { weight, bias })
}

/// Refuses a configuration the builder's keys contradict (pooling, BatchNorm, mode), naming
/// the keys. A builder without the block's keys (a new [`candle_nn::VarMap`]) passes.
fn check_keys(vb: &VarBuilder<'_>, keys: &WeightKeys, config: &NonLocalConfig) -> Result<()> {
    let has = |stem: String| vb.contains_tensor(&format!("{stem}.weight"));
    let pooled = config.sub_sample.is_some();
    let (ours, other) = (keys.embedding("g", pooled), keys.embedding("g", !pooled));
    if !has(ours.clone()) && has(other.clone()) {
        candle_core::bail!(
            "nonlocal: configuration says sub_sample = {:?}, but the weights have {}.weight{} instead of {ours}.weight",
            config.sub_sample,
            vb.prefix_key(&other),
            if pooled { " (unpooled)" } else { " (pooled)" }
        );
    }
    let bn = has(keys.bn());
    let w_z = has(keys.w_z(true)) || has(keys.w_z(false));
    if w_z && bn != config.bn_layer {
        candle_core::bail!(
            "nonlocal: configuration says bn_layer = {}, but the weights {} {}.weight",
            config.bn_layer,
            if bn { "have" } else { "have no" },
            vb.prefix_key(&keys.bn())
        );
    }
    let concat = vb.contains_tensor(&keys.concat_project());
    if concat && config.mode != Mode::Concatenation {
        candle_core::bail!(
            "nonlocal: configuration says mode = {}, but the weights have {} (concatenation)",
            config.mode,
            vb.prefix_key(&keys.concat_project())
        );
    }
    let theta = has(keys.embedding("theta", pooled));
    if theta && !config.mode.has_theta_phi() {
        candle_core::bail!("nonlocal: configuration says mode = gaussian, but the weights have θ/φ convolutions");
    }
    if !theta && config.mode.has_theta_phi() && has(ours) {
        candle_core::bail!(
            "nonlocal: configuration says mode = {}, but the weights have no {}.weight (gaussian)",
            config.mode,
            vb.prefix_key(&keys.embedding("theta", pooled))
        );
    }
    Ok(())
}

/// The full key of `name` under the builder's prefix, for messages.
trait PrefixKey {
    fn prefix_key(&self, name: &str) -> String;
}

impl PrefixKey for VarBuilder<'_> {
    fn prefix_key(&self, name: &str) -> String {
        let prefix = self.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }
}

impl NonLocal {
    /// The block's parameters from `vb` under `naming`'s keys (at the builder's prefix),
    /// checked against `config`: every shape by candle (its error names the key, the expected
    /// and the found shape), and pooling, BatchNorm and mode against the keys present.
    ///
    /// # Errors
    /// An invalid configuration, a missing key, a wrong shape, or keys that contradict the
    /// configuration (e.g. `phi.weight` for a pooled block).
    pub fn new(config: NonLocalConfig, naming: Naming, vb: VarBuilder<'_>) -> Result<Self> {
        config.validate().map_err(candle_core::Error::wrap)?;
        let keys = WeightKeys { naming, prefix: String::new() };
        check_keys(&vb, &keys, &config)?;
        let (c, ci, dims) = (config.in_channels, config.inter_channels, config.conv_dims);
        let pooled = config.sub_sample.is_some();
        let embed_init = uniform(1.0 / (c as f64).sqrt());
        let embed = |name: &str| conv(&vb, &keys.embedding(name, pooled), (ci, c, dims), embed_init, true);
        let (theta, phi) =
            if config.mode.has_theta_phi() { (Some(embed("theta")?), Some(embed("phi")?)) } else { (None, None) };
        let g = embed("g")?;
        // mmcv's conv_out has no bias when BatchNorm follows; AlexHex7's always has one. Without
        // BatchNorm W_z starts at zero (the paper's identity init), with it BatchNorm's γ does.
        let w_z_bias = !(config.bn_layer && naming == Naming::Mmcv);
        let w_z_init = if config.bn_layer { uniform(1.0 / (ci as f64).sqrt()) } else { Init::Const(0.0) };
        let w_z = conv(&vb, &keys.w_z(config.bn_layer), (c, ci, dims), w_z_init, w_z_bias)?;
        let bn = if config.bn_layer {
            let stem = keys.bn();
            let get = |name: &str, init: f64| vb.get_with_hints(c, &format!("{stem}.{name}"), Init::Const(init));
            Some(BatchNorm {
                weight: get("weight", 0.0)?,
                bias: get("bias", 0.0)?,
                running_mean: get("running_mean", 0.0)?.detach(),
                running_var: get("running_var", 1.0)?.detach(),
            })
        } else {
            None
        };
        let concat_project = if config.mode == Mode::Concatenation {
            let init = uniform(1.0 / ((2 * ci) as f64).sqrt());
            Some(vb.get_with_hints((1, 2 * ci, 1, 1), &keys.concat_project(), init)?.reshape(2 * ci)?)
        } else {
            None
        };
        Ok(NonLocal {
            config,
            theta,
            phi,
            g,
            w_z,
            bn,
            concat_project,
            workspace: Arc::default(),
            cache: Arc::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NonLocalConfig {
        &self.config
    }

    /// The input's (T, H, W) grid, checked: rank 2 + `conv_dims`, C channels in axis 1, no
    /// empty axis, at least one key.
    fn grid(&self, x: &Tensor) -> Result<[usize; 3]> {
        let dims = x.dims();
        let conv_dims = self.config.conv_dims;
        if dims.len() != 2 + conv_dims {
            let layout = ["(B, C, L)", "(B, C, H, W)", "(B, C, T, H, W)"][conv_dims - 1];
            candle_core::bail!(
                "nonlocal: input shape {dims:?} has rank {}, the block (conv_dims = {conv_dims}) takes {layout}",
                dims.len()
            );
        }
        if dims[1] != self.config.in_channels {
            candle_core::bail!(
                "nonlocal: input shape {dims:?} has {} channels in axis 1, the block expects {} (inputs are \
                 channels-first, as in PyTorch)",
                dims[1],
                self.config.in_channels
            );
        }
        if let Some(axis) = dims.iter().position(|&d| d == 0) {
            let names = [&["B", "C"][..], &["T", "H", "W"][3 - conv_dims..]].concat();
            return Err(candle_core::Error::wrap(crate::Error::EmptyInput {
                axis,
                name: names[axis],
                shape: dims.to_vec(),
            }));
        }
        let mut grid = [1usize; 3];
        grid[3 - conv_dims..].copy_from_slice(&dims[2..]);
        let kernel = self.config.pool_kernel();
        if grid.iter().zip(kernel).any(|(&g, k)| g < k) {
            return Err(candle_core::Error::wrap(crate::Error::NoKeys { size: grid, kernel }));
        }
        if !x.dtype().is_float() {
            candle_core::bail!("nonlocal: input dtype {:?} is not a float type", x.dtype());
        }
        Ok(grid)
    }

    /// `W_z` with BatchNorm folded in, `[W' | b']` (C × (C' + 1)), in candle ops on the
    /// parameters: `W' = s ⊙ W_z`, `b' = s ⊙ (b_z − mean) + β` with `s = γ / √(var + eps)`.
    fn folded_output(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        let c = self.config.in_channels;
        let w = self.w_z.weight.to_dtype(dtype)?;
        let b = match &self.w_z.bias {
            Some(b) => b.to_dtype(dtype)?,
            None => Tensor::zeros(c, dtype, w.device())?,
        };
        match &self.bn {
            None => Ok((w, b)),
            Some(bn) => {
                let var = bn.running_var.to_dtype(dtype)?;
                let s = (bn.weight.to_dtype(dtype)? / (var + self.config.bn_eps)?.sqrt()?)?;
                let w = w.broadcast_mul(&s.unsqueeze(1)?)?;
                let b = ((b - bn.running_mean.to_dtype(dtype)?)? * &s)?.add(&bn.bias.to_dtype(dtype)?)?;
                Ok((w, b))
            }
        }
    }

    /// Which optional parameters the layer has.
    fn present(&self) -> Present {
        Present {
            theta_phi: self.theta.is_some(),
            bias: [&self.theta, &self.phi, &Some(self.g.clone()), &Some(self.w_z.clone())]
                .map(|c| c.as_ref().is_some_and(|c| c.bias.is_some())),
            bn: self.bn.is_some(),
            concat: self.concat_project.is_some(),
        }
    }

    /// The parameters as f32 tensors in the order of [`entries`](super::block_op::entries) (weights flattened).
    fn parameter_parts(&self) -> Result<Vec<Tensor>> {
        let mut parts: Vec<Tensor> = Vec::new();
        for conv in [&self.theta, &self.phi].into_iter().flatten().chain([&self.g, &self.w_z]) {
            parts.push(conv.weight.flatten_all()?);
            parts.extend(conv.bias.iter().cloned());
        }
        if let Some(bn) = &self.bn {
            parts.extend([bn.weight.clone(), bn.bias.clone()]);
        }
        parts.extend(self.concat_project.iter().cloned());
        if let Some(bn) = &self.bn {
            parts.extend([bn.running_mean.clone(), bn.running_var.clone()]);
        }
        parts.iter().map(|t| t.to_dtype(DType::F32)).collect()
    }

    /// The CPU forward pass: the whole block as one custom op (see `block_op`), in f32.
    fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let mut x32 = x.to_dtype(DType::F32)?;
        // The block reads positions through one stride (a broadcast axis is none): else copy.
        let broadcast = x32.stride().iter().zip(x32.dims()).any(|(&s, &d)| s == 0 && d > 1);
        if broadcast || !collapsible(&x32, 1, 1) {
            x32 = x32.contiguous()?;
        }
        let parts = self.parameter_parts()?;
        if !x32.track_op() && !parts.iter().any(Tensor::track_op) {
            // Inference: the block built from these parameters before, when their bits are
            // those it was built from (one comparison, no concatenation), else a new one.
            let present = self.present();
            let mut cache = self.cache.lock().map_err(|_| poisoned())?;
            if !cache.as_ref().is_some_and(|(values, _)| same_bits(values, &parts)) {
                let values = Tensor::cat(&parts, 0)?.to_vec1::<f32>()?;
                let block = block_from_flat(&self.config, present, &values, &self.workspace)?;
                *cache = Some((values, block));
            }
            drop(cache);
            let op = CachedBlock { cache: Arc::clone(&self.cache) };
            return x32.apply_op1_no_bwd(&op)?.to_dtype(dtype);
        }
        let (present, flat) = (self.present(), Tensor::cat(&parts, 0)?);
        let workspace = Arc::clone(&self.workspace);
        let op = BlockOp { config: self.config.clone(), present, workspace, saved: Mutex::new(None) };
        x32.apply_op2(&flat, op)?.to_dtype(dtype)
    }

    /// The block in plain candle ops on any device: projections by matmul, max-pool by
    /// reshape and max, and the N×M attention by matmul, softmax (or division by M, or ReLU)
    /// and matmul. What `forward` runs on non-CPU devices; on the CPU, a comparison for the
    /// fused path (tests, benches). Gradients flow through candle's own ops (max-pool ties
    /// share their gradient, where PyTorch and the fused path give it to the first maximum).
    ///
    /// # Errors
    /// As `forward`.
    pub fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        let grid = self.grid(x)?;
        let (y, _) = self.plain_attention(x, grid, false)?;
        let (w, b) = self.folded_output(x.dtype())?;
        let z = w.broadcast_matmul(&y.transpose(1, 2)?)?.broadcast_add(&b.unsqueeze(1)?)?;
        x.flatten_from(2)?.add(&z)?.reshape(x.dims())
    }

    /// The normalised attention weights `f(x_i, x_j)/C(x)` of every query i over every key j:
    /// (B, N, M), queries in (t, h, w) row-major order and keys likewise on the pooled grid,
    /// what PyTorch's `return_nl_map` gives. N·M numbers per sample, in plain candle ops: for
    /// small inputs and inspection.
    ///
    /// # Errors
    /// As `forward`.
    pub fn attention_map(&self, x: &Tensor) -> Result<Tensor> {
        let grid = self.grid(x)?;
        let (_, weights) = self.plain_attention(x, grid, true)?;
        Ok(weights.expect("asked for the weights"))
    }

    /// y (B, N, C') in plain candle ops, and the attention weights (B, N, M) if asked.
    fn plain_attention(&self, x: &Tensor, grid: [usize; 3], want_weights: bool) -> Result<(Tensor, Option<Tensor>)> {
        let dtype = x.dtype();
        let xf = x.flatten_from(2)?; // (B, C, N)
        let project = |conv: &Conv| -> Result<Tensor> {
            let p = conv.weight.to_dtype(dtype)?.broadcast_matmul(&xf)?;
            match &conv.bias {
                Some(b) => p.broadcast_add(&b.to_dtype(dtype)?.unsqueeze(1)?),
                None => Ok(p),
            }
        };
        let pool = |t: &Tensor| self.pool_plain(t, grid);
        let g = pool(&project(&self.g)?)?; // (B, C', M)
        let m = g.dim(2)?;
        let weights = match self.config.mode {
            Mode::EmbeddedGaussian | Mode::DotProduct | Mode::Gaussian => {
                let (q, k) = match (&self.theta, &self.phi) {
                    (Some(theta), Some(phi)) => (project(theta)?, pool(&project(phi)?)?),
                    _ => (xf.clone(), pool(&xf)?),
                };
                let logits = q.transpose(1, 2)?.matmul(&k)?;
                if self.config.mode == Mode::DotProduct {
                    (logits / m as f64)?
                } else {
                    let logits = (logits * self.config.logit_scale() as f64)?;
                    candle_nn::ops::softmax(&logits, D::Minus1)?
                }
            }
            Mode::Concatenation => {
                let project_w = self.concat_project.as_ref().expect("projection").to_dtype(dtype)?;
                let ci = self.config.inter_channels;
                let theta = project(self.theta.as_ref().expect("θ"))?;
                let phi = pool(&project(self.phi.as_ref().expect("φ"))?)?;
                let a = project_w.narrow(0, 0, ci)?.reshape((1, 1, ci))?.broadcast_matmul(&theta)?; // (B, 1, N)
                let b = project_w.narrow(0, ci, ci)?.reshape((1, 1, ci))?.broadcast_matmul(&phi)?; // (B, 1, M)
                (a.transpose(1, 2)?.broadcast_add(&b)?.relu()? / m as f64)?
            }
        };
        let y = weights.matmul(&g.transpose(1, 2)?)?; // (B, N, C')
        Ok((y, want_weights.then_some(weights)))
    }

    /// Max-pool of (B, K, N) over the grid with kernel = stride (floor), in candle ops:
    /// (B, K, M); the identity without sub-sampling.
    fn pool_plain(&self, t: &Tensor, grid: [usize; 3]) -> Result<Tensor> {
        let Some([kt, kh, kw]) = self.config.sub_sample else { return Ok(t.clone()) };
        let (b, k, _) = t.dims3()?;
        let [pt, ph, pw] = crate::kernels::pool::pooled_grid(grid, [kt, kh, kw]);
        let t = t.reshape((b, k, grid[0], grid[1], grid[2]))?;
        let t = t.narrow(2, 0, pt * kt)?.narrow(3, 0, ph * kh)?.narrow(4, 0, pw * kw)?;
        let t = t.contiguous()?.reshape(vec![b * k, pt, kt, ph, kh, pw, kw])?;
        t.max(6)?.max(4)?.max(2)?.reshape((b, k, pt * ph * pw))
    }
}

impl Module for NonLocal {
    /// `z = BN(W_z·y) + x` on channels-first input, fused on the CPU (see [`NonLocal`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.grid(x)?;
        if !x.device().is_cpu() {
            return self.forward_plain(x);
        }
        self.forward_fused(x)
    }
}
