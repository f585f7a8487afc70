//! Fused softmax attention for the (embedded) Gaussian modes,
//! `Y = softmax(s · Q·Kᵀ) · V` without the N×M matrix: the one place that picks a kernel.
//!
//! The packed kernel of `flash` runs on AVX-512 (12×32 register tiles, f32 and bf16) and AVX2
//! (6×16 in f32, 4×16 for the bf16 value product), the sgemm-based one of `sgemm_attention` on
//! other CPUs and for values wider than the packed kernel's limit on the path (1024 channels
//! on AVX-512, 512 on AVX2). Both check every shape before any work, so no call reaches memory
//! outside its operands. The forward pass runs in either [`Precision`] (bf16: the value
//! product on bf16 operands, the logits and the softmax in f32); the backward pass in f32.

use super::attention_common::query_tile;
use super::attention_shapes::{check_backward, check_forward};
use super::microkernel::{Bf16, F32};
#[cfg(target_arch = "x86_64")]
use super::simd::{isa, Avx2, Avx512, Avx512Bf16, Isa};
#[cfg(target_arch = "x86_64")]
use super::tiles::{AVX2_BF16_MR, AVX2_MR, AVX2_NV, AVX512_MR, AVX512_NV};
use super::views::MatRef;
use super::{flash, sgemm_attention};
use crate::config::Precision;
use crate::workspace::Workspace;

/// Widest values the packed AVX2 kernel is used for: beyond, Oᵀ (value channels × query tile)
/// outgrows L2 (measured with AVX2 at 784 queries, 1024 channels: 52% of the sgemm peak,
/// against 90% through sgemm).
const MAX_VALUE_CHANNELS_AVX2: usize = 512;
/// Widest values the packed AVX-512 kernel is used for (its 224-query tiles of 1024 channels
/// measured 2–3% faster than the sgemm kernel at video-res4 on Zen 5, 1 MiB of L2 a core;
/// every AVX-512 CPU has at least that).
const MAX_VALUE_CHANNELS_AVX512: usize = 1024;

/// An attention kernel, for dispatch and for tests that run each one directly.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kernel {
    /// Packed, AVX-512 12×32 tiles in f32; bf16 products on AMX tiles (`flash_amx`).
    #[cfg(target_arch = "x86_64")]
    Amx(super::simd::Amx),
    /// Packed, AVX-512 12×32 tiles; bf16 on `VDPBF16PS`.
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16(Avx512Bf16),
    /// Packed, AVX-512 12×32 tiles; bf16 emulated.
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512),
    /// Packed, AVX2 6×16 tiles; bf16 emulated in 4×16 tiles.
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
    /// One sgemm call per product and tile.
    Sgemm,
    /// The packed kernel with the AVX-512 geometry on portable 16-lane vectors (tests).
    #[cfg(test)]
    Portable16,
    /// The packed kernel with the AVX2 geometries on portable 8-lane vectors (tests).
    #[cfg(test)]
    Portable8,
}

