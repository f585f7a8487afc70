//! The instruction-set layer: the few vector operations the packed kernels are written in
//! (`Simd`, and `Bf16Simd` for bf16 pairs, implemented in `bf16_simd`), implemented for AVX-512 with
//! AVX512_BF16, for AVX-512, for AVX2+FMA, and portably over arrays of the same widths, plus
//! the run-time choice of one of them ([`Isa`], [`isa`]). Functions built from these
//! operations (the vector `exp`) live with their algorithms, above this layer.
//!
//! The kernels (`microkernel`, `flash`, `packed_gemm`) are written once, generic over
//! `Simd` (and `Bf16Simd`). A value of an x86 implementation is a token proving the CPU has
//! the instructions (it can only be obtained from detection), so the arithmetic methods are
//! safe; a kernel is entered through `Simd::vectorize`, which runs a `Job` inside a function
//! compiled with the instruction set enabled, everything below it inlined.
//!
//! `Portable` rounds every lane exactly as the hardware does (IEEE add, multiply and fused
//! multiply-add; exact integer steps), so a kernel instantiated with `Portable<16>` computes
//! bit for bit what its AVX-512 instantiation computes with the same tile geometry: tests run
//! the AVX-512 layout on any CPU and compare the real thing with it where both run.

use std::sync::OnceLock;

/// The vector operations of the packed kernels, on vectors of [`Simd::LANES`] f32.
///
/// Every method is `#[inline(always)]` in the implementations, so a kernel inlined into
/// [`Simd::vectorize`] is compiled for the instruction set as a whole.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    /// Floats per vector.
    const LANES: usize;
    /// A vector of [`Simd::LANES`] floats.
    type V: Copy;

    /// Runs `job` in a function compiled for this instruction set.
    fn vectorize<J: Job>(self, job: J) -> J::Out;

    /// All lanes 0.
    fn zero(self) -> Self::V;
    /// All lanes `x`.
    fn splat(self, x: f32) -> Self::V;
    /// Loads [`Simd::LANES`] floats.
    ///
    /// # Safety
    /// `ptr` must be readable for [`Simd::LANES`] floats (no alignment needed).
    unsafe fn load(self, ptr: *const f32) -> Self::V;
    /// Stores [`Simd::LANES`] floats.
    ///
    /// # Safety
    /// `ptr` must be writable for [`Simd::LANES`] floats (no alignment needed).
    unsafe fn store(self, ptr: *mut f32, v: Self::V);
    /// `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a · b`.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a · b + c`, rounded once.
    fn fmadd(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Per lane `if a > b { a } else { b }` (so `max(lo, NaN)` is NaN).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Per lane `if a < b { a } else { b }`.
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    /// Per lane `if x < bound { 0 } else { y }`.
    fn zero_below(self, x: Self::V, bound: Self::V, y: Self::V) -> Self::V;
    /// Per lane `2^n` where the integer n sits in the low mantissa bits of `t = n + ROUNDER`
    /// ([`ROUNDER`] = 1.5·2^23), for −126 ≤ n ≤ 127.
    fn pow2_rounded(self, t: Self::V) -> Self::V;

    /// `dst[j][i] = src[i][j]` for a [`Simd::LANES`] × [`Simd::LANES`] block, rows `src_ld`
    /// and `dst_ld` floats apart (any 32-bit data). The default moves element by element;
    /// the x86 paths shuffle registers.
    ///
    /// # Safety
    /// The [`Simd::LANES`] rows of [`Simd::LANES`] floats at `src` readable, at `dst` writable.
    #[inline(always)]
    unsafe fn transpose(self, src: *const f32, src_ld: usize, dst: *mut f32, dst_ld: usize) {
        for i in 0..Self::LANES {
            for j in 0..Self::LANES {
                // SAFETY: the caller's guarantees.
                unsafe { *dst.add(j * dst_ld + i) = *src.add(i * src_ld + j) };
            }
        }
    }

    /// Loads `ptr[..LANES]`, reading only slice elements (a safe [`Simd::load`]).
    ///
    /// # Panics
    /// If `src` is shorter than [`Simd::LANES`].
    #[inline(always)]
    fn load_slice(self, src: &[f32]) -> Self::V {
        assert!(src.len() >= Self::LANES);
        // SAFETY: checked above.
        unsafe { self.load(src.as_ptr()) }
    }

    /// Stores into `dst[..LANES]` (a safe [`Simd::store`]).
    ///
    /// # Panics
    /// If `dst` is shorter than [`Simd::LANES`].
    #[inline(always)]
    fn store_slice(self, dst: &mut [f32], v: Self::V) {
        assert!(dst.len() >= Self::LANES);
        // SAFETY: checked above.
        unsafe { self.store(dst.as_mut_ptr(), v) }
    }
}

