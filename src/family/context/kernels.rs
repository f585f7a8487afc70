//! The context block's passes over the input, vectorised and parallel.
//!
//! The block is memory-bound: per sample it reads x twice and writes the output once.
//!
//! - **Pooling** ([`pool`]): positions are cut into chunks of about [`CHUNK_FLOATS`] floats
//!   (a few hundred kB, so a chunk stays in L2 while it is read a second time). Per chunk:
//!   the mask logits `w·x_j + b` (one read of the chunk), their max `m`, `e_j = exp(l_j − m)`
//!   and `s = Σ e_j`, then `acc = Σ_j e_j·x_j` (the second read, from cache). Chunks combine
//!   as an online softmax ([`combine`]): with M the largest chunk max, `context = Σ_k
//!   e^(m_k − M)·acc_k / Σ_k e^(m_k − M)·s_k`, in f64. Average pooling is the same with
//!   `e_j = 1`. (An online softmax inside the logit pass, rescaling `acc` whenever the
//!   running max grows, reads each row from L1 instead of L2 but measured no faster at
//!   ResNet stage-4 size, and needs a scalar `exp` per row where the chunk gets a vector one;
//!   tried again in groups of four rows, the logits and the weighted sum both from L1: pooling
//!   0.25–0.33 ms against this design's 0.26–0.28 at C 2048, 25×42 on Zen 5.)
//! - **Fusion** ([`fuse`]): `out_j = x_j ⊙ s + a` per channel, rounded as PyTorch does
//!   (product, then sum).
//! - The backward passes ([`grad_sums`], [`input_grad`]) and the MLPs' matrix-vector
//!   products ([`matvec`], [`weighted_rows_sum`]) use the same pieces.
//!
//! The chunking depends on N and C only, and chunk results are added in chunk order, so
//! results are bit-identical for any thread count. Inner loops are written once over
//! 16-lane arrays ([`Pass`]) and compiled for AVX-512, for AVX2+FMA and portably: the two
//! x86 paths use fused multiply-adds and give the same bits (each lane, and each dot
//! product's lane order, is fixed by the 16-lane layout, not the vector width); the
//! portable path rounds products separately.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::kernels::exp::{exp_sum, fmadd, row_max, sum_lanes};
use crate::kernels::simd::{isa, Isa};

/// Lanes of the partial sums of a dot product: fixed, whatever the vector width.
const LANES: usize = 16;

/// Floats of input per chunk of positions (256 kB).
pub(super) const CHUNK_FLOATS: usize = 1 << 16;

/// Positions per chunk for rows of `c` floats: about [`CHUNK_FLOATS`] floats, at least one row.
pub(super) fn chunk_rows(c: usize) -> usize {
    (CHUNK_FLOATS / c.max(1)).max(1)
}

/// A loop body compiled for an instruction set: `FMA` says whether multiply-adds are fused.
/// Implementations mark `run` `#[inline(always)]`, so it is compiled inside the
/// `#[target_feature]` entry point that [`dispatch`] calls.
pub(super) trait Pass {
    /// What the pass returns.
    type Out;
    /// Runs the pass.
    fn run<const FMA: bool>(self) -> Self::Out;
}

/// Runs `pass` on the instruction set [`isa`] chose.
pub(super) fn dispatch<P: Pass>(pass: P) -> P::Out {
    match isa() {
        // SAFETY (both arms): `isa()` chose a path the CPU has, with the features these
        // functions enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => unsafe { x86::avx512(pass) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::avx2(pass) },
        Isa::Portable => pass.run::<false>(),
        #[cfg(not(target_arch = "x86_64"))]
        _ => pass.run::<false>(),
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::Pass;

    /// The pass compiled for AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(in super::super) fn avx512<P: Pass>(pass: P) -> P::Out {
        pass.run::<true>()
    }

    /// The pass compiled for AVX2 with FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) fn avx2<P: Pass>(pass: P) -> P::Out {
        pass.run::<true>()
    }
}

