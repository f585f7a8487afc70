//! GEMM on packed operands, written once over [`Simd`] and a register tile of MR rows × NV
//! vectors: `C ← A·B (+ C)` with B packed ahead of time ([`PackedB`]: weights are packed once
//! when the parameters are set) and A packed per block of rows.
//!
//! Loops, outer to inner: row blocks of C in parallel; depth blocks of [`DEPTH_BLOCK`] (A's
//! block packed, L2-resident); B's column panels (one panel, `DEPTH_BLOCK × NR`, L1-resident);
//! A's row panels; the register tile. Every element of C is one fused multiply-add chain per
//! depth block, the blocks added in order: the same bits whatever the row blocking, hence
//! whatever the thread count.

use rayon::prelude::*;

use super::microkernel::{edge_tile, pack_panels, pack_rows, tile};
use super::simd::{Job, Simd};
use super::views::{MatMut, MatRef};
use crate::workspace::Workspace;

/// Depth per block: a B panel of `DEPTH_BLOCK × 32` floats is 32 KiB, inside L1.
pub(crate) const DEPTH_BLOCK: usize = 256;
/// Rows of C per parallel block, at most (a block's packed A, `192 × 256` floats, is 192 KiB).
const MAX_ROW_BLOCK: usize = 192;

/// B (K × N) packed for a register tile NR wide: for each depth block, its column panels one
/// after the other, each `depth × NR` floats (zero past column N).
#[derive(Clone, Debug)]
pub(crate) struct PackedB {
    data: Vec<f32>,
    k: usize,
    n: usize,
    nr: usize,
}

impl PackedB {
    /// Packs `alpha · b` for tiles `nr` wide, depth blocks in parallel.
    pub(crate) fn new(b: MatRef<'_>, nr: usize, alpha: f32) -> PackedB {
        let (k, n) = (b.rows(), b.cols());
        let n_pad = n.next_multiple_of(nr);
        let mut data = vec![0.0f32; k * n_pad];
        data.par_chunks_mut(DEPTH_BLOCK * n_pad.max(1)).enumerate().for_each(|(i, block)| {
            let start = i * DEPTH_BLOCK;
            let depth = block.len() / n_pad;
            let rows = b.rows_range(start, start + depth);
            match rows.row(0).is_some() {
                // Rows of B are contiguous: copy NR-wide runs of each row into its panels.
                true => {
                    for p in 0..depth {
                        let row = rows.row(p).expect("contiguous rows");
                        for (jp, run) in row.chunks(nr).enumerate() {
                            let dst = &mut block[jp * depth * nr + p * nr..][..run.len()];
                            dst.iter_mut().zip(run).for_each(|(d, &v)| *d = alpha * v);
                        }
                    }
                }
                // Column panels of B are row panels of Bᵀ.
                false => {
                    pack_panels(rows.t(), nr, depth, block);
                    if alpha != 1.0 {
                        block.iter_mut().for_each(|v| *v *= alpha);
                    }
                }
            }
        });
        PackedB { data, k, n, nr }
    }
}

