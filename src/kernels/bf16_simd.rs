//! The bf16 pair operations of the register tile on every instruction set (the [`Bf16Simd`]
//! implementations; the trait is the instruction-set layer's, in `simd`): the real
//! `VDPBF16PS` on [`Avx512Bf16`], an exact emulation in f32 fused multiply-adds on
//! [`Avx512`] and [`Avx2`], and the scalar model of [`bf16`] per lane on
//! `Portable`, so that a bf16 kernel gives the same bits on each of them.
//!
//! A vector of pairs holds [`Simd::LANES`](super::simd::Simd::LANES) 32-bit words, each two
//! bf16: element 2i in the low half, 2i+1 in the high half. [`Bf16Simd::dot_pairs`] computes
//! per f32 lane `acc + a.odd·b.odd + a.even·b.even`, the odd pair first, each addition one
//! fused multiply-add rounded to nearest even, tiny results flushed to zero.
//!
//! The emulations widen a bf16 to f32 by a 16-bit shift (exact) and use `vfmadd` in the same
//! order: the product of two bf16 is exact, so the FMA rounds exactly where the instruction
//! rounds, even when the product alone would overflow or underflow f32. Only the subnormal
//! range differs, handled by a check after each FMA: a result in `(0, 2^-126]` takes a rare
//! branch that flushes it (or, at exactly ±2^-126, asks the model).
//!
//! Preconditions shared by all implementations (the kernels keep them): the pair words hold no
//! subnormal bf16 (rounding with [`f32_to_bf16`](super::bf16::f32_to_bf16) never makes one),
//! and `acc` is never subnormal (zero, or a value `dot_pairs` returned). The instruction and
//! the model read subnormals as zeros anyway; the emulations skip that step.

use super::bf16;
use super::simd::Bf16Simd;
#[cfg(test)]
use super::simd::Portable;
#[cfg(target_arch = "x86_64")]
#[allow(unused_imports)]
use super::simd::{Avx2, Avx512, Avx512Bf16};

#[cfg(test)]
impl<const L: usize> Bf16Simd for Portable<L> {
    const EMULATED: bool = false;
    type Pairs = [u32; L];

    #[inline(always)]
    unsafe fn load_pairs(self, ptr: *const u32) -> [u32; L] {
        // SAFETY: the caller guarantees L readable words.
        unsafe { std::ptr::read_unaligned(ptr as *const [u32; L]) }
    }
    #[inline(always)]
    unsafe fn splat_pair(self, ptr: *const u32) -> [u32; L] {
        // SAFETY: the caller guarantees one readable word.
        [unsafe { *ptr }; L]
    }
    #[inline(always)]
    fn dot_pairs(self, acc: [f32; L], a: [u32; L], b: [u32; L]) -> [f32; L] {
        std::array::from_fn(|l| bf16::dpbf16_word(acc[l], a[l], b[l]))
    }
    #[inline(always)]
    unsafe fn store_bf16_pairs(self, even: [f32; L], odd: [f32; L], dst: *mut u32) {
        let words: [u32; L] =
            std::array::from_fn(|l| bf16::pair(bf16::f32_to_bf16(even[l]), bf16::f32_to_bf16(odd[l])));
        // SAFETY: the caller guarantees L writable words.
        unsafe { std::ptr::write_unaligned(dst as *mut [u32; L], words) }
    }
}