/// Runs `f` on a worker of the current rayon pool (inline when already on one), so that the
/// parallel passes inside it do not each have to wake the pool from outside: a forward pass
/// has about six of them, each tens of microseconds of latency from a non-pool thread.
pub(super) fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// `a ← a + v ⊙ x` on one block of 16 lanes.
#[inline(always)]
fn fma_block<const FMA: bool>(a: &mut [f32; LANES], v: &[f32; LANES], x: &[f32; LANES]) {
    for k in 0..LANES {
        a[k] = fmadd::<FMA>(v[k], x[k], a[k]);
    }
}

/// `v · x` over the elements after the last whole block of 16, lane k taking element k.
#[inline(always)]
fn fma_tail<const FMA: bool>(a: &mut [f32; LANES], v: &[f32], x: &[f32]) {
    for (k, (&v, &x)) in v.iter().zip(x).enumerate() {
        a[k] = fmadd::<FMA>(v, x, a[k]);
    }
}

/// `v · x`: lane k adds the elements c ≡ k (mod 16) in order, then the lanes add pairwise.
#[inline(always)]
fn dot1<const FMA: bool>(v: &[f32], x: &[f32]) -> f32 {
    let (vb, vt) = v.as_chunks::<LANES>();
    let (xb, xt) = x.as_chunks::<LANES>();
    let mut a = [0.0f32; LANES];
    for (v, x) in vb.iter().zip(xb) {
        fma_block::<FMA>(&mut a, v, x);
    }
    fma_tail::<FMA>(&mut a, vt, xt);
    sum_lanes(a)
}

/// `v · x_r` for four rows at once (four independent chains), each bit for bit [`dot1`].
#[inline(always)]
fn dot4<const FMA: bool>(v: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    let (vb, vt) = v.as_chunks::<LANES>();
    let ((b0, t0), (b1, t1)) = (x[0].as_chunks::<LANES>(), x[1].as_chunks::<LANES>());
    let ((b2, t2), (b3, t3)) = (x[2].as_chunks::<LANES>(), x[3].as_chunks::<LANES>());
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    for ((((v, x0), x1), x2), x3) in vb.iter().zip(b0).zip(b1).zip(b2).zip(b3) {
        fma_block::<FMA>(&mut a0, v, x0);
        fma_block::<FMA>(&mut a1, v, x1);
        fma_block::<FMA>(&mut a2, v, x2);
        fma_block::<FMA>(&mut a3, v, x3);
    }
    fma_tail::<FMA>(&mut a0, vt, t0);
    fma_tail::<FMA>(&mut a1, vt, t1);
    fma_tail::<FMA>(&mut a2, vt, t2);
    fma_tail::<FMA>(&mut a3, vt, t3);
    [sum_lanes(a0), sum_lanes(a1), sum_lanes(a2), sum_lanes(a3)]
}

/// `out[j] ← v · rows[j]` for the rows (each `v.len()` floats) of a row-major block.
pub(super) struct Dots<'a> {
    pub v: &'a [f32],
    pub rows: &'a [f32],
    pub out: &'a mut [f32],
}

impl Pass for Dots<'_> {
    type Out = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let c = self.v.len();
        debug_assert_eq!(self.rows.len(), self.out.len() * c);
        let mut outs = self.out.chunks_exact_mut(4);
        let mut groups = self.rows.chunks_exact(4 * c);
        for (o, r) in (&mut outs).zip(&mut groups) {
            let (r01, r23) = r.split_at(2 * c);
            let (r0, r1) = r01.split_at(c);
            let (r2, r3) = r23.split_at(c);
            o.copy_from_slice(&dot4::<FMA>(self.v, [r0, r1, r2, r3]));
        }
        for (o, r) in outs.into_remainder().iter_mut().zip(groups.remainder().chunks_exact(c)) {
            *o = dot1::<FMA>(self.v, r);
        }
    }
}

