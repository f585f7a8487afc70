//! The stacked projections `[q | k | v]` of one sample, and views of one image row or one
//! image column of them.

use super::params::Compiled;
use crate::config::Precision;
use crate::error::Result;
use crate::kernels::views::{MatMut, MatRef};
use crate::workspace::{Scratch, Workspace};

/// Which projection a view selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// q, `qk` channels.
    Query,
    /// k, `qk` channels.
    Key,
    /// v, C channels.
    Value,
}

/// One sample's projections: N = H·W positions in (h, w) row-major order, each a row of
/// `2·qk + C` floats `[q | k | v]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Projections<'a> {
    data: &'a [f32],
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) qk: usize,
    pub(crate) c: usize,
}

impl<'a> Projections<'a> {
    /// # Panics
    /// If `data` does not hold H·W rows of `2·qk + C` floats (an internal error).
    pub(crate) fn new(data: &'a [f32], [h, w]: [usize; 2], qk: usize, c: usize) -> Self {
        assert_eq!(data.len(), h * w * (2 * qk + c), "projections: size");
        Projections { data, h, w, qk, c }
    }

    /// Floats per position.
    pub(crate) fn width(&self) -> usize {
        2 * self.qk + self.c
    }

    fn columns(&self, part: Part) -> (usize, usize) {
        match part {
            Part::Query => (0, self.qk),
            Part::Key => (self.qk, self.qk),
            Part::Value => (2 * self.qk, self.c),
        }
    }

    /// Image row `h` of one projection: W positions.
    pub(crate) fn row(&self, h: usize, part: Part) -> MatRef<'a> {
        let (start, cols) = self.columns(part);
        let ld = self.width();
        MatRef::new(self.data, h * self.w * ld + start, self.w, cols, ld)
    }

    /// Image column `w` of one projection: H positions, `W·width` floats apart.
    pub(crate) fn column(&self, w: usize, part: Part) -> MatRef<'a> {
        let (start, cols) = self.columns(part);
        let ld = self.width();
        MatRef::new(self.data, w * ld + start, self.h, cols, self.w * ld)
    }
}

/// `[q | k | v] = x·[W_q; W_k; W_v]ᵀ + b` for one sample `x` (N × C): one GEMM on the weights
/// packed when the parameters were set, into a buffer from `workspace`.
///
/// # Errors
/// [`Error::TooLarge`](crate::Error::TooLarge) when the buffer cannot be allocated.
pub(crate) fn project<'w>(compiled: &Compiled, x: MatRef<'_>, workspace: &'w Workspace) -> Result<Scratch<'w>> {
    let mut proj = workspace.take(x.rows() * compiled.b_proj.len(), "criss-cross projections")?;
    project_into(compiled, x, &mut proj, workspace);
    Ok(proj)
}

/// [`project`] into `out` (N × (2·qk + C)).
///
/// # Panics
/// If `out` has another size (an internal error).
pub(crate) fn project_into(compiled: &Compiled, x: MatRef<'_>, out: &mut [f32], workspace: &Workspace) {
    let (n, width) = (x.rows(), compiled.b_proj.len());
    assert_eq!(out.len(), n * width, "projections: size");
    compiled.w_proj.apply_bias(Precision::F32, x, &compiled.b_proj, &mut MatMut::new(out, n, width, width), workspace);
}
