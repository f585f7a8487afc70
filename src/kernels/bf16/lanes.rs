//! Test inputs for the bf16 model and kernels: a seeded generator, lane classes that stress each
//! question about `VDPBF16PS` (order, rounding, DAZ, FTZ, overflow, NaN), and what the
//! instruction returned on them (`recorded`), so the model is checked on machines without it.
//! From the team's research crate (`bf16proto`), where the constants were recorded on AMD Zen 5.

/// FNV-1a over 32-bit words (the tests' fingerprint of recorded hardware results).
pub(crate) fn fnv(words: impl Iterator<Item = u32>) -> u64 {
    words.fold(0xCBF2_9CE4_8422_2325u64, |h, w| (h ^ w as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

/// SplitMix64: small, seeded, good enough to spread bits.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// 32 random bits.
    pub(crate) fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() >> 32) * n) >> 32
    }
    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: i32, hi: i32) -> i32 {
        lo + self.below((hi - lo + 1) as u64) as i32
    }
    /// True with probability 1/n.
    pub(crate) fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    /// A bf16 of random sign and mantissa with unbiased exponent `e` (clamped to the normal
    /// range −126..=127).
    pub(crate) fn bf16_with_exponent(&mut self, e: i32) -> u16 {
        let field = (e.clamp(-126, 127) + 127) as u16;
        ((self.next_u32() & 1) as u16) << 15 | field << 7 | (self.next_u32() & 0x7F) as u16
    }
    /// An f32 of random sign and mantissa with unbiased exponent `e`; below −126 it is a
    /// subnormal of about that size, above 127 it saturates at exponent 127.
    pub(crate) fn f32_with_exponent(&mut self, e: i32) -> f32 {
        let sign = self.next_u32() & 0x8000_0000;
        if e < -126 {
            let shift = (-126 - e).min(23) as u32;
            let mantissa = ((self.next_u32() & 0x7F_FFFF) | 0x80_0000) >> (shift + 1);
            return f32::from_bits(sign | mantissa.max(1));
        }
        let field = (e.min(127) + 127) as u32;
        f32::from_bits(sign | field << 23 | (self.next_u32() & 0x7F_FFFF))
    }
}

/// A family of inputs for one question about `VDPBF16PS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Every bit random (NaN, ∞ and subnormal inputs at their natural rates).
    UniformBits,
    /// Exponents near 0: ordinary products and sums.
    Moderate,
    /// Cancellation between the two products, or between a product and the accumulator.
    Cancellation,
    /// Products and accumulators near the top of the f32 range (overflow, come-backs).
    NearOverflow,
    /// Products, accumulators and inputs in or near the subnormal range.
    Subnormal,
    /// ±0, ±∞, NaNs with payloads, extremes, mixed with ordinary values.
    Specials,
    /// Huge and tiny products and accumulators mixed.
    HugeSmall,
    /// Results within a few units of ±2^-126 (flush-to-zero's edge).
    FlushBoundary,
}

impl Class {
    /// Every class.
    pub(crate) const ALL: [Class; 8] = [
        Class::UniformBits,
        Class::Moderate,
        Class::Cancellation,
        Class::NearOverflow,
        Class::Subnormal,
        Class::Specials,
        Class::HugeSmall,
        Class::FlushBoundary,
    ];
}

/// The exponent ⌊log2 |x|⌋ of a normal bf16.
fn exponent_of(x: u16) -> i32 {
    ((x >> 7) & 0xFF) as i32 - 127
}

/// `x` with its mantissa moved by `delta` units (wrapping within the mantissa).
fn nudge(x: u16, delta: i32) -> u16 {
    let mantissa = ((x & 0x7F) as i32 + delta).rem_euclid(128) as u16;
    (x & !0x7F) | mantissa
}

const SPECIAL_BF16: [u16; 18] = [
    0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0x7FA5, 0xFF85, 0x7F7F, 0xFF7F, 0x0080, 0x8080, 0x0001,
    0x807F, 0x0040, 0x3F80, 0xBF80,
];

const SPECIAL_F32: [u32; 18] = [
    0x0000_0000,
    0x8000_0000,
    0x7F80_0000,
    0xFF80_0000,
    0x7FC0_0000,
    0xFFC0_0000,
    0x7F80_0001,
    0x7FA1_2345,
    0xFFC5_4321,
    0x7F7F_FFFF,
    0xFF7F_FFFF,
    0x0080_0000,
    0x8080_0000,
    0x0000_0001,
    0x807F_FFFF,
    0x0040_0000,
    0x3F80_0000,
    0xBF80_0000,
];