/// `acc[c] ← acc[c] + Σ_j e[j]·rows[j][c]`, one multiply-add per row in the order of j.
pub(super) struct WeightedRows<'a> {
    pub rows: &'a [f32],
    pub e: &'a [f32],
    pub acc: &'a mut [f32],
}

impl Pass for WeightedRows<'_> {
    type Out = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let c = self.acc.len();
        debug_assert_eq!(self.rows.len(), self.e.len() * c);
        let mut groups = self.rows.chunks_exact(4 * c);
        let mut weights = self.e.chunks_exact(4);
        for (r, e) in (&mut groups).zip(&mut weights) {
            let (r01, r23) = r.split_at(2 * c);
            let (r0, r1) = r01.split_at(c);
            let (r2, r3) = r23.split_at(c);
            let (e0, e1, e2, e3) = (e[0], e[1], e[2], e[3]);
            for ((((a, &x0), &x1), &x2), &x3) in self.acc.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3) {
                let s = fmadd::<FMA>(e0, x0, *a);
                let s = fmadd::<FMA>(e1, x1, s);
                let s = fmadd::<FMA>(e2, x2, s);
                *a = fmadd::<FMA>(e3, x3, s);
            }
        }
        for (r, &e) in groups.remainder().chunks_exact(c).zip(weights.remainder()) {
            for (a, &x) in self.acc.iter_mut().zip(r) {
                *a = fmadd::<FMA>(e, x, *a);
            }
        }
    }
}

/// `out_j ← x_j ⊙ s + a` for rows of C floats (`s` absent: 1; `a` absent: 0), the product
/// and the sum rounded separately, as PyTorch computes `x * gate + term`.
pub(super) struct Affine<'a> {
    pub x: &'a [f32],
    pub s: Option<&'a [f32]>,
    pub a: Option<&'a [f32]>,
    /// Written element by element, every one (it may start uninitialised).
    pub out: &'a mut [MaybeUninit<f32>],
}

impl Pass for Affine<'_> {
    type Out = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let c = self.s.or(self.a).map_or(1, <[f32]>::len);
        for (o, x) in self.out.chunks_exact_mut(c).zip(self.x.chunks_exact(c)) {
            match (self.s, self.a) {
                (Some(s), Some(a)) => {
                    for (((o, &x), &s), &a) in o.iter_mut().zip(x).zip(s).zip(a) {
                        o.write(x * s + a);
                    }
                }
                (Some(s), None) => o.iter_mut().zip(x).zip(s).for_each(|((o, &x), &s)| _ = o.write(x * s)),
                (None, Some(a)) => o.iter_mut().zip(x).zip(a).for_each(|((o, &x), &a)| _ = o.write(x + a)),
                (None, None) => o.iter_mut().zip(x).for_each(|(o, &x)| _ = o.write(x)),
            }
        }
    }
}

/// Backward sums over rows of C floats: `ds ← ds + Σ_j g_j ⊙ x_j`, `da ← da + Σ_j g_j`.
pub(super) struct GradSums<'a> {
    pub g: &'a [f32],
    pub x: &'a [f32],
    pub ds: Option<&'a mut [f32]>,
    pub da: Option<&'a mut [f32]>,
}

impl Pass for GradSums<'_> {
    type Out = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let GradSums { g, x, mut ds, mut da } = self;
        let Some(c) = ds.as_ref().or(da.as_ref()).map(|v| v.len()) else { return };
        for (g, x) in g.chunks_exact(c).zip(x.chunks_exact(c)) {
            if let Some(ds) = ds.as_deref_mut() {
                for ((d, &g), &x) in ds.iter_mut().zip(g).zip(x) {
                    *d = fmadd::<FMA>(g, x, *d);
                }
            }
            if let Some(da) = da.as_deref_mut() {
                da.iter_mut().zip(g).for_each(|(d, &g)| *d += g);
            }
        }
    }
}

