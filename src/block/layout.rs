//! How inputs are read: the three layouts the entry points take, the checks every input
//! passes before the kernels see it, and the numbering of query and key positions.

use std::ops::Range;

use ndarray::{ArrayView5, ArrayViewD, Axis, Ix5};

use super::NonLocalBlock;
use crate::error::{Error, Result};
use crate::kernels::pool::pooled_grid;

/// The axes of an input, channels last, batch first. Each layout has its own entry points and
/// its rank is checked, never guessed; the kernels read every layout as clips, an image map
/// as T = 1 and a sequence as T = H = 1 (W = L).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// (B, T, H, W, C): `forward` and every other entry point.
    Clips,
    /// (B, H, W, C): `forward_images`.
    Images,
    /// (B, L, C): `forward_sequences`.
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

    /// The rank and axes, and where the other layouts go, for [`Error::InputRank`].
    fn expected(self) -> &'static str {
        match self {
            Layout::Clips => {
                "5 (B, T, H, W, C); image maps (B, H, W, C) go to forward_images, sequences (B, L, C) to \
                 forward_sequences"
            }
            Layout::Images => "4 (B, H, W, C) for forward_images; clips (B, T, H, W, C) go to forward",
            Layout::Sequences => "3 (B, L, C) for forward_sequences; clips (B, T, H, W, C) go to forward",
        }
    }
}

impl NonLocalBlock {
    /// Checks an input of the given layout and views it as clips (B, T, H, W, C).
    pub(crate) fn check_input<'a>(&self, x: ArrayViewD<'a, f32>, layout: Layout) -> Result<ArrayView5<'a, f32>> {
        let shape = x.shape().to_vec();
        let names = layout.axis_names();
        if shape.len() != names.len() {
            return Err(Error::InputRank { expected: layout.expected(), actual: shape.len(), shape });
        }
        let channels = shape[shape.len() - 1];
        if channels != self.config.in_channels {
            return Err(Error::InputChannels { expected: self.config.in_channels, actual: channels, shape });
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
        let (b, t, h, w, c) = x.dim();
        let grid = [t, h, w];
        // conv_dims d attends over the last d axes of (T, H, W), as PyTorch's NonLocal{d}d.
        let conv_dims = self.config.conv_dims;
        if grid[..3 - conv_dims.min(3)].iter().any(|&d| d != 1) {
            return Err(Error::LayoutMismatch { conv_dims, grid });
        }
        let kernel = self.config.pool_kernel();
        if grid.iter().zip(kernel).any(|(&g, k)| g < k) {
            return Err(Error::NoKeys { size: grid, kernel });
        }
        // Every buffer is at most max(C, proj_cols, C') floats per position.
        let width = c.max(self.compiled.proj_cols).max(self.config.inter_channels);
        [b, t, h, w, width]
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&floats| floats <= isize::MAX as usize / 4)
            .ok_or(Error::TooLarge { what: "B·T·H·W·channels" })?;
        Ok(x)
    }

    /// The key grid (T', H', W') for an input grid (T, H, W): the pooled grid with
    /// sub-sampling (floor on sizes that do not divide, as PyTorch), else the grid itself.
    /// Image maps have T = 1, sequences T = H = 1.
    pub fn key_grid(&self, grid: [usize; 3]) -> [usize; 3] {
        pooled_grid(grid, self.config.pool_kernel())
    }

    /// The index of the query at `position` (t, h, w) in an input grid (T, H, W): its row in
    /// the attention maps, `(t·H + h)·W + w`. An image map's (h, w) is `[0, h, w]` in grid
    /// `[1, H, W]`, a sequence's l is `[0, 0, l]` in `[1, 1, L]`.
    ///
    /// ```
    /// # use nonlocal::{NonLocalBlock, NonLocalConfig};
    /// let block = NonLocalBlock::new(NonLocalConfig::new(8))?;
    /// assert_eq!(block.query_index([4, 6, 10], [1, 2, 3])?, 83);
    /// assert_eq!(block.query_position([4, 6, 10], 83)?, [1, 2, 3]);
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::PositionOutOfRange`] when `position` is outside the grid.
    pub fn query_index(&self, grid: [usize; 3], position: [usize; 3]) -> Result<usize> {
        if position.iter().zip(grid).any(|(&p, g)| p >= g) {
            return Err(Error::PositionOutOfRange { position, grid });
        }
        let [t, h, w] = position;
        Ok((t * grid[1] + h) * grid[2] + w)
    }

    /// The position (t, h, w) of query `index` in an input grid (T, H, W): the inverse of
    /// [`NonLocalBlock::query_index`].
    ///
    /// # Errors
    /// [`Error::QueryOutOfRange`] for an index ≥ T·H·W.
    pub fn query_position(&self, grid: [usize; 3], index: usize) -> Result<[usize; 3]> {
        let positions = grid.iter().product();
        if index >= positions {
            return Err(Error::QueryOutOfRange { index, positions });
        }
        Ok(unravel(grid, index))
    }

    /// The position (t', h', w') of key `index` (a column of the attention maps) on the key
    /// grid [`NonLocalBlock::key_grid`] of an input grid (T, H, W).
    ///
    /// # Errors
    /// [`Error::KeyOutOfRange`] for an index ≥ M, the number of keys.
    pub fn key_position(&self, grid: [usize; 3], index: usize) -> Result<[usize; 3]> {
        let keys = self.key_grid(grid);
        let count = keys.iter().product();
        if index >= count {
            return Err(Error::KeyOutOfRange { index, keys: count });
        }
        Ok(unravel(keys, index))
    }

    /// The input positions key `index` stands for, per axis (t, h, w): the window its
    /// max-pool reads, `k·t' .. k·(t' + 1)` with k the pool kernel, or the key's own position
    /// without sub-sampling. Positions cut off by the floor on odd sizes are in no key's
    /// region.
    ///
    /// ```
    /// # use nonlocal::{NonLocalBlock, NonLocalConfig};
    /// let block = NonLocalBlock::new(NonLocalConfig::new(8).sub_sample(Some([1, 2, 2])))?;
    /// // Input grid 2x5x5: keys on a 2x2x2 grid, key 3 at (0, 1, 1).
    /// assert_eq!(block.key_position([2, 5, 5], 3)?, [0, 1, 1]);
    /// assert_eq!(block.key_region([2, 5, 5], 3)?, [0..1, 2..4, 2..4]);
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::KeyOutOfRange`] for an index ≥ M, the number of keys.
    pub fn key_region(&self, grid: [usize; 3], index: usize) -> Result<[Range<usize>; 3]> {
        let key = self.key_position(grid, index)?;
        let kernel = self.config.pool_kernel();
        Ok(std::array::from_fn(|a| key[a] * kernel[a]..(key[a] + 1) * kernel[a]))
    }
}

/// The (t, h, w) of a row-major index into `grid`.
fn unravel(grid: [usize; 3], index: usize) -> [usize; 3] {
    [index / (grid[1] * grid[2]), (index / grid[2]) % grid[1], index % grid[2]]
}
