//! Fused softmax attention as a candle op: `softmax(s·Q·Kᵀ)·V` on (B, heads, N, d) tensors
//! without the N×M matrix, forward and backward.
//!
//! **How the log-sum-exp reaches the backward pass.** The custom op returns one flat f32
//! tensor, `[out | lse]`: the B·heads·N·dv outputs, then one log-sum-exp per query. The
//! caller sees `out` only (a narrow of the first part, reshaped: no copy), and `bwd` finds the
//! log-sum-exp in the op's result, which candle hands to it. This costs N floats per head
//! and nothing else; recomputing the log-sum-exp in `bwd` instead would cost a second
//! forward pass (about a third of the backward's work). Candle's backward of the narrow pads
//! the gradient with zeros for the `lse` part (one O(N·dv) copy), which `bwd` ignores: the
//! log-sum-exp itself is not differentiable here.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::views::{collapsed, cpu_tensor, f32_data, with_cpu_f32, MatBatch};
use crate::kernels::attention::{softmax_attention_backward, softmax_attention_lse};
use crate::kernels::views::MatRef;

/// `softmax(scale · Q·Kᵀ) · V` over the last two dims of (B, heads, N, d) queries,
/// (B, heads, M, d) keys and (B, heads, M, dv) values: returns (B, heads, N, dv).
///
/// On the CPU, f32 tensors run the crate's fused kernel (FlashAttention-style online softmax)
/// forward, and backward from the saved log-sum-exp, in O(N·dv + M·(d + dv)) memory per
/// head: the N×M attention matrix never exists. Inputs may have any strides (transposed,
/// narrowed, permuted heads) as long as each head's rows and columns have one stride each;
/// others are copied first. Results do not depend on the rayon thread count.
///
/// Other dtypes (BF16, F16, F64) are converted to f32 for the kernel and the result back.
/// On other devices (CUDA, Metal), and for empty sizes, this runs candle's composition
/// `matmul → softmax → matmul` instead: the slow N×M path.
///
/// ```
/// use candle_core::{Device, Tensor};
///
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1., (1, 2, 5, 4), &dev)?;
/// let k = Tensor::randn(0f32, 1., (1, 2, 7, 4), &dev)?;
/// let v = Tensor::randn(0f32, 1., (1, 2, 7, 3), &dev)?;
/// let y = nonlocal::candle::attention(&q, &k, &v, 0.5)?;
/// assert_eq!(y.dims(), &[1, 2, 5, 3]);
/// let plain = nonlocal::candle::attention_plain(&q, &k, &v, 0.5)?;
/// let err = (y - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(err < 1e-5);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// Tensors that are not rank 4, sizes that disagree (batch, heads, depth, keys), no key
/// (M = 0), a scale that is negative or not finite, devices that differ, or a non-float dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, n, d, _, dv) = check_shapes(q, k, v)?;
    if !(scale.is_finite() && scale >= 0.0) {
        candle_core::bail!("nonlocal::candle::attention: scale {scale} must be finite and non-negative");
    }
    if !q.device().is_cpu() || n == 0 || d == 0 || dv == 0 || b * h == 0 {
        return attention_plain(q, k, v, scale);
    }
    let dtype = q.dtype();
    let f32s = |t: &Tensor| -> Result<Tensor> { collapsed(&t.to_dtype(candle_core::DType::F32)?, 2, 1) };
    let (q32, k32, v32) = (f32s(q)?, f32s(k)?, f32s(v)?);
    let packed = q32.apply_op3(&k32, &v32, FusedAttention { scale: scale as f32 })?;
    let out = packed.narrow(0, 0, b * h * n * dv)?.reshape((b, h, n, dv))?;
    out.to_dtype(dtype)
}

/// The composition `softmax(scale · Q·Kᵀ) · V` in candle ops, forming the N×M matrix: what
/// [`attention`] runs on non-CPU devices, and the ground truth its tests compare with. Uses
/// `candle_nn::ops::softmax_last_dim` (fused, no backward) when no input needs gradients,
/// else `candle_nn::ops::softmax` (composed, differentiable).
///
/// # Errors
/// As candle's `matmul` and softmax, and shape errors as [`attention`].
pub fn attention_plain(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    check_shapes(q, k, v)?;
    let logits = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let weights = if q.track_op() || k.track_op() || v.track_op() {
        candle_nn::ops::softmax(&logits, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&logits)?
    };
    weights.matmul(&v.contiguous()?)
}