/// The input gradient, rows of C floats:
/// `dx_j = g_j ⊙ s + p_j·dc + dl_j·w` (`s` absent: 1; `p` absent: 1; `dl` absent: no term).
pub(super) struct InputGrad<'a> {
    pub g: &'a [f32],
    pub s: Option<&'a [f32]>,
    pub dc: &'a [f32],
    pub p: Option<&'a [f32]>,
    pub dl: Option<(&'a [f32], &'a [f32])>,
    /// Written row by row, every element (it may start uninitialised).
    pub dx: &'a mut [MaybeUninit<f32>],
}

impl Pass for InputGrad<'_> {
    type Out = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let c = self.dc.len();
        for (j, (dx, g)) in self.dx.chunks_exact_mut(c).zip(self.g.chunks_exact(c)).enumerate() {
            match self.s {
                Some(s) => dx.iter_mut().zip(g).zip(s).for_each(|((d, &g), &s)| _ = d.write(g * s)),
                None => dx.iter_mut().zip(g).for_each(|(d, &g)| _ = d.write(g)),
            }
            // SAFETY: every element of the row was written just above; MaybeUninit<f32> has
            // the layout of f32.
            let dx = unsafe { std::slice::from_raw_parts_mut(dx.as_mut_ptr().cast::<f32>(), dx.len()) };
            match self.p {
                Some(p) => {
                    let p = p[j];
                    dx.iter_mut().zip(self.dc).for_each(|(d, &dc)| *d = fmadd::<FMA>(p, dc, *d));
                }
                None => dx.iter_mut().zip(self.dc).for_each(|(d, &dc)| *d += dc),
            }
            if let Some((dl, w)) = self.dl {
                let dl = dl[j];
                dx.iter_mut().zip(w).for_each(|(d, &w)| *d = fmadd::<FMA>(dl, w, *d));
            }
        }
    }
}

/// What pooling one chunk of positions gives: its logit max `m` (0 for average pooling),
/// `s = Σ_j e_j` and `acc = Σ_j e_j·x_j`, with `e_j = exp(l_j − m)` (1 for average pooling).
#[derive(Clone, Debug)]
pub(super) struct ChunkSums {
    pub max: f32,
    pub sum: f32,
    pub acc: Vec<f32>,
}

/// Pools one chunk (rows × C, row-major) into [`ChunkSums`], writing `e_j` into `e`.
/// `mask` is the attention conv (w, b), or `None` for average pooling.
fn pool_chunk(rows: &[f32], c: usize, mask: Option<(&[f32], f32)>, e: &mut [f32]) -> ChunkSums {
    let mut acc = vec![0.0f32; c];
    let (max, sum) = match mask {
        Some((w, b)) => {
            dispatch(Dots { v: w, rows, out: e });
            e.iter_mut().for_each(|l| *l += b);
            // NaN when any logit is NaN or infinite: the softmax is then NaN, as in PyTorch.
            let max = row_max(e);
            (max, exp_sum(e, 1.0, max))
        }
        None => {
            e.fill(1.0);
            (0.0, e.len() as f32)
        }
    };
    dispatch(WeightedRows { rows, e, acc: &mut acc });
    ChunkSums { max, sum, acc }
}

/// Pooling pass over B samples of N positions (x: B·N·C row-major): the [`ChunkSums`] of
/// every chunk in (sample, chunk) order, chunks of [`chunk_rows`] positions in parallel;
/// `e` (B·N) receives each position's `e_j`.
pub(super) fn pool(x: &[f32], n: usize, c: usize, mask: Option<(&[f32], f32)>, e: &mut [f32]) -> Vec<ChunkSums> {
    let rows = chunk_rows(c);
    let tasks: Vec<(&[f32], &mut [f32])> = x
        .chunks(n * c)
        .zip(e.chunks_mut(n))
        .flat_map(|(xs, es)| xs.chunks(rows * c).zip(es.chunks_mut(rows)))
        .collect();
    tasks.into_par_iter().map(|(xs, es)| pool_chunk(xs, c, mask, es)).collect()
}

