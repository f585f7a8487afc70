//! Concatenation attention in O(M log M + N·(log M + C')) instead of O(N·M·C').
//!
//! With `a_i = w_θ·θ_i` and `b_j = w_φ·φ_j`, `y_i = Σ_j ReLU(a_i + b_j)·g_j / M`. The ReLU is
//! non-zero exactly for the keys with `b_j > −a_i`: sorting keys by `b_j` (descending) makes
//! that set a prefix, so with prefix sums `G_k = Σ_{r<k} g_(r)` and `H_k = Σ_{r<k} b_(r)·g_(r)`,
//! `y_i = (a_i·G_k + H_k) / M` where k counts the active keys (one binary search). Prefix sums
//! are kept in f64, so long prefixes lose no accuracy.

use rayon::prelude::*;

use super::views::MatRef;

/// Keys sorted by `b` and the prefix sums of `g` and `b·g` in that order.
pub struct SortedKeys {
    /// `b` sorted descending.
    b_sorted: Vec<f32>,
    /// (M + 1) × dv prefix sums of g.
    g_prefix: Vec<f64>,
    /// (M + 1) × dv prefix sums of b·g.
    bg_prefix: Vec<f64>,
    dv: usize,
}

impl SortedKeys {
    /// Sorts the keys by `b` (M) and builds the prefix sums of `v` (M × dv).
    pub fn new(b: &[f32], v: MatRef<'_>) -> Self {
        let (m, dv) = (b.len(), v.cols());
        assert_eq!(v.rows(), m);
        let mut order: Vec<usize> = (0..m).collect();
        // total_cmp: a NaN key sorts to one end instead of breaking the sort.
        order.sort_by(|&i, &j| b[j].total_cmp(&b[i]));
        let mut g_prefix = vec![0.0f64; (m + 1) * dv];
        let mut bg_prefix = vec![0.0f64; (m + 1) * dv];
        let mut row = vec![0.0f32; dv];
        for (r, &j) in order.iter().enumerate() {
            v.copy_row(j, &mut row);
            let bj = b[j] as f64;
            let (done, next) = g_prefix.split_at_mut((r + 1) * dv);
            let (bdone, bnext) = bg_prefix.split_at_mut((r + 1) * dv);
            for c in 0..dv {
                next[c] = done[r * dv + c] + row[c] as f64;
                bnext[c] = bdone[r * dv + c] + bj * row[c] as f64;
            }
        }
        let b_sorted = order.iter().map(|&j| b[j]).collect();
        SortedKeys { b_sorted, g_prefix, bg_prefix, dv }
    }

    /// How many keys are active for a query with `a` (those with `a + b_j > 0`).
    pub fn active(&self, a: f32) -> usize {
        self.b_sorted.partition_point(|&b| a + b > 0.0)
    }

    /// `out ← Σ_j ReLU(a + b_j)·v_j · scale`, for one query.
    pub fn attend(&self, a: f32, scale: f64, out: &mut [f32]) {
        let k = self.active(a);
        let (a, dv) = (a as f64, self.dv);
        let g = &self.g_prefix[k * dv..(k + 1) * dv];
        let bg = &self.bg_prefix[k * dv..(k + 1) * dv];
        for c in 0..dv {
            out[c] = ((a * g[c] + bg[c]) * scale) as f32;
        }
    }

    /// Σ of `v` over the keys active for a query with `a` (f64, dv entries).
    pub fn active_values(&self, a: f32) -> &[f64] {
        let k = self.active(a);
        &self.g_prefix[k * self.dv..(k + 1) * self.dv]
    }
}

/// The key scores `b_j = w_φ·φ_j` for every row of `phi` (M × C'), each summed in f64.
pub fn key_scores(phi: MatRef<'_>, w_phi: &[f32]) -> Vec<f32> {
    let mut row = vec![0.0f32; phi.cols()];
    (0..phi.rows())
        .map(|j| {
            phi.copy_row(j, &mut row);
            row.iter().zip(w_phi).map(|(&p, &w)| p as f64 * w as f64).sum::<f64>() as f32
        })
        .collect()
}

/// `out_i ← Σ_j ReLU(a_i + b_j)·v_j / M` for every query i: `a` is N × 1, `b` has M entries,
/// `v` is M × dv, `out` is N × dv row-major.
pub fn concat_attention(a: MatRef<'_>, b: &[f32], v: MatRef<'_>, out: &mut [f32]) {
    let dv = v.cols();
    assert_eq!(out.len(), a.rows() * dv);
    let keys = SortedKeys::new(b, v);
    let scale = 1.0 / b.len() as f64;
    out.par_chunks_mut(dv.max(1) * 256).enumerate().for_each(|(t, tile)| {
        for (r, row) in tile.chunks_mut(dv.max(1)).enumerate() {
            keys.attend(a.at(t * 256 + r, 0), scale, row);
        }
    });
}

