//! bf16 numbers as AVX512_BF16 computes with them, in plain integer and f64 steps (the same
//! bits on every machine): the rounding of f32 to bf16 (`VCVTNEPS2BF16`, [`f32_to_bf16`]) and
//! one lane of the bf16 dot product (`VDPBF16PS`, `dpbf16_lane`, in the tests). Found by
//! experiment on AMD Zen 5 (134 M lanes of eight adversarial classes and all 2^32 conversions,
//! zero differences), and as Intel's SDM pseudo-code says:
//!
//! - [`f32_to_bf16`]: round to nearest even; a subnormal f32 gives a zero of its sign; a NaN
//!   keeps its sign and top payload bits and is quieted; overflow rounds to ±∞. (`half`'s
//!   conversion differs on the subnormals it does not flush.)
//! - `dpbf16_lane`: `acc + a₁·b₁` (the odd, high halves first), rounded, then `+ a₀·b₀`,
//!   rounded: two fused multiply-adds ([`fma_step`]), each reading subnormal inputs as zeros,
//!   rounding to nearest even with the product exact, and flushing a result that is tiny
//!   *after* rounding to a zero of its sign.
//!
//! A pair word holds two bf16: element 2i in the low half, 2i+1 in the high half (the
//! instruction's layout).

/// Magnitude bits of the smallest normal f32, 2^-126.
pub(crate) const MIN_NORMAL_BITS: u32 = 0x0080_0000;
/// The NaN an invalid operation (∞·0, ∞ − ∞) produces on x86: the negative "QNaN
/// floating-point indefinite".
pub(crate) const DEFAULT_NAN_BITS: u32 = 0xFFC0_0000;

/// The f32 whose top half is bf16 `x` (exact).
#[cfg(test)]
#[inline(always)]
pub(crate) fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// `x` rounded to bf16 as `VCVTNEPS2BF16` does: round to nearest even; a subnormal input gives
/// a zero of its sign; NaN → `(bits >> 16) | 0x0040` (sign and top payload kept, quieted);
/// magnitudes from `0x7F7F8000` round to ±∞. Branch-free, so loops of it vectorise.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    (round_bits(x.to_bits()) >> 16) as u16
}

/// The f32 value of `x` rounded to bf16 ([`f32_to_bf16`], widened back: exact).
#[inline(always)]
pub(crate) fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits(round_bits(x.to_bits()) & 0xFFFF_0000)
}

/// The bits of the rounding in the top half of a word (the low half is left over).
#[inline(always)]
fn round_bits(bits: u32) -> u32 {
    let magnitude = bits & 0x7FFF_FFFF;
    // Adding 0x7FFF plus the bit that will be the last one kept rounds to nearest even; a carry
    // out of the mantissa lands in the exponent, up to ∞.
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
    if magnitude > 0x7F80_0000 {
        bits | 0x0040_0000
    } else if magnitude < MIN_NORMAL_BITS {
        bits & 0x8000_0000
    } else {
        rounded
    }
}

/// The pair word of bf16 `even` (low half) and `odd` (high half).
#[inline(always)]
pub(crate) fn pair(even: u16, odd: u16) -> u32 {
    even as u32 | (odd as u32) << 16
}

/// The two bf16 of a pair word: `[low half, high half]` (element 2i, element 2i+1).
#[cfg(test)]
#[inline(always)]
pub(crate) fn unpair(word: u32) -> [u16; 2] {
    [word as u16, (word >> 16) as u16]
}

/// A subnormal `x` as a zero of its sign (the instructions' DAZ), anything else unchanged.
#[cfg_attr(not(any(test, target_arch = "x86_64")), allow(dead_code))]
#[inline(always)]
fn daz(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// `hi + lo` exactly, where `hi = fl(x + y)` (Knuth's two-sum; exact without overflow).
#[inline(always)]
fn two_sum(x: f64, y: f64) -> (f64, f64) {
    let hi = x + y;
    let y_virtual = hi - x;
    let x_virtual = hi - y_virtual;
    (hi, (x - x_virtual) + (y - y_virtual))
}

/// The exact value `hi + lo` (|lo| ≤ ulp(hi)/2) rounded to nearest even with a 24-bit
/// significand and unbounded exponent, as an f64 (exact).
fn round_to_24_bits(hi: f64, lo: f64) -> f64 {
    if hi == 0.0 {
        return hi;
    }
    // hi is a normal f64 here (every nonzero value involved is a multiple of 2^-298): drop 29
    // of its 52 fraction bits.
    const DROP: u32 = 52 - 23;
    let bits = hi.to_bits();
    let rest = bits & ((1 << DROP) - 1);
    let half = 1u64 << (DROP - 1);
    let truncated = bits - rest;
    let up = match rest.cmp(&half) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        // Exactly half way as far as hi tells: lo decides, or the tie goes to even.
        std::cmp::Ordering::Equal if lo == 0.0 => truncated & (1 << DROP) != 0,
        std::cmp::Ordering::Equal => (lo > 0.0) == (hi > 0.0),
    };
    f64::from_bits(if up { truncated + (1 << DROP) } else { truncated })
}

