//! How inputs are read: the checks every input passes before the kernels see it (those of
//! `crate::input`, with the block's channels, rank and pool kernel), and the numbering of
//! query and key positions.

use std::ops::Range;

use ndarray::{ArrayView5, ArrayViewD};

use super::NonLocalBlock;
use crate::error::{Error, Result};
pub(crate) use crate::input::Layout;
use crate::input::{check_input, Expected};
use crate::kernels::pool::pooled_grid;

impl NonLocalBlock {
    /// Checks an input of the given layout and views it as clips (B, T, H, W, C) (see
    /// [`check_input`]).
    pub(crate) fn check_input<'a>(&self, x: ArrayViewD<'a, f32>, layout: Layout) -> Result<ArrayView5<'a, f32>> {
        let expected = Expected {
            channels: self.config.in_channels,
            conv_dims: self.config.conv_dims,
            sequences: true,
            min_grid: self.config.pool_kernel(),
            // Every buffer is at most max(C, proj_cols, C') floats per position.
            floats_per_position: self.config.in_channels.max(self.compiled.proj_cols).max(self.config.inter_channels),
        };
        check_input(x, layout, expected)
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