/// One lane `(acc, a, b)` of `class` (`a[0]`, `b[0]` the even, low halves).
pub(crate) fn lane(class: Class, rng: &mut Rng) -> (f32, [u16; 2], [u16; 2]) {
    match class {
        Class::UniformBits => {
            let (a, b) = (rng.next_u32(), rng.next_u32());
            (f32::from_bits(rng.next_u32()), super::unpair(a), super::unpair(b))
        }
        Class::Moderate => {
            let mut x = || rng.range(-8, 8);
            let e: [i32; 4] = [x(), x(), x(), x()];
            let a = [rng.bf16_with_exponent(e[0]), rng.bf16_with_exponent(e[1])];
            let b = [rng.bf16_with_exponent(e[2]), rng.bf16_with_exponent(e[3])];
            let ea = rng.range(-20, 20);
            (rng.f32_with_exponent(ea), a, b)
        }
        Class::Cancellation => cancellation(rng),
        Class::NearOverflow => {
            let product = |rng: &mut Rng| {
                let sum = rng.range(118, 130);
                let ea = rng.range(sum - 127, 127);
                [rng.bf16_with_exponent(ea), rng.bf16_with_exponent(sum - ea)]
            };
            let (p0, p1) = (product(rng), product(rng));
            let acc = match rng.below(4) {
                0 => f32::from_bits(SPECIAL_F32[9 + rng.below(2) as usize]),
                _ => {
                    let e = rng.range(110, 127);
                    rng.f32_with_exponent(e)
                }
            };
            (acc, [p0[0], p1[0]], [p0[1], p1[1]])
        }
        Class::Subnormal => {
            let input = |rng: &mut Rng, e: i32| {
                if rng.one_in(8) {
                    // A subnormal bf16.
                    (rng.next_u32() as u16 & 0x807F).max(1)
                } else {
                    rng.bf16_with_exponent(e)
                }
            };
            let product = |rng: &mut Rng| {
                let sum = rng.range(-165, -100);
                let ea = rng.range((sum - 127).max(-126), (sum + 126).min(127));
                [input(rng, ea), input(rng, sum - ea)]
            };
            let (p0, p1) = (product(rng), product(rng));
            let e = rng.range(-155, -100);
            (rng.f32_with_exponent(e), [p0[0], p1[0]], [p0[1], p1[1]])
        }
        Class::Specials => {
            let bf = |rng: &mut Rng| {
                if rng.one_in(2) {
                    SPECIAL_BF16[rng.below(SPECIAL_BF16.len() as u64) as usize]
                } else {
                    let e = rng.range(-10, 10);
                    rng.bf16_with_exponent(e)
                }
            };
            let a = [bf(rng), bf(rng)];
            let b = [bf(rng), bf(rng)];
            let acc = if rng.one_in(2) {
                f32::from_bits(SPECIAL_F32[rng.below(SPECIAL_F32.len() as u64) as usize])
            } else {
                let e = rng.range(-10, 10);
                rng.f32_with_exponent(e)
            };
            (acc, a, b)
        }
        Class::HugeSmall => {
            let exponent = |rng: &mut Rng| match rng.below(3) {
                0 => rng.range(40, 127),
                1 => rng.range(-126, -40),
                _ => rng.range(-5, 5),
            };
            let e: [i32; 5] = std::array::from_fn(|_| exponent(rng));
            let a = [rng.bf16_with_exponent(e[0]), rng.bf16_with_exponent(e[1])];
            let b = [rng.bf16_with_exponent(e[2]), rng.bf16_with_exponent(e[3])];
            (rng.f32_with_exponent(e[4]), a, b)
        }
        Class::FlushBoundary => flush_boundary(rng),
    }
}