/// The online-softmax combination of one sample's chunks, in chunk order and in f64.
#[derive(Clone, Debug)]
pub(super) struct Pooled {
    /// The context vector (C).
    pub context: Vec<f32>,
    /// Per chunk, the factor turning its `e_j` into the softmax weight `p_j`:
    /// `e^(m_k − M) / Σ_k e^(m_k − M)·s_k`.
    pub weight_scale: Vec<f64>,
}

/// Combines one sample's chunks into the context (see [`Pooled`]).
pub(super) fn combine(chunks: &[ChunkSums], c: usize) -> Pooled {
    // NaN propagates: a NaN chunk max makes every factor NaN.
    let max = chunks
        .iter()
        .fold(f32::NEG_INFINITY, |m, k| if k.max.is_nan() || m.is_nan() { f32::NAN } else { m.max(k.max) });
    let factors: Vec<f64> = chunks.iter().map(|k| (f64::from(k.max) - f64::from(max)).exp()).collect();
    let total: f64 = chunks.iter().zip(&factors).map(|(k, f)| f * f64::from(k.sum)).sum();
    let mut context = vec![0.0f64; c];
    for (k, &f) in chunks.iter().zip(&factors) {
        context.iter_mut().zip(&k.acc).for_each(|(o, &a)| *o += f * f64::from(a));
    }
    Pooled {
        context: context.iter().map(|v| (v / total) as f32).collect(),
        weight_scale: factors.iter().map(|f| f / total).collect(),
    }
}

/// One sample's fusion terms: the gate s and the added term a (C each), when present.
#[derive(Clone, Copy, Debug)]
pub(super) struct FusionTerms<'a> {
    pub gate: Option<&'a [f32]>,
    pub add: Option<&'a [f32]>,
}