/// One of the two steps of `VDPBF16PS`: `x + a·b` with the inputs' subnormals read as zeros,
/// the product exact, one rounding to nearest even (unbounded exponent), a tiny result flushed
/// to a zero of its sign, overflow to ±∞. NaN: the first NaN of `a`, `b`, `x` (in that order)
/// quieted; otherwise an invalid operation (∞·0, ∞ − ∞) gives [`DEFAULT_NAN_BITS`]. `a` and
/// `b` are f32 so that bf16 widened by a 16-bit shift and other operands alike fit. (The
/// emulations' rarest path and the portable model use it.)
#[cfg_attr(not(any(test, target_arch = "x86_64")), allow(dead_code))]
pub(crate) fn fma_step(x: f32, a: f32, b: f32) -> f32 {
    let (x, a, b) = (daz(x), daz(a), daz(b));
    if let Some(nan) = [a, b, x].into_iter().find(|v| v.is_nan()) {
        return f32::from_bits(nan.to_bits() | 0x0040_0000);
    }
    let default_nan = f32::from_bits(DEFAULT_NAN_BITS);
    let product_negative = a.is_sign_negative() != b.is_sign_negative();
    if a.is_infinite() || b.is_infinite() {
        if a == 0.0 || b == 0.0 {
            return default_nan;
        }
        let product = if product_negative { f32::NEG_INFINITY } else { f32::INFINITY };
        return if x.is_infinite() && x != product { default_nan } else { product };
    }
    if x.is_infinite() {
        return x;
    }
    // The product of two f32 (≤ 48 significant bits, a multiple of 2^-298) is exact in f64,
    // and two-sum makes the sum exact as a pair.
    let (hi, lo) = two_sum(x as f64, a as f64 * b as f64);
    let rounded = round_to_24_bits(hi, lo);
    let magnitude = rounded.abs();
    if magnitude >= 2f64.powi(128) {
        f32::INFINITY.copysign(rounded as f32)
    } else if magnitude < 2f64.powi(-126) {
        0f32.copysign(rounded as f32)
    } else {
        rounded as f32
    }
}

/// One f32 lane of `VDPBF16PS`: `acc + a[1]·b[1] + a[0]·b[0]`, the odd pair first, each
/// addition a separately rounded [`fma_step`]. `a[i]`, `b[i]` are bf16 bits, `a[0]` the low
/// half of the 32-bit lane.
#[cfg(test)]
pub(crate) fn dpbf16_lane(acc: f32, a: [u16; 2], b: [u16; 2]) -> f32 {
    let odd = fma_step(acc, bf16_to_f32(a[1]), bf16_to_f32(b[1]));
    fma_step(odd, bf16_to_f32(a[0]), bf16_to_f32(b[0]))
}

/// [`dpbf16_lane`] on pair words.
#[cfg(test)]
#[inline(always)]
pub(crate) fn dpbf16_word(acc: f32, a: u32, b: u32) -> f32 {
    dpbf16_lane(acc, unpair(a), unpair(b))
}

#[cfg(test)]
pub(crate) mod lanes;

#[cfg(test)]
mod tests {
    use super::lanes::{fnv, lane, recorded, Class, Rng};
    use super::*;

    fn class_lanes(class: Class, seed: u64, count: u64) -> Vec<(f32, u32, u32)> {
        let mut rng = Rng::new(seed);
        (0..count)
            .map(|_| {
                let (acc, a, b) = lane(class, &mut rng);
                (acc, pair(a[0], a[1]), pair(b[0], b[1]))
            })
            .collect()
    }