/// 1.5·2^23: adding it to a float of magnitude below 2^22 rounds that float to an integer n and
/// leaves n in the low mantissa bits (the input [`Simd::pow2_rounded`] takes).
pub(crate) const ROUNDER: f32 = 12_582_912.0;

/// A computation to run under [`Simd::vectorize`]. Implementations mark `run`
/// `#[inline(always)]`, so it is compiled for the instruction set of the caller. Every
/// instruction set has the bf16 pair operations too (real or emulated), so a job may use them.
pub(crate) trait Job {
    /// What the job returns.
    type Out;
    /// Runs the job with the vector operations of `simd`.
    fn run<S: Bf16Simd>(self, simd: S) -> Self::Out;
}

/// An instruction set's bf16 pair operations (every [`Simd`] has them: real or emulated).
pub(crate) trait Bf16Simd: Simd {
    /// Whether [`Bf16Simd::dot_pairs_unchecked`] can differ from [`Bf16Simd::dot_pairs`] (on
    /// the emulations, for operands whose products reach below 2^-112).
    const EMULATED: bool;
    /// [`Simd::LANES`] pair words in the form [`Bf16Simd::dot_pairs`] takes (the raw words for
    /// the instruction, the two widened f32 halves for an emulation).
    type Pairs: Copy;

    /// Loads [`Simd::LANES`] pair words.
    ///
    /// # Safety
    /// `ptr` must be readable for [`Simd::LANES`] u32 (no alignment needed).
    unsafe fn load_pairs(self, ptr: *const u32) -> Self::Pairs;
    /// All lanes the pair word `*ptr`.
    ///
    /// # Safety
    /// `ptr` must be readable for one u32.
    unsafe fn splat_pair(self, ptr: *const u32) -> Self::Pairs;
    /// Per lane `acc + a.odd·b.odd + a.even·b.even` exactly as `VDPBF16PS` computes it
    /// (the tests' model `bf16::dpbf16_lane`), under the preconditions of `bf16_simd`.
    fn dot_pairs(self, acc: Self::V, a: Self::Pairs, b: Self::Pairs) -> Self::V;
    /// [`Bf16Simd::dot_pairs`] without the emulations' checks for tiny results: the same bits
    /// whenever no intermediate result is in `(0, 2^-126]`, which holds in a chain from zero
    /// when every nonzero product is at least 2^-112 (see
    /// [`normal_range_certified`](super::microkernel::normal_range_certified)).
    #[inline(always)]
    fn dot_pairs_unchecked(self, acc: Self::V, a: Self::Pairs, b: Self::Pairs) -> Self::V {
        self.dot_pairs(acc, a, b)
    }
    /// Rounds the lanes of `even` and `odd` to bf16
    /// ([`f32_to_bf16`](super::bf16::f32_to_bf16)) and stores [`Simd::LANES`] pair words: lane
    /// l of `even` in the low half of word l, of `odd` in the high half (`VCVTNE2PS2BF16` and a
    /// word interleave on the instruction set that has it, integer rounding elsewhere: the same
    /// bits).
    ///
    /// # Safety
    /// `dst` must be writable for [`Simd::LANES`] u32.
    unsafe fn store_bf16_pairs(self, even: Self::V, odd: Self::V, dst: *mut u32);
}

