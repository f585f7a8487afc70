//! [`NonLocalBlock`]: the type and its constructors here, each concern of its API in a file of
//! its own: the input layouts and position numbering (`layout`), the forward pass (`forward`),
//! attention maps (`attention_maps`), loading and saving checkpoints (`loading`), training
//! (`train`, `gradients`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::NonLocalConfig;
use crate::error::{Error, Result};
use crate::load::WeightKeys;
use crate::params::Parameters;
use crate::plan::Compiled;
use crate::workspace::Workspace;

mod attention_maps;
mod forward;
mod gradients;
mod layout;
mod loading;
mod train;

pub(crate) use forward::{sample_matrix, Order};
pub use gradients::{Gradients, ParameterGradients};
pub(crate) use layout::Layout;
pub use loading::load_blocks;
pub use train::TrainContext;
pub(crate) use train::{column_sums, Accumulators};

/// Seed of the weight init of [`NonLocalBlock::new`].
const DEFAULT_SEED: u64 = 0x6e6f_6e6c_6f63_616c;

/// A non-local block: `z = BN(W_z·y) + x` with `y_i = Σ_j f(x_i, x_j)·g(x_j) / C(x)`.
///
/// # Building one
/// | you have | use |
/// |---|---|
/// | nothing yet (to train) | [`NonLocalBlock::new`]: fresh parameters, the identity until trained |
/// | parameters in ndarrays | [`NonLocalBlock::from_parameters`] |
/// | a checkpoint file and its block's configuration | [`NonLocalBlock::from_checkpoint_file`] (any format: safetensors, `.pth`) |
/// | a checkpoint already open ([`TensorFile`](crate::TensorFile)) | [`NonLocalBlock::from_checkpoint`] |
/// | a whole model's checkpoint | [`load_blocks`] (every block [`find_blocks`](crate::find_blocks) lists) |
///
/// The keys of a checkpoint cannot show everything (embedded Gaussian or dot product, the pool
/// kernel, `use_scale`): the configuration says those, from the model's own config
/// ([`NonLocalConfig::mmaction2_i3d`] and the other presets help).
///
/// # Threads
/// A block is `Send + Sync`: one block can serve several threads at once. Each call runs on
/// the current rayon pool and borrows scratch buffers from a pool the block keeps behind a
/// mutex (concurrent calls each get their own; the results are the same bits as one call at a
/// time). [`NonLocalBlock::release_buffers`] frees the buffers kept between calls.
///
/// # Example
/// ```
/// use ndarray::Array5;
/// use nonlocal::{NonLocalBlock, NonLocalConfig};
///
/// let block = NonLocalBlock::new(NonLocalConfig::new(16))?;
/// let x = Array5::<f32>::from_shape_fn((1, 2, 6, 6, 16), |(_, t, h, w, c)| (t + h * w + c) as f32 * 0.01);
/// let z = block.forward(&x)?;
/// // A new block's last layer is zero (as in the paper): it starts as the identity.
/// assert_eq!(z, x);
/// # Ok::<(), nonlocal::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct NonLocalBlock {
    config: NonLocalConfig,
    params: Parameters,
    keys: Option<WeightKeys>,
    compiled: Compiled,
    workspace: Arc<Workspace>,
    /// Identifies the current parameters, so a training context can tell it is stale.
    generation: u64,
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<NonLocalBlock>();
};

/// Source of [`NonLocalBlock::generation`] values.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// A new value for a block's parameters' identity (family blocks number theirs from it too).
pub(crate) fn next_generation() -> u64 {
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

impl NonLocalBlock {
    /// A new block with fresh parameters (see [`Parameters::init`]): θ, φ, g drawn like
    /// PyTorch's default init from a fixed seed, and the last layer zero so the block is the
    /// identity until trained or loaded.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (see [`NonLocalConfig::validate`]), [`Error::TooLarge`] when
    /// the parameter tensors cannot be sized.
    pub fn new(config: NonLocalConfig) -> Result<Self> {
        config.validate()?;
        check_parameter_count(&config)?;
        let params = Parameters::init(&config, DEFAULT_SEED);
        Self::from_parameters(config, params)
    }

    /// A block from parameters held in ndarrays.
    ///
    /// # Errors
    /// Any error of [`Parameters::validate`]: a missing part, a wrong shape, a non-finite
    /// value, or a part the configuration does not have.
    pub fn from_parameters(config: NonLocalConfig, params: Parameters) -> Result<Self> {
        params.validate(&config)?;
        let compiled = Compiled::new(&config, &params);
        Ok(NonLocalBlock {
            config,
            params,
            keys: None,
            compiled,
            workspace: Default::default(),
            generation: next_generation(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NonLocalConfig {
        &self.config
    }

    /// The parameters, as loaded or built (BatchNorm not folded).
    pub fn parameters(&self) -> &Parameters {
        &self.params
    }

    /// The checkpoint keys the parameters were loaded under, if they came from a file.
    pub fn weight_keys(&self) -> Option<&WeightKeys> {
        self.keys.as_ref()
    }

    /// Replaces the parameters.
    ///
    /// # Errors
    /// As [`NonLocalBlock::from_parameters`]; on error the block is unchanged.
    pub fn set_parameters(&mut self, params: Parameters) -> Result<()> {
        params.validate(&self.config)?;
        self.compiled = Compiled::new(&self.config, &params);
        self.params = params;
        self.generation = next_generation();
        Ok(())
    }

    /// The parameters rearranged for the kernels (family blocks built on this one).
    pub(crate) fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// The scratch pool (family blocks built on this one share it).
    pub(crate) fn workspace(&self) -> &Arc<Workspace> {
        &self.workspace
    }

    /// Makes the block take its scratch buffers from `workspace` (shared with other blocks or
    /// ops that run one after the other).
    #[cfg_attr(not(feature = "candle"), allow(dead_code))]
    pub(crate) fn share_workspace(&mut self, workspace: Arc<Workspace>) {
        self.workspace = workspace;
    }

    /// Identifies the current parameters (see [`TrainContext`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Frees the scratch buffers the block keeps between calls (they are allocated again, as
    /// fresh pages, by the next call). Buffers in use by a call running on another thread, or
    /// held by a [`TrainContext`], go back to the pool when that call or context ends.
    pub fn release_buffers(&self) {
        self.workspace.clear();
    }
}

/// A zeroed f32 buffer, or [`Error::AllocationFailed`] when it cannot be allocated.
pub(crate) fn buffer(len: usize, what: &'static str) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::AllocationFailed { what, bytes: len.saturating_mul(4) })?;
    v.resize(len, 0.0);
    Ok(v)
}

/// Rejects configurations whose parameter tensors cannot be sized.
fn check_parameter_count(config: &NonLocalConfig) -> Result<()> {
    config
        .in_channels
        .checked_mul(config.inter_channels)
        .and_then(|p| p.checked_mul(4 * 4))
        .filter(|&bytes| bytes <= isize::MAX as usize)
        .map(|_| ())
        .ok_or(Error::TooLarge { what: "in_channels·inter_channels" })
}