/// The fusion pass: `out_j = x_j ⊙ s_b + a_b` for every position of every sample b (x and
/// out: B·N·C), chunks in parallel, with `terms[b]` sample b's terms. Writes every element
/// of `out`, which may start uninitialised.
pub(super) fn fuse(x: &[f32], n: usize, c: usize, terms: &[FusionTerms<'_>], out: &mut [MaybeUninit<f32>]) {
    debug_assert_eq!(x.len(), out.len());
    let rows = chunk_rows(c);
    // (input rows, output rows, sample) per chunk.
    type Task<'t> = (&'t [f32], &'t mut [MaybeUninit<f32>], usize);
    let tasks: Vec<Task<'_>> = x
        .chunks(n * c)
        .zip(out.chunks_mut(n * c))
        .enumerate()
        .flat_map(|(b, (xs, os))| xs.chunks(rows * c).zip(os.chunks_mut(rows * c)).map(move |(x, o)| (x, o, b)))
        .collect();
    tasks.into_par_iter().for_each(|(x, out, b)| {
        let FusionTerms { gate, add } = terms[b];
        dispatch(Affine { x, s: gate, a: add, out });
    });
}

/// `out ← W·v (+ bias)` for a row-major W (out.len() × v.len()), row blocks in parallel.
pub(super) fn matvec(w: &[f32], v: &[f32], bias: &[f32], out: &mut [f32]) {
    let cols = v.len();
    let rows = chunk_rows(cols).next_multiple_of(4);
    out.par_chunks_mut(rows).zip(w.par_chunks(rows * cols)).for_each(|(out, w)| dispatch(Dots { v, rows: w, out }));
    out.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
}

/// `Σ_j e[j]·rows[j]` over the rows (each `cols` floats) of a row-major matrix: chunks of
/// rows in parallel, their partial sums added in chunk order in f64.
pub(super) fn weighted_rows_sum(rows: &[f32], cols: usize, e: &[f32]) -> Vec<f32> {
    let per = chunk_rows(cols);
    let partials: Vec<Vec<f32>> = rows
        .par_chunks(per * cols)
        .zip(e.par_chunks(per))
        .map(|(rows, e)| {
            let mut acc = vec![0.0f32; cols];
            dispatch(WeightedRows { rows, e, acc: &mut acc });
            acc
        })
        .collect();
    add_in_order(&partials, cols)
}

/// The element-wise sum of `parts`, added in order in f64.
pub(super) fn add_in_order(parts: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut total = vec![0.0f64; len];
    for part in parts {
        total.iter_mut().zip(part).for_each(|(t, &p)| *t += f64::from(p));
    }
    total.into_iter().map(|t| t as f32).collect()
}

/// The backward sums of one sample (x, g: N·C): `Σ_j g_j ⊙ x_j` (when `want_ds`) and
/// `Σ_j g_j` (when `want_da`), chunks in parallel, added in chunk order in f64.
pub(super) fn grad_sums(x: &[f32], g: &[f32], c: usize, want_ds: bool, want_da: bool) -> (Vec<f32>, Vec<f32>) {
    let rows = chunk_rows(c);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = x
        .par_chunks(rows * c)
        .zip(g.par_chunks(rows * c))
        .map(|(x, g)| {
            let mut ds = if want_ds { vec![0.0f32; c] } else { Vec::new() };
            let mut da = if want_da { vec![0.0f32; c] } else { Vec::new() };
            let pass = GradSums { g, x, ds: want_ds.then_some(&mut ds[..]), da: want_da.then_some(&mut da[..]) };
            dispatch(pass);
            (ds, da)
        })
        .collect();
    let (ds, da): (Vec<Vec<f32>>, Vec<Vec<f32>>) = partials.into_iter().unzip();
    (if want_ds { add_in_order(&ds, c) } else { Vec::new() }, if want_da { add_in_order(&da, c) } else { Vec::new() })
}

/// What the input-gradient pass of one sample needs besides x and g.
pub(super) struct InputGradTerms<'a> {
    /// The multiplicative gate s (C), absent without mul fusion.
    pub s: Option<&'a [f32]>,
    /// ∂L/∂context (C); for average pooling already divided by N.
    pub dc: &'a [f32],
    /// Attention pooling: the softmax weights p (N), the context (C) and the mask weight w (C).
    pub attention: Option<(&'a [f32], &'a [f32], &'a [f32])>,
}

/// The input gradient of one sample into `dx` (N·C; every element written, it may start
/// uninitialised), chunks in parallel; with attention pooling also `(∂L/∂w, ∂L/∂b)` of the
/// mask conv, added in chunk order in f64.
///
/// With `q_j = dc·x_j` and `dl_j = p_j·(q_j − dc·context)` (the softmax backward):
/// `dx_j = g_j ⊙ s + p_j·dc + dl_j·w`, `∂L/∂w = Σ_j dl_j·x_j`, `∂L/∂b = Σ_j dl_j`.
pub(super) fn input_grad(
    x: &[f32],
    g: &[f32],
    t: &InputGradTerms<'_>,
    dx: &mut [MaybeUninit<f32>],
) -> Option<(Vec<f32>, f64)> {
    debug_assert_eq!(g.len(), dx.len());
    let c = t.dc.len();
    let rows = chunk_rows(c);
    match t.attention {
        None => {
            dx.par_chunks_mut(rows * c)
                .zip(g.par_chunks(rows * c))
                .for_each(|(dx, g)| dispatch(InputGrad { g, s: t.s, dc: t.dc, p: None, dl: None, dx }));
            None
        }
        Some((p, context, w)) => {
            let dc_context = dot64(t.dc, context);
            let partials: Vec<(Vec<f32>, f64)> = dx
                .par_chunks_mut(rows * c)
                .zip(x.par_chunks(rows * c))
                .zip(g.par_chunks(rows * c))
                .zip(p.par_chunks(rows))
                .map(|(((dx, x), g), p)| {
                    let mut dl = vec![0.0f32; p.len()];
                    dispatch(Dots { v: t.dc, rows: x, out: &mut dl });
                    dl.iter_mut().zip(p).for_each(|(q, &p)| *q = (f64::from(p) * (f64::from(*q) - dc_context)) as f32);
                    dispatch(InputGrad { g, s: t.s, dc: t.dc, p: Some(p), dl: Some((&dl, w)), dx });
                    let mut dw = vec![0.0f32; c];
                    dispatch(WeightedRows { rows: x, e: &dl, acc: &mut dw });
                    (dw, dl.iter().map(|&v| f64::from(v)).sum())
                })
                .collect();
            let db = partials.iter().map(|p| p.1).sum();
            let dw: Vec<Vec<f32>> = partials.into_iter().map(|p| p.0).collect();
            Some((add_in_order(&dw, c), db))
        }
    }
}

/// `a · b` in f64.
pub(super) fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
}