/// `C ← A·B` (`accumulate`: `C ← C + A·B`) with B packed, row blocks of C in parallel, each
/// packing its block of A into scratch from `ws`.
///
/// # Panics
/// If the shapes disagree or B was packed for another tile width.
pub(crate) fn gemm_packed<S: Simd, const MR: usize, const NV: usize>(
    s: S,
    a: MatRef<'_>,
    b: &PackedB,
    accumulate: bool,
    c: &mut MatMut<'_>,
    ws: &Workspace,
) {
    assert_eq!(b.nr, NV * S::LANES, "gemm_packed: B packed for another tile");
    assert_eq!((a.cols(), a.rows(), b.n), (b.k, c.rows(), c.cols()), "gemm_packed: shapes");
    let (m, n, ld) = (c.rows(), c.cols(), c.ld());
    if m == 0 || n == 0 {
        return;
    }
    if b.k == 0 {
        // An empty sum: C ← 0, or C unchanged.
        if !accumulate {
            c.data_mut().chunks_mut(ld).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    // Blocks of whole register panels, at most MAX_ROW_BLOCK rows, as many as a multiple of
    // the thread count and of near-equal height, so the threads finish together (784 rows on
    // 2 threads: 6 blocks of 132 rows, not 8 of 108 with a last one of 28). The blocking
    // changes no result.
    let threads = rayon::current_num_threads().max(1);
    let panels = m.div_ceil(MR);
    let blocks = threads * panels.div_ceil(threads * (MAX_ROW_BLOCK / MR));
    let block = panels.div_ceil(blocks) * MR;
    // Only the m rows of C: its buffer may run on past them.
    c.data_mut()[..(m - 1) * ld + n].par_chunks_mut(block * ld).enumerate().for_each(|(i, c_block)| {
        let start = i * block;
        let rows = block.min(m - start);
        let a = a.rows_range(start, start + rows);
        s.vectorize(GemmBlock::<MR, NV> { a, b, c: c_block, cols: n, ld, accumulate, ws });
    });
}

/// One block of rows of C: `a` (rows × K) times all of B into `c` (rows `ld` apart).
struct GemmBlock<'a, const MR: usize, const NV: usize> {
    a: MatRef<'a>,
    b: &'a PackedB,
    c: &'a mut [f32],
    cols: usize,
    ld: usize,
    accumulate: bool,
    ws: &'a Workspace,
}

impl<const MR: usize, const NV: usize> Job for GemmBlock<'_, MR, NV> {
    type Out = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let GemmBlock { a, b, c, cols, ld, accumulate, ws } = self;
        let nr = NV * S::LANES;
        let (rows, k) = (a.rows(), a.cols());
        let (a_panels, b_panels) = (rows.div_ceil(MR), cols.div_ceil(nr));
        let n_pad = b_panels * nr;
        // Each depth block's part is written by the packing before the tiles read it.
        let mut a_packed = ws.scratch(a_panels * DEPTH_BLOCK.min(k) * MR);
        let mut start = 0;
        while start < k {
            let depth = DEPTH_BLOCK.min(k - start);
            let a_block = &mut a_packed[..a_panels * depth * MR];
            pack_rows::<MR>(a.cols_range(start, start + depth), depth, a_block);
            let add = accumulate || start > 0;
            for jp in 0..b_panels {
                let b_panel = &b.data[start * n_pad + jp * depth * nr..][..depth * nr];
                let tile_cols = nr.min(cols - jp * nr);
                for ip in 0..a_panels {
                    let a_panel = &a_block[ip * depth * MR..][..depth * MR];
                    let tile_rows = MR.min(rows - ip * MR);
                    let c_tile = &mut c[ip * MR * ld + jp * nr..][..(tile_rows - 1) * ld + tile_cols];
                    let (ap, bp, cp) = (a_panel.as_ptr(), b_panel.as_ptr(), c_tile.as_mut_ptr());
                    // SAFETY: `a_panel` holds depth groups of MR, `b_panel` depth groups of nr,
                    // and `c_tile` `tile_rows` rows of `tile_cols` floats `ld` apart: all of a
                    // full tile when both are whole.
                    unsafe {
                        if tile_rows == MR && tile_cols == nr {
                            tile::<S, MR, NV>(s, depth, ap, bp, cp, ld, add);
                        } else {
                            edge_tile::<S, MR, NV>(s, depth, ap, bp, cp, ld, add, (tile_rows, tile_cols));
                        }
                    }
                }
            }
            start += depth;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::Portable;
    use crate::kernels::views::naive_product as naive;

    /// Runs `gemm_packed` with every instruction set this CPU has and the portable twins of
    /// their geometries; returns the outputs, each with the padding around C.
    fn all_paths(
        a: MatRef<'_>,
        b: MatRef<'_>,
        c0: &[f32],
        ld: usize,
        accumulate: bool,
    ) -> Vec<(&'static str, Vec<f32>)> {
        let (m, n) = (a.rows(), b.cols());
        let run = |name: &'static str, f: &dyn Fn(&mut MatMut<'_>)| {
            let mut c = c0.to_vec();
            f(&mut MatMut::new(&mut c, m, n, ld));
            (name, c)
        };
        let mut out = vec![
            run("portable16", &|c| {
                gemm_packed::<_, 12, 2>(
                    Portable::<16>,
                    a,
                    &PackedB::new(b, 32, 1.0),
                    accumulate,
                    c,
                    &Workspace::default(),
                )
            }),
            run("portable8", &|c| {
                gemm_packed::<_, 6, 2>(
                    Portable::<8>,
                    a,
                    &PackedB::new(b, 16, 1.0),
                    accumulate,
                    c,
                    &Workspace::default(),
                )
            }),
        ];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::kernels::simd::{Avx2, Avx512};
            if let Some(s) = Avx512::detect() {
                out.push(run("avx512", &|c| {
                    gemm_packed::<_, 12, 2>(s, a, &PackedB::new(b, 32, 1.0), accumulate, c, &Workspace::default())
                }));
            }
            if let Some(s) = Avx2::detect() {
                out.push(run("avx2", &|c| {
                    gemm_packed::<_, 6, 2>(s, a, &PackedB::new(b, 16, 1.0), accumulate, c, &Workspace::default())
                }));
            }
        }
        out
    }

    #[test]
    fn every_path_matches_naive_on_awkward_sizes_and_strides() {
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (13, 1, 33), (17, 300, 2), (70, 40, 90), (300, 513, 50), (25, 257, 65)]
        {
            // Integer-valued entries make the sums exact. A row-major, and A stored transposed
            // (contiguous columns, as the backward pass's Xᵀ); B stored transposed.
            let a_rows: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let a_cols: Vec<f32> = (0..m * k).map(|i| a_rows[(i % m) * k + i / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
            let b = MatRef::new(&bt, 0, n, k, k).t();
            for a in [MatRef::new(&a_rows, 0, m, k, k), MatRef::new(&a_cols, 0, k, m, m).t()] {
                let want = naive(a, b);
                let ld = n + 3;
                for accumulate in [false, true] {
                    // NaN pre-fill proves overwriting writes everything; padding proves nothing past
                    // each row is touched; with accumulate, C starts at 1.
                    let c0: Vec<f32> = (0..m * ld)
                        .map(|i| {
                            if i % ld >= n {
                                f32::NAN
                            } else if accumulate {
                                1.0
                            } else {
                                f32::NAN
                            }
                        })
                        .collect();
                    let paths = all_paths(a, b, &c0, ld, accumulate);
                    for (name, c) in &paths {
                        for i in 0..m {
                            for j in 0..ld {
                                let got = c[i * ld + j];
                                if j < n {
                                    let w = want[i * n + j] + if accumulate { 1.0 } else { 0.0 };
                                    assert_eq!(got as f64, w, "{name} ({m},{k},{n}) at ({i},{j})");
                                } else {
                                    assert!(got.is_nan(), "{name}: padding written at ({i},{j})");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn real_paths_equal_their_portable_twin_bit_for_bit_for_any_thread_count() {
        let (m, k, n) = (301, 600, 77);
        let a: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.618).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i as f32) * 0.377).cos()).collect();
        let (a, b) = (MatRef::new(&a, 0, m, k, k), MatRef::new(&b, 0, k, n, n));
        let c0 = vec![0.5f32; m * n];
        let runs: Vec<_> = [1, 2, 3]
            .iter()
            .map(|&t| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().expect("pool");
                pool.install(|| all_paths(a, b, &c0, n, true))
            })
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for run in &runs[1..] {
            for ((name, c), (_, c1)) in run.iter().zip(&runs[0]) {
                assert_eq!(bits(c), bits(c1), "{name}: depends on the thread count");
            }
        }
        let find = |name: &str| runs[0].iter().find(|(n, _)| *n == name).map(|(_, c)| bits(c));
        for (real, twin) in [("avx512", "portable16"), ("avx2", "portable8")] {
            if let Some(got) = find(real) {
                assert_eq!(Some(got), find(twin), "{real} differs from {twin}");
            }
        }
        let want = naive(a, b);
        for (name, c) in &runs[0] {
            for (g, w) in c.iter().zip(&want) {
                assert!((*g as f64 - (w + 0.5)).abs() < 1e-3, "{name}: {g} vs {}", w + 0.5);
            }
        }
    }
}