/// (B, heads, N, d, M, dv), checked.
fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (b, h, n, d) = q.dims4()?;
    let (kb, kh, m, kd) = k.dims4()?;
    let (vb, vh, vm, dv) = v.dims4()?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vm) != (b, h, m) {
        candle_core::bail!(
            "nonlocal::candle::attention: q {:?}, k {:?}, v {:?} do not fit (B, heads, N, d), (B, heads, M, d), \
             (B, heads, M, dv)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if m == 0 {
        candle_core::bail!("nonlocal::candle::attention: no keys (M = 0)");
    }
    if !(q.device().same_device(k.device()) && q.device().same_device(v.device())) {
        candle_core::bail!("nonlocal::candle::attention: q, k, v are on different devices");
    }
    if !q.dtype().is_float() || q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        candle_core::bail!(
            "nonlocal::candle::attention: dtypes {:?}, {:?}, {:?} must be one float type",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    Ok((b, h, n, d, m, dv))
}

/// The fused forward (result `[out | lse]`, flat) and its backward.
pub(crate) struct FusedAttention {
    pub(crate) scale: f32,
}

/// The per-head views of q, k, v.
struct Heads {
    q: MatBatch,
    k: MatBatch,
    v: MatBatch,
}

impl Heads {
    fn new((lq, lk, lv): (&Layout, &Layout, &Layout), (nq, nk, nv): (usize, usize, usize)) -> Result<Self> {
        Ok(Heads { q: MatBatch::new(lq, 2, 1, nq)?, k: MatBatch::new(lk, 2, 1, nk)?, v: MatBatch::new(lv, 2, 1, nv)? })
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "nonlocal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32_data(sq, "q")?, f32_data(sk, "k")?, f32_data(sv, "v")?);
        let heads = Heads::new((lq, lk, lv), (q.len(), k.len(), v.len()))?;
        let (count, n, dv) = (heads.q.count(), heads.q.rows(), heads.v.cols());
        let mut packed = vec![0.0f32; count * n * (dv + 1)];
        let (out, lse) = packed.split_at_mut(count * n * dv);
        out.par_chunks_mut(n * dv).zip(lse.par_chunks_mut(n)).enumerate().for_each(|(i, (out, lse))| {
            let (qi, ki, vi) = (heads.q.mat(q, i), heads.k.mat(k, i), heads.v.mat(v, i));
            softmax_attention_lse(qi, ki, vi, self.scale, out, lse);
        });
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_res = grad_res.contiguous()?;
        let [dq, dk, dv] = with_cpu_f32(q, "q", |qd, lq| {
            with_cpu_f32(k, "k", |kd, lk| {
                with_cpu_f32(v, "v", |vd, lv| {
                    with_cpu_f32(res, "attention result", |rd, lr| {
                        with_cpu_f32(&grad_res, "attention gradient", |gd, lg| {
                            let heads = Heads::new((lq, lk, lv), (qd.len(), kd.len(), vd.len()))?;
                            let res = &rd[lr.start_offset()..];
                            let grad = &gd[lg.start_offset()..];
                            Ok(backward(self.scale, &heads, (qd, kd, vd), res, grad))
                        })
                    })
                })
            })
        })?;
        Ok((Some(cpu_tensor(dq, q.dims())?), Some(cpu_tensor(dk, k.dims())?), Some(cpu_tensor(dv, v.dims())?)))
    }
}

/// dq, dk, dv (contiguous) for every head, from the packed result and its gradient.
fn backward(
    scale: f32,
    heads: &Heads,
    (q, k, v): (&[f32], &[f32], &[f32]),
    res: &[f32],
    grad: &[f32],
) -> [Vec<f32>; 3] {
    let (count, n, d) = (heads.q.count(), heads.q.rows(), heads.q.cols());
    let (m, dvc) = (heads.k.rows(), heads.v.cols());
    let (y, lse) = res.split_at(count * n * dvc);
    let mut dq = vec![0.0f32; count * n * d];
    let mut dk = vec![0.0f32; count * m * d];
    let mut dv = vec![0.0f32; count * m * dvc];
    fn rows(data: &[f32], i: usize, r: usize, c: usize) -> MatRef<'_> {
        MatRef::new(data, i * r * c, r, c, c)
    }
    dq.par_chunks_mut(n * d).zip(dk.par_chunks_mut(m * d)).zip(dv.par_chunks_mut(m * dvc)).enumerate().for_each(
        |(i, ((dq, dk), dv))| {
            let (qi, ki, vi) = (heads.q.mat(q, i), heads.k.mat(k, i), heads.v.mat(v, i));
            let lse = &lse[i * n..(i + 1) * n];
            let (yi, dyi) = (rows(y, i, n, dvc), rows(grad, i, n, dvc));
            softmax_attention_backward(qi, ki, vi, scale, lse, yi, dyi, dq, dk, dv);
        },
    );
    [dq, dk, dv]
}
