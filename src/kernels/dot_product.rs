//! Dot-product attention by associativity: `(θ·φᵀ / M)·g = θ·(φᵀ·g) / M`.
//!
//! The N×M matrix is never formed: `φᵀ·g` is a C'×C' matrix (M·C'² work), and the block folds
//! it into the output projection so each query then costs one row of a GEMM.

use super::gemm::par_gemm_in;
use super::views::{MatMut, MatRef};
use crate::config::Precision;

/// `kᵀ·v · alpha` as a row-major d × dv matrix (`k`: M × d, `v`: M × dv).
pub fn key_value_product(k: MatRef<'_>, v: MatRef<'_>, alpha: f32) -> Vec<f32> {
    key_value_product_in(Precision::F32, k, v, alpha)
}

/// [`key_value_product`] in `precision` (bf16: `k` and `v` rounded to bf16, the sums in f32,
/// then scaled by `alpha`).
pub fn key_value_product_in(precision: Precision, k: MatRef<'_>, v: MatRef<'_>, alpha: f32) -> Vec<f32> {
    let (d, dv) = (k.cols(), v.cols());
    let mut out = vec![0.0f32; d * dv];
    par_gemm_in(precision, alpha, k.t(), v, 0.0, &mut MatMut::new(&mut out, d, dv, dv));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_the_scaled_transposed_product() {
        let (m, d, dv) = (5, 3, 2);
        let k: Vec<f32> = (0..m * d).map(|i| i as f32 - 4.0).collect();
        let v: Vec<f32> = (0..m * dv).map(|i| (i % 3) as f32).collect();
        let out = key_value_product(MatRef::new(&k, 0, m, d, d), MatRef::new(&v, 0, m, dv, dv), 0.5);
        for a in 0..d {
            for b in 0..dv {
                let want: f32 = (0..m).map(|j| k[j * d + a] * v[j * dv + b]).sum::<f32>() * 0.5;
                assert_eq!(out[a * dv + b], want);
            }
        }
    }
}
