//! `exp` for the softmax, full f32 accuracy (about 1 ulp), one algorithm in two forms: per
//! lane ([`exp_lane`]: the row loops below, compiled for the instruction set [`isa`] chose and
//! vectorised by the compiler) and per vector of a [`Simd`] path ([`exp_vector`]: the packed
//! kernels), the same steps in the same order.
//!
//! The loops are written so the compiler vectorises them: fixed 16-lane chunks, branch-free
//! lanes, and 16 independent partial sums added in a fixed order (so results do not depend
//! on anything but the data).

use super::simd::{isa, Isa, Simd, ROUNDER};

pub(crate) const LANES: usize = 16;
/// Below this, `exp` underflows past the smallest normal f32; we return 0.
pub(crate) const EXP_LOW: f32 = -87.0;
/// Above this, `exp` overflows; inputs are clamped (softmax never passes positive values).
pub(crate) const EXP_HIGH: f32 = 88.0;
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' degree-6 polynomial for e^r on |r| ≤ ln2/2, highest coefficient first (Horner).
pub(crate) const EXP_POLY: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp(x)` for x ≤ 88: Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, Cephes' degree-6
/// polynomial for e^r, then scaling by 2^n through the exponent bits. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_lane<const FMA: bool>(x: f32) -> f32 {
    let xc = if x < EXP_LOW { EXP_LOW } else { x };
    let xc = if xc > EXP_HIGH { EXP_HIGH } else { xc };
    let t = fmadd::<FMA>(xc, LOG2E, ROUNDER);
    let n = t - ROUNDER;
    let r = fmadd::<FMA>(n, -LN2_HI, xc);
    let r = fmadd::<FMA>(n, -LN2_LO, r);
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = fmadd::<FMA>(p, r, c);
    }
    let e = fmadd::<FMA>(p, r * r, r) + 1.0;
    // n sits in the low bits of t; move it to the exponent field with the bias 127.
    let n_bits = t.to_bits().wrapping_sub(ROUNDER.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    let y = e * scale;
    if x < EXP_LOW {
        0.0
    } else {
        y
    }
}

/// `exp(x)` per lane of a vector, the same steps as [`exp_lane`] (so the same bits where the
/// hardware fuses the multiply-adds): about 1 ulp for x ≤ 88, 0 below −87, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_vector<S: Simd>(s: S, x: S::V) -> S::V {
    let low = s.splat(EXP_LOW);
    let xc = s.min(s.splat(EXP_HIGH), s.max(low, x));
    let rounder = s.splat(ROUNDER);
    let t = s.fmadd(xc, s.splat(LOG2E), rounder);
    // `t − ROUNDER` is exact: n as a float.
    let n = s.add(t, s.splat(-ROUNDER));
    let r = s.fmadd(n, s.splat(-LN2_HI), xc);
    let r = s.fmadd(n, s.splat(-LN2_LO), r);
    let mut p = s.splat(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = s.fmadd(p, r, s.splat(c));
    }
    let e = s.add(s.fmadd(p, s.mul(r, r), r), s.splat(1.0));
    s.zero_below(x, low, s.mul(e, s.pow2_rounded(t)))
}

/// Below this argument, [`weight_vector`] gives 0: `exp(−64·ln 2) = 2^-64`, the f32 weights'
/// floor relative to the largest weight (1), as the bf16 path's [`WEIGHT_LOW`].
pub(crate) const WEIGHT_ARG_LOW: f32 = -44.361_42;

/// An f32 softmax weight `exp(x)` for `x = s·(logit − max) ≤ 0`: [`exp_vector`], but 0 below
/// [`WEIGHT_ARG_LOW`] (weights under 2^-64 of the largest). Their sum, at most M times that,
/// is far below f32's resolution of the row's total (≥ 1); kept, the smallest of them (down to
/// 2^-125) make subnormal products in the value product, and on Intel cores every multiply-add
/// with a subnormal result or operand takes a microcode assist (Gaussian's unscaled logits make
/// many such weights). NaN stays NaN.
#[inline(always)]
pub(crate) fn weight_vector<S: Simd>(s: S, x: S::V) -> S::V {
    s.zero_below(x, s.splat(WEIGHT_ARG_LOW), exp_vector(s, x))
}

/// Below this `y`, [`exp2_weight`] gives 0: every weight it gives is 0 or at least 2^-63.
pub(crate) const WEIGHT_LOW: f32 = -63.0;
/// The polynomial of [`exp2_weight`]: 2^f ≈ 1 + f·(c1 + f·(c2 + f·(c3 + f·c4))) on |f| ≤ 1/2,
/// a relative-error fit (at most 4.1e-6 evaluated in f32), lowest coefficient first.
const EXP2_POLY: [f32; 4] = [6.931_242e-1, 2.402_409_9e-1, 5.590_643e-2, 9.582_852e-3];

/// `2^y` per lane for the attention weights of the bf16 value product, which are rounded to
/// bf16 (relative error 2^-9) as they are packed: 4e-6 relative is more than enough, and two
/// fewer multiply-adds than [`exp_vector`] (the exponential's share of the softmax is that of a
/// product with the values). y ≤ 0 as softmax arguments are; 0 below [`WEIGHT_LOW`]; NaN stays
/// NaN. The same operations on every instruction set, so the same bits.
#[inline(always)]
pub(crate) fn exp2_weight<S: Simd>(s: S, y: S::V) -> S::V {
    let low = s.splat(WEIGHT_LOW);
    let yc = s.min(s.splat(0.0), s.max(low, y));
    let t = s.add(yc, s.splat(ROUNDER));
    // n = round(y) exactly, and f = y − n exactly (|f| ≤ 1/2).
    let n = s.add(t, s.splat(-ROUNDER));
    let f = s.fmadd(n, s.splat(-1.0), yc);
    let mut p = s.splat(EXP2_POLY[3]);
    for &c in EXP2_POLY[..3].iter().rev() {
        p = s.fmadd(p, f, s.splat(c));
    }
    let p = s.fmadd(p, f, s.splat(1.0));
    s.zero_below(y, low, s.mul(p, s.pow2_rounded(t)))
}

/// `row[j] ← exp(row[j]·scale − shift)`, returning the sum of the new values; with `FLOOR`,
/// 0 where the argument is below [`WEIGHT_ARG_LOW`] (as [`weight_vector`]).
#[inline(always)]
fn exp_sum_body<const FMA: bool, const FLOOR: bool>(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for k in 0..LANES {
            let e = scaled_exp::<FMA, FLOOR>(chunk[k], scale, shift);
            chunk[k] = e;
            acc[k] += e;
        }
    }
    for (k, v) in chunks.into_remainder().iter_mut().enumerate() {
        let e = scaled_exp::<FMA, FLOOR>(*v, scale, shift);
        *v = e;
        acc[k] += e;
    }
    sum_lanes(acc)
}

/// `exp(v·scale − shift)` of one lane; with `FLOOR`, 0 below [`WEIGHT_ARG_LOW`]. (A function,
/// not a closure in the loop: a closure is compiled without the caller's instruction set.)
#[inline(always)]
fn scaled_exp<const FMA: bool, const FLOOR: bool>(v: f32, scale: f32, shift: f32) -> f32 {
    let x = fmadd::<FMA>(v, scale, -shift);
    let e = exp_lane::<FMA>(x);
    if FLOOR && x < WEIGHT_ARG_LOW {
        0.0
    } else {
        e
    }
}

/// The maximum of `row`, NaN when any element is NaN or infinite (so the softmax of such a
/// row is NaN, as in PyTorch), −∞ for an empty row.
#[inline(always)]
fn max_body(row: &[f32]) -> f32 {
    let mut best = [f32::NEG_INFINITY; LANES];
    // v·0 is NaN exactly when v is NaN or ±∞.
    let mut probe = [0.0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for k in 0..LANES {
            let v = chunk[k];
            best[k] = if v > best[k] { v } else { best[k] };
            probe[k] += v * 0.0;
        }
    }
    for (k, &v) in chunks.remainder().iter().enumerate() {
        best[k] = if v > best[k] { v } else { best[k] };
        probe[k] += v * 0.0;
    }
    if sum_lanes(probe).is_nan() {
        return f32::NAN;
    }
    best.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Adds 16 partial sums pairwise, in a fixed order (the reductions of the fixed-lane dot
/// products and sums here and in the family's kernels).
#[inline(always)]
pub(crate) fn sum_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for k in 0..width {
            acc[k] += acc[k + width];
        }
        width /= 2;
    }
    acc[0]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn exp_sum_avx512<const FLOOR: bool>(row: &mut [f32], scale: f32, shift: f32) -> f32 {
        super::exp_sum_body::<true, FLOOR>(row, scale, shift)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_sum_avx2<const FLOOR: bool>(row: &mut [f32], scale: f32, shift: f32) -> f32 {
        super::exp_sum_body::<true, FLOOR>(row, scale, shift)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn max_avx512(row: &[f32]) -> f32 {
        super::max_body(row)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn max_avx2(row: &[f32]) -> f32 {
        super::max_body(row)
    }
}

/// [`exp_sum`] (`FLOOR` false) or [`softmax_weights`] on the path of [`isa`].
fn exp_sum_on_path<const FLOOR: bool>(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    match isa() {
        // SAFETY (both arms): `isa()` chose a path the CPU has, with the features these
        // functions enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => unsafe { x86::exp_sum_avx512::<FLOOR>(row, scale, shift) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::exp_sum_avx2::<FLOOR>(row, scale, shift) },
        _ => exp_sum_body::<false, FLOOR>(row, scale, shift),
    }
}

/// [`row_max`] on the path of [`isa`].
fn max_on_path(row: &[f32]) -> f32 {
    match isa() {
        // SAFETY (both arms): as in `exp_sum_on_path`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => unsafe { x86::max_avx512(row) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::max_avx2(row) },
        _ => max_body(row),
    }
}

/// `row[j] ← exp(row[j]·scale − shift)` for every j; returns Σ_j of the new values.
///
/// Accurate to about 1 ulp for arguments ≤ 88; arguments below −87 give 0; NaN gives NaN.
pub fn exp_sum(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    exp_sum_on_path::<false>(row, scale, shift)
}

/// Softmax weights: [`exp_sum`], but 0 where `row[j]·scale − shift` is below
/// [`WEIGHT_ARG_LOW`] (weights under 2^-64 of the row's largest, as [`weight_vector`]: the same
/// bits on the FMA paths).
pub(crate) fn softmax_weights(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    exp_sum_on_path::<true>(row, scale, shift)
}

/// The largest element of `row`; NaN if any element is NaN or infinite; −∞ if empty.
pub fn row_max(row: &[f32]) -> f32 {
    max_on_path(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::kernels::simd::{Avx2, Avx512};
    use crate::kernels::simd::{Job, Portable};

    /// Which vector function [`PerVector`] applies.
    #[derive(Clone, Copy)]
    enum VectorFn {
        Exp,
        Weight,
        Exp2Weight,
    }

    /// A vector function of each whole vector of the input.
    struct PerVector(Vec<f32>, VectorFn);
    impl Job for PerVector {
        type Out = Vec<f32>;
        #[inline(always)]
        fn run<S: Simd>(self, s: S) -> Vec<f32> {
            let mut out = vec![0.0f32; self.0.len()];
            for (c, o) in self.0.chunks_exact(S::LANES).zip(out.chunks_exact_mut(S::LANES)) {
                let x = s.load_slice(c);
                let y = match self.1 {
                    VectorFn::Exp => exp_vector(s, x),
                    VectorFn::Weight => weight_vector(s, x),
                    VectorFn::Exp2Weight => exp2_weight(s, x),
                };
                s.store_slice(o, y);
            }
            out
        }
    }

    /// `f` of `xs` on portable 16-lane vectors, after checking that portable 8-lane vectors and
    /// the AVX-512 and AVX2 paths (where the CPU has them) give the same bits.
    fn same_on_every_isa(xs: &[f32], f: VectorFn) -> Vec<f32> {
        let want = Portable::<16>.vectorize(PerVector(xs.to_vec(), f));
        let mut others = vec![Portable::<8>.vectorize(PerVector(xs.to_vec(), f))];
        #[cfg(target_arch = "x86_64")]
        {
            others.extend(Avx512::detect().map(|s| s.vectorize(PerVector(xs.to_vec(), f))));
            others.extend(Avx2::detect().map(|s| s.vectorize(PerVector(xs.to_vec(), f))));
        }
        for got in others {
            for ((x, g), w) in xs.iter().zip(&got).zip(&want) {
                assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "f({x}): {g} vs {w}");
            }
        }
        want
    }

    #[test]
    fn vector_exp_is_the_scalar_exp_bit_for_bit_on_every_isa() {
        let mut xs: Vec<f32> = (0..4096).map(|i| -100.0 + 200.0 * i as f32 / 4096.0).collect();
        xs.extend([f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -87.0, -87.5, 88.0, 88.5, 0.0, -0.0, 1e-30, -1e-30]);
        xs.resize(xs.len().next_multiple_of(16), 0.5);
        let got = same_on_every_isa(&xs, VectorFn::Exp);
        for ((x, g), w) in xs.iter().zip(&got).zip(xs.iter().map(|&x| exp_lane::<true>(x))) {
            assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "exp({x}): {g} vs {w}");
        }
    }

    fn ulp_error(got: f32, want: f64) -> f64 {
        let ulp = (want as f32).abs().max(f32::MIN_POSITIVE) * f32::EPSILON;
        (got as f64 - want).abs() / ulp as f64
    }

    #[test]
    fn exp_is_accurate_to_two_ulp_over_the_softmax_range() {
        let xs: Vec<f32> = (0..200_001).map(|i| -87.0 + 87.0 * i as f32 / 200_000.0).collect();
        let portable: fn(&mut [f32], f32, f32) -> f32 = exp_sum_body::<false, false>;
        for f in [portable, exp_sum] {
            let mut row = xs.clone();
            f(&mut row, 1.0, 0.0);
            for (&x, &got) in xs.iter().zip(&row) {
                let err = ulp_error(got, (x as f64).exp());
                assert!(err <= 2.0, "exp({x}) = {got}, {err} ulp off");
            }
        }
    }

    #[test]
    fn the_row_functions_are_the_fused_ones_on_every_vector_path() {
        // Every x86 path isa() may choose compiles the row loops with FMA: their exp is the
        // vector exp's (which the packed kernels use) bit for bit.
        let xs: Vec<f32> = (0..4096).map(|i| -80.0 + 80.0 * i as f32 / 4096.0).collect();
        let mut row = xs.clone();
        exp_sum(&mut row, 1.0, 0.0);
        let fused = isa() != Isa::Portable;
        for (x, got) in xs.iter().zip(&row) {
            let want = if fused { exp_lane::<true>(*x) } else { exp_lane::<false>(*x) };
            assert_eq!(got.to_bits(), want.to_bits(), "exp({x}) on {}", isa());
        }
    }

    #[test]
    fn exp_sum_applies_scale_and_shift_and_sums() {
        let mut row: Vec<f32> = (0..37).map(|i| i as f32 * 0.25).collect();
        let want: f64 = (0..37).map(|i| (i as f64 * 0.25 * 0.5 - 3.0).exp()).sum();
        let got = exp_sum(&mut row, 0.5, 3.0);
        assert!((got as f64 - want).abs() < 1e-5 * want, "{got} vs {want}");
        assert!((row[36] as f64 - (9.0f64 * 0.5 - 3.0).exp()).abs() < 1e-6);
    }

    #[test]
    fn weights_are_the_exp_above_2_to_the_minus_64_and_zero_below_on_every_isa() {
        let mut xs: Vec<f32> = (0..4096).map(|i| -90.0 + 90.0 * i as f32 / 4095.0).collect();
        let floor = WEIGHT_ARG_LOW;
        xs.extend([floor, f32::from_bits(floor.to_bits() - 1), f32::from_bits(floor.to_bits() + 1)]);
        xs.extend([f32::NAN, f32::NEG_INFINITY, -0.0, 0.0]);
        xs.resize(xs.len().next_multiple_of(16), -1.0);
        let want = same_on_every_isa(&xs, VectorFn::Weight);
        // The row loops of the sgemm kernel: the same weights (the vector's bits on FMA paths).
        let mut row = xs.clone();
        let total = softmax_weights(&mut row, 1.0, 0.0);
        let fused = isa() != Isa::Portable;
        for ((&x, &got), &w) in xs.iter().zip(&row).zip(&want) {
            let lane = if x < floor {
                0.0
            } else if fused {
                exp_lane::<true>(x)
            } else {
                exp_lane::<false>(x)
            };
            assert!(got.to_bits() == lane.to_bits() || (got.is_nan() && x.is_nan()), "row exp({x}) = {got}");
            assert!(!fused || got.to_bits() == w.to_bits() || got.is_nan(), "row exp({x}) = {got} vs {w}");
        }
        assert!(total.is_nan(), "a NaN argument makes the sum NaN");
        for (&x, &got) in xs.iter().zip(&want) {
            match x {
                x if x.is_nan() => assert!(got.is_nan()),
                // f32::from_bits(floor + 1) is more negative: below the floor.
                x if x < floor => assert_eq!(got, 0.0, "exp({x})"),
                x => {
                    assert_eq!(got.to_bits(), exp_lane::<true>(x).to_bits(), "exp({x})");
                    assert!(got >= 2f32.powi(-64) * (1.0 - 1e-6), "exp({x}) = {got} under the floor");
                }
            }
        }
    }

    #[test]
    fn weight_exp2_is_accurate_to_5e_6_the_same_everywhere_and_zero_below_its_floor() {
        let mut ys: Vec<f32> = (0..200_000).map(|i| -64.0 + 64.0 * i as f32 / 199_999.0).collect();
        ys.extend([0.0, -0.0, -62.999_996, -63.0, -63.000_004, -1000.0, f32::NEG_INFINITY, f32::NAN, 1e-7]);
        ys.resize(ys.len().next_multiple_of(16), -0.5);
        let want = same_on_every_isa(&ys, VectorFn::Exp2Weight);
        for (&y, &got) in ys.iter().zip(&want) {
            if y.is_nan() {
                assert!(got.is_nan());
            } else if y < WEIGHT_LOW {
                assert_eq!(got, 0.0, "2^{y}");
            } else {
                let exact = 2f64.powf(y.min(0.0) as f64);
                assert!((got as f64 - exact).abs() <= 5e-6 * exact, "2^{y} = {got}, want {exact}");
                assert!(got >= 2f32.powi(-63), "2^{y} = {got} below the floor");
            }
        }
    }

    #[test]
    fn exp_edges() {
        let mut row = vec![f32::NEG_INFINITY, -1000.0, -87.5, f32::NAN, 0.0];
        exp_sum(&mut row, 1.0, 0.0);
        assert_eq!(&row[..3], &[0.0, 0.0, 0.0]);
        assert!(row[3].is_nan());
        assert_eq!(row[4], 1.0);
    }

    #[test]
    fn row_max_finds_max_and_flags_non_finite() {
        let row: Vec<f32> = (0..35).map(|i| ((i * 17) % 23) as f32 - 4.0).collect();
        assert_eq!(row_max(&row), 18.0);
        assert_eq!(row_max(&[]), f32::NEG_INFINITY);
        let mut with_nan = row.clone();
        with_nan[33] = f32::NAN;
        assert!(row_max(&with_nan).is_nan());
        let mut with_inf = row;
        with_inf[3] = f32::INFINITY;
        assert!(row_max(&with_inf).is_nan());
    }
}