/// Portable vectors of `L` lanes: plain arrays, each lane rounded as the hardware rounds it.
/// Tests run the packed kernels' AVX-512 and AVX2 geometries on it, on any CPU.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Portable<const L: usize>;

#[cfg(test)]
impl<const L: usize> Portable<L> {
    #[inline(always)]
    fn lanes(a: [f32; L], b: [f32; L], f: impl Fn(f32, f32) -> f32) -> [f32; L] {
        std::array::from_fn(|l| f(a[l], b[l]))
    }
}

#[cfg(test)]
impl<const L: usize> Simd for Portable<L> {
    const LANES: usize = L;
    type V = [f32; L];

    #[inline(always)]
    fn vectorize<J: Job>(self, job: J) -> J::Out {
        job.run(self)
    }
    #[inline(always)]
    fn zero(self) -> [f32; L] {
        [0.0; L]
    }
    #[inline(always)]
    fn splat(self, x: f32) -> [f32; L] {
        [x; L]
    }
    #[inline(always)]
    unsafe fn load(self, ptr: *const f32) -> [f32; L] {
        // SAFETY: the caller guarantees L readable floats.
        unsafe { std::ptr::read_unaligned(ptr as *const [f32; L]) }
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32, v: [f32; L]) {
        // SAFETY: the caller guarantees L writable floats.
        unsafe { std::ptr::write_unaligned(ptr as *mut [f32; L], v) }
    }
    #[inline(always)]
    fn add(self, a: [f32; L], b: [f32; L]) -> [f32; L] {
        Self::lanes(a, b, |a, b| a + b)
    }
    #[inline(always)]
    fn mul(self, a: [f32; L], b: [f32; L]) -> [f32; L] {
        Self::lanes(a, b, |a, b| a * b)
    }
    #[inline(always)]
    fn fmadd(self, a: [f32; L], b: [f32; L], c: [f32; L]) -> [f32; L] {
        std::array::from_fn(|l| a[l].mul_add(b[l], c[l]))
    }
    #[inline(always)]
    fn max(self, a: [f32; L], b: [f32; L]) -> [f32; L] {
        Self::lanes(a, b, |a, b| if a > b { a } else { b })
    }
    #[inline(always)]
    fn min(self, a: [f32; L], b: [f32; L]) -> [f32; L] {
        Self::lanes(a, b, |a, b| if a < b { a } else { b })
    }
    #[inline(always)]
    fn zero_below(self, x: [f32; L], bound: [f32; L], y: [f32; L]) -> [f32; L] {
        std::array::from_fn(|l| if x[l] < bound[l] { 0.0 } else { y[l] })
    }
    #[inline(always)]
    fn pow2_rounded(self, t: [f32; L]) -> [f32; L] {
        let rounder = ROUNDER.to_bits();
        t.map(|t| f32::from_bits(t.to_bits().wrapping_sub(rounder).wrapping_add(127) << 23))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{transpose16, Amx, Avx2, Avx512, Avx512Bf16};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Job, Simd};