/// Products that cancel each other or the accumulator.
fn cancellation(rng: &mut Rng) -> (f32, [u16; 2], [u16; 2]) {
    let e = rng.range(-30, 30);
    let a0 = rng.bf16_with_exponent(e);
    let e = rng.range(-30, 30);
    let b0 = rng.bf16_with_exponent(e);
    let p0 = super::bf16_to_f32(a0) as f64 * super::bf16_to_f32(b0) as f64;
    let p_exponent = exponent_of(a0) + exponent_of(b0);
    // A second product equal to −p0 up to a few units.
    let (a1, b1) = {
        let delta_a = rng.range(-3, 3);
        let delta_b = rng.range(-3, 3);
        (nudge(a0 ^ 0x8000, delta_a), nudge(b0, delta_b))
    };
    let small = |rng: &mut Rng| {
        let e = p_exponent - rng.range(0, 45);
        rng.f32_with_exponent(e)
    };
    match rng.below(3) {
        // p1 ≈ −p0, accumulator smaller.
        0 => (small(rng), [a0, a1], [b0, b1]),
        // accumulator ≈ −p0 up to a few f32 units, the odd product small.
        1 => {
            let acc = f32::from_bits(((-p0) as f32).to_bits().wrapping_add(rng.range(-4, 4) as u32));
            let e = p_exponent - rng.range(0, 40);
            let ea = rng.range((e - 126).max(-126), (e + 126).min(127));
            let (x, y) = (rng.bf16_with_exponent(ea), rng.bf16_with_exponent(e - ea));
            (acc, [a0, x], [b0, y])
        }
        // accumulator ≈ −p0, and p1 ≈ −p0 too.
        _ => {
            let acc = f32::from_bits(((-p0) as f32).to_bits().wrapping_add(rng.range(-4, 4) as u32));
            (acc, [a0, a1 ^ 0x8000], [b0, b1])
        }
    }
}

/// Results near ±2^-126: a boundary accumulator with tiny products, or products summing there.
fn flush_boundary(rng: &mut Rng) -> (f32, [u16; 2], [u16; 2]) {
    let tiny_product = |rng: &mut Rng, lo: i32, hi: i32| {
        let sum = rng.range(lo, hi);
        let ea = rng.range((sum - 127).max(-126), (sum + 126).min(127));
        [rng.bf16_with_exponent(ea), rng.bf16_with_exponent(sum - ea)]
    };
    match rng.below(3) {
        0 => {
            // acc a few units around ±2^-126, two tiny products.
            let bits = (0x0080_0000u32 as i32 + rng.range(-3, 3)) as u32 | (rng.next_u32() & 0x8000_0000);
            let (p0, p1) = (tiny_product(rng, -160, -140), tiny_product(rng, -160, -140));
            (f32::from_bits(bits), [p0[0], p1[0]], [p0[1], p1[1]])
        }
        1 => {
            // Products near 2^-126 from a zero or tiny accumulator.
            let (p0, p1) = (tiny_product(rng, -128, -125), tiny_product(rng, -150, -126));
            let acc = if rng.one_in(2) { 0.0 } else { rng.f32_with_exponent(-127) };
            (acc, [p0[0], p1[0]], [p0[1], p1[1]])
        }
        _ => {
            // A product of about −2^-126 against an accumulator just above it.
            let p1 = tiny_product(rng, -127, -126);
            let p0 = tiny_product(rng, -170, -145);
            let x = super::bf16_to_f32(p1[0]) as f64 * super::bf16_to_f32(p1[1]) as f64;
            let acc = f32::from_bits(((-x) as f32).to_bits().wrapping_add(rng.range(-2, 2) as u32));
            (acc, [p0[0], p1[0]], [p0[1], p1[1]])
        }
    }
}