/// The emulations' rarest path: lanes whose f32 FMA result `r` is still in (0, 2^-126] (an
/// exact ±2^-126, which may be a tiny value rounded up) recomputed by the model from the
/// step's inputs `t + a·b`.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[cold]
fn model_step_lanes<const L: usize>(t: &[f32; L], a: &[f32; L], b: &[f32; L], r: &mut [f32; L]) {
    for l in 0..L {
        let magnitude = r[l].to_bits() & 0x7FFF_FFFF;
        if magnitude != 0 && magnitude <= bf16::MIN_NORMAL_BITS {
            r[l] = bf16::fma_step(t[l], a[l], b[l]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{model_step_lanes, Avx2, Avx512, Avx512Bf16, Bf16Simd};

    impl Bf16Simd for Avx512Bf16 {
        const EMULATED: bool = false;
        type Pairs = __m512i;

        #[inline(always)]
        unsafe fn load_pairs(self, ptr: *const u32) -> __m512i {
            // SAFETY: the caller guarantees 16 readable words; the token proves AVX-512F.
            unsafe { _mm512_loadu_si512(ptr as *const __m512i) }
        }
        #[inline(always)]
        unsafe fn splat_pair(self, ptr: *const u32) -> __m512i {
            // SAFETY: the caller guarantees one readable word.
            unsafe { _mm512_set1_epi32(*ptr as i32) }
        }
        #[inline(always)]
        fn dot_pairs(self, acc: __m512, a: __m512i, b: __m512i) -> __m512 {
            // SAFETY: the token proves AVX512_BF16; the transmutes only retype 64 bytes.
            unsafe {
                _mm512_dpbf16_ps(
                    acc,
                    std::mem::transmute::<__m512i, __m512bh>(a),
                    std::mem::transmute::<__m512i, __m512bh>(b),
                )
            }
        }
        #[inline(always)]
        unsafe fn store_bf16_pairs(self, even: __m512, odd: __m512, dst: *mut u32) {
            // SAFETY: the token proves AVX512_BF16 and AVX512BW; the caller guarantees `dst`.
            unsafe {
                // The second source fills halves 0..16: [even 0..16 | odd 0..16], then interleaved.
                let halves = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(odd, even));
                _mm512_storeu_si512(dst as *mut __m512i, _mm512_permutexvar_epi16(interleave_index(), halves));
            }
        }
    }

    /// Halves 2k ← k, 2k+1 ← 16+k: [even 0..16 | odd 0..16] into 16 (even, odd) words.
    #[inline(always)]
    unsafe fn interleave_index() -> __m512i {
        const INDEX: [u16; 32] = {
            let mut index = [0u16; 32];
            let mut k = 0;
            while k < 16 {
                index[2 * k] = k as u16;
                index[2 * k + 1] = 16 + k as u16;
                k += 1;
            }
            index
        };
        // SAFETY: 64 readable bytes; the caller has AVX-512F.
        unsafe { _mm512_loadu_si512(INDEX.as_ptr() as *const __m512i) }
    }

    /// The f32 bits of `v` with the bf16 rounding of [`super::bf16::f32_to_bf16`] in the top
    /// half (the low half is left over).
    #[inline(always)]
    unsafe fn round_512(v: __m512) -> __m512i {
        // SAFETY: the caller has AVX-512F.
        unsafe {
            let bits = _mm512_castps_si512(v);
            let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFF_FFFF));
            let last_kept = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(last_kept, _mm512_set1_epi32(0x7FFF)));
            let nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7F80_0000));
            let subnormal = _mm512_cmplt_epu32_mask(magnitude, _mm512_set1_epi32(0x0080_0000));
            let r = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x0040_0000));
            _mm512_mask_and_epi32(r, subnormal, bits, _mm512_set1_epi32(0x8000_0000u32 as i32))
        }
    }

    /// The odd (high) and even (low) bf16 halves of each word as f32: exact widenings.
    #[inline(always)]
    unsafe fn widen_512(w: __m512i) -> (__m512, __m512) {
        // SAFETY: the caller has AVX-512F.
        unsafe {
            let odd = _mm512_and_si512(w, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
            (_mm512_castsi512_ps(odd), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w)))
        }
    }

    /// `t + a·b` as the instruction's step, given that `t` is not subnormal: an f32 FMA, then
    /// a branch (rarely taken) for results in (0, 2^-126]: subnormal ones become zeros of their
    /// sign; an exact ±2^-126 may be a rounded-up tiny value and is recomputed by the model.
    #[inline(always)]
    unsafe fn step_512(t: __m512, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the caller has AVX-512F.
        unsafe {
            let r = _mm512_fmadd_ps(a, b, t);
            let magnitude = _mm512_and_si512(_mm512_castps_si512(r), _mm512_set1_epi32(0x7FFF_FFFF));
            // 0 < |r| ≤ 2^-126 ⇔ |r| − 1 ≤ 2^-126 − 1 as unsigned words.
            let tiny = _mm512_cmple_epu32_mask(
                _mm512_sub_epi32(magnitude, _mm512_set1_epi32(1)),
                _mm512_set1_epi32(0x007F_FFFF),
            );
            if tiny == 0 {
                return r;
            }
            flush_512(t, a, b, r, magnitude, tiny)
        }
    }

    #[cold]
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    fn flush_512(t: __m512, a: __m512, b: __m512, r: __m512, magnitude: __m512i, tiny: __mmask16) -> __m512 {
        let edge = _mm512_mask_cmpeq_epi32_mask(tiny, magnitude, _mm512_set1_epi32(0x0080_0000));
        let sign = _mm512_set1_epi32(0x8000_0000u32 as i32);
        let flushed = _mm512_castsi512_ps(_mm512_mask_and_epi32(
            _mm512_castps_si512(r),
            tiny & !edge,
            _mm512_castps_si512(r),
            sign,
        ));
        if edge == 0 {
            return flushed;
        }
        let lanes = |v: __m512| -> [f32; 16] {
            let mut out = [0.0f32; 16];
            // SAFETY: 16 writable floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
            out
        };
        let mut out = lanes(flushed);
        model_step_lanes(&lanes(t), &lanes(a), &lanes(b), &mut out);
        // SAFETY: 16 readable floats.
        unsafe { _mm512_loadu_ps(out.as_ptr()) }
    }

    impl Bf16Simd for Avx512 {
        const EMULATED: bool = true;
        type Pairs = (__m512, __m512);

        #[inline(always)]
        unsafe fn load_pairs(self, ptr: *const u32) -> (__m512, __m512) {
            // SAFETY: the caller guarantees 16 readable words; the token proves AVX-512F.
            unsafe { widen_512(_mm512_loadu_si512(ptr as *const __m512i)) }
        }
        #[inline(always)]
        unsafe fn splat_pair(self, ptr: *const u32) -> (__m512, __m512) {
            // SAFETY: the caller guarantees one readable word.
            unsafe { widen_512(_mm512_set1_epi32(*ptr as i32)) }
        }
        #[inline(always)]
        fn dot_pairs(
            self,
            acc: __m512,
            (a_odd, a_even): (__m512, __m512),
            (b_odd, b_even): (__m512, __m512),
        ) -> __m512 {
            // SAFETY: the token proves AVX-512F.
            unsafe { step_512(step_512(acc, a_odd, b_odd), a_even, b_even) }
        }
        #[inline(always)]
        fn dot_pairs_unchecked(
            self,
            acc: __m512,
            (a_odd, a_even): (__m512, __m512),
            (b_odd, b_even): (__m512, __m512),
        ) -> __m512 {
            // SAFETY: the token proves AVX-512F.
            unsafe { _mm512_fmadd_ps(a_even, b_even, _mm512_fmadd_ps(a_odd, b_odd, acc)) }
        }
        #[inline(always)]
        unsafe fn store_bf16_pairs(self, even: __m512, odd: __m512, dst: *mut u32) {
            // SAFETY: the token proves AVX-512F; the caller guarantees `dst`.
            unsafe {
                let high = _mm512_and_si512(round_512(odd), _mm512_set1_epi32(0xFFFF_0000u32 as i32));
                let words = _mm512_or_si512(high, _mm512_srli_epi32::<16>(round_512(even)));
                _mm512_storeu_si512(dst as *mut __m512i, words);
            }
        }
    }

    /// The odd and even halves widened, 8 lanes.
    #[inline(always)]
    unsafe fn widen_256(w: __m256i) -> (__m256, __m256) {
        // SAFETY: the caller has AVX2.
        unsafe {
            let odd = _mm256_and_si256(w, _mm256_set1_epi32(0xFFFF_0000u32 as i32));
            (_mm256_castsi256_ps(odd), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w)))
        }
    }

    /// [`step_512`] in AVX2.
    #[inline(always)]
    unsafe fn step_256(t: __m256, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the caller has AVX2 and FMA.
        unsafe {
            let r = _mm256_fmadd_ps(a, b, t);
            let magnitude = _mm256_and_si256(_mm256_castps_si256(r), _mm256_set1_epi32(0x7FFF_FFFF));
            // |r| + (2^31 − 1 − 2^-126) lands in [0x7F80_0000, 0x7FFF_FFFF] exactly for
            // |r| ∈ [1, 0x0080_0000] (as words); above it wraps negative, zero stays below.
            let shifted = _mm256_add_epi32(magnitude, _mm256_set1_epi32(0x7F7F_FFFF));
            let tiny = _mm256_cmpgt_epi32(shifted, _mm256_set1_epi32(0x7F7F_FFFF));
            if _mm256_testz_si256(tiny, tiny) != 0 {
                return r;
            }
            flush_256(t, a, b, r, magnitude, tiny)
        }
    }

    #[cold]
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    fn flush_256(t: __m256, a: __m256, b: __m256, r: __m256, magnitude: __m256i, tiny: __m256i) -> __m256 {
        let edge = _mm256_and_si256(tiny, _mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x0080_0000)));
        let flush = _mm256_andnot_si256(edge, tiny);
        let sign_only = _mm256_and_si256(_mm256_castps_si256(r), _mm256_set1_epi32(0x8000_0000u32 as i32));
        let flushed = _mm256_castsi256_ps(_mm256_blendv_epi8(_mm256_castps_si256(r), sign_only, flush));
        if _mm256_testz_si256(edge, edge) != 0 {
            return flushed;
        }
        let lanes = |v: __m256| -> [f32; 8] {
            let mut out = [0.0f32; 8];
            // SAFETY: 8 writable floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
            out
        };
        let mut out = lanes(flushed);
        model_step_lanes(&lanes(t), &lanes(a), &lanes(b), &mut out);
        // SAFETY: 8 readable floats.
        unsafe { _mm256_loadu_ps(out.as_ptr()) }
    }

    /// [`round_512`] in AVX2.
    #[inline(always)]
    unsafe fn round_256(v: __m256) -> __m256i {
        // SAFETY: the caller has AVX2.
        unsafe {
            let bits = _mm256_castps_si256(v);
            // Non-negative as i32, so signed compares order magnitudes.
            let magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFF_FFFF));
            let last_kept = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
            let rounded = _mm256_add_epi32(bits, _mm256_add_epi32(last_kept, _mm256_set1_epi32(0x7FFF)));
            let nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F80_0000));
            let subnormal = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x0080_0000), magnitude);
            let quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000));
            let signed_zero = _mm256_and_si256(bits, _mm256_set1_epi32(0x8000_0000u32 as i32));
            _mm256_blendv_epi8(_mm256_blendv_epi8(rounded, quiet, nan), signed_zero, subnormal)
        }
    }

    impl Bf16Simd for Avx2 {
        const EMULATED: bool = true;
        type Pairs = (__m256, __m256);

        #[inline(always)]
        unsafe fn load_pairs(self, ptr: *const u32) -> (__m256, __m256) {
            // SAFETY: the caller guarantees 8 readable words; the token proves AVX2.
            unsafe { widen_256(_mm256_loadu_si256(ptr as *const __m256i)) }
        }
        #[inline(always)]
        unsafe fn splat_pair(self, ptr: *const u32) -> (__m256, __m256) {
            // SAFETY: the caller guarantees one readable word.
            unsafe { widen_256(_mm256_set1_epi32(*ptr as i32)) }
        }
        #[inline(always)]
        fn dot_pairs(
            self,
            acc: __m256,
            (a_odd, a_even): (__m256, __m256),
            (b_odd, b_even): (__m256, __m256),
        ) -> __m256 {
            // SAFETY: the token proves AVX2 and FMA.
            unsafe { step_256(step_256(acc, a_odd, b_odd), a_even, b_even) }
        }
        #[inline(always)]
        fn dot_pairs_unchecked(
            self,
            acc: __m256,
            (a_odd, a_even): (__m256, __m256),
            (b_odd, b_even): (__m256, __m256),
        ) -> __m256 {
            // SAFETY: the token proves AVX2 and FMA.
            unsafe { _mm256_fmadd_ps(a_even, b_even, _mm256_fmadd_ps(a_odd, b_odd, acc)) }
        }
        #[inline(always)]
        unsafe fn store_bf16_pairs(self, even: __m256, odd: __m256, dst: *mut u32) {
            // SAFETY: the token proves AVX2; the caller guarantees `dst`.
            unsafe {
                let high = _mm256_and_si256(round_256(odd), _mm256_set1_epi32(0xFFFF_0000u32 as i32));
                let words = _mm256_or_si256(high, _mm256_srli_epi32::<16>(round_256(even)));
                _mm256_storeu_si256(dst as *mut __m256i, words);
            }
        }
    }
}