    #[test]
    fn model_reproduces_every_question_recorded_from_the_instruction() {
        for &(question, acc, a, b, want) in recorded::CASES {
            let got = dpbf16_word(f32::from_bits(acc), a, b).to_bits();
            assert_eq!(got, want, "{question}: model {got:08X}, VDPBF16PS gave {want:08X}");
        }
    }

    #[test]
    fn model_reproduces_recorded_lanes_of_every_class_bit_for_bit() {
        for (&(seed, want), class) in recorded::CLASS_HASHES.iter().zip(Class::ALL) {
            let results =
                class_lanes(class, seed, recorded::HASHED_LANES).into_iter().map(|(c, a, b)| dpbf16_word(c, a, b));
            assert_eq!(
                fnv(results.map(f32::to_bits)),
                want,
                "{class:?}: the model differs from the recorded VDPBF16PS"
            );
        }
    }

    #[test]
    fn conversion_reproduces_the_recorded_instruction() {
        let stride = recorded::CONVERT_STRIDE;
        let mut halves: Vec<u16> = (0..=u32::MAX / stride).map(|k| f32_to_bf16(f32::from_bits(k * stride))).collect();
        halves.push(0);
        let words = halves.chunks_exact(2).map(|h| pair(h[0], h[1]));
        assert_eq!(fnv(words), recorded::CONVERT_HASH);
        for (bits, want) in [
            (0x0000_0001u32, 0x0000u16), // subnormal → +0
            (0x807F_FFFF, 0x8000),       // subnormal → −0 (half gives 0x8080)
            (0x0080_8000, 0x0080),       // tie → even
            (0x0081_8000, 0x0082),       // tie → even (up)
            (0x3F80_8001, 0x3F81),       // above the tie
            (0x7F7F_FFFF, 0x7F80),       // overflow → ∞
            (0x7F80_0001, 0x7FC0),       // sNaN: quieted, low payload lost
            (0x7FA0_0000, 0x7FE0),       // payload top bits kept
            (0xFFC1_2345, 0xFFC1),       // negative NaN
        ] {
            assert_eq!(f32_to_bf16(f32::from_bits(bits)), want, "{bits:08X}");
            assert_eq!(round_to_bf16(f32::from_bits(bits)).to_bits(), (want as u32) << 16, "{bits:08X}");
        }
    }

    #[test]
    fn half_differs_from_the_instruction_exactly_on_the_subnormals_it_keeps() {
        let mut differences = 0;
        let probe =
            (0..=u32::MAX / 997).map(|k| k * 997).chain(0x0000_7FF0..0x0000_8010).chain(0x807F_FFF0..=0x8080_0010);
        for bits in probe {
            let x = f32::from_bits(bits);
            let (ours, theirs) = (f32_to_bf16(x), half::bf16::from_f32(x).to_bits());
            let expected_to_differ = x.is_subnormal() && bits & 0x7FFF_FFFF > 0x8000;
            assert_eq!(ours != theirs, expected_to_differ, "{bits:08X}: ours {ours:04X}, half {theirs:04X}");
            differences += expected_to_differ as u32;
        }
        assert!(differences > 1000);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_instruction_equals_the_model_where_the_cpu_has_it() {
        use crate::kernels::bf16_simd::hardware_dpbf16;
        if hardware_dpbf16(&[0.0; 16], &[0; 16], &[0; 16]).is_none() {
            eprintln!("no AVX512_BF16 here: the recorded constants stand in for the instruction");
            return;
        }
        for (i, class) in Class::ALL.into_iter().enumerate() {
            for chunk in class_lanes(class, 0xAB00 + i as u64, 1 << 14).chunks_exact(16) {
                let acc: [f32; 16] = std::array::from_fn(|l| chunk[l].0);
                let a: [u32; 16] = std::array::from_fn(|l| chunk[l].1);
                let b: [u32; 16] = std::array::from_fn(|l| chunk[l].2);
                let hw = hardware_dpbf16(&acc, &a, &b).expect("detected above");
                for l in 0..16 {
                    let m = dpbf16_word(acc[l], a[l], b[l]);
                    assert_eq!(
                        m.to_bits(),
                        hw[l].to_bits(),
                        "{class:?}: {:08X} {:08X} {:08X}",
                        acc[l].to_bits(),
                        a[l],
                        b[l]
                    );
                }
            }
        }
    }
}
