//! The shape checks of the softmax-attention kernels, in one place: the dispatch and each
//! kernel call them before any work, so a kernel run directly checks what it relies on too.

use super::views::MatRef;

/// `q` N × d, `k` M × d with M ≥ 1, `v` M × dv, `bias` M, `out` N·dv, `lse` N.
///
/// # Panics
/// When any of them disagrees.
pub(crate) fn check_forward(
    (q, k, v): (MatRef<'_>, MatRef<'_>, MatRef<'_>),
    bias: Option<&[f32]>,
    out: &[f32],
    lse: Option<&[f32]>,
) {
    let (n, m, d, dv) = (q.rows(), k.rows(), q.cols(), v.cols());
    assert!(m > 0, "softmax attention needs at least one key");
    assert_eq!((k.cols(), v.rows()), (d, m), "softmax_attention: q, k, v shapes");
    assert_eq!(Some(out.len()), n.checked_mul(dv), "softmax_attention: output length");
    assert!(lse.is_none_or(|l| l.len() == n), "softmax_attention: lse length");
    assert!(bias.is_none_or(|b| b.len() == m), "softmax_attention: key bias length");
}

/// As [`check_forward`] for `q`, `k`, `v`; `lse` N, `y` and `dy` N × dv, `dq` N·d, `dk` M·d,
/// `dv` M·dv.
///
/// # Panics
/// When any of them disagrees.
pub(crate) fn check_backward(
    (q, k, v): (MatRef<'_>, MatRef<'_>, MatRef<'_>),
    lse: &[f32],
    (y, dy): (MatRef<'_>, MatRef<'_>),
    (dq, dk, dv): (&[f32], &[f32], &[f32]),
) {
    let (n, m, d, dvc) = (q.rows(), k.rows(), q.cols(), v.cols());
    assert!(m > 0, "softmax attention needs at least one key");
    assert_eq!((k.cols(), v.rows(), lse.len()), (d, m, n), "softmax_attention_backward: q, k, v, lse shapes");
    assert_eq!((y.rows(), y.cols(), dy.rows(), dy.cols()), (n, dvc, n, dvc), "softmax_attention_backward: y, dy");
    assert_eq!((dq.len(), dk.len(), dv.len()), (n * d, m * d, m * dvc), "softmax_attention_backward: outputs");
}