/// `VDPBF16PS` itself on 16 lanes, for comparisons; `None` without AVX512_BF16.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn hardware_dpbf16(acc: &[f32; 16], a: &[u32; 16], b: &[u32; 16]) -> Option<[f32; 16]> {
    Avx512Bf16::detect().map(|s| dot_pairs_of(s, acc, a, b))
}

/// `s.dot_pairs` on L lanes given as arrays (for the tests).
#[cfg(test)]
fn dot_pairs_of<S: Bf16Simd, const L: usize>(s: S, acc: &[f32; L], a: &[u32; L], b: &[u32; L]) -> [f32; L] {
    struct Dot<'a, const L: usize>(&'a [f32; L], &'a [u32; L], &'a [u32; L]);
    impl<const L: usize> super::simd::Job for Dot<'_, L> {
        type Out = [f32; L];
        #[inline(always)]
        fn run<S: Bf16Simd>(self, s: S) -> [f32; L] {
            assert_eq!(S::LANES, L);
            let mut out = [0.0f32; L];
            // SAFETY: L = LANES elements in each array.
            unsafe {
                let r =
                    s.dot_pairs(s.load(self.0.as_ptr()), s.load_pairs(self.1.as_ptr()), s.load_pairs(self.2.as_ptr()));
                s.store(out.as_mut_ptr(), r);
            }
            out
        }
    }
    s.vectorize(Dot(acc, a, b))
}

