//! Max-pooling over (T, H, W) of channels-last features, kernel = stride, floor on sizes that
//! do not divide (PyTorch's `MaxPool3d(kernel, stride=kernel)`).

use rayon::prelude::*;

use super::views::MatRef;

/// The pooled grid: `floor(size / kernel)` per axis.
pub fn pooled_grid(grid: [usize; 3], kernel: [usize; 3]) -> [usize; 3] {
    [grid[0] / kernel[0], grid[1] / kernel[1], grid[2] / kernel[2]]
}

/// Max-pools `src` (N × c, rows in (t, h, w) row-major order over `grid`) into `out`
/// (M × c row-major, M = product of the pooled grid). Within a window the first maximum wins;
/// a NaN anywhere in a window makes that output NaN, as in PyTorch.
pub fn max_pool(src: MatRef<'_>, grid: [usize; 3], kernel: [usize; 3], out: &mut [f32]) {
    let c = src.cols();
    let [pt, ph, pw] = pooled_grid(grid, kernel);
    assert_eq!(src.rows(), grid.iter().product::<usize>());
    assert_eq!(out.len(), pt * ph * pw * c);
    if c == 0 {
        return;
    }
    out.par_chunks_mut(c * pw.max(1)).enumerate().for_each(|(row, dst_row)| {
        let (to, ho) = (row / ph.max(1), row % ph.max(1));
        let mut scratch = Vec::new();
        for (wo, dst) in dst_row.chunks_mut(c).enumerate() {
            for (k, n) in window(grid, kernel, [to, ho, wo]).enumerate() {
                let values = src.row_or_copy(n, &mut scratch);
                if k == 0 {
                    dst.copy_from_slice(values);
                } else {
                    for (d, &v) in dst.iter_mut().zip(values) {
                        *d = if v > *d || v.is_nan() { v } else { *d };
                    }
                }
            }
        }
    });
}

/// The source rows (indices into the grid's (t, h, w) row-major positions) of the pooling
/// window of pooled position `[to, ho, wo]`, in (t, h, w) order.
fn window(grid: [usize; 3], kernel: [usize; 3], [to, ho, wo]: [usize; 3]) -> impl Iterator<Item = usize> {
    let ([_, h, w], [kt, kh, kw]) = (grid, kernel);
    (0..kt).flat_map(move |dt| {
        (0..kh).flat_map(move |dh| (0..kw).map(move |dw| ((to * kt + dt) * h + ho * kh + dh) * w + wo * kw + dw))
    })
}

/// For each pooled position and channel, the index (into `src`'s rows) of the maximum that
/// [`max_pool`] picked: the first maximum in (t, h, w) order, or the first NaN.
pub fn max_pool_argmax(src: MatRef<'_>, grid: [usize; 3], kernel: [usize; 3]) -> Vec<u32> {
    let c = src.cols();
    let [pt, ph, pw] = pooled_grid(grid, kernel);
    let mut arg = vec![0u32; pt * ph * pw * c];
    if c == 0 {
        return arg;
    }
    // Pooled rows in parallel blocks, each block's running maxima in one buffer; the
    // comparison is branch-free so that it vectorises.
    let block = 16;
    arg.par_chunks_mut(block * c).enumerate().for_each(|(b, arg_rows)| {
        let mut best = vec![0.0f32; c];
        let mut copy = Vec::new();
        for (r, arg_row) in arg_rows.chunks_mut(c).enumerate() {
            let m = b * block + r;
            let (to, rest) = (m / (ph * pw), m % (ph * pw));
            for (k, n) in window(grid, kernel, [to, rest / pw, rest % pw]).enumerate() {
                let values = src.row_or_copy(n, &mut copy);
                if k == 0 {
                    best.copy_from_slice(values);
                    arg_row.fill(n as u32);
                    continue;
                }
                for ((b, a), &v) in best.iter_mut().zip(arg_row.iter_mut()).zip(values) {
                    // The first maximum, or the first NaN (which then stays).
                    let take = !b.is_nan() & ((v > *b) | v.is_nan());
                    *b = if take { v } else { *b };
                    *a = if take { n as u32 } else { *a };
                }
            }
        }
    });
    arg
}

