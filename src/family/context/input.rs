//! The inputs a context block takes, and the checks every input passes before the kernels
//! see it.

use ndarray::{ArrayBase, ArrayView4, ArrayViewD, Axis, Data, Dimension, Ix4};

use crate::error::{Error, Result};
use crate::workspace::{Scratch, Workspace};

/// The axes of an input, channels last, batch first. The rank is checked, never guessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Layout {
    /// (B, T, H, W, C) with T = 1: `forward`, `forward_into`, `forward_train`.
    Clips,
    /// (B, H, W, C): `forward_images`.
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

/// Checks an input of the given layout against `channels` and views it as image maps
/// (B, H, W, C).
///
/// # Errors
/// [`Error::InputRank`], [`Error::InputChannels`], [`Error::EmptyInput`],
/// [`Error::LayoutMismatch`] (a clip with T > 1: the block is 2-d, as the upstream modules),
/// [`Error::TooLarge`].
pub(super) fn check_input<'a>(x: ArrayViewD<'a, f32>, layout: Layout, channels: usize) -> Result<ArrayView4<'a, f32>> {
    let shape = x.shape().to_vec();
    let names = layout.axis_names();
    if shape.len() != names.len() {
        return Err(Error::InputRank { expected: layout.expected(), actual: shape.len(), shape });
    }
    let actual = shape[shape.len() - 1];
    if actual != channels {
        return Err(Error::InputChannels { expected: channels, actual, shape });
    }
    if let Some(axis) = shape.iter().position(|&d| d == 0) {
        return Err(Error::EmptyInput { axis, name: names[axis], shape });
    }
    let x = match layout {
        Layout::Clips => {
            if shape[1] != 1 {
                return Err(Error::LayoutMismatch { conv_dims: 2, grid: [shape[1], shape[2], shape[3]] });
            }
            x.index_axis_move(Axis(1), 0)
        }
        Layout::Images => x,
    };
    let x = x.into_dimensionality::<Ix4>().map_err(|_| Error::InputRank {
        expected: layout.expected(),
        actual: shape.len(),
        shape: shape.clone(),
    })?;
    // The output and, in training, a copy of the input: B·N·C floats each.
    x.shape()
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&floats| floats <= isize::MAX as usize / 4)
        .ok_or(Error::TooLarge { what: "B·H·W·C" })?;
    Ok(x)
}

/// An array's elements as one row-major slice: its own memory, or a copy in a workspace
/// buffer.
pub(super) enum Contiguous<'a> {
    /// The array is in standard layout.
    View(&'a [f32]),
    /// The array's elements, copied in logical order.
    Copy(Scratch<'a>),
}

impl std::ops::Deref for Contiguous<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Contiguous::View(s) => s,
            Contiguous::Copy(s) => s,
        }
    }
}

/// The elements of `x` as one row-major slice: the array's own memory when it is in
/// standard layout, else a copy in a buffer of `workspace` (strided or permuted views cost
/// one extra pass).
pub(super) fn contiguous<'a, S, D>(x: &'a ArrayBase<S, D>, workspace: &'a Workspace) -> Result<Contiguous<'a>>
where
    S: Data<Elem = f32>,
    D: Dimension,
{
    if let Some(slice) = x.as_slice() {
        return Ok(Contiguous::View(slice));
    }
    let mut copy = workspace.take(x.len(), "input copy")?;
    copy.iter_mut().zip(x.iter()).for_each(|(c, &v)| *c = v);
    Ok(Contiguous::Copy(copy))
}

/// A zeroed f32 buffer: [`Error::TooLarge`] when its size overflows, [`Error::AllocationFailed`]
/// when it cannot be allocated.
///
/// Allocated zeroed (`calloc`), not filled: memory fresh from the system is zero already, so
/// a large output costs its page faults once, in the pass that writes it, not also a memset.
pub(super) fn buffer(len: usize, what: &'static str) -> Result<Vec<f32>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(len).map_err(|_| Error::TooLarge { what })?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<f32>();
    if ptr.is_null() {
        return Err(Error::AllocationFailed { what, bytes: layout.size() });
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `len` f32 (f32's
    // alignment), so it is a valid allocation of capacity `len`; all bits zero is 0.0.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}
