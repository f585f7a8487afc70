//! [`ContextBlock`]: parameters plus the forward pass (shape checks, pooling, the two MLPs,
//! fusion).

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::Arc;

use ndarray::{Array, Array2, ArrayBase, ArrayView4, Data, DataMut, Dimension};

use super::config::ContextConfig;
use super::input::{as_uninit, check_input, contiguous, written_buffer, Layout};
use super::kernels::{combine, fuse, matvec, on_worker, pool, FusionTerms, Pooled};
use super::params::{ContextMlp, ContextParameters};
use crate::error::{Error, Result};
use crate::load::TensorFile;
use crate::load::WeightKeys;
use crate::params::Conv1x1;
use crate::workspace::Workspace;

/// Seed of the weight init of [`ContextBlock::new`].
const DEFAULT_SEED: u64 = 0x6763_6e65_745f_6263;

/// Source of [`ContextBlock`] generations, so a training context can tell it is stale.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub(super) fn next_generation() -> u64 {
    GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The global context block of GCNet (Cao et al., [*GCNet: Non-local Networks Meet
/// Squeeze-Excitation Networks and Beyond*][paper], 2019): one query-independent attention
/// map per sample pools a context vector, two small MLPs turn it into a per-channel gate and
/// a per-channel term:
///
/// ```text
/// context = Σ_j softmax_j(w·x_j + b)·x_j        (or the mean of x)
/// MLP(c)  = W2·ReLU(LayerNorm(W1·c + b1)) + b2
/// out_j   = x_j ⊙ sigmoid(MLP_mul(context)) + MLP_add(context)
/// ```
///
/// either fusion optional. PyTorch-exact for mmcv's `ContextBlock` and timm's
/// `GlobalContext` (sigmoid gate), whose checkpoints it loads ([`ContextBlock::from_checkpoint`]).
///
/// # Example
/// ```
/// use ndarray::Array4;
/// use nonlocal::{ContextBlock, ContextConfig};
///
/// let block = ContextBlock::new(ContextConfig::mmcv(16, 0.25))?;
/// let x = Array4::<f32>::from_shape_fn((2, 5, 7, 16), |(b, h, w, c)| (b + h * w + c) as f32 * 0.01);
/// let z = block.forward_images(&x)?;
/// // mmcv zero-inits the last conv of each MLP: a new add-fusion block is the identity.
/// assert_eq!(z, x);
/// # Ok::<(), nonlocal::Error>(())
/// ```
///
/// [paper]: https://arxiv.org/abs/1904.11492
#[derive(Clone, Debug)]
pub struct ContextBlock {
    pub(super) config: ContextConfig,
    pub(super) params: ContextParameters,
    pub(super) keys: Option<WeightKeys>,
    pub(super) compiled: Compiled,
    pub(super) generation: u64,
    /// Scratch buffers kept between calls (large fresh allocations cost page faults).
    pub(super) workspace: Arc<Workspace>,
}

/// One MLP's weights as row-major slices (absent biases as zeros).
#[derive(Clone, Debug)]
pub(super) struct CompiledMlp {
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
}

/// The parameters as the kernels read them.
#[derive(Clone, Debug)]
pub(super) struct Compiled {
    /// The mask conv's weight (C) and bias.
    pub mask: Option<(Vec<f32>, f32)>,
    pub add: Option<CompiledMlp>,
    pub mul: Option<CompiledMlp>,
}

fn weight_of(conv: &Conv1x1) -> Vec<f32> {
    conv.weight.iter().copied().collect()
}

fn bias_of(conv: &Conv1x1) -> Vec<f32> {
    conv.bias.as_ref().map_or_else(|| vec![0.0; conv.weight.nrows()], |b| b.to_vec())
}

impl CompiledMlp {
    fn new(m: &ContextMlp) -> Self {
        CompiledMlp {
            w1: weight_of(&m.conv1),
            b1: bias_of(&m.conv1),
            gamma: m.ln_weight.to_vec(),
            beta: m.ln_bias.to_vec(),
            w2: weight_of(&m.conv2),
            b2: bias_of(&m.conv2),
        }
    }
}

impl Compiled {
    pub(super) fn new(params: &ContextParameters) -> Self {
        Compiled {
            mask: params.mask.as_ref().map(|m| (weight_of(m), bias_of(m)[0])),
            add: params.add.as_ref().map(CompiledMlp::new),
            mul: params.mul.as_ref().map(CompiledMlp::new),
        }
    }
}

/// What one MLP computed for one sample, kept for the backward pass.
#[derive(Clone, Debug)]
pub(super) struct MlpTrace {
    /// The LayerNorm's normalised input `(h − μ)/σ` (planes).
    pub normed: Vec<f64>,
    /// `1/σ = 1/√(var + eps)`.
    pub inv_std: f64,
    /// The LayerNorm output, before the ReLU (planes).
    pub pre_relu: Vec<f32>,
    /// After the ReLU (planes).
    pub hidden: Vec<f32>,
    /// The MLP's output (C): the add term, or the gate's logit.
    pub out: Vec<f32>,
}

/// `W2·ReLU(LayerNorm(W1·c + b1)) + b2`, the LayerNorm statistics in f64.
pub(super) fn run_mlp(m: &CompiledMlp, context: &[f32], eps: f64) -> MlpTrace {
    let planes = m.b1.len();
    let mut h = vec![0.0f32; planes];
    matvec(&m.w1, context, &m.b1, &mut h);
    let mean = h.iter().map(|&v| f64::from(v)).sum::<f64>() / planes as f64;
    let var = h.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / planes as f64;
    let inv_std = 1.0 / (var + eps).sqrt();
    let normed: Vec<f64> = h.iter().map(|&v| (f64::from(v) - mean) * inv_std).collect();
    let pre_relu: Vec<f32> = normed
        .iter()
        .zip(m.gamma.iter().zip(&m.beta))
        .map(|(n, (&g, &b))| (n * f64::from(g) + f64::from(b)) as f32)
        .collect();
    // NaN stays NaN, as in PyTorch (f32::max would drop it).
    let hidden: Vec<f32> = pre_relu.iter().map(|&v| if v > 0.0 || v.is_nan() { v } else { 0.0 }).collect();
    let mut out = vec![0.0f32; m.b2.len()];
    matvec(&m.w2, &hidden, &m.b2, &mut out);
    MlpTrace { normed, inv_std, pre_relu, hidden, out }
}

/// `1/(1 + e^−v)`, in f64.
pub(super) fn sigmoid(v: f32) -> f32 {
    (1.0 / (1.0 + (-f64::from(v)).exp())) as f32
}

/// What the forward pass computed for one sample besides the output.
#[derive(Clone, Debug)]
pub(super) struct SampleTrace {
    pub pooled: Pooled,
    pub add: Option<MlpTrace>,
    pub mul: Option<MlpTrace>,
    /// `sigmoid(MLP_mul(context))`, with mul fusion.
    pub gate: Option<Vec<f32>>,
}

impl ContextBlock {
    /// A new block with fresh parameters drawn as the upstream module of `config.naming`
    /// initialises them (see [`ContextParameters::init`]): mmcv's block with add fusion
    /// starts as the identity.
    ///
    /// # Errors
    /// Those of [`ContextConfig::validate`].
    pub fn new(config: ContextConfig) -> Result<Self> {
        config.validate()?;
        let params = ContextParameters::init(&config, DEFAULT_SEED);
        Self::from_parameters(config, params)
    }

    /// A block from parameters held in ndarrays.
    ///
    /// # Errors
    /// Those of [`ContextParameters::validate`]: a missing or extra part, a wrong shape, a
    /// non-finite value, an invalid configuration.
    pub fn from_parameters(config: ContextConfig, params: ContextParameters) -> Result<Self> {
        params.validate(&config)?;
        let compiled = Compiled::new(&params);
        Ok(ContextBlock {
            config,
            params,
            keys: None,
            compiled,
            generation: next_generation(),
            workspace: Default::default(),
        })
    }

    /// A block with parameters read from a checkpoint (safetensors or `torch.save`, as
    /// [`TensorFile::open`] reads them) under `keys`: [`WeightKeys::mmcv`] for mmcv's
    /// `ContextBlock` (`conv_mask.weight`, `channel_add_conv.0.weight`, …) or
    /// [`WeightKeys::timm`] for timm's `GlobalContext` (`conv_attn.weight`,
    /// `mlp_scale.fc1.weight`, …), with a prefix for a block inside a model. Other tensors
    /// are ignored; F32, F16, BF16 and F64 are read as f32.
    ///
    /// The pooling (a mask conv or none) and the fusions (which MLPs) are read off the keys
    /// and must agree with `config`, as must `config.naming`, the channels and the planes;
    /// [`ContextConfig::from_keys`] gives a configuration that does.
    ///
    /// ```
    /// use nonlocal::{ContextBlock, ContextConfig, TensorFile, WeightKeys};
    ///
    /// let file = TensorFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/family/gc_timm_scale.safetensors"))?;
    /// let keys = WeightKeys::timm();
    /// let config = ContextConfig::from_keys(&file, &keys)?;
    /// assert_eq!((config.in_channels, config.planes, config.fuse_mul), (16, 2, true));
    /// let block = ContextBlock::from_checkpoint(config, &file, &keys)?;
    /// let x = file.tensor("input")?; // (2, 1, 6, 6, 16)
    /// assert_eq!(block.forward(&x)?.shape(), x.shape());
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for AlexHex7 keys (no context block) or an invalid
    /// configuration, [`Error::ConfigMismatch`] (naming, pooling, `fuse_add`, `fuse_mul`),
    /// [`Error::MissingKey`], [`Error::WrongShape`], [`Error::UnsupportedDtype`],
    /// [`Error::NotATensor`], [`Error::InvalidParameter`] (NaN or ±∞), each naming the key.
    pub fn from_checkpoint(config: ContextConfig, file: &TensorFile, keys: &WeightKeys) -> Result<Self> {
        let params = super::keys::load(file, &config, keys)?;
        let mut block = Self::from_parameters(config, params)?;
        block.keys = Some(keys.clone());
        Ok(block)
    }

    /// Reads a checkpoint of any format from `path`, then as [`ContextBlock::from_checkpoint`].
    ///
    /// # Errors
    /// Those of [`TensorFile::open`] and of [`ContextBlock::from_checkpoint`].
    pub fn from_checkpoint_file(config: ContextConfig, path: impl AsRef<Path>, keys: &WeightKeys) -> Result<Self> {
        Self::from_checkpoint(config, &TensorFile::open(path)?, keys)
    }

    /// The configuration.
    pub fn config(&self) -> &ContextConfig {
        &self.config
    }

    /// The parameters.
    pub fn parameters(&self) -> &ContextParameters {
        &self.params
    }

    /// The checkpoint keys the parameters were loaded under, if they came from a file.
    pub fn weight_keys(&self) -> Option<&WeightKeys> {
        self.keys.as_ref()
    }

    /// Replaces the parameters.
    ///
    /// # Errors
    /// As [`ContextBlock::from_parameters`]; on error the block is unchanged.
    pub fn set_parameters(&mut self, params: ContextParameters) -> Result<()> {
        params.validate(&self.config)?;
        self.compiled = Compiled::new(&params);
        self.params = params;
        self.generation = next_generation();
        Ok(())
    }

    /// The parameters as a safetensors file under the keys they were loaded with (the
    /// configuration's naming, no prefix, for a block not loaded from a file): the upstream
    /// module's `state_dict` keys and shapes, F32, for `load_state_dict` in PyTorch.
    ///
    /// # Errors
    /// [`Error::SaveFailed`] if serialisation fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let keys = self.keys.clone().unwrap_or(WeightKeys { naming: self.config.naming, prefix: String::new() });
        super::keys::export(&keys, &self.params)
    }

    /// Writes [`ContextBlock::to_safetensors`] to `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written, or as [`ContextBlock::to_safetensors`].
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_safetensors()?)
            .map_err(|source| Error::Io { path: path.display().to_string(), source })
    }

    /// Runs the block on a batch of image feature maps.
    ///
    /// # Shapes
    /// - `x`: (B, H, W, C), channels last (PyTorch's (B, C, H, W) permuted), any strides
    ///   (views in standard layout are read in place; others are copied first);
    /// - returns an array of the same shape, in standard layout.
    ///
    /// Each sample pools its own context over its H·W positions. NaN or ±∞ in a sample make
    /// its whole output NaN, as in PyTorch (the softmax, or the mean, sees every position).
    ///
    /// # Errors
    /// [`Error::InputRank`] unless `x` has rank 4, [`Error::InputChannels`],
    /// [`Error::EmptyInput`], [`Error::TooLarge`] (sizes that overflow), [`Error::AllocationFailed`].
    pub fn forward_images<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        self.forward_layout(x, Layout::Images)
    }

    /// Runs the block on clips (B, T, H, W, C) of one frame, T = 1 (the layout of the
    /// crate's golden files and of [`NonLocalBlock::forward`](crate::NonLocalBlock::forward)).
    /// Returns the input's shape, standard layout.
    ///
    /// # Errors
    /// As [`ContextBlock::forward_images`], [`Error::InputRank`] unless `x` has rank 5, and
    /// [`Error::LayoutMismatch`] when T > 1: the block is 2-d, as the upstream modules.
    pub fn forward<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        self.forward_layout(x, Layout::Clips)
    }

    /// As [`ContextBlock::forward`] (clips, T = 1), into `out`, an array of the input's
    /// shape: no output allocation.
    ///
    /// # Errors
    /// As [`ContextBlock::forward`], and [`Error::WrongShape`] when `out`'s shape is not
    /// the input's.
    pub fn forward_into<S, D, So>(&self, x: &ArrayBase<S, D>, out: &mut ArrayBase<So, D>) -> Result<()>
    where
        S: Data<Elem = f32>,
        So: DataMut<Elem = f32>,
        D: Dimension,
    {
        if out.shape() != x.shape() {
            return Err(Error::WrongShape {
                key: "out".into(),
                expected: x.shape().to_vec(),
                actual: out.shape().to_vec(),
            });
        }
        let x4 = check_input(x.view().into_dyn(), Layout::Clips, self.config.in_channels)?;
        match out.as_slice_mut() {
            // SAFETY: the forward pass writes only initialised values.
            Some(slice) => self.forward_checked(&x4, unsafe { as_uninit(slice) }),
            None => {
                let tmp = self.forward_new(&x4)?;
                out.iter_mut().zip(tmp).for_each(|(o, v)| *o = v);
                Ok(())
            }
        }
    }

    /// The context vector of each sample of image maps `x` (B, H, W, C): shape (B, C), what
    /// the MLPs see (mmcv's `spatial_pool`).
    ///
    /// # Errors
    /// As [`ContextBlock::forward_images`].
    pub fn context<S, D>(&self, x: &ArrayBase<S, D>) -> Result<Array2<f32>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let x4 = check_input(x.view().into_dyn(), Layout::Images, self.config.in_channels)?;
        let (b, h, w, c) = x4.dim();
        let xs = contiguous(&x4, &self.workspace)?;
        let mut e = self.workspace.take(b * h * w, "attention weights")?;
        let pooled = on_worker(|| self.pool_samples(&xs, b, h * w, &mut e));
        let flat: Vec<f32> = pooled.into_iter().flat_map(|p| p.context).collect();
        Ok(Array2::from_shape_vec((b, c), flat)?)
    }

    fn forward_layout<S, D>(&self, x: &ArrayBase<S, D>, layout: Layout) -> Result<Array<f32, D>>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let x4 = check_input(x.view().into_dyn(), layout, self.config.in_channels)?;
        let out = self.forward_new(&x4)?;
        Ok(Array::from_shape_vec(x.raw_dim(), out)?)
    }

    /// The forward pass into a new buffer (B·N·C), not zero-filled first.
    fn forward_new(&self, x4: &ArrayView4<'_, f32>) -> Result<Vec<f32>> {
        let (b, h, w, _) = x4.dim();
        let xs = contiguous(x4, &self.workspace)?;
        let mut e = self.workspace.take(b * h * w, "attention weights")?;
        // SAFETY: `run` cannot fail, and its fusion pass writes every element of `out`.
        unsafe { written_buffer(x4.len(), "output", |out| _ = on_worker(|| self.run(&xs, b, h * w, &mut e, out))) }
    }

    fn forward_checked(&self, x4: &ArrayView4<'_, f32>, out: &mut [MaybeUninit<f32>]) -> Result<()> {
        let (b, h, w, _) = x4.dim();
        let xs = contiguous(x4, &self.workspace)?;
        let mut e = self.workspace.take(b * h * w, "attention weights")?;
        on_worker(|| self.run(&xs, b, h * w, &mut e, out));
        Ok(())
    }

    /// Pooling of every sample (x: B·N·C); `e` (B·N) receives each position's `e_j`.
    fn pool_samples(&self, x: &[f32], b: usize, n: usize, e: &mut [f32]) -> Vec<Pooled> {
        let c = self.config.in_channels;
        let mask = self.compiled.mask.as_ref().map(|(w, bias)| (&w[..], *bias));
        let chunks = pool(x, n, c, mask, e);
        let per_sample = chunks.len() / b;
        chunks.chunks(per_sample).map(|k| combine(k, c)).collect()
    }

    /// The whole block on B samples of N positions (x, out: B·N·C): pooling, the MLPs,
    /// fusion. Returns what each sample computed, for training.
    pub(super) fn run(
        &self,
        x: &[f32],
        b: usize,
        n: usize,
        e: &mut [f32],
        out: &mut [MaybeUninit<f32>],
    ) -> Vec<SampleTrace> {
        let c = self.config.in_channels;
        let eps = self.config.ln_eps;
        let traces: Vec<SampleTrace> = self
            .pool_samples(x, b, n, e)
            .into_iter()
            .map(|pooled| {
                let add = self.compiled.add.as_ref().map(|m| run_mlp(m, &pooled.context, eps));
                let mul = self.compiled.mul.as_ref().map(|m| run_mlp(m, &pooled.context, eps));
                let gate = mul.as_ref().map(|m| m.out.iter().map(|&v| sigmoid(v)).collect());
                SampleTrace { pooled, add, mul, gate }
            })
            .collect();
        let terms: Vec<FusionTerms<'_>> = traces
            .iter()
            .map(|t| FusionTerms { gate: t.gate.as_deref(), add: t.add.as_ref().map(|a| &a.out[..]) })
            .collect();
        fuse(x, n, c, &terms, out);
        traces
    }
}