/// Gradients of [`concat_attention`] for `dy` (N × dv): writes `da` (N), `db` (M) and `dv`
/// (M × dv).
///
/// `da_i = dy_i·Σ_{j active} v_j / M` uses the keys' prefix sums. The key side mirrors it:
/// key j is active for the queries with `a_i > −b_j`, a prefix of the queries sorted by `a`,
/// so with prefix sums of `dy` and `a·dy` over that order,
/// `db_j = v_j·Σ dy / M` and `dv_j = (Σ a·dy + b_j·Σ dy) / M` over that prefix.
pub fn concat_attention_backward(
    a: MatRef<'_>,
    b: &[f32],
    v: MatRef<'_>,
    dy: MatRef<'_>,
    (da, db, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (n, m, dvc) = (a.rows(), b.len(), v.cols());
    assert_eq!((da.len(), db.len(), dv.len()), (n, m, m * dvc));
    let inv_m = 1.0 / m as f64;
    let keys = SortedKeys::new(b, v);
    da.par_iter_mut().enumerate().for_each(|(i, out)| {
        let mut row = vec![0.0f32; dvc];
        dy.copy_row(i, &mut row);
        let g = keys.active_values(a.at(i, 0));
        *out = (row.iter().zip(g).map(|(&d, &g)| d as f64 * g).sum::<f64>() * inv_m) as f32;
    });
    let a_col: Vec<f32> = (0..n).map(|i| a.at(i, 0)).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a_col[j].total_cmp(&a_col[i]));
    let a_sorted: Vec<f32> = order.iter().map(|&i| a_col[i]).collect();
    let mut dy_prefix = vec![0.0f64; (n + 1) * dvc];
    let mut ady_prefix = vec![0.0f64; (n + 1) * dvc];
    let mut row = vec![0.0f32; dvc];
    for (r, &i) in order.iter().enumerate() {
        dy.copy_row(i, &mut row);
        let ai = a_col[i] as f64;
        for c in 0..dvc {
            dy_prefix[(r + 1) * dvc + c] = dy_prefix[r * dvc + c] + row[c] as f64;
            ady_prefix[(r + 1) * dvc + c] = ady_prefix[r * dvc + c] + ai * row[c] as f64;
        }
    }
    db.par_iter_mut().zip(dv.par_chunks_mut(dvc.max(1))).enumerate().for_each(|(j, (db_j, dv_j))| {
        let bj = b[j];
        let cnt = a_sorted.partition_point(|&a| a + bj > 0.0);
        let (sum_dy, sum_ady) = (&dy_prefix[cnt * dvc..(cnt + 1) * dvc], &ady_prefix[cnt * dvc..(cnt + 1) * dvc]);
        let mut vj = vec![0.0f32; dvc];
        v.copy_row(j, &mut vj);
        *db_j = (vj.iter().zip(sum_dy).map(|(&g, &s)| g as f64 * s).sum::<f64>() * inv_m) as f32;
        for c in 0..dvc {
            dv_j[c] = ((sum_ady[c] + bj as f64 * sum_dy[c]) * inv_m) as f32;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_direct_sum() {
        let (n, m, dv) = (40, 23, 3);
        let a: Vec<f32> = (0..n).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let b: Vec<f32> = (0..m).map(|j| ((j * 7) % 23) as f32 * 0.5 - 5.0).collect();
        let v: Vec<f32> = (0..m * dv).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        let mut out = vec![f32::NAN; n * dv];
        concat_attention(MatRef::new(&a, 0, n, 1, 1), &b, MatRef::new(&v, 0, m, dv, dv), &mut out);
        for i in 0..n {
            for c in 0..dv {
                let want: f64 =
                    (0..m).map(|j| (a[i] as f64 + b[j] as f64).max(0.0) * v[j * dv + c] as f64).sum::<f64>() / m as f64;
                assert!((out[i * dv + c] as f64 - want).abs() < 1e-5, "({i},{c})");
            }
        }
    }

    #[test]
    fn backward_matches_the_direct_sums() {
        let (n, m, dv) = (37, 19, 3);
        let a: Vec<f32> = (0..n).map(|i| (i as f32 - 18.0) * 0.31).collect();
        let b: Vec<f32> = (0..m).map(|j| ((j * 7) % 19) as f32 * 0.5 - 4.0).collect();
        let v: Vec<f32> = (0..m * dv).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        let dy: Vec<f32> = (0..n * dv).map(|i| ((i * 3) % 7) as f32 - 3.0).collect();
        let (mut da, mut db, mut dvv) = (vec![0.0; n], vec![0.0; m], vec![0.0; m * dv]);
        concat_attention_backward(
            MatRef::new(&a, 0, n, 1, 1),
            &b,
            MatRef::new(&v, 0, m, dv, dv),
            MatRef::new(&dy, 0, n, dv, dv),
            (&mut da, &mut db, &mut dvv),
        );
        let mf = m as f64;
        for i in 0..n {
            let want: f64 = (0..m)
                .filter(|&j| a[i] + b[j] > 0.0)
                .map(|j| (0..dv).map(|c| dy[i * dv + c] as f64 * v[j * dv + c] as f64).sum::<f64>())
                .sum::<f64>()
                / mf;
            assert!((da[i] as f64 - want).abs() < 1e-5, "da[{i}]");
        }
        for j in 0..m {
            let active: Vec<usize> = (0..n).filter(|&i| a[i] + b[j] > 0.0).collect();
            let want_db: f64 = active
                .iter()
                .map(|&i| (0..dv).map(|c| dy[i * dv + c] as f64 * v[j * dv + c] as f64).sum::<f64>())
                .sum::<f64>()
                / mf;
            assert!((db[j] as f64 - want_db).abs() < 1e-5, "db[{j}]");
            for c in 0..dv {
                let want: f64 =
                    active.iter().map(|&i| (a[i] as f64 + b[j] as f64) * dy[i * dv + c] as f64).sum::<f64>() / mf;
                assert!((dvv[j * dv + c] as f64 - want).abs() < 1e-5, "dv[{j},{c}]");
            }
        }
    }
}
