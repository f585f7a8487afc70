//! Every block of the family a checkpoint holds, found by its keys, with the configuration its
//! keys show ([`find_all_blocks`]).

use std::fmt;

use super::context::ContextConfig;
use super::criss_cross::CrissCrossConfig;
use crate::load::{find_blocks, BlockInfo, Naming, TensorFile, WeightKeys};

/// A block found in a checkpoint by [`find_all_blocks`].
///
/// Its [`Display`](fmt::Display) is one line: [`BlockInfo`]'s for non-local and disentangled
/// blocks; `prefix=<p> naming=<mmcv|timm> block=<context_block|global_context> in_channels=<C>
/// planes=<P> pooling=<att|avg> fusion=<add|mul|mul,add>` for context blocks;
/// `prefix=<p> naming=mmcv block=criss_cross in_channels=<C> qk_channels=<Q>` for criss-cross
/// attention.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum FoundBlock {
    /// A non-local or disentangled block ([`BlockInfo::kind`] tells which), as
    /// [`find_blocks`] lists them.
    NonLocal(BlockInfo),
    /// A global context block (mmcv's `ContextBlock` or timm's `GlobalContext`): its keys and
    /// [`ContextConfig::from_keys`] (the LayerNorm epsilon, which the keys cannot show, from
    /// the naming's preset).
    Context {
        /// The key scheme and prefix.
        keys: WeightKeys,
        /// The configuration the keys show.
        config: ContextConfig,
    },
    /// Criss-cross attention (mmcv's `CrissCrossAttention`): its keys and
    /// [`CrissCrossConfig::from_keys`] (the recurrence, which the keys cannot show, is 1).
    CrissCross {
        /// The key scheme (mmcv's) and prefix.
        keys: WeightKeys,
        /// The configuration the keys show.
        config: CrissCrossConfig,
    },
}

impl FoundBlock {
    /// Where the block's parameters are.
    pub fn keys(&self) -> &WeightKeys {
        match self {
            FoundBlock::NonLocal(info) => &info.keys,
            FoundBlock::Context { keys, .. } | FoundBlock::CrissCross { keys, .. } => keys,
        }
    }

    /// The block's name as the golden files' `block` metadata writes it: `non_local`,
    /// `disentangled`, `context_block` (mmcv), `global_context` (timm) or `criss_cross`.
    pub fn block_name(&self) -> &'static str {
        match self {
            FoundBlock::NonLocal(info) => info.kind.name(),
            FoundBlock::Context { keys, .. } if keys.naming == Naming::Timm => "global_context",
            FoundBlock::Context { .. } => "context_block",
            FoundBlock::CrissCross { .. } => "criss_cross",
        }
    }
}

impl fmt::Display for FoundBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FoundBlock::NonLocal(info) => write!(f, "{info}"),
            FoundBlock::Context { keys, config } => {
                let fusion = match (config.fuse_mul, config.fuse_add) {
                    (true, true) => "mul,add",
                    (true, false) => "mul",
                    _ => "add",
                };
                write!(
                    f,
                    "prefix={} naming={} block={} in_channels={} planes={} pooling={} fusion={fusion}",
                    keys.prefix,
                    keys.naming,
                    self.block_name(),
                    config.in_channels,
                    config.planes,
                    config.pooling
                )
            }
            FoundBlock::CrissCross { keys, config } => write!(
                f,
                "prefix={} naming={} block=criss_cross in_channels={} qk_channels={}",
                keys.prefix, keys.naming, config.in_channels, config.qk_channels
            ),
        }
    }
}

/// The key of each block kind's first parameter, as it ends: what marks a block's prefix.
const CONTEXT_MARKS: [(Naming, &str); 4] = [
    (Naming::Mmcv, "channel_add_conv.0.weight"),
    (Naming::Mmcv, "channel_mul_conv.0.weight"),
    (Naming::Timm, "mlp_add.fc1.weight"),
    (Naming::Timm, "mlp_scale.fc1.weight"),
];
const CRISS_CROSS_MARK: &str = "query_conv.weight";

/// Every block of the family in a checkpoint, in the order of the file: the non-local and
/// disentangled blocks of [`find_blocks`], context blocks (mmcv's and timm's keys) and
/// criss-cross attention, each with the configuration its keys show. What keys cannot show —
/// embedded Gaussian or dot product and `use_scale` (non-local), the temperature
/// (disentangled), the LayerNorm epsilon (context: the preset's), the recurrence
/// (criss-cross: 1) — is set from the model's own configuration.
///
/// # Example
/// ```
/// use nonlocal::{find_all_blocks, ContextBlock, FoundBlock, TensorFile};
///
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/family/gc_mmcv_add.safetensors");
/// let file = TensorFile::open(path)?;
/// let found = find_all_blocks(&file);
/// assert_eq!(found[0].to_string(), "prefix= naming=mmcv block=context_block in_channels=16 planes=4 pooling=att fusion=add");
/// if let FoundBlock::Context { keys, config } = &found[0] {
///     let block = ContextBlock::from_checkpoint(config.clone(), &file, keys)?;
/// }
/// # Ok::<(), nonlocal::Error>(())
/// ```
pub fn find_all_blocks(file: &TensorFile) -> Vec<FoundBlock> {
    let order: Vec<&str> = file.keys_in_order().collect();
    // Where a prefix first appears, to list the blocks in the file's order.
    let first = |prefix: &str| order.iter().position(|k| k.starts_with(prefix)).unwrap_or(usize::MAX);
    let mut found: Vec<(usize, FoundBlock)> =
        find_blocks(file).into_iter().map(|info| (first(&info.keys.prefix), FoundBlock::NonLocal(info))).collect();
    let mut seen: Vec<String> = Vec::new();
    for key in &order {
        for (naming, mark) in CONTEXT_MARKS {
            let Some(prefix) = key.strip_suffix(mark).filter(|p| p.is_empty() || p.ends_with('.')) else { continue };
            if seen.iter().any(|s| s == prefix) {
                continue;
            }
            let keys = WeightKeys::new(naming, prefix);
            if let Ok(config) = ContextConfig::from_keys(file, &keys) {
                seen.push(prefix.to_string());
                found.push((first(prefix), FoundBlock::Context { keys, config }));
            }
        }
        let Some(prefix) = key.strip_suffix(CRISS_CROSS_MARK).filter(|p| p.is_empty() || p.ends_with('.')) else {
            continue;
        };
        let keys = WeightKeys::mmcv().with_prefix(prefix);
        let complete = ["key_conv.weight", "value_conv.weight", "gamma.scale"]
            .iter()
            .all(|k| file.contains(&format!("{prefix}{k}")));
        if !complete || seen.iter().any(|s| s == prefix) {
            continue;
        }
        if let Ok(config) = CrissCrossConfig::from_keys(file, &keys) {
            seen.push(prefix.to_string());
            found.push((first(prefix), FoundBlock::CrissCross { keys, config }));
        }
    }
    found.sort_by_key(|(at, _)| *at);
    found.into_iter().map(|(_, block)| block).collect()
}
