//! The checks every block's input passes before any kernel sees it, in one place: the three
//! layouts the entry points take (channels last, batch first), their rank, channel count,
//! empty axes, the axes a block of a given rank attends over, a least size per axis, and
//! buffer sizes that must fit. Every block reads every layout as clips (B, T, H, W, C): an
//! image map as T = 1, a sequence as T = H = 1 (W = L).

use ndarray::{ArrayView5, ArrayViewD, Axis, Ix5};

use crate::error::{Error, Result};

/// The axes of an input. Each layout has its own entry points and its rank is checked, never
/// guessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// (B, T, H, W, C): `forward` and the other clip entry points.
    Clips,
    /// (B, H, W, C): `forward_images`.
    Images,
    /// (B, L, C): `forward_sequences` (the non-local block only).
    Sequences,
}

impl Layout {
    fn axis_names(self) -> &'static [&'static str] {
        match self {
            Layout::Clips => &["B", "T", "H", "W", "C"],
            Layout::Images => &["B", "H", "W", "C"],
            Layout::Sequences => &["B", "L", "C"],
        }
    }

    /// The rank and axes, and where the other layouts go, for [`Error::InputRank`]; a block
    /// without `forward_sequences` (the 2-d family blocks) says so.
    fn expected(self, sequences: bool) -> &'static str {
        match (self, sequences) {
            (Layout::Clips, true) => {
                "5 (B, T, H, W, C); image maps (B, H, W, C) go to forward_images, sequences (B, L, C) to \
                 forward_sequences"
            }
            (Layout::Clips, false) => "5 (B, T, H, W, C) with T = 1; image maps (B, H, W, C) go to forward_images",
            (Layout::Images, true) => "4 (B, H, W, C) for forward_images; clips (B, T, H, W, C) go to forward",
            (Layout::Images, false) => "4 (B, H, W, C) for forward_images; clips (B, 1, H, W, C) go to forward",
            (Layout::Sequences, _) => "3 (B, L, C) for forward_sequences; clips (B, T, H, W, C) go to forward",
        }
    }
}

/// What a block asks of its input.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expected {
    /// C, the last axis.
    pub channels: usize,
    /// The block attends over the last `conv_dims` of (T, H, W); the others must be 1.
    pub conv_dims: usize,
    /// Whether the block has `forward_sequences` (for the rank error's advice).
    pub sequences: bool,
    /// The least size of (T, H, W) (a pool kernel: smaller leaves no key, [`Error::NoKeys`]).
    pub min_grid: [usize; 3],
    /// The most floats per position any of the block's buffers holds: B·T·H·W times it must
    /// fit in `isize` bytes.
    pub floats_per_position: usize,
}

/// Checks an input of the given layout and views it as clips (B, T, H, W, C).
///
/// # Errors
/// [`Error::InputRank`], [`Error::InputChannels`] (naming a channels-first axis when one has
/// C), [`Error::EmptyInput`], [`Error::LayoutMismatch`] (more axes than the block's rank
/// attends over), [`Error::NoKeys`] (an axis below `min_grid`), [`Error::TooLarge`] (buffers
/// whose sizes overflow).
pub(crate) fn check_input<'a>(
    x: ArrayViewD<'a, f32>,
    layout: Layout,
    expected: Expected,
) -> Result<ArrayView5<'a, f32>> {
    let shape = x.shape().to_vec();
    let names = layout.axis_names();
    if shape.len() != names.len() {
        return Err(Error::InputRank { expected: layout.expected(expected.sequences), actual: shape.len(), shape });
    }
    let channels = shape[shape.len() - 1];
    if channels != expected.channels {
        return Err(Error::InputChannels { expected: expected.channels, actual: channels, shape });
    }
    if let Some(axis) = shape.iter().position(|&d| d == 0) {
        return Err(Error::EmptyInput { axis, name: names[axis], shape });
    }
    let x = match layout {
        Layout::Clips => x,
        Layout::Images => x.insert_axis(Axis(1)),
        Layout::Sequences => x.insert_axis(Axis(1)).insert_axis(Axis(1)),
    };
    let x = x.into_dimensionality::<Ix5>().expect("rank checked");
    let (b, t, h, w, _) = x.dim();
    let grid = [t, h, w];
    // A d-dimensional block attends over the last d axes of (T, H, W), as PyTorch's d-d modules.
    let conv_dims = expected.conv_dims;
    if grid[..3 - conv_dims.min(3)].iter().any(|&d| d != 1) {
        return Err(Error::LayoutMismatch { conv_dims, grid });
    }
    let kernel = expected.min_grid;
    if grid.iter().zip(kernel).any(|(&g, k)| g < k) {
        return Err(Error::NoKeys { size: grid, kernel });
    }
    [b, t, h, w, expected.floats_per_position.max(1)]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&floats| floats <= isize::MAX as usize / 4)
        .ok_or(Error::TooLarge { what: "B·T·H·W·channels" })?;
    Ok(x)
}
