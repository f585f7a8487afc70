//! A layer's weights as the kernels use them: packed once, when the parameters are set, for
//! the block's precision.

use crate::config::Precision;
use crate::kernels::gemm::{par_gemm_prepacked, PrepackedB};
use crate::kernels::views::{MatMut, MatRef};
use crate::workspace::Workspace;

/// A layer's weights W (`out × in`, row-major), the right-hand operand of `X·Wᵀ` on every
/// forward pass: Wᵀ is packed once here for the GEMM path this process runs, in the block's
/// precision (bf16: rounded once, here). The f32 weights are kept too, for the products that
/// stay f32 (training and attention maps pack them on the call).
#[derive(Clone, Debug)]
pub(crate) struct Weights {
    data: Vec<f32>,
    out: usize,
    inp: usize,
    /// Wᵀ packed ahead.
    packed_t: PrepackedB,
}

impl Weights {
    /// W from `data` (`out × in`, row-major), packed for products in `precision`.
    ///
    /// # Panics
    /// If `data` does not hold `out × in` floats (an internal error).
    pub(crate) fn new(data: Vec<f32>, out: usize, inp: usize, precision: Precision) -> Weights {
        assert_eq!(Some(data.len()), out.checked_mul(inp), "Weights: {out}×{inp}");
        let packed_t = PrepackedB::new(MatRef::new(&data, 0, out, inp, inp).t(), precision);
        Weights { data, out, inp, packed_t }
    }

    /// W as a view (`out × in`).
    pub(crate) fn view(&self) -> MatRef<'_> {
        MatRef::new(&self.data, 0, self.out, self.inp, self.inp)
    }

    /// `C ← X·Wᵀ + β·C` (β 0 or 1) in `precision`, rows of C in parallel, scratch from `ws`
    /// (on the packing made ahead when it is for `precision`).
    pub(crate) fn apply(&self, precision: Precision, x: MatRef<'_>, beta: f32, c: &mut MatMut<'_>, ws: &Workspace) {
        par_gemm_prepacked(precision, x, (self.view().t(), &self.packed_t), beta, c, ws);
    }
}