impl Kernel {
    /// The kernel for values `dv` wide on the path of [`isa`].
    fn choose(dv: usize) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        match isa() {
            Isa::Amx if dv <= MAX_VALUE_CHANNELS_AVX512 => {
                return super::simd::Amx::detect().map_or(Kernel::Sgemm, Kernel::Amx)
            }
            Isa::Avx512Bf16 if dv <= MAX_VALUE_CHANNELS_AVX512 => {
                return Avx512Bf16::detect().map_or(Kernel::Sgemm, Kernel::Avx512Bf16)
            }
            Isa::Avx512 if dv <= MAX_VALUE_CHANNELS_AVX512 => {
                return Avx512::detect().map_or(Kernel::Sgemm, Kernel::Avx512)
            }
            Isa::Avx2 if dv <= MAX_VALUE_CHANNELS_AVX2 => return Avx2::detect().map_or(Kernel::Sgemm, Kernel::Avx2),
            _ => {}
        }
        let _ = dv;
        Kernel::Sgemm
    }

    /// The forward pass in `precision` with optional per-key logit offsets, shapes checked
    /// (see [`softmax_attention_lse`] and [`softmax_attention_with_key_bias`]).
    pub(crate) fn forward(
        self,
        precision: Precision,
        qkv: (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
        bias: Option<&[f32]>,
        out: &mut [f32],
        lse: Option<&mut [f32]>,
        ws: &Workspace,
    ) {
        let (q, k, v, scale) = qkv;
        check_forward((q, k, v), bias, out, lse.as_deref());
        assert!(scale >= 0.0, "softmax_attention: the logit scale must not be negative");
        assert!(v.cols() > 0 || lse.is_none(), "softmax_attention: no value channel");
        if q.rows() == 0 || v.cols() == 0 {
            return;
        }
        let tile = query_tile(q.rows());
        // `Bf16`: the value product in bf16, the logits f32 (bf16 logits lose the accuracy
        // contract on wide and many-key cases: see the README's "bf16"). `Bf16Logits`: both.
        let (bf16, bf16_logits) = (precision.bf16_values(), precision.bf16_logits());
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(amx) if bf16 => {
                use super::flash_amx::{attention, Logits};
                let logits = if bf16_logits { Logits::Rounded } else { Logits::Split };
                attention(amx, logits, qkv, bias, out, lse, tile, ws)
            }
            // f32: the AVX-512 kernels, as on the path without the tiles.
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(amx) => Kernel::Avx512Bf16(amx.simd()).forward(precision, qkv, bias, out, lse, ws),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16(s) if bf16_logits => {
                flash::attention::<_, Bf16, Bf16, AVX512_MR, AVX512_MR, AVX512_NV>(s, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16(s) if bf16 => {
                flash::attention::<_, F32, Bf16, AVX512_MR, AVX512_MR, AVX512_NV>(s, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16(s) => flash::attention::<_, F32, F32, AVX512_MR, AVX512_MR, AVX512_NV>(
                s.base(),
                qkv,
                bias,
                out,
                lse,
                tile,
                ws,
            ),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512(s) if bf16_logits => {
                flash::attention::<_, Bf16, Bf16, AVX512_MR, AVX512_MR, AVX512_NV>(s, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512(s) if bf16 => {
                flash::attention::<_, F32, Bf16, AVX512_MR, AVX512_MR, AVX512_NV>(s, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512(s) => {
                flash::attention::<_, F32, F32, AVX512_MR, AVX512_MR, AVX512_NV>(s, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(s) if bf16_logits => {
                flash::attention::<_, Bf16, Bf16, AVX2_BF16_MR, AVX2_BF16_MR, AVX2_NV>(s, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(s) if bf16 => {
                flash::attention::<_, F32, Bf16, AVX2_MR, AVX2_BF16_MR, AVX2_NV>(s, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(s) => {
                flash::attention::<_, F32, F32, AVX2_MR, AVX2_MR, AVX2_NV>(s, qkv, bias, out, lse, tile, ws)
            }
            Kernel::Sgemm => sgemm_attention::attention(qkv, bias, out, lse, ws, precision),
            #[cfg(test)]
            Kernel::Portable16 if bf16_logits => {
                flash::attention::<_, Bf16, Bf16, 12, 12, 2>(super::simd::Portable::<16>, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(test)]
            Kernel::Portable16 if bf16 => {
                flash::attention::<_, F32, Bf16, 12, 12, 2>(super::simd::Portable::<16>, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(test)]
            Kernel::Portable16 => {
                flash::attention::<_, F32, F32, 12, 12, 2>(super::simd::Portable::<16>, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(test)]
            Kernel::Portable8 if bf16_logits => {
                flash::attention::<_, Bf16, Bf16, 4, 4, 2>(super::simd::Portable::<8>, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(test)]
            Kernel::Portable8 if bf16 => {
                flash::attention::<_, F32, Bf16, 6, 4, 2>(super::simd::Portable::<8>, qkv, bias, out, lse, tile, ws)
            }
            #[cfg(test)]
            Kernel::Portable8 => {
                flash::attention::<_, F32, F32, 6, 6, 2>(super::simd::Portable::<8>, qkv, bias, out, lse, tile, ws)
            }
        }
    }

    /// The backward pass, shapes checked (see [`softmax_attention_backward`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        self,
        qkv: (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
        lse: &[f32],
        (y, dy): (MatRef<'_>, MatRef<'_>),
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        ws: &Workspace,
    ) {
        let (q, k, v, scale) = qkv;
        let (n, d, dvc) = (q.rows(), q.cols(), v.cols());
        assert!(scale >= 0.0, "softmax_attention_backward: the logit scale must not be negative");
        check_backward((q, k, v), lse, (y, dy), (dq, dk, dv));
        assert!(n > 0 && d > 0 && dvc > 0, "softmax_attention_backward: empty queries, depth or values");
        let yy = (y, dy);
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(amx) => Kernel::Avx512Bf16(amx.simd()).backward(qkv, lse, yy, dq, dk, dv, ws),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16(s) => {
                flash::attention_backward::<_, AVX512_MR, AVX512_NV>(s.base(), qkv, lse, yy, dq, dk, dv, ws)
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512(s) => flash::attention_backward::<_, AVX512_MR, AVX512_NV>(s, qkv, lse, yy, dq, dk, dv, ws),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(s) => flash::attention_backward::<_, AVX2_MR, AVX2_NV>(s, qkv, lse, yy, dq, dk, dv, ws),
            Kernel::Sgemm => sgemm_attention::attention_backward(qkv, lse, yy, dq, dk, dv, ws),
            #[cfg(test)]
            Kernel::Portable16 => {
                flash::attention_backward::<_, 12, 2>(super::simd::Portable::<16>, qkv, lse, yy, dq, dk, dv, ws)
            }
            #[cfg(test)]
            Kernel::Portable8 => {
                flash::attention_backward::<_, 6, 2>(super::simd::Portable::<8>, qkv, lse, yy, dq, dk, dv, ws)
            }
        }
    }
}

/// `out ← softmax(scale · (q·kᵀ + 1·biasᵀ))·v` in `precision` and, when asked, each row's
/// log-sum-exp: the kernel for the path and value width, scratch from `ws` (what the block
/// calls).
///
/// # Panics
/// If the shapes disagree (checked before any work).
pub(crate) fn attention_in(
    ws: &Workspace,
    precision: Precision,
    qkv: (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
    bias: Option<&[f32]>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) {
    Kernel::choose(qkv.2.cols()).forward(precision, qkv, bias, out, lse, ws);
}

/// [`softmax_attention_backward`] with scratch from `ws` (what the block calls).
///
/// # Panics
/// If the shapes disagree (checked before any work).
pub(crate) fn attention_backward_in(
    ws: &Workspace,
    qkv: (MatRef<'_>, MatRef<'_>, MatRef<'_>, f32),
    lse: &[f32],
    (y, dy): (MatRef<'_>, MatRef<'_>),
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    Kernel::choose(qkv.2.cols()).backward(qkv, lse, (y, dy), dq, dk, dv, ws);
}

/// `out ← softmax(scale · q·kᵀ)·v` with `out` row-major N × dv.
///
/// `q`: N × d, `k`: M × d, `v`: M × dv, M ≥ 1.
///
/// # Panics
/// If the shapes disagree (checked before any work).
pub fn softmax_attention(q: MatRef<'_>, k: MatRef<'_>, v: MatRef<'_>, scale: f32, out: &mut [f32]) {
    Kernel::choose(v.cols()).forward(Precision::F32, (q, k, v, scale), None, out, None, &Workspace::default());
}

/// As [`softmax_attention`] in `precision`: with [`Precision::Bf16`], the logits and the
/// softmax in f32, and the value product on bf16 operands: v rounded as it is packed, the
/// weights rounded per tile.
///
/// # Panics
/// If the shapes disagree (checked before any work).
pub fn softmax_attention_in(
    precision: Precision,
    q: MatRef<'_>,
    k: MatRef<'_>,
    v: MatRef<'_>,
    scale: f32,
    out: &mut [f32],
) {
    Kernel::choose(v.cols()).forward(precision, (q, k, v, scale), None, out, None, &Workspace::default());
}

/// `out ← softmax(scale · (q·kᵀ + 1·biasᵀ))·v`: as [`softmax_attention`] with one logit offset
/// per key (`bias`, M, finite: a −∞ offset is not a mask, it makes every row NaN). The block uses it when it folds θ's projection into the keys
/// (`θ_i·φ_j = x_i·(W_θᵀφ_j) + b_θ·φ_j`).
///
/// # Panics
/// If the shapes disagree (checked before any work).
pub fn softmax_attention_with_key_bias(
    q: MatRef<'_>,
    k: MatRef<'_>,
    bias: &[f32],
    v: MatRef<'_>,
    scale: f32,
    out: &mut [f32],
) {
    Kernel::choose(v.cols()).forward(Precision::F32, (q, k, v, scale), Some(bias), out, None, &Workspace::default());
}

/// As [`softmax_attention`], and writes each row's log-sum-exp `s·m + ln l` into `lse` (N),
/// so the attention weights can be recomputed later as `exp(s·q·k − lse)`.
///
/// # Panics
/// If the shapes disagree (checked before any work).
pub fn softmax_attention_lse(
    q: MatRef<'_>,
    k: MatRef<'_>,
    v: MatRef<'_>,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    Kernel::choose(v.cols()).forward(Precision::F32, (q, k, v, scale), None, out, Some(lse), &Workspace::default());
}

/// Gradients of `Y = softmax(scale · Q·Kᵀ)·V` (the backward of [`softmax_attention_lse`]),
/// recomputing the attention tile by tile from the saved log-sum-exp, as FlashAttention-2.
///
/// Inputs: `q` N × d, `k` M × d, `v` M × dv, `lse` (N) from the forward pass, `y` (N × dv,
/// the forward output) and `dy` (N × dv). Outputs, overwritten: `dq` N × d, `dk` M × d,
/// `dv` M × dv, all row-major. Queries are split into fixed chunks of 256-row
/// tiles whose key-side partial sums are added in chunk order, so the result does not depend
/// on the thread count.
///
/// # Panics
/// If the shapes disagree (checked before any work).
#[allow(clippy::too_many_arguments)]
pub fn softmax_attention_backward(
    q: MatRef<'_>,
    k: MatRef<'_>,
    v: MatRef<'_>,
    scale: f32,
    lse: &[f32],
    y: MatRef<'_>,
    dy: MatRef<'_>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    Kernel::choose(v.cols()).backward((q, k, v, scale), lse, (y, dy), dq, dk, dv, &Workspace::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax attention in f64, straight from the definition.
    fn reference(q: &[f32], k: &[f32], v: &[f32], (n, m, d, dv): (usize, usize, usize, usize), scale: f64) -> Vec<f64> {
        let mut out = vec![0.0; n * dv];
        for i in 0..n {
            let logits: Vec<f64> = (0..m)
                .map(|j| scale * (0..d).map(|c| q[i * d + c] as f64 * k[j * d + c] as f64).sum::<f64>())
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = w.iter().sum();
            for j in 0..m {
                for c in 0..dv {
                    out[i * dv + c] += w[j] / total * v[j * dv + c] as f64;
                }
            }
        }
        out
    }

    fn pseudo_random(len: usize, seed: u32, amp: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    /// Every kernel this CPU can run: the portable instantiations of both packed geometries
    /// and the sgemm kernel everywhere, the real AVX-512 and AVX2 kernels where the CPU has
    /// them (whatever path `isa()` chose).
    fn kernels() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut all = vec![Kernel::Sgemm, Kernel::Portable16, Kernel::Portable8];
        #[cfg(target_arch = "x86_64")]
        {
            all.extend(super::super::simd::Amx::detect().map(Kernel::Amx));
            all.extend(Avx512Bf16::detect().map(Kernel::Avx512Bf16));
            all.extend(Avx512::detect().map(Kernel::Avx512));
            all.extend(Avx2::detect().map(Kernel::Avx2));
        }
        all
    }

    /// The portable kernel with the same geometry, when `kernel` is a real packed one.
    fn portable_twin(kernel: Kernel) -> Option<Kernel> {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(_) | Kernel::Avx512Bf16(_) | Kernel::Avx512(_) => Some(Kernel::Portable16),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(_) => Some(Kernel::Portable8),
            _ => None,
        }
    }

    fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool").install(f)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Q, K, V of the given sizes; Q read through a column stride of 2 (a strided view).
    struct Case {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        bias: Option<Vec<f32>>,
        dims: (usize, usize, usize, usize),
    }

    impl Case {
        fn new((n, m, d, dv): (usize, usize, usize, usize), amp: f32, seed: u32) -> Case {
            Case {
                q: pseudo_random(n * 2 * d, seed, amp),
                k: pseudo_random(m * d, seed + 1, amp),
                v: pseudo_random(m * dv, seed + 2, 1.0),
                bias: None,
                dims: (n, m, d, dv),
            }
        }
        fn q(&self) -> MatRef<'_> {
            let (n, _, d, _) = self.dims;
            // SAFETY: n rows of 2·d floats, every other one read.
            unsafe { MatRef::from_raw(self.q.as_ptr(), n, d, 2 * d as isize, 2) }
        }
        fn q_dense(&self) -> Vec<f32> {
            let (n, _, d, _) = self.dims;
            (0..n * d).map(|i| self.q[(i / d) * 2 * d + 2 * (i % d)]).collect()
        }
        fn k(&self) -> MatRef<'_> {
            MatRef::new(&self.k, 0, self.dims.1, self.dims.2, self.dims.2)
        }
        fn v(&self) -> MatRef<'_> {
            MatRef::new(&self.v, 0, self.dims.1, self.dims.3, self.dims.3)
        }
        fn forward(&self, kernel: Kernel, scale: f32) -> (Vec<f32>, Vec<f32>) {
            self.forward_in(Precision::F32, kernel, scale)
        }
        fn forward_in(&self, precision: Precision, kernel: Kernel, scale: f32) -> (Vec<f32>, Vec<f32>) {
            let (n, _, _, dv) = self.dims;
            let (mut out, mut lse) = (vec![f32::NAN; n * dv], vec![f32::NAN; n]);
            let ws = Workspace::default();
            let qkv = (self.q(), self.k(), self.v(), scale);
            kernel.forward(precision, qkv, self.bias.as_deref(), &mut out, Some(&mut lse), &ws);
            (out, lse)
        }
    }

    #[test]
    fn every_kernel_matches_the_reference_across_tiles_and_odd_sizes() {
        // m > KEY_TILE exercises the running-max rescaling; n > QUERY_TILE several tiles;
        // sizes off every tile multiple test the edges and padding.
        for &(dims, amp, scale) in &[
            ((1, 1, 1, 1), 1.0, 1.0),
            ((7, 3, 5, 2), 1.0, 0.5),
            ((300, 1100, 9, 6), 2.0, 1.0),
            ((33, 700, 16, 13), 6.0, 0.25),
            ((70, 253, 33, 31), 1.0, 0.3),
            ((45, 30, 8, 48), 1.0, 0.7),
        ] {
            let case = Case::new(dims, amp, 1);
            let (n, m, d, dv) = dims;
            let q = case.q_dense();
            let want = reference(&q, &case.k, &case.v, dims, scale as f64);
            for kernel in kernels() {
                let (out, lse) = case.forward(kernel, scale);
                for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    assert!((g as f64 - w).abs() < 2e-5, "{kernel:?} {dims:?} [{i}]: {g} vs {w}");
                }
                // The log-sum-exp recomputes each row's weights: they must sum to 1.
                for row in [0, n - 1] {
                    let total: f64 = (0..m)
                        .map(|j| {
                            let dot: f64 = (0..d).map(|c| q[row * d + c] as f64 * case.k[j * d + c] as f64).sum();
                            (scale as f64 * dot - lse[row] as f64).exp()
                        })
                        .sum();
                    assert!((total - 1.0).abs() < 1e-4, "{kernel:?}: lse of row {row} gives total weight {total}");
                }
                let _ = dv;
            }
        }
    }

    #[test]
    fn peaked_rows_lose_only_negligible_weights_in_every_kernel() {
        // Logits ±0.3·j over 600 keys (three key tiles): rising rows move their maximum by
        // ~75 a tile, so the earlier tiles' sums are rescaled by e^-75 (0 in the packed kernels:
        // below 2^-64) and most weights fall between 2^-125 and 2^-64 (dropped there); falling
        // rows keep their maximum in the first tile. Either way the result is the reference's.
        let (n, m, d, dv) = (40, 600, 2, 5);
        let q: Vec<f32> = (0..n * d)
            .map(|i| {
                if i % d == 1 {
                    0.0
                } else if (i / d) % 2 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let k: Vec<f32> = (0..m * d).map(|i| if i % d == 1 { 0.5 } else { 0.3 * (i / d) as f32 }).collect();
        let v = pseudo_random(m * dv, 11, 1.0);
        let want = reference(&q, &k, &v, (n, m, d, dv), 1.0);
        let qkv = (MatRef::new(&q, 0, n, d, d), MatRef::new(&k, 0, m, d, d), MatRef::new(&v, 0, m, dv, dv), 1.0);
        for kernel in kernels() {
            let mut out = vec![f32::NAN; n * dv];
            kernel.forward(Precision::F32, qkv, None, &mut out, None, &Workspace::default());
            for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() < 2e-5, "{kernel:?} [{i}]: {g} vs {w}");
            }
        }
    }

    #[test]
    fn packed_kernels_equal_their_portable_twin_bit_for_bit_for_any_thread_count() {
        let case = Case::new((517, 611, 40, 24), 3.0, 7);
        for kernel in kernels() {
            let runs: Vec<_> = [1, 2, 3].iter().map(|&t| in_pool(t, || case.forward(kernel, 0.7))).collect();
            for run in &runs[1..] {
                assert_eq!(bits(&run.0), bits(&runs[0].0), "{kernel:?}: output depends on the thread count");
                assert_eq!(bits(&run.1), bits(&runs[0].1), "{kernel:?}: lse depends on the thread count");
            }
            if let Some(twin) = portable_twin(kernel) {
                let portable = case.forward(twin, 0.7);
                assert_eq!(bits(&portable.0), bits(&runs[0].0), "{kernel:?} differs from {twin:?}");
                assert_eq!(bits(&portable.1), bits(&runs[0].1), "{kernel:?} lse differs from {twin:?}");
            }
        }
    }

    #[test]
    fn key_bias_offsets_each_keys_logit_in_every_kernel() {
        // softmax(s·(q·k + b)) is the attention of [q, 1] on [k, b]: the reference's.
        let dims = (203, 517, 19, 11);
        let (n, m, d, dv) = dims;
        let mut case = Case::new(dims, 1.5, 5);
        let bias = pseudo_random(m, 9, 4.0);
        case.bias = Some(bias.clone());
        let q = case.q_dense();
        let q_aug: Vec<f32> = q.chunks(d).flat_map(|r| r.iter().copied().chain([1.0])).collect();
        let k_aug: Vec<f32> = case.k.chunks(d).zip(&bias).flat_map(|(r, &b)| r.iter().copied().chain([b])).collect();
        let want = reference(&q_aug, &k_aug, &case.v, (n, m, d + 1, dv), 0.6);
        let mut results = Vec::new();
        for kernel in kernels() {
            let (out, _) = case.forward(kernel, 0.6);
            for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() < 2e-5, "{kernel:?} [{i}]: {g} vs {w}");
            }
            assert_eq!(bits(&in_pool(3, || case.forward(kernel, 0.6)).0), bits(&out), "{kernel:?}: thread count");
            results.push((kernel, out));
        }
        for (kernel, out) in &results {
            if let Some(twin) = portable_twin(*kernel) {
                assert_eq!(bits(&case.forward(twin, 0.6).0), bits(out), "{kernel:?} differs from {twin:?}");
            }
        }
    }

    #[test]
    fn empty_depth_gives_uniform_weights_and_no_query_gives_nothing() {
        // d = 0: every logit is 0, so each output row is the mean of the values. The views
        // of no column sit on an empty slice, with a row stride past it.
        let (m, dv) = (3, 2);
        let v: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 9.0];
        let none: [f32; 0] = [];
        for (kernel, precision) in kernels().into_iter().flat_map(|k| PRECISIONS.map(|p| (k, p))) {
            let mut out = vec![f32::NAN; 5 * dv];
            let (q, k) = (MatRef::new(&none, 0, 5, 0, 7), MatRef::new(&none, 0, m, 0, 7));
            let qkv = (q, k, MatRef::new(&v, 0, m, dv, dv), 1.0);
            kernel.forward(precision, qkv, None, &mut out, None, &Workspace::default());
            for row in out.chunks(dv) {
                assert!((row[0] - 3.0).abs() < 1e-6 && (row[1] - 5.0).abs() < 1e-6, "{kernel:?}: {row:?}");
            }
            let mut nothing: [f32; 0] = [];
            let q = MatRef::new(&none, 0, 0, 0, 7);
            kernel.forward(
                Precision::F32,
                (q, k, MatRef::new(&v, 0, m, dv, dv), 1.0),
                None,
                &mut nothing,
                Some(&mut []),
                &Workspace::default(),
            );
        }
    }

    /// Every precision the kernels take.
    const PRECISIONS: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::Bf16Logits];

    /// The packed kernels that take bf16 pairs in register tiles (every packed kernel but the
    /// AMX one, whose tiles sum in their own order): their bf16 outputs are one computation
    /// whatever the geometry and instruction set.
    fn packed_kernels() -> Vec<Kernel> {
        kernels().into_iter().filter(|k| !matches!(k, Kernel::Sgemm)).filter(|k| !is_amx(*k)).collect()
    }

    fn is_amx(kernel: Kernel) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Kernel::Amx(_) = kernel {
            return true;
        }
        let _ = kernel;
        false
    }

    #[test]
    fn the_amx_kernel_gives_one_result_for_any_thread_count_close_to_the_register_tiles() {
        // The AMX tiles round the same operands and sum each element in f32 in their own
        // order, over key tiles of their own (288 keys, not 252: the weights are rounded
        // against another running maximum): the register tiles' result within the weights'
        // rounding (2^-8 of the values, 1 here, each way), and the same bits for any thread
        // count. Key tiles, query tiles and channel blocks off every multiple.
        let Some(amx) = kernels().into_iter().find(|k| is_amx(*k)) else {
            eprintln!("no AMX here: the AMX kernel is not run");
            return;
        };
        let mut with_bias = Case::new((203, 617, 19, 45), 1.5, 5);
        with_bias.bias = Some(pseudo_random(617, 9, 4.0));
        for case in [Case::new((517, 611, 40, 24), 3.0, 7), Case::new((33, 290, 64, 70), 2.0, 3), with_bias] {
            for precision in [Precision::Bf16, Precision::Bf16Logits] {
                let want = case.forward_in(precision, Kernel::Portable16, 0.7);
                let one = in_pool(1, || case.forward_in(precision, amx, 0.7));
                for threads in [2, 3] {
                    let got = in_pool(threads, || case.forward_in(precision, amx, 0.7));
                    assert_eq!(bits(&got.0), bits(&one.0), "{precision} on {threads} threads");
                    assert_eq!(bits(&got.1), bits(&one.1), "{precision} lse on {threads} threads");
                }
                for (i, (a, b)) in one.0.iter().zip(&want.0).enumerate() {
                    assert!((a - b).abs() < 2.04 / 256.0, "{precision} [{i}]: {a} vs {b}");
                }
                let worst = one.0.iter().zip(&want.0).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst > 0.0, "{precision}: the AMX result is the register tiles' bits");
                for (i, (a, b)) in one.1.iter().zip(&want.1).enumerate() {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{precision} lse [{i}]: {a} vs {b}");
                }
            }
        }
    }

    /// bf16 softmax attention in f64: the values rounded to bf16, the logits and the weights
    /// exact.
    fn bf16_reference(case: &Case, scale: f64) -> Vec<f64> {
        use crate::kernels::bf16::round_to_bf16;
        let (q, k) = (case.q_dense(), case.k.clone());
        let v: Vec<f32> = case.v.iter().map(|&x| round_to_bf16(x)).collect();
        match &case.bias {
            None => reference(&q, &k, &v, case.dims, scale),
            Some(bias) => {
                let (n, m, d, dv) = case.dims;
                let q_aug: Vec<f32> = q.chunks(d).flat_map(|row| row.iter().copied().chain([1.0])).collect();
                let k_aug: Vec<f32> =
                    k.chunks(d).zip(bias).flat_map(|(row, &b)| row.iter().copied().chain([b])).collect();
                reference(&q_aug, &k_aug, &v, (n, m, d + 1, dv), scale)
            }
        }
    }

    #[test]
    fn bf16_kernels_are_the_attention_on_rounded_values() {
        // The weights are rounded to bf16 (relative error ≤ 2^-9 each) and renormalised by
        // their sum: each output is off by at most 2^-8 of the largest value magnitude (1 here)
        // from the attention of q, k and the rounded v, plus f32 rounding.
        for &(dims, amp, scale, bias) in &[
            ((1, 1, 1, 1), 1.0, 1.0, false),
            ((7, 3, 5, 2), 1.0, 0.5, false),
            ((300, 1100, 9, 6), 2.0, 1.0, false),
            ((33, 700, 16, 13), 6.0, 0.25, true),
            ((70, 253, 33, 31), 1.0, 0.3, false),
        ] {
            let mut case = Case::new(dims, amp, 11);
            if bias {
                case.bias = Some(pseudo_random(dims.1, 12, 4.0));
            }
            let want = bf16_reference(&case, scale as f64);
            for kernel in kernels() {
                let (out, _) = case.forward_in(Precision::Bf16, kernel, scale);
                for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    let bound = 1.02 / 256.0 + 2e-5;
                    assert!((g as f64 - w).abs() < bound, "{kernel:?} {dims:?} [{i}]: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn bf16_packed_kernels_give_one_result_bit_for_bit_for_any_thread_count() {
        // Every logit is one f32 chain over d, every output one chain of pair steps over the
        // key pairs tile by tile: the same bits on every instruction set and geometry, and (the
        // query tiles being independent) for any thread count. Values 2^-60 test the
        // emulations' checked path (their products are not certified).
        let mut tiny = Case::new((131, 300, 7, 5), 1.0, 13);
        tiny.v.iter_mut().for_each(|v| *v *= 1e-18);
        for case in [Case::new((300, 611, 21, 14), 3.0, 7), tiny] {
            let want = case.forward_in(Precision::Bf16, Kernel::Portable16, 0.7);
            for kernel in packed_kernels() {
                for threads in [1, 2, 3] {
                    let got = in_pool(threads, || case.forward_in(Precision::Bf16, kernel, 0.7));
                    assert_eq!(bits(&got.0), bits(&want.0), "{kernel:?} on {threads} threads");
                    assert_eq!(bits(&got.1), bits(&want.1), "{kernel:?} lse on {threads} threads");
                }
            }
        }
        // The portable path rounds the same way but multiplies through sgemm: close, and
        // itself independent of the thread count.
        let case = Case::new((300, 611, 21, 14), 3.0, 7);
        let packed = case.forward_in(Precision::Bf16, Kernel::Portable16, 0.7);
        let sgemm = case.forward_in(Precision::Bf16, Kernel::Sgemm, 0.7);
        assert_eq!(bits(&in_pool(3, || case.forward_in(Precision::Bf16, Kernel::Sgemm, 0.7)).0), bits(&sgemm.0));
        for (a, b) in packed.0.iter().zip(&sgemm.0) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn bf16_logit_kernels_are_the_attention_on_rounded_operands_with_one_result() {
        // `Precision::Bf16Logits`: q and k rounded too. A product of two bf16 values is exact,
        // so every kernel is the attention of the rounded q, k and v within the weights'
        // rounding (2^-8, as above) plus f32 sums; the packed kernels give one result bit for
        // bit on every instruction set, geometry and thread count (a fixed chain of pair
        // steps per logit and per output).
        use crate::kernels::bf16::round_to_bf16;
        let r = |v: &[f32]| v.iter().map(|&x| round_to_bf16(x)).collect::<Vec<_>>();
        for (dims, amp, scale, bias) in [
            ((70, 300, 33, 13), 2.0, 0.4, false),
            ((203, 517, 19, 11), 1.5, 0.6, true),
            ((5, 1, 3, 2), 1.0, 1.0, false),
        ] {
            let mut case = Case::new(dims, amp, 17);
            let (n, m, d, dv) = dims;
            let exact = match bias {
                false => reference(&r(&case.q_dense()), &r(&case.k), &r(&case.v), dims, scale as f64),
                true => {
                    // The offsets stay f32: the attention of [q, 1] on [k, b].
                    let b = pseudo_random(m, 9, 4.0);
                    case.bias = Some(b.clone());
                    let q: Vec<f32> =
                        r(&case.q_dense()).chunks(d).flat_map(|row| row.iter().copied().chain([1.0])).collect();
                    let k: Vec<f32> =
                        r(&case.k).chunks(d).zip(&b).flat_map(|(row, &b)| row.iter().copied().chain([b])).collect();
                    reference(&q, &k, &r(&case.v), (n, m, d + 1, dv), scale as f64)
                }
            };
            for kernel in kernels() {
                let (out, _) = case.forward_in(Precision::Bf16Logits, kernel, scale);
                for (i, (&g, &w)) in out.iter().zip(&exact).enumerate() {
                    assert!((g as f64 - w).abs() < 1.02 / 256.0 + 2e-5, "{kernel:?} {dims:?} [{i}]: {g} vs {w}");
                }
            }
            let want = case.forward_in(Precision::Bf16Logits, Kernel::Portable16, scale);
            for kernel in packed_kernels() {
                for threads in [1, 2, 3] {
                    let got = in_pool(threads, || case.forward_in(Precision::Bf16Logits, kernel, scale));
                    assert_eq!(bits(&got.0), bits(&want.0), "{kernel:?} {dims:?} on {threads} threads");
                    assert_eq!(bits(&got.1), bits(&want.1), "{kernel:?} {dims:?} lse on {threads} threads");
                }
            }
            // Bf16Logits differs from Bf16 (the logits' operands are rounded; one key weighs 1).
            let value_side_only = case.forward_in(Precision::Bf16, Kernel::Portable16, scale);
            assert_eq!(bits(&want.0) == bits(&value_side_only.0), m == 1, "{dims:?}");
        }
    }

    #[test]
    fn non_finite_queries_poison_only_their_own_rows() {
        let mut case = Case::new((40, 300, 8, 5), 1.0, 3);
        case.q[3 * 16] = f32::NAN;
        case.q[9 * 16 + 2] = f32::INFINITY;
        for (kernel, precision) in kernels().into_iter().flat_map(|k| PRECISIONS.map(|p| (k, p))) {
            let (out, _) = case.forward_in(precision, kernel, 1.0);
            for (r, row) in out.chunks(5).enumerate() {
                let poisoned = r == 3 || r == 9;
                assert_eq!(row.iter().all(|v| v.is_nan()), poisoned, "{kernel:?} {precision} row {r}: {row:?}");
                assert!(poisoned || row.iter().all(|v| v.is_finite()), "{kernel:?} {precision} row {r}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "q, k, v")]
    fn mismatched_depth_is_refused_before_any_work() {
        let (q, k, v) = (vec![0.0f32; 8 * 4], vec![0.0f32; 5 * 3], vec![0.0f32; 5 * 2]);
        let mut out = vec![0.0f32; 8 * 2];
        let qm = MatRef::new(&q, 0, 8, 4, 4);
        softmax_attention(qm, MatRef::new(&k, 0, 5, 3, 3), MatRef::new(&v, 0, 5, 2, 2), 1.0, &mut out);
    }

    #[test]
    #[should_panic(expected = "q, k, v")]
    fn backward_with_too_few_value_rows_is_refused_before_any_work() {
        let (n, m, d, dv) = (20, 9, 4, 3);
        let (q, k, v) = (vec![0.1f32; n * d], vec![0.1f32; m * d], vec![0.1f32; (m - 1) * dv]);
        let (y, dy, lse) = (vec![0.0f32; n * dv], vec![0.0f32; n * dv], vec![0.0f32; n]);
        let (mut dq, mut dk, mut dvv) = (vec![0.0; n * d], vec![0.0; m * d], vec![0.0; m * dv]);
        softmax_attention_backward(
            MatRef::new(&q, 0, n, d, d),
            MatRef::new(&k, 0, m, d, d),
            MatRef::new(&v, 0, m - 1, dv, dv),
            1.0,
            &lse,
            MatRef::new(&y, 0, n, dv, dv),
            MatRef::new(&dy, 0, n, dv, dv),
            &mut dq,
            &mut dk,
            &mut dvv,
        );
    }

    #[test]
    fn backward_takes_subnormal_logit_gradients_as_zero_in_every_kernel() {
        // One query, two keys: weights 1 and e^-40 (kept: above 2^-64), value gradients 0 and
        // 1e-22, so both dS = P ⊙ (dP − δ) are subnormal (~4e-40): flushed, dq and dk are
        // exactly 0 (a subnormal operand would cost a microcode assist per multiply-add).
        let (q, k, v, dy) = ([1.0f32], [0.0f32, -40.0], [0.0f32, 1.0], [1e-22f32]);
        let (qm, km, vm) = (MatRef::new(&q, 0, 1, 1, 1), MatRef::new(&k, 0, 2, 1, 1), MatRef::new(&v, 0, 2, 1, 1));
        let (mut y, mut lse) = ([0.0f32], [0.0f32]);
        Kernel::Sgemm.forward(Precision::F32, (qm, km, vm, 1.0), None, &mut y, Some(&mut lse), &Workspace::default());
        assert!(y[0] > 4e-18 && y[0] < 5e-18, "the small weight is kept: {}", y[0]);
        for kernel in kernels().into_iter().chain([Kernel::Sgemm]) {
            let (mut dq, mut dk, mut dvv) = ([f32::NAN], [f32::NAN; 2], [f32::NAN; 2]);
            let yy = (MatRef::new(&y, 0, 1, 1, 1), MatRef::new(&dy, 0, 1, 1, 1));
            kernel.backward((qm, km, vm, 1.0), &lse, yy, &mut dq, &mut dk, &mut dvv, &Workspace::default());
            assert_eq!((dq, dk), ([0.0], [0.0, 0.0]), "{kernel:?}");
            assert_eq!(dvv[0], 1e-22, "{kernel:?}: dV = Pᵀ·dY keeps its normal terms");
        }
    }

    #[test]
    fn backward_within_one_key_tile_renormalises_its_weights() {
        // Every key in one key tile: the kernels take the softmax of their own logits, so a
        // log-sum-exp off by 3e-3 (a forward pass that rounded the logits differently, e.g.
        // with θ folded into the keys, drifts this way at large logits) changes nothing
        // beyond rounding; and with one key dS is 0 (no gradient for q and k at all).
        let scale = 0.7;
        for (n, m, d, dv) in [(70, 200, 5, 3), (40, 1, 6, 4)] {
            let q = pseudo_random(n * d, 21, 1.5);
            let k = pseudo_random(m * d, 22, 1.5);
            let v = pseudo_random(m * dv, 23, 1.0);
            let dy = pseudo_random(n * dv, 24, 1.0);
            let (qm, km, vm) =
                (MatRef::new(&q, 0, n, d, d), MatRef::new(&k, 0, m, d, d), MatRef::new(&v, 0, m, dv, dv));
            let (mut y, mut lse) = (vec![0.0f32; n * dv], vec![0.0f32; n]);
            Kernel::Sgemm.forward(
                Precision::F32,
                (qm, km, vm, scale),
                None,
                &mut y,
                Some(&mut lse),
                &Workspace::default(),
            );
            let want = |kernel: Kernel, lse: &[f32]| {
                let (mut dq, mut dk, mut dvv) = (vec![f32::NAN; n * d], vec![f32::NAN; m * d], vec![f32::NAN; m * dv]);
                let yy = (MatRef::new(&y, 0, n, dv, dv), MatRef::new(&dy, 0, n, dv, dv));
                kernel.backward((qm, km, vm, scale), lse, yy, &mut dq, &mut dk, &mut dvv, &Workspace::default());
                [dq, dk, dvv]
            };
            let shifted: Vec<f32> = lse.iter().map(|l| l + 3e-3).collect();
            for kernel in kernels().into_iter().chain([Kernel::Sgemm]) {
                let (exact, drifted) = (want(kernel, &lse), want(kernel, &shifted));
                for (which, (a, b)) in drifted.iter().zip(&exact).enumerate() {
                    let top = b.iter().fold(1.0f32, |t, x| t.max(x.abs()));
                    for (x, y) in a.iter().zip(b) {
                        assert!((x - y).abs() <= 1e-5 * top, "{kernel:?} ({n}, {m}) gradient {which}: {x} vs {y}");
                    }
                }
                if m == 1 {
                    let top = exact[2].iter().fold(0.0f32, |t, x| t.max(x.abs()));
                    for (which, g) in exact[..2].iter().enumerate() {
                        let largest = g.iter().fold(0.0f32, |t, x| t.max(x.abs()));
                        assert!(largest <= 1e-6 * top, "{kernel:?}, one key: gradient {which} reads {largest}");
                    }
                }
            }
        }
    }

    #[test]
    fn backward_of_every_kernel_matches_finite_differences_and_is_thread_independent() {
        let (n, m, d, dv) = (300, 530, 5, 3);
        let scale = 0.7;
        let q = pseudo_random(n * d, 11, 1.5);
        let k = pseudo_random(m * d, 12, 1.5);
        let v = pseudo_random(m * dv, 13, 1.0);
        let dy = pseudo_random(n * dv, 14, 1.0);
        let (qm, km, vm) = (MatRef::new(&q, 0, n, d, d), MatRef::new(&k, 0, m, d, d), MatRef::new(&v, 0, m, dv, dv));
        let mut y = vec![0.0f32; n * dv];
        let mut lse = vec![0.0f32; n];
        Kernel::Sgemm.forward(Precision::F32, (qm, km, vm, scale), None, &mut y, Some(&mut lse), &Workspace::default());
        let backward = |kernel: Kernel| {
            let (mut dq, mut dk, mut dvv) = (vec![f32::NAN; n * d], vec![f32::NAN; m * d], vec![f32::NAN; m * dv]);
            let yy = (MatRef::new(&y, 0, n, dv, dv), MatRef::new(&dy, 0, n, dv, dv));
            kernel.backward((qm, km, vm, scale), &lse, yy, &mut dq, &mut dk, &mut dvv, &Workspace::default());
            [dq, dk, dvv]
        };
        let sgemm = backward(Kernel::Sgemm);
        for kernel in kernels() {
            let runs: Vec<_> = [1, 2, 3].iter().map(|&t| in_pool(t, || backward(kernel))).collect();
            for run in &runs[1..] {
                for (a, b) in run.iter().zip(&runs[0]) {
                    assert_eq!(bits(a), bits(b), "{kernel:?}: gradients depend on the thread count");
                }
            }
            if let Some(twin) = portable_twin(kernel) {
                for (a, b) in backward(twin).iter().zip(&runs[0]) {
                    assert_eq!(bits(a), bits(b), "{kernel:?} gradients differ from {twin:?}");
                }
            }
            for (a, b) in runs[0].iter().zip(&sgemm) {
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{kernel:?} disagrees with sgemm: {x} vs {y}");
                }
            }
        }
        let [dq, dk, dvv] = sgemm;
        // L = Σ dy ⊙ Y in f64; central differences on a few entries of each input.
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let y = reference(q, k, v, (n, m, d, dv), scale as f64);
            y.iter().zip(&dy).map(|(a, &b)| a * b as f64).sum()
        };
        let h = 1e-2f32;
        let check = |which: usize, idx: usize, got: f32| {
            let diff = |delta: f32| {
                let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
                [&mut q2, &mut k2, &mut v2][which][idx] += delta;
                loss(&q2, &k2, &v2)
            };
            let fd = (diff(h) - diff(-h)) / (2.0 * h as f64);
            assert!((fd - got as f64).abs() < 2e-3 * fd.abs().max(1.0), "input {which}[{idx}]: fd {fd} vs {got}");
        };
        for idx in [0, 7, n * d - 1] {
            check(0, idx, dq[idx]);
        }
        for idx in [0, 511 * d + 2, m * d - 1] {
            check(1, idx, dk[idx]);
        }
        for idx in [0, 515 * dv + 1, m * dv - 1] {
            check(2, idx, dvv[idx]);
        }
    }
}
