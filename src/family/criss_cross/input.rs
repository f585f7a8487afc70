//! The checks every input passes before the kernels see it, once at the boundary.

use ndarray::{ArrayView5, ArrayViewD, Axis, Ix5};

use super::config::CrissCrossConfig;
use crate::error::{Error, Result};

/// The layouts the entry points take, channels last, batch first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// (B, T, H, W, C) with T = 1: `forward`, `forward_into`, `forward_train`.
    Clips,
    /// (B, H, W, C): `forward_images`, mmcv's (B, C, H, W) channels last.
    Images,
}

impl Layout {
    fn axis_names(self) -> &'static [&'static str] {
        match self {
            Layout::Clips => &["B", "T", "H", "W", "C"],
            Layout::Images => &["B", "H", "W", "C"],
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Layout::Clips => "5 (B, T, H, W, C) with T = 1; image maps (B, H, W, C) go to forward_images",
            Layout::Images => "4 (B, H, W, C) for forward_images; clips (B, 1, H, W, C) go to forward",
        }
    }
}

/// Checks an input of the given layout and views it as clips (B, 1, H, W, C).
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
    let shape = x.shape().to_vec();
    let names = layout.axis_names();
    if shape.len() != names.len() {
        return Err(Error::InputRank { expected: layout.expected(), actual: shape.len(), shape });
    }
    let channels = shape[shape.len() - 1];
    if channels != config.in_channels {
        return Err(Error::InputChannels { expected: config.in_channels, actual: channels, shape });
    }
    if let Some(axis) = shape.iter().position(|&d| d == 0) {
        return Err(Error::EmptyInput { axis, name: names[axis], shape });
    }
    let x = match layout {
        Layout::Clips => x,
        Layout::Images => x.insert_axis(Axis(1)),
    };
    let x = x.into_dimensionality::<Ix5>().expect("rank checked");
    let (b, t, h, w, _) = x.dim();
    if t != 1 {
        // A 2-d block, as mmcv's module on (B, C, H, W): frames are never attended across.
        return Err(Error::LayoutMismatch { conv_dims: 2, grid: [t, h, w] });
    }
    // The largest buffers: the projections and their gradients (2·qk + C per position), and
    // one group's H² or W² attention weights.
    let width = config.projection_width().max(config.in_channels);
    let fits = |dims: &[usize]| {
        dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).is_some_and(|f| f <= isize::MAX as usize / 4)
    };
    if !fits(&[b, h, w, width]) {
        return Err(Error::TooLarge { what: "B·H·W·(2·qk_channels + in_channels)" });
    }
    if !fits(&[h, h]) || !fits(&[w, w]) {
        return Err(Error::TooLarge { what: "H² or W² attention weights" });
    }
    Ok(x)
}