#[cfg(test)]
mod tests {
    use super::super::bf16::lanes::{lane, Class, Rng};
    use super::super::bf16::{dpbf16_word, pair, round_to_bf16};
    use super::*;

    /// Lanes of every class made to meet the preconditions: subnormal accumulators and bf16
    /// inputs read as zeros of their sign (which changes nothing for the instruction).
    fn sanitized_lanes(seed: u64, per_class: usize) -> Vec<(f32, u32, u32)> {
        let daz16 = |h: u16| if h & 0x7F80 == 0 { h & 0x8000 } else { h };
        let daz = |x: f32| if x.is_subnormal() { f32::from_bits(x.to_bits() & 0x8000_0000) } else { x };
        let mut out = Vec::new();
        for (i, class) in Class::ALL.into_iter().enumerate() {
            let mut rng = Rng::new(seed + i as u64);
            for _ in 0..per_class {
                let (acc, a, b) = lane(class, &mut rng);
                out.push((daz(acc), pair(daz16(a[0]), daz16(a[1])), pair(daz16(b[0]), daz16(b[1]))));
            }
        }
        out
    }

    fn check_dot<S: Bf16Simd, const L: usize>(s: S, what: &str) {
        let same = |x: f32, y: f32| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
        for chunk in sanitized_lanes(0xD0, 1 << 13).chunks_exact(L) {
            let acc: [f32; L] = std::array::from_fn(|l| chunk[l].0);
            let a: [u32; L] = std::array::from_fn(|l| chunk[l].1);
            let b: [u32; L] = std::array::from_fn(|l| chunk[l].2);
            let got = dot_pairs_of(s, &acc, &a, &b);
            for l in 0..L {
                let want = dpbf16_word(acc[l], a[l], b[l]);
                assert!(
                    same(got[l], want),
                    "{what}: {:08X} {:08X} {:08X}: {got:?} vs {want}",
                    acc[l].to_bits(),
                    a[l],
                    b[l]
                );
            }
        }
    }