/// The backward of [`max_pool`]: adds each pooled gradient (M × c) to the source row that won
/// its window (`argmax` from [`max_pool_argmax`]), in `out` (N × c with row stride `ld`,
/// columns starting at `col`). Windows do not overlap, so no two gradients meet.
pub fn max_unpool_add(grad: &[f32], argmax: &[u32], c: usize, out: &mut [f32], ld: usize, col: usize) {
    assert_eq!(grad.len(), argmax.len());
    for (g_row, a_row) in grad.chunks(c.max(1)).zip(argmax.chunks(c.max(1))) {
        for (ch, (&g, &n)) in g_row.iter().zip(a_row).enumerate() {
            out[n as usize * ld + col + ch] += g;
        }
    }
}

/// [`max_unpool_add`] into the transpose: `out` is c × N row-major (channels-first), the
/// gradient of source row `n`, channel `ch` adds to `out[ch·N + n]`.
pub fn max_unpool_add_transposed(grad: &[f32], argmax: &[u32], c: usize, out: &mut [f32], n: usize) {
    assert_eq!(grad.len(), argmax.len());
    for (g_row, a_row) in grad.chunks(c.max(1)).zip(argmax.chunks(c.max(1))) {
        for (ch, (&g, &row)) in g_row.iter().zip(a_row).enumerate() {
            out[ch * n + row as usize] += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_with_floor_and_strided_source() {
        // grid (2, 3, 5), kernel (1, 2, 2): pooled (2, 1, 2); the last row and column drop.
        let grid = [2, 3, 5];
        let n: usize = grid.iter().product();
        let c = 3;
        // Stored with 2 padding columns to make the source rows strided.
        let ld = c + 2;
        let data: Vec<f32> = (0..n * ld).map(|i| ((i * 37) % 101) as f32).collect();
        let src = MatRef::new(&data, 1, n, c, ld);
        let mut out = vec![f32::NAN; 2 * 2 * c];
        max_pool(src, grid, [1, 2, 2], &mut out);
        for t in 0..2 {
            for wo in 0..2 {
                for ch in 0..c {
                    let mut want = f32::NEG_INFINITY;
                    for hh in 0..2 {
                        for ww in 0..2 {
                            want = want.max(src.at((t * 3 + hh) * 5 + wo * 2 + ww, ch));
                        }
                    }
                    assert_eq!(out[(t * 2 + wo) * c + ch], want);
                }
            }
        }
        let arg = max_pool_argmax(src, grid, [1, 2, 2]);
        for (i, &a) in arg.iter().enumerate() {
            assert_eq!(src.at(a as usize, i % c), out[i]);
        }
    }

    #[test]
    fn nan_propagates_and_ties_take_the_first() {
        let data = [1.0, f32::NAN, 2.0, 2.0, 5.0, 5.0, 0.0, 1.0];
        let src = MatRef::new(&data, 0, 4, 2, 2);
        let mut out = vec![0.0; 4];
        // grid (1, 1, 4), kernel (1, 1, 2): windows {0, 1} and {2, 3}.
        max_pool(src, [1, 1, 4], [1, 1, 2], &mut out);
        assert_eq!(out[0], 2.0);
        assert!(out[1].is_nan());
        assert_eq!(&out[2..], &[5.0, 5.0]);
        let arg = max_pool_argmax(src, [1, 1, 4], [1, 1, 2]);
        assert_eq!(arg, vec![1, 0, 2, 2]);
        // Gradients go back to the winners, into a wider matrix at column 1.
        let mut back = vec![0.0f32; 4 * 3];
        max_unpool_add(&[1.0, 2.0, 3.0, 4.0], &arg, 2, &mut back, 3, 1);
        assert_eq!(back, vec![0.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0]);
        // The same into the transpose (2 channels × 4 rows).
        let mut back_t = vec![0.0f32; 2 * 4];
        max_unpool_add_transposed(&[1.0, 2.0, 3.0, 4.0], &arg, 2, &mut back_t, 4);
        assert_eq!(back_t, vec![0.0, 1.0, 3.0, 0.0, 2.0, 0.0, 4.0, 0.0]);
    }
}
