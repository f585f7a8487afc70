//! The inputs a context block takes, and the checks every input passes before the kernels
//! see it.

use std::mem::MaybeUninit;

use ndarray::{ArrayBase, ArrayView4, ArrayViewD, Axis, Data, Dimension};

use crate::error::{Error, Result};
use crate::input::Expected;
pub(super) use crate::input::Layout;
use crate::workspace::{Scratch, Workspace};

/// Checks an input of the given layout (clips of one frame or image maps) against `channels`
/// (the crate's checks, `crate::input`, for a 2-d block) and views it as image maps
/// (B, H, W, C).
///
/// # Errors
/// [`Error::InputRank`], [`Error::InputChannels`], [`Error::EmptyInput`],
/// [`Error::LayoutMismatch`] (a clip with T > 1: the block is 2-d, as the upstream modules),
/// [`Error::TooLarge`].
pub(super) fn check_input<'a>(x: ArrayViewD<'a, f32>, layout: Layout, channels: usize) -> Result<ArrayView4<'a, f32>> {
    // The output and, in training, a copy of the input: B·N·C floats each.
    let expected =
        Expected { channels, conv_dims: 2, sequences: false, min_grid: [1, 1, 1], floats_per_position: channels };
    Ok(crate::input::check_input(x, layout, expected)?.index_axis_move(Axis(1), 0))
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

/// A buffer of `len` floats, every one written by `write` (given the buffer uninitialised):
/// no zero-fill pass, as PyTorch's `empty`. Fresh memory still costs its page faults, in the
/// pass that writes it.
///
/// # Errors
/// [`Error::AllocationFailed`] when the buffer cannot be allocated.
///
/// # Safety
/// `write` must write every element of the slice it is given.
pub(super) unsafe fn written_buffer(
    len: usize,
    what: &'static str,
    write: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Result<Vec<f32>> {
    let mut v: Vec<f32> = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::AllocationFailed { what, bytes: len.saturating_mul(4) })?;
    write(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is at least `len`, and the caller guarantees that `write`
    // initialised all `len` elements.
    unsafe { v.set_len(len) };
    Ok(v)
}

/// An initialised buffer seen as possibly uninitialised floats, for a pass that writes every
/// element.
///
/// # Safety
/// Only initialised values may be written through the result (as the passes do), so the
/// buffer stays initialised.
pub(super) unsafe fn as_uninit(out: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; the caller keeps the contents
    // initialised.
    unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) }
}