    #[test]
    fn every_dot_product_is_the_models_on_every_class() {
        check_dot::<_, 16>(Portable::<16>, "portable");
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(s) = Avx512Bf16::detect() {
                check_dot::<_, 16>(s, "vdpbf16ps");
            }
            if let Some(s) = Avx512::detect() {
                check_dot::<_, 16>(s, "AVX-512F emulation");
            }
            if let Some(s) = Avx2::detect() {
                check_dot::<_, 8>(s, "AVX2 emulation");
            }
        }
    }

    fn check_rounding<S: Bf16Simd, const L: usize>(s: S, what: &str) {
        struct Round<'a, const L: usize>(&'a [f32]);
        impl<const L: usize> super::super::simd::Job for Round<'_, L> {
            type Out = Vec<u32>;
            #[inline(always)]
            fn run<S: Bf16Simd>(self, s: S) -> Vec<u32> {
                let mut words = vec![0u32; self.0.len() / 2];
                for (src, dst) in self.0.chunks_exact(2 * L).zip(words.chunks_exact_mut(L)) {
                    let (even, odd) = (s.load_slice(&src[..L]), s.load_slice(&src[L..]));
                    // SAFETY: `dst` holds L words.
                    unsafe { s.store_bf16_pairs(even, odd, dst.as_mut_ptr()) };
                }
                words
            }
        }
        let mut rng = Rng::new(77);
        let values: Vec<f32> = (0..(1 << 16))
            .map(|k| match k % 4 {
                0 => f32::from_bits(rng.next_u32()),
                1 => f32::from_bits((rng.next_u32() & 0x807F_FFFF) | (0x0080_0000 * (k as u32 % 3))),
                _ => f32::from_bits((rng.next_u32() & 0xFFFF_0000) | (0x7FFF + (k as u32 % 3))),
            })
            .collect();
        let words = s.vectorize(Round::<L>(&values));
        for (w, (src, _)) in words.iter().zip(values.chunks_exact(2 * L).flat_map(|c| c[..L].iter().zip(&c[L..]))) {
            assert_eq!(w & 0xFFFF, round_to_bf16(*src).to_bits() >> 16, "{what}: {:08X}", src.to_bits());
        }
        for (w, (_, src)) in words.iter().zip(values.chunks_exact(2 * L).flat_map(|c| c[..L].iter().zip(&c[L..]))) {
            assert_eq!(w & 0xFFFF_0000, round_to_bf16(*src).to_bits(), "{what}: {:08X}", src.to_bits());
        }
    }

    #[test]
    fn vector_rounding_is_the_instructions_on_every_kind_of_value() {
        check_rounding::<_, 16>(Portable::<16>, "portable");
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(s) = Avx512Bf16::detect() {
                check_rounding::<_, 16>(s, "avx512bf16");
            }
            if let Some(s) = Avx512::detect() {
                check_rounding::<_, 16>(s, "avx512");
            }
            if let Some(s) = Avx2::detect() {
                check_rounding::<_, 8>(s, "avx2");
            }
        }
    }
}