    /// AVX-512F (with AVX2 and FMA): 16 lanes. A value proves the CPU has them.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512 {
        _detected: (),
    }

    impl Avx512 {
        /// The token, when the CPU has AVX-512F, AVX2 and FMA.
        pub(crate) fn detect() -> Option<Self> {
            (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
                .then_some(Avx512 { _detected: () })
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn run_avx512<J: Job>(simd: Avx512, job: J) -> J::Out {
        job.run(simd)
    }

    /// AVX-512F with AVX512_BF16 (and AVX512BW, which every CPU with it has): 16 lanes, its
    /// f32 operations AVX-512F's, its bf16 dot product the real `VDPBF16PS`. A value proves
    /// the CPU has them.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512Bf16 {
        base: Avx512,
    }

    impl Avx512Bf16 {
        /// The token, when the CPU has AVX-512F, AVX512_BF16, AVX512BW, AVX2 and FMA.
        pub(crate) fn detect() -> Option<Self> {
            let base = Avx512::detect()?;
            (is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw"))
                .then_some(Avx512Bf16 { base })
        }

        /// The AVX-512F token this one includes (the f32 kernels run on it).
        pub(crate) fn base(self) -> Avx512 {
            self.base
        }
    }

    /// A token proving this process may run AMX-BF16 (and AVX512_BF16, which every CPU with
    /// AMX has, for the conversions around the tiles). The tile kernels are `kernels::amx`'s.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Amx {
        simd: Avx512Bf16,
    }

    impl Amx {
        /// The token, when the CPU has AMX-TILE and AMX-BF16 and the system lets this process
        /// use the tile registers (asked once).
        pub(crate) fn detect() -> Option<Amx> {
            let simd = Avx512Bf16::detect()?;
            amx_permitted().then_some(Amx { simd })
        }

        /// The AVX-512 token the code around the tiles runs on.
        pub(crate) fn simd(self) -> Avx512Bf16 {
            self.simd
        }
    }

    /// Whether the CPU reports AMX-TILE and AMX-BF16 and Linux granted this process the tile
    /// data state (once per process).
    fn amx_permitted() -> bool {
        static PERMITTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *PERMITTED.get_or_init(|| cpu_has_amx_bf16() && request_tile_data())
    }

    fn cpu_has_amx_bf16() -> bool {
        // CPUID leaf 7, sub-leaf 0: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        // SAFETY: CPUID is available on every x86-64 CPU; leaf 7 exists where the maximum leaf
        // (leaf 0's EAX) reaches it. (Safe functions from Rust 1.94 on, unsafe before.)
        #[allow(unused_unsafe)]
        let max_leaf = unsafe { __cpuid(0) }.eax;
        if max_leaf < 7 {
            return false;
        }
        // SAFETY: as above.
        #[allow(unused_unsafe)]
        let edx = unsafe { __cpuid_count(7, 0) }.edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }

    /// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`).
    #[cfg(target_os = "linux")]
    fn request_tile_data() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with this request only changes which register states the process
        // may use; it fails (non-zero) where the kernel or CPU lacks them.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tile_data() -> bool {
        false
    }

    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx2,fma")]
    fn run_avx512bf16<J: Job>(simd: Avx512Bf16, job: J) -> J::Out {
        job.run(simd)
    }

    impl Simd for Avx512Bf16 {
        const LANES: usize = 16;
        type V = __m512;

        #[inline(always)]
        fn vectorize<J: Job>(self, job: J) -> J::Out {
            // SAFETY: the token exists only where the CPU has the features.
            unsafe { run_avx512bf16(self, job) }
        }
        #[inline(always)]
        fn zero(self) -> __m512 {
            self.base.zero()
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            self.base.splat(x)
        }
        #[inline(always)]
        unsafe fn load(self, ptr: *const f32) -> __m512 {
            // SAFETY: the caller's guarantee, passed on.
            unsafe { self.base.load(ptr) }
        }
        #[inline(always)]
        unsafe fn store(self, ptr: *mut f32, v: __m512) {
            // SAFETY: the caller's guarantee, passed on.
            unsafe { self.base.store(ptr, v) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            self.base.add(a, b)
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            self.base.mul(a, b)
        }
        #[inline(always)]
        fn fmadd(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            self.base.fmadd(a, b, c)
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            self.base.max(a, b)
        }
        #[inline(always)]
        fn min(self, a: __m512, b: __m512) -> __m512 {
            self.base.min(a, b)
        }
        #[inline(always)]
        fn zero_below(self, x: __m512, bound: __m512, y: __m512) -> __m512 {
            self.base.zero_below(x, bound, y)
        }
        #[inline(always)]
        fn pow2_rounded(self, t: __m512) -> __m512 {
            self.base.pow2_rounded(t)
        }
        #[inline(always)]
        unsafe fn transpose(self, src: *const f32, src_ld: usize, dst: *mut f32, dst_ld: usize) {
            // SAFETY: the caller's guarantees.
            unsafe { self.base.transpose(src, src_ld, dst, dst_ld) }
        }
    }

    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;

        #[inline(always)]
        fn vectorize<J: Job>(self, job: J) -> J::Out {
            // SAFETY: the token exists only where the CPU has the features.
            unsafe { run_avx512(self, job) }
        }
        #[inline(always)]
        fn zero(self) -> __m512 {
            // SAFETY (this and every method below): the token proves AVX-512F.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(self, ptr: *const f32) -> __m512 {
            // SAFETY: the caller guarantees 16 readable floats.
            unsafe { _mm512_loadu_ps(ptr) }
        }
        #[inline(always)]
        unsafe fn store(self, ptr: *mut f32, v: __m512) {
            // SAFETY: the caller guarantees 16 writable floats.
            unsafe { _mm512_storeu_ps(ptr, v) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fmadd(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            // maxps returns its second operand unless a > b: exactly `if a > b { a } else { b }`.
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        fn zero_below(self, x: __m512, bound: __m512, y: __m512) -> __m512 {
            unsafe {
                let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, bound);
                _mm512_mask_blend_ps(below, y, _mm512_setzero_ps())
            }
        }
        #[inline(always)]
        fn pow2_rounded(self, t: __m512) -> __m512 {
            unsafe {
                let n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(super::ROUNDER.to_bits() as i32));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127))))
            }
        }
        #[inline(always)]
        unsafe fn transpose(self, src: *const f32, src_ld: usize, dst: *mut f32, dst_ld: usize) {
            // SAFETY: the token proves AVX-512F; the caller guarantees the blocks.
            unsafe { transpose16(src, src_ld, dst, dst_ld, None) }
        }
    }

    /// `dst[j][i] = src[i][j] · scale[j]` (no scaling without `scale`) for a 16 × 16 block,
    /// rows `src_ld` and `dst_ld` floats apart (any 32-bit data when unscaled): pairs of rows
    /// interleaved, then pairs of pairs, then 128-bit lanes twice.
    ///
    /// # Safety
    /// AVX-512F; the 16 rows of 16 floats at `src` readable, at `dst` writable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn transpose16(
        src: *const f32,
        src_ld: usize,
        dst: *mut f32,
        dst_ld: usize,
        scale: Option<&[f32; 16]>,
    ) {
        // SAFETY: the caller's guarantees.
        unsafe {
            let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * src_ld)));
            let t: [__m512; 16] = std::array::from_fn(|i| match i % 2 {
                0 => _mm512_unpacklo_ps(r[i], r[i + 1]),
                _ => _mm512_unpackhi_ps(r[i - 1], r[i]),
            });
            let pd = |x: __m512| _mm512_castps_pd(x);
            let u: [__m512; 16] = std::array::from_fn(|i| {
                let (base, k) = (i / 4 * 4, i % 4);
                let (a, b) = (t[base + k / 2], t[base + 2 + k / 2]);
                match k % 2 {
                    0 => _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(b))),
                    _ => _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(b))),
                }
            });
            let v: [__m512; 16] = std::array::from_fn(|i| {
                let (base, k) = (i / 8 * 8, i % 8);
                let (a, b) = (u[base + k % 4], u[base + 4 + k % 4]);
                match k / 4 {
                    0 => _mm512_shuffle_f32x4::<0x88>(a, b),
                    _ => _mm512_shuffle_f32x4::<0xdd>(a, b),
                }
            });
            for j in 0..16 {
                let (a, b) = (v[j % 8], v[8 + j % 8]);
                let mut x = match j / 8 {
                    0 => _mm512_shuffle_f32x4::<0x88>(a, b),
                    _ => _mm512_shuffle_f32x4::<0xdd>(a, b),
                };
                if let Some(scale) = scale {
                    x = _mm512_mul_ps(x, _mm512_set1_ps(scale[j]));
                }
                _mm512_storeu_ps(dst.add(j * dst_ld), x);
            }
        }
    }

    /// AVX2 with FMA: 8 lanes. A value proves the CPU has them.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2 {
        _detected: (),
    }

    impl Avx2 {
        /// The token, when the CPU has AVX2 and FMA.
        pub(crate) fn detect() -> Option<Self> {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(Avx2 { _detected: () })
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn run_avx2<J: Job>(simd: Avx2, job: J) -> J::Out {
        job.run(simd)
    }

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;

        #[inline(always)]
        fn vectorize<J: Job>(self, job: J) -> J::Out {
            // SAFETY: the token exists only where the CPU has the features.
            unsafe { run_avx2(self, job) }
        }
        #[inline(always)]
        fn zero(self) -> __m256 {
            // SAFETY (this and every method below): the token proves AVX2 and FMA.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(self, ptr: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 readable floats.
            unsafe { _mm256_loadu_ps(ptr) }
        }
        #[inline(always)]
        unsafe fn store(self, ptr: *mut f32, v: __m256) {
            // SAFETY: the caller guarantees 8 writable floats.
            unsafe { _mm256_storeu_ps(ptr, v) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fmadd(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn zero_below(self, x: __m256, bound: __m256, y: __m256) -> __m256 {
            unsafe { _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LT_OQ>(x, bound)) }
        }
        #[inline(always)]
        fn pow2_rounded(self, t: __m256) -> __m256 {
            unsafe {
                let n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(super::ROUNDER.to_bits() as i32));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127))))
            }
        }
        #[inline(always)]
        unsafe fn transpose(self, src: *const f32, src_ld: usize, dst: *mut f32, dst_ld: usize) {
            // SAFETY: the token proves AVX2; the caller guarantees the blocks. Pairs of rows
            // interleaved, then pairs of pairs, then the 128-bit halves.
            unsafe {
                let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_ld)));
                let t: [__m256; 8] = std::array::from_fn(|i| match i % 2 {
                    0 => _mm256_unpacklo_ps(r[i], r[i + 1]),
                    _ => _mm256_unpackhi_ps(r[i - 1], r[i]),
                });
                // u[4h + q]: rows 4h..4h+4, columns q, q + 4 of each half.
                let u: [__m256; 8] = std::array::from_fn(|i| {
                    let (base, k) = (i / 4 * 4, i % 4);
                    let (a, b) = (t[base + k / 2], t[base + 2 + k / 2]);
                    match k % 2 {
                        0 => _mm256_shuffle_ps::<0x44>(a, b),
                        _ => _mm256_shuffle_ps::<0xee>(a, b),
                    }
                });
                for j in 0..8 {
                    let (a, b) = (u[j % 4], u[4 + j % 4]);
                    let x = match j / 4 {
                        0 => _mm256_permute2f128_ps::<0x20>(a, b),
                        _ => _mm256_permute2f128_ps::<0x31>(a, b),
                    };
                    _mm256_storeu_ps(dst.add(j * dst_ld), x);
                }
            }
        }
    }
}