/// What VDPBF16PS and VCVTNE2PS2BF16 returned on AMD Zen 5 (recorded by the research crate's
/// `golden` binary; do not edit).
#[rustfmt::skip]
pub(crate) mod recorded {
    /// (question, acc bits, a word, b word, result bits).
    pub(crate) const CASES: &[(&str, u32, u32, u32, u32)] = &[
        ("odd first: acc=1, odd=+2^24, even=-2^24", 0x3F800000, 0x4B80CB80, 0x3F803F80, 0x00000000),
        ("odd first: acc=1, odd=-2^24, even=+2^24", 0x3F800000, 0xCB804B80, 0x3F803F80, 0x3F800000),
        ("two roundings: 2^24 + 1 + 1", 0x4B800000, 0x3F803F80, 0x3F803F80, 0x4B800000),
        ("DAZ bf16 input", 0x00000000, 0x00000040, 0x00007180, 0x00000000),
        ("DAZ accumulator", 0x00400000, 0x00003F80, 0x00000000, 0x00000000),
        ("DAZ keeps sign: -0 + (-sub)·1 + (-0)·1", 0x80000000, 0x80008040, 0x3F803F80, 0x80000000),
        ("FTZ result -2^-127 -> -0", 0x00000000, 0x0000A000, 0x00001F80, 0x80000000),
        ("FTZ intermediate: 2^-130 then +2^-110", 0x00000000, 0x1F002400, 0x1F002400, 0x08800000),
        ("tininess after rounding: 2^-126 - 2^-152 -> 2^-126", 0x00800000, 0x00009980, 0x00001980, 0x00800000),
        ("tie: 2^-126 - 2^-151 -> 2^-126", 0x00800000, 0x00009A00, 0x00001980, 0x00800000),
        ("2^-126 - 2^-150 exactly -> 0", 0x00800000, 0x00009A00, 0x00001A00, 0x00000000),
        ("2^-126 - 3·2^-152 -> 0", 0x00800000, 0x00009A40, 0x00001980, 0x00000000),
        ("product in subnormal range, result normal", 0x01000000, 0x00009C80, 0x00001C80, 0x00FFFE00),
        ("product overflows f32, FMA comes back", 0xFF000000, 0x00007F40, 0x00003FC0, 0x7F200000),
        ("1 + 2^-200 - 1", 0x3F800000, 0x0D80BF80, 0x0D803F80, 0x00000000),
        ("overflow to inf", 0x7F7FFFFF, 0x00007F00, 0x00003380, 0x7F800000),
        ("-0 + (+0) -> +0", 0x80000000, 0x00000000, 0x3F803F80, 0x00000000),
        ("-0 + (-0) + (-0) -> -0", 0x80000000, 0x80008000, 0x3F803F80, 0x80000000),
        ("inf·0 -> default NaN", 0x00000000, 0x00007F80, 0x00000000, 0xFFC00000),
        ("inf - inf -> default NaN", 0x00000000, 0x7F807F80, 0xBF803F80, 0xFFC00000),
        ("subnormal·inf -> default NaN (DAZ first)", 0x00000000, 0x00000040, 0x00007F80, 0xFFC00000),
        ("sNaN acc quieted, payload kept", 0x7F800001, 0x3F803F80, 0x3F803F80, 0x7FC00001),
        ("NaN a0 beats NaN a1", 0x3F800000, 0x7F827F81, 0x3F803F80, 0x7FC10000),
        ("NaN a beats NaN b", 0x3F800000, 0x3F807F81, 0x3F807F83, 0x7FC10000),
        ("NaN b0 beats NaN a1", 0x3F800000, 0x7F823F80, 0x3F807F83, 0x7FC30000),
        ("NaN a1 beats NaN acc", 0x7FC12345, 0x7F823F80, 0x3F803F80, 0x7FC20000),
        ("NaN acc beats inf·0", 0x7FC12345, 0x7F800000, 0x00000000, 0x7FC12345),
        ("NaN a0 beats default NaN of odd pair", 0x3F800000, 0x7F807F81, 0x00003F80, 0x7FC10000),
        ("negative NaN keeps sign", 0x3F800000, 0x3F80FF81, 0x3F803F80, 0xFFC10000),
    ];

    /// Lanes per class hashed in [`CLASS_HASHES`].
    pub(crate) const HASHED_LANES: u64 = 65536;
    /// Per class of `Class::ALL`: the generator seed and the FNV-1a hash of the result bits
    /// of `HASHED_LANES` lanes of `lane`.
    pub(crate) const CLASS_HASHES: &[(u64, u64)] = &[
        (0xC1A55000, 0x26D12075EB227D98), // UniformBits
        (0xC1A55001, 0xA9504BF0ED372D1E), // Moderate
        (0xC1A55002, 0x97297EF55BC34ADA), // Cancellation
        (0xC1A55003, 0x17B41E1E1BFC9D22), // NearOverflow
        (0xC1A55004, 0x043B43C201DC0A17), // Subnormal
        (0xC1A55005, 0xCBB532110BCB80DD), // Specials
        (0xC1A55006, 0x506204044B8A08EB), // HugeSmall
        (0xC1A55007, 0x0EF2E32FD710A020), // FlushBoundary
    ];

    /// Every f32 bit pattern `CONVERT_STRIDE·k` (k = 0, 1, ..., then one 0.0 to make the count
    /// even) rounded by VCVTNE2PS2BF16: the FNV-1a hash of the pair words.
    pub(crate) const CONVERT_STRIDE: u32 = 4099;
    /// See [`CONVERT_STRIDE`].
    pub(crate) const CONVERT_HASH: u64 = 0x5EB4CB49332E9807;
}