#[cfg(test)]
mod tests {
    use super::super::input::as_uninit;
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// Runs a pass on every instruction set this CPU has, plus the portable body with fused
    /// multiply-adds (software `fma` where the CPU has none), returning each result.
    fn on_every_isa<T>(make: impl Fn() -> T, run: impl Fn(&mut T, u8)) -> Vec<T> {
        let mut out = Vec::new();
        for path in 0..3u8 {
            #[cfg(target_arch = "x86_64")]
            let available = match path {
                0 => is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma"),
                1 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                _ => true,
            };
            #[cfg(not(target_arch = "x86_64"))]
            let available = path == 2;
            if available {
                let mut state = make();
                run(&mut state, path);
                out.push(state);
            }
        }
        out
    }

    fn run_on<P: Pass>(pass: P, path: u8) -> P::Out {
        match path {
            // SAFETY: `on_every_isa` runs these paths only where the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            0 => unsafe { x86::avx512(pass) },
            #[cfg(target_arch = "x86_64")]
            1 => unsafe { x86::avx2(pass) },
            _ => pass.run::<true>(),
        }
    }

    #[test]
    fn dots_match_f64_and_are_bit_equal_on_every_isa() {
        for (rows, c) in [(1, 1), (3, 5), (7, 16), (9, 33), (13, 100)] {
            let v = data(c, 1);
            let x = data(rows * c, 2);
            let results = on_every_isa(|| vec![0.0f32; rows], |out, path| run_on(Dots { v: &v, rows: &x, out }, path));
            for (j, &got) in results[0].iter().enumerate() {
                let want = dot64(&v, &x[j * c..(j + 1) * c]);
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{rows}x{c} row {j}: {got} vs {want}"
                );
            }
            for r in &results[1..] {
                assert_eq!(
                    r.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    results[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
            // Four rows at a time give the bits of one row at a time.
            for j in 0..rows {
                let mut one = [0.0f32];
                run_on(Dots { v: &v, rows: &x[j * c..(j + 1) * c], out: &mut one }, 2);
                assert_eq!(one[0].to_bits(), results.last().unwrap()[j].to_bits());
            }
        }
    }

    /// The dispatcher runs the fused x86 body on every x86 path `isa()` may choose (an
    /// `Isa::Avx512Bf16` CPU once fell through to the portable body: a third of the speed)
    /// and the unfused portable body only on `Isa::Portable`.
    #[test]
    fn dispatch_runs_the_fused_body_on_every_x86_path() {
        let (rows, c) = (9, 100);
        let (v, x) = (data(c, 16), data(rows * c, 17));
        let mut got = vec![0.0f32; rows];
        dispatch(Dots { v: &v, rows: &x, out: &mut got });
        let mut fused = vec![0.0f32; rows];
        Dots { v: &v, rows: &x, out: &mut fused }.run::<true>();
        let mut unfused = vec![0.0f32; rows];
        Dots { v: &v, rows: &x, out: &mut unfused }.run::<false>();
        assert_ne!(fused, unfused, "the data must tell the two bodies apart");
        let want = if isa() == Isa::Portable { &unfused } else { &fused };
        assert_eq!(&got, want, "dispatch on {}", isa());
    }

    #[test]
    fn weighted_rows_match_f64_and_are_bit_equal_on_every_isa() {
        for (rows, c) in [(1, 1), (5, 3), (8, 17), (11, 40)] {
            let x = data(rows * c, 3);
            let e = data(rows, 4);
            let init = data(c, 5);
            let results =
                on_every_isa(|| init.clone(), |acc, path| run_on(WeightedRows { rows: &x, e: &e, acc }, path));
            for (k, &got) in results[0].iter().enumerate() {
                let want =
                    f64::from(init[k]) + (0..rows).map(|j| f64::from(e[j]) * f64::from(x[j * c + k])).sum::<f64>();
                assert!((f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()));
            }
            for r in &results[1..] {
                assert_eq!(r, &results[0]);
            }
        }
    }

    #[test]
    fn affine_rounds_like_pytorch_and_input_grad_adds_every_term() {
        let (rows, c) = (3, 7);
        let x = data(rows * c, 6);
        let (s, a) = (data(c, 7), data(c, 8));
        for (s, a) in [(Some(&s[..]), Some(&a[..])), (Some(&s[..]), None), (None, Some(&a[..])), (None, None)] {
            let mut out = vec![f32::NAN; rows * c];
            // SAFETY: the pass writes initialised values only.
            dispatch(Affine { x: &x, s, a, out: unsafe { as_uninit(&mut out) } });
            for (i, &o) in out.iter().enumerate() {
                let k = i % c;
                let want = x[i] * s.map_or(1.0, |s| s[k]) + a.map_or(0.0, |a| a[k]);
                assert_eq!(o.to_bits(), want.to_bits(), "element {i}");
            }
        }
        let (g, dc, p, dl, w) = (data(rows * c, 9), data(c, 10), data(rows, 11), data(rows, 12), data(c, 13));
        let mut dx = vec![f32::NAN; rows * c];
        // SAFETY: as above.
        let dx_out = unsafe { as_uninit(&mut dx) };
        dispatch(InputGrad { g: &g, s: Some(&s), dc: &dc, p: Some(&p), dl: Some((&dl, &w)), dx: dx_out });
        for (i, &d) in dx.iter().enumerate() {
            let (j, k) = (i / c, i % c);
            let want = f64::from(g[i]) * f64::from(s[k])
                + f64::from(p[j]) * f64::from(dc[k])
                + f64::from(dl[j]) * f64::from(w[k]);
            assert!((f64::from(d) - want).abs() < 1e-6, "element {i}: {d} vs {want}");
        }
    }

    #[test]
    fn pooled_chunks_combine_to_the_softmax_weighted_mean() {
        for (n, c) in [(1, 3), (5, 4), (3000, 30), (700, 200)] {
            let x = data(n * c, 14);
            let w = data(c, 15);
            let mut e = vec![0.0f32; n];
            let chunks = pool(&x, n, c, Some((&w, 0.25)), &mut e);
            assert_eq!(chunks.len(), n.div_ceil(chunk_rows(c)));
            let pooled = combine(&chunks, c);
            let logits: Vec<f64> = (0..n).map(|j| dot64(&w, &x[j * c..(j + 1) * c]) + 0.25).collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            for k in 0..c {
                let want: f64 = (0..n).map(|j| (logits[j] - max).exp() / total * f64::from(x[j * c + k])).sum();
                let got = f64::from(pooled.context[k]);
                assert!((got - want).abs() < 1e-5, "{n}x{c} channel {k}: {got} vs {want}");
            }
            // e_j times its chunk's factor is the softmax weight.
            let rows = chunk_rows(c);
            for j in [0, n / 2, n - 1] {
                let p = f64::from(e[j]) * pooled.weight_scale[j / rows];
                assert!((p - (logits[j] - max).exp() / total).abs() < 1e-6);
            }
        }
    }
}
