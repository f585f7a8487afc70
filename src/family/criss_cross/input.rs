//! The checks every input passes before the kernels see it, once at the boundary: the crate's
//! (`crate::input`) for a 2-d block, and one group's H² or W² attention weights.

use ndarray::{ArrayView5, ArrayViewD};

use super::config::CrissCrossConfig;
use crate::error::{Error, Result};
use crate::input::Expected;
pub(crate) use crate::input::Layout;

/// Checks an input of the given layout (clips of one frame or image maps) and views it as
/// clips (B, 1, H, W, C).
///
/// # Errors
/// [`Error::InputRank`], [`Error::InputChannels`], [`Error::EmptyInput`],
/// [`Error::LayoutMismatch`] (a clip of more than one frame: the block attends within an
/// image), [`Error::TooLarge`] (buffers that cannot be sized).
pub(crate) fn check_input<'a>(
    config: &CrissCrossConfig,
    x: ArrayViewD<'a, f32>,
    layout: Layout,
) -> Result<ArrayView5<'a, f32>> {
    // The largest buffers: the projections and their gradients (2·qk + C per position).
    let expected = Expected {
        channels: config.in_channels,
        conv_dims: 2,
        sequences: false,
        min_grid: [1, 1, 1],
        floats_per_position: config.projection_width().max(config.in_channels),
    };
    let x = crate::input::check_input(x, layout, expected)?;
    let (_, _, h, w, _) = x.dim();
    // One group's H² or W² attention weights.
    let fits = |d: usize| d.checked_mul(d).is_some_and(|f| f <= isize::MAX as usize / 4);
    if !fits(h) || !fits(w) {
        return Err(Error::TooLarge { what: "H² or W² attention weights" });
    }
    Ok(x)
}
