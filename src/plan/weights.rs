//! A layer's weights as the kernels use them: packed once, when the parameters are set, for
//! the block's precision.

use std::sync::OnceLock;

use crate::config::Precision;
use crate::kernels::gemm::{par_gemm_from, par_gemm_prepacked_from, PrepackedB};
use crate::kernels::views::{MatMut, MatRef, Start};
use crate::workspace::Workspace;

/// A layer's weights W (`out × in`, row-major), the right-hand operand of `X·Wᵀ` on every
/// forward pass: Wᵀ is packed for the GEMM path this process runs, once, on the first product
/// that needs it (a block built for one training step never packs), in f32, or (a bf16 block)
/// with the rows from `split` on rounded to bf16 for bf16 products, the rows before `split` in
/// f32 (the products that stay f32: the logits' θ and φ). The f32 weights are kept too, for the
/// products that stay f32 throughout (training and attention maps pack them on the call).
#[derive(Clone, Debug)]
pub(crate) struct Weights {
    data: Vec<f32>,
    out: usize,
    inp: usize,
    /// Rows `0..split` are multiplied in f32 whatever the precision asked.
    split: usize,
    precision: Precision,
    packed: OnceLock<Packings>,
}

/// [`Weights`]' packings.
#[derive(Clone, Debug)]
struct Packings {
    /// `W[0..split]ᵀ` packed ahead for f32 products.
    head: PrepackedB,
    /// `W[0..split]ᵀ` packed for the near-f32 products of a bf16 block's forward pass, where
    /// the path has them ([`PrepackedB::near_f32`]: AMX).
    head_near: Option<PrepackedB>,
    /// `W[split..out]ᵀ` packed ahead for bf16 products (nothing when `split = out`).
    tail: PrepackedB,
}

impl Weights {
    /// W from `data` (`out × in`, row-major), for f32 products.
    ///
    /// # Panics
    /// If `data` does not hold `out × in` floats (an internal error).
    pub(crate) fn new(data: Vec<f32>, out: usize, inp: usize) -> Weights {
        Self::mixed(data, out, inp, Precision::F32, out)
    }

    /// W from `data` (`out × in`, row-major) for a block in `precision`: with
    /// [`Precision::Bf16`], rows `split..` are rounded to bf16 once, when packed, and
    /// multiplied in bf16; rows `..split` stay f32.
    ///
    /// # Panics
    /// If `data` does not hold `out × in` floats or `split > out` (an internal error).
    pub(crate) fn mixed(data: Vec<f32>, out: usize, inp: usize, precision: Precision, split: usize) -> Weights {
        assert_eq!(Some(data.len()), out.checked_mul(inp), "Weights: {out}×{inp}");
        assert!(split <= out, "Weights: split {split} of {out} rows");
        let split = if precision == Precision::F32 { out } else { split };
        Weights { data, out, inp, split, precision, packed: OnceLock::new() }
    }

    /// The packings, made on the first call.
    fn packings(&self) -> &Packings {
        self.packed.get_or_init(|| {
            let (inp, split, out) = (self.inp, self.split, self.out);
            let rows = |from: usize, to: usize| MatRef::new(&self.data, from * inp, to - from, inp, inp).t();
            let head = PrepackedB::new(rows(0, split), Precision::F32);
            let head_near = match self.precision {
                Precision::F32 => None,
                _ => PrepackedB::near_f32(rows(0, split)),
            };
            let tail_precision = if split < out { Precision::Bf16 } else { Precision::F32 };
            Packings { head, head_near, tail: PrepackedB::new(rows(split, out), tail_precision) }
        })
    }

    /// W's values (`out × in`, row-major).
    pub(crate) fn to_vec(&self) -> Vec<f32> {
        self.data.clone()
    }

    /// W's values (`out × in`, row-major), borrowed.
    pub(crate) fn values(&self) -> &[f32] {
        &self.data
    }

    /// W as a view (`out × in`).
    pub(crate) fn view(&self) -> MatRef<'_> {
        MatRef::new(&self.data, 0, self.out, self.inp, self.inp)
    }

    /// `C ← X·Wᵀ + β·C` (β 0 or 1), rows of C in parallel, scratch from `ws`: in f32 for
    /// [`Precision::F32`] (the bits of an f32 block's weights); for [`Precision::Bf16`], the
    /// columns of the bf16 rows in bf16 and the others in f32 (near f32 on AMX: see
    /// [`PrepackedB::near_f32`]), each on its packing.
    pub(crate) fn apply(&self, precision: Precision, x: MatRef<'_>, beta: f32, c: &mut MatMut<'_>, ws: &Workspace) {
        self.apply_from(precision, x, Start::beta(beta), c, ws)
    }

    /// `C ← X·Wᵀ + 1·biasᵀ` as [`Weights::apply`] with β = 0 and `bias` (out) added to every
    /// row: the packed kernels start from the bias row instead of a C filled with it.
    pub(crate) fn apply_bias(
        &self,
        precision: Precision,
        x: MatRef<'_>,
        bias: &[f32],
        c: &mut MatMut<'_>,
        ws: &Workspace,
    ) {
        assert_eq!(bias.len(), self.out, "Weights::apply_bias: bias");
        self.apply_from(precision, x, Start::Bias(bias), c, ws)
    }

    /// `C ← start + X·Wᵀ` as [`Weights::apply`] ([`Weights::apply`] and
    /// [`Weights::apply_bias`] are its β and bias starts; the block's output starts from its
    /// residual).
    pub(crate) fn apply_from(
        &self,
        precision: Precision,
        x: MatRef<'_>,
        start: Start<'_>,
        c: &mut MatMut<'_>,
        ws: &Workspace,
    ) {
        let (split, out) = (self.split, self.out);
        let packed = self.packings();
        let head = match (&packed.head_near, precision) {
            (Some(near), p) if p != Precision::F32 => near,
            _ => &packed.head,
        };
        if split == out {
            return par_gemm_prepacked_from(Precision::F32, x, (self.view().t(), head), start, c, ws);
        }
        if precision == Precision::F32 {
            // One f32 product of all the rows, packed on the call: the same bits as on packed
            // f32 weights.
            return par_gemm_from(x, self.view().t(), start, c, ws);
        }
        let (rows, ld) = (c.rows(), c.ld());
        if rows == 0 {
            return;
        }
        let rows_of =
            |from: usize, to: usize| MatRef::new(&self.data, from * self.inp, to - from, self.inp, self.inp).t();
        if split > 0 {
            let mut head_c = MatMut::new(c.data_mut(), rows, split, ld);
            par_gemm_prepacked_from(
                Precision::F32,
                x,
                (rows_of(0, split), head),
                start.columns(0, split),
                &mut head_c,
                ws,
            );
        }
        let mut tail = MatMut::new(&mut c.data_mut()[split..], rows, out - split, ld);
        let b = (rows_of(split, out), &packed.tail);
        par_gemm_prepacked_from(Precision::Bf16, x, b, start.columns(split, out), &mut tail, ws);
    }
}