/// The instruction set the kernels run on, chosen once per process. `#[non_exhaustive]`: paths
/// may be added (other architectures).
///
/// Each path runs both precisions ([`Precision`](crate::Precision)): the f32 kernels and the
/// bf16 ones. On every x86 path the bf16 products give the same bits (the instruction, or its
/// exact emulation); only [`Isa::Avx512Bf16`] makes them faster than f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Isa {
    /// [`Isa::Avx512Bf16`] with Intel AMX-BF16 (Sapphire Rapids and later Xeons), on Linux: the
    /// same kernels, except that the bf16 products of the GEMMs and of the fused attention run
    /// on AMX tiles (`TDPBF16PS`: a 16 × 32 by 32 × 16 bf16 product per instruction; on those
    /// CPUs `VDPBF16PS` is no faster than the f32 kernels). The operands are rounded as on the
    /// other paths; the tiles accumulate in f32 in their own order (the same bits for any
    /// thread count, not the bits of the `VDPBF16PS` kernels).
    Amx,
    /// AVX-512F with AVX512_BF16 (Zen 4 and later, Sapphire Rapids and later Xeons): the f32
    /// kernels of [`Isa::Avx512`], and bf16 products on `VDPBF16PS` in the same 12×32 register
    /// tile (twice the multiply-adds per instruction).
    Avx512Bf16,
    /// AVX-512F (with AVX2 and FMA): packed 12×32 kernels for the attention and every large
    /// GEMM; bf16 products through an exact emulation of `VDPBF16PS` in f32 fused
    /// multiply-adds (12×32; the f32 kernels' speed, not faster).
    Avx512,
    /// AVX2 with FMA: packed 6×16 attention kernels and GEMMs through matrixmultiply in f32;
    /// bf16 products through the exact emulation in a 4×16 tile (packed kernels for the
    /// attention and the GEMMs; about the f32 speed or a little below).
    Avx2,
    /// Portable code: sgemm-based attention, GEMMs through matrixmultiply; bf16 operands
    /// rounded the same way and multiplied there in f32 (the same rounding points, not the
    /// bits of the instruction).
    Portable,
}

