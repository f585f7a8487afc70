//! A layer's weights as the kernels use them: packed once, when the parameters are set.

use crate::kernels::gemm::{par_gemm_prepacked, PrepackedB};
use crate::kernels::views::{MatMut, MatRef};
use crate::workspace::Workspace;

/// A layer's weights W (`out × in`, row-major), the right-hand operand of `X·Wᵀ` on every
/// forward pass: Wᵀ is packed once here for the GEMM path this process runs.
#[derive(Clone, Debug)]
pub(crate) struct Weights {
    data: Vec<f32>,
    out: usize,
    inp: usize,
    /// Wᵀ packed ahead.
    packed_t: PrepackedB,
}

impl Weights {
    /// W from `data` (`out × in`, row-major).
    ///
    /// # Panics
    /// If `data` does not hold `out × in` floats (an internal error).
    pub(crate) fn new(data: Vec<f32>, out: usize, inp: usize) -> Weights {
        assert_eq!(Some(data.len()), out.checked_mul(inp), "Weights: {out}×{inp}");
        let packed_t = PrepackedB::new(MatRef::new(&data, 0, out, inp, inp).t());
        Weights { data, out, inp, packed_t }
    }

    /// W's values (`out × in`, row-major).
    pub(crate) fn to_vec(&self) -> Vec<f32> {
        self.data.clone()
    }

    /// W as a view (`out × in`).
    pub(crate) fn view(&self) -> MatRef<'_> {
        MatRef::new(&self.data, 0, self.out, self.inp, self.inp)
    }

    /// `C ← X·Wᵀ + β·C` (β 0 or 1), rows of C in parallel, scratch from `ws`.
    pub(crate) fn apply(&self, x: MatRef<'_>, beta: f32, c: &mut MatMut<'_>, ws: &Workspace) {
        par_gemm_prepacked(x, (self.view().t(), &self.packed_t), beta, c, ws);
    }
}