impl Isa {
    /// Every path, widest first.
    const ALL: [Isa; 5] = [Isa::Amx, Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// The name used by `NONLOCAL_SIMD` and in reports: `amx`, `avx512bf16`, `avx512`, `avx2`
    /// or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => Amx::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => Avx512Bf16::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Avx512::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Avx2::detect().is_some(),
            Isa::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest path this CPU can run.
    pub fn best() -> Isa {
        Isa::ALL.into_iter().find(|isa| isa.available()).unwrap_or(Isa::Portable)
    }

    /// Whether the f32 kernels of this path are the AVX-512 ones ([`Isa::Avx512`],
    /// [`Isa::Avx512Bf16`] and [`Isa::Amx`]).
    pub(crate) fn f32_avx512(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx)
    }

    /// Whether the `VDPBF16PS` kernels of [`Isa::Avx512Bf16`] run on this path (the bf16
    /// products AMX does not take, on [`Isa::Amx`]).
    pub(crate) fn has_avx512_bf16(self) -> bool {
        matches!(self, Isa::Avx512Bf16 | Isa::Amx)
    }

    fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|isa| isa.name() == name.trim().to_ascii_lowercase())
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The path the kernels use: [`Isa::best`], or the one named by the environment variable
/// `NONLOCAL_SIMD` (`amx`, `avx512bf16`, `avx512`, `avx2` or `portable`, any case; empty means
/// unset) when the CPU can run it: `avx512bf16` on a CPU with AMX runs the `VDPBF16PS` kernels
/// instead of the tiles, `avx512` on a CPU with AVX512_BF16 runs the f32 AVX-512 kernels
/// and the bf16 emulation. A path the CPU lacks, or an unknown name, falls back to the best available with
/// a message on stderr: never an illegal instruction. Chosen once, at the first call.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = Isa::best();
        let requested = match std::env::var("NONLOCAL_SIMD") {
            Ok(value) if !value.trim().is_empty() => value,
            _ => return best,
        };
        match Isa::parse(&requested) {
            Some(isa) if isa.available() => isa,
            Some(isa) => {
                eprintln!("nonlocal: NONLOCAL_SIMD={requested}: this CPU has no {isa}; using {best}");
                best
            }
            None => {
                eprintln!(
                    "nonlocal: NONLOCAL_SIMD={requested} is not amx, avx512bf16, avx512, avx2 or portable; using {best}"
                );
                best
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_portable_is_always_available() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse(" AVX512 "), Some(Isa::Avx512));
        assert_eq!(Isa::parse("AVX512BF16"), Some(Isa::Avx512Bf16));
        // The bf16 path includes the AVX-512 one.
        assert!(!Isa::Avx512Bf16.available() || Isa::Avx512.available());
        assert!(!Isa::Amx.available() || Isa::Avx512Bf16.available());
        assert_eq!(Isa::parse("AMX"), Some(Isa::Amx));
        assert_eq!(Isa::parse("sse"), None);
        assert!(Isa::Portable.available());
        assert!(isa().available());
    }
}
