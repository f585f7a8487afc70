//! GEMM on packed operands, written once over [`Simd`](super::simd::Simd), a register tile of MR rows × NV
//! vectors and its element type ([`Elem`]: f32, or bf16 pairs): `C ← A·B (+ C)` with B packed
//! ahead of time ([`PackedB`]: weights are packed once when the parameters are set) and A packed
//! per block of rows (bf16: rounded as it is packed).
//!
//! Loops, outer to inner: row blocks of C in parallel; depth blocks of [`GROUP_BLOCK`] packed
//! groups (A's block packed); column blocks of [`COLUMN_BLOCK`] columns (that depth block's
//! slab of B, L2-resident); A's row panels (one panel, `MR × GROUP_BLOCK` words, L1-resident);
//! the slab's column panels, streamed from L2; the register tile. Every element of C is one
//! chain of the tile's fused operations per depth block, the blocks added in order: the same
//! bits whatever the row or column blocking, hence whatever the thread count.

use rayon::prelude::*;

use super::microkernel::{edge_tile, min_exponent, pack_pair_panels, pack_panels, tile, Elem, Word};
use super::simd::Bf16Simd;
use super::simd::Job;
use super::views::{MatMut, MatRef, Start};
use crate::workspace::Workspace;

/// Packed depth groups per block (512 f32 depth steps, or 512 bf16 pairs): an A panel of
/// `12 × GROUP_BLOCK` words is 24 KiB, inside L1 with room to stream B's panels through.
/// Deep blocks halve the passes over C against 256 (each tile loads and stores C once per
/// block): with them and A's panel resident instead of B's, the GEMM ran 1.1–1.2× faster on an
/// AVX-512 Xeon (2048³ and the block's projections), where a 32 KiB B panel held in L1 beside
/// A's stream was evicted often.
pub(crate) const GROUP_BLOCK: usize = 512;
/// Columns of C per column block with 16-lane vectors: a depth block's slab of B,
/// `GROUP_BLOCK × 256` words, is 512 KiB, held in L2 (1 MiB or more on the AVX-512 CPUs) while
/// every A panel of the row block passes over it. With 8 lanes (AVX2 CPUs, many with 256–512
/// KiB of L2) half as many: a 256 KiB slab. The column blocking changes no sum.
const COLUMN_BLOCK: usize = 256;
/// Rows of C per parallel block, at most (a block's packed A, `192 × 512` words, is 384 KiB,
/// of which one panel at a time is read from L1).
const MAX_ROW_BLOCK: usize = 192;

/// B (K × N) packed for a register tile NR wide, in words `W` (f32, or u32 pairs of bf16): for
/// each depth block, its column panels one after the other, each `groups × NR` words (zero
/// past column N and past depth K).
#[derive(Clone, Debug)]
pub(crate) struct PackedB<W: Word = f32> {
    data: Vec<W>,
    k: usize,
    n: usize,
    nr: usize,
    /// bf16: the least exponent of the packed values ([`min_exponent`]), for the emulations'
    /// certificate.
    exponent_floor: Option<i32>,
}

impl PackedB<f32> {
    /// Packs `alpha · b` for tiles `nr` wide, depth blocks in parallel.
    pub(crate) fn new(b: MatRef<'_>, nr: usize, alpha: f32) -> PackedB {
        let (k, n) = (b.rows(), b.cols());
        Self::pack_into(b, nr, alpha, vec![0.0f32; k * n.next_multiple_of(nr)])
    }

    /// [`PackedB::new`] into a buffer of `ws` (give it back with [`PackedB::into_data`]): for
    /// an operand packed once per product, which fresh pages would cost as much as packing.
    pub(crate) fn new_in(b: MatRef<'_>, nr: usize, alpha: f32, ws: &Workspace) -> PackedB {
        let (k, n) = (b.rows(), b.cols());
        Self::pack_into(b, nr, alpha, ws.scratch(k * n.next_multiple_of(nr)).into_vec())
    }

    /// Packs into `data` (k × n_pad floats, any contents: every word is written).
    fn pack_into(b: MatRef<'_>, nr: usize, alpha: f32, mut data: Vec<f32>) -> PackedB {
        let (k, n) = (b.rows(), b.cols());
        let n_pad = n.next_multiple_of(nr);
        debug_assert_eq!(data.len(), k * n_pad);
        data.par_chunks_mut(GROUP_BLOCK * n_pad.max(1)).enumerate().for_each(|(i, block)| {
            let start = i * GROUP_BLOCK;
            let depth = block.len() / n_pad;
            let rows = b.rows_range(start, start + depth);
            match rows.row(0).is_some() {
                // Rows of B are contiguous: copy NR-wide runs of each row into its panels.
                true => {
                    for p in 0..depth {
                        let row = rows.row(p).expect("contiguous rows");
                        for (jp, run) in row.chunks(nr).enumerate() {
                            let dst = &mut block[jp * depth * nr + p * nr..][..nr];
                            dst.iter_mut().zip(run).for_each(|(d, &v)| *d = alpha * v);
                            dst[run.len()..].fill(0.0);
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
        PackedB { data, k, n, nr, exponent_floor: None }
    }
}

impl<W: Word> PackedB<W> {
    /// The packed words, to give back to the workspace they came from.
    pub(crate) fn into_data(self) -> Vec<W> {
        self.data
    }
}

impl PackedB<u32> {
    /// Packs `b` rounded to bf16 into pair words for tiles `nr` wide (pairs along the depth),
    /// depth blocks in parallel.
    pub(crate) fn bf16(b: MatRef<'_>, nr: usize) -> PackedB<u32> {
        let (k, n) = (b.rows(), b.cols());
        let n_pad = n.next_multiple_of(nr);
        let mut data = vec![0u32; k.div_ceil(2) * n_pad];
        data.par_chunks_mut(GROUP_BLOCK * n_pad.max(1)).enumerate().for_each(|(i, block)| {
            let start = 2 * i * GROUP_BLOCK;
            let groups = block.len() / n_pad;
            let depth = (2 * groups).min(k - start);
            // Column panels of B are row panels of Bᵀ.
            pack_pair_panels(b.rows_range(start, start + depth).t(), nr, groups, block);
        });
        let exponent_floor = min_exponent(&data);
        PackedB { data, k, n, nr, exponent_floor }
    }
}

impl<W: Word> PackedB<W> {
    /// The tile width the panels are packed for.
    pub(crate) fn nr(&self) -> usize {
        self.nr
    }
}

/// `C ← A·B` (`accumulate`: `C ← C + A·B`) with B packed, row blocks of C in parallel, each
/// packing its block of A into scratch from `ws`. With bf16 elements ([`PackedB::bf16`]) A
/// is rounded to bf16 as it is packed, and each element of C is accumulated in f32.
///
/// # Panics
/// If the shapes disagree or B was packed for another tile width.
pub(crate) fn gemm_packed<S: Bf16Simd, E: Elem, const MR: usize, const NV: usize>(
    s: S,
    a: MatRef<'_>,
    b: &PackedB<E::Packed>,
    start: Start<'_>,
    c: &mut MatMut<'_>,
    ws: &Workspace,
) {
    assert_eq!(b.nr, NV * S::LANES, "gemm_packed: B packed for another tile");
    assert!(start.in_place(), "gemm_packed: a residual start with strided rows");
    assert_eq!((a.cols(), a.rows(), b.n), (b.k, c.rows(), c.cols()), "gemm_packed: shapes");
    let (m, n, ld) = (c.rows(), c.cols(), c.ld());
    if m == 0 || n == 0 {
        return;
    }
    if b.k == 0 {
        // An empty sum: C ← start.
        if !matches!(start, Start::C) {
            for (i, row) in c.data_mut().chunks_mut(ld).take(m).enumerate() {
                row[..n].fill(0.0);
                start.add_under(i, 0..n, &mut row[..n]);
            }
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
        let first = i * block;
        let rows = block.min(m - first);
        let (a, start) = (a.rows_range(first, first + rows), start.rows(first, first + rows));
        s.vectorize(GemmBlock::<E, MR, NV> { a, b, c: c_block, cols: n, ld, start, ws });
    });
}

/// One block of rows of C: `a` (rows × K) times all of B into `c` (rows `ld` apart).
struct GemmBlock<'a, E: Elem, const MR: usize, const NV: usize> {
    a: MatRef<'a>,
    b: &'a PackedB<E::Packed>,
    c: &'a mut [f32],
    cols: usize,
    ld: usize,
    /// What the block's rows of C start from (rows in place).
    start: Start<'a>,
    ws: &'a Workspace,
}

impl<E: Elem, const MR: usize, const NV: usize> Job for GemmBlock<'_, E, MR, NV> {
    type Out = ();

    #[inline(always)]
    fn run<S: Bf16Simd>(self, s: S) {
        let GemmBlock { a, b, c, cols, ld, start: from, ws } = self;
        let nr = NV * S::LANES;
        let (rows, k) = (a.rows(), a.cols());
        let (a_panels, b_panels) = (rows.div_ceil(MR), cols.div_ceil(nr));
        let n_pad = b_panels * nr;
        let block_depth = GROUP_BLOCK * E::DEPTH;
        // Each depth block's part is written by the packing before the tiles read it.
        let mut a_scratch = ws.scratch(a_panels * GROUP_BLOCK.min(k.div_ceil(E::DEPTH)) * MR);
        let a_packed = E::Packed::of_mut(&mut a_scratch);
        let mut start = 0;
        while start < k {
            // The first depth block begins from zero or C; a bias or residual start is added
            // under each of its tiles right after (while the tile is in L1).
            let under = (start == 0).then_some(from).filter(|f| !matches!(f, Start::Zero | Start::C));
            let depth = block_depth.min(k - start);
            let groups = depth.div_ceil(E::DEPTH);
            let a_block = &mut a_packed[..a_panels * groups * MR];
            E::pack_rows::<MR>(a.cols_range(start, start + depth), groups, a_block);
            let checked = E::checked::<S>(E::exponent_floor::<S>(a_block), b.exponent_floor);
            let add = start > 0 || matches!(from, Start::C);
            let block_panels = (COLUMN_BLOCK * S::LANES / 16 / nr).max(1);
            for first in (0..b_panels).step_by(block_panels) {
                for ip in 0..a_panels {
                    let a_panel = &a_block[ip * groups * MR..][..groups * MR];
                    let tile_rows = MR.min(rows - ip * MR);
                    for jp in first..b_panels.min(first + block_panels) {
                        let b_panel = &b.data[(start / E::DEPTH) * n_pad + jp * groups * nr..][..groups * nr];
                        let tile_cols = nr.min(cols - jp * nr);
                        let c_tile = &mut c[ip * MR * ld + jp * nr..][..(tile_rows - 1) * ld + tile_cols];
                        let (ap, bp, cp) = (a_panel.as_ptr(), b_panel.as_ptr(), c_tile.as_mut_ptr());
                        let corner = (tile_rows, tile_cols);
                        // SAFETY: `a_panel` holds groups runs of MR, `b_panel` groups runs of
                        // nr, and `c_tile` `tile_rows` rows of `tile_cols` floats `ld` apart: all
                        // of a full tile when both are whole.
                        unsafe {
                            match (tile_rows == MR && tile_cols == nr, checked) {
                                (true, false) => tile::<S, E, MR, NV>(s, groups, ap, bp, cp, ld, add),
                                (false, false) => edge_tile::<S, E, MR, NV>(s, groups, ap, bp, cp, ld, add, corner),
                                (true, true) => tile::<S, E::Checked, MR, NV>(s, groups, ap, bp, cp, ld, add),
                                (false, true) => {
                                    edge_tile::<S, E::Checked, MR, NV>(s, groups, ap, bp, cp, ld, add, corner)
                                }
                            }
                        }
                        if let Some(from) = under {
                            let cols = jp * nr..jp * nr + tile_cols;
                            for (r, row) in c_tile.chunks_mut(ld).enumerate() {
                                from.add_under(ip * MR + r, cols.clone(), &mut row[..tile_cols]);
                            }
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
    use crate::kernels::microkernel::F32;
    use crate::kernels::simd::Portable;
    use crate::kernels::views::naive_product as naive;

    /// Runs `gemm_packed` with every instruction set this CPU has and the portable twins of
    /// their geometries; returns the outputs, each with the padding around C.
    fn all_paths(
        a: MatRef<'_>,
        b: MatRef<'_>,
        c0: &[f32],
        ld: usize,
        start: Start<'_>,
    ) -> Vec<(&'static str, Vec<f32>)> {
        let (m, n) = (a.rows(), b.cols());
        let run = |name: &'static str, f: &dyn Fn(&mut MatMut<'_>)| {
            let mut c = c0.to_vec();
            f(&mut MatMut::new(&mut c, m, n, ld));
            (name, c)
        };
        let mut out = vec![
            run("portable16", &|c| {
                gemm_packed::<_, F32, 12, 2>(
                    Portable::<16>,
                    a,
                    &PackedB::new(b, 32, 1.0),
                    start,
                    c,
                    &Workspace::default(),
                )
            }),
            run("portable8", &|c| {
                gemm_packed::<_, F32, 6, 2>(
                    Portable::<8>,
                    a,
                    &PackedB::new(b, 16, 1.0),
                    start,
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
                    gemm_packed::<_, F32, 12, 2>(s, a, &PackedB::new(b, 32, 1.0), start, c, &Workspace::default())
                }));
            }
            if let Some(s) = Avx2::detect() {
                out.push(run("avx2", &|c| {
                    gemm_packed::<_, F32, 6, 2>(s, a, &PackedB::new(b, 16, 1.0), start, c, &Workspace::default())
                }));
            }
        }
        out
    }

    #[test]
    fn every_path_matches_naive_on_awkward_sizes_and_strides() {
        for (m, k, n) in [
            (1, 1, 1),
            (3, 5, 7),
            (13, 1, 33),
            (17, 300, 2),
            (70, 40, 90),
            (300, 513, 50),
            (25, 257, 65),
            (29, 1030, 290),
        ] {
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
                    let paths = all_paths(a, b, &c0, ld, Start::beta(accumulate as u8 as f32));
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
        let (m, k, n) = (301, 600, 300);
        let a: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.618).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i as f32) * 0.377).cos()).collect();
        let (a, b) = (MatRef::new(&a, 0, m, k, k), MatRef::new(&b, 0, k, n, n));
        let c0 = vec![0.5f32; m * n];
        // C's start: C itself (0.5), or a bias row (0.5: the same bits as C holding it) and a
        // residual added under the first depth block's tiles.
        let x: Vec<f32> = (0..m * n).map(|i| 0.25 + (i % 7) as f32 / 64.0).collect();
        let bias: Vec<f32> = (0..n).map(|j| 0.25 - (j % 7) as f32 / 64.0).collect();
        let bias_only: Vec<f32> = vec![0.5f32; n];
        let starts = [
            ("C", Start::C),
            ("bias", Start::Bias(&bias_only)),
            ("residual", Start::Residual(MatRef::new(&x, 0, m, n, n), &bias)),
        ];
        let want = naive(a, b);
        let mut from_c = Vec::new();
        for (what, start) in starts {
            let runs: Vec<_> = [1, 2, 3]
                .iter()
                .map(|&t| {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().expect("pool");
                    pool.install(|| all_paths(a, b, &c0, n, start))
                })
                .collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for run in &runs[1..] {
                for ((name, c), (_, c1)) in run.iter().zip(&runs[0]) {
                    assert_eq!(bits(c), bits(c1), "{name} from {what}: depends on the thread count");
                }
            }
            let find = |name: &str| runs[0].iter().find(|(n, _)| *n == name).map(|(_, c)| bits(c));
            for (real, twin) in [("avx512", "portable16"), ("avx2", "portable8")] {
                if let Some(got) = find(real) {
                    assert_eq!(Some(got), find(twin), "{real} from {what} differs from {twin}");
                }
            }
            for (name, c) in &runs[0] {
                for (i, (g, w)) in c.iter().zip(&want).enumerate() {
                    let under = match start {
                        Start::Residual(x, bias) => (x.at(i / n, i % n) + bias[i % n]) as f64,
                        _ => 0.5,
                    };
                    assert!((*g as f64 - (w + under)).abs() < 1e-3, "{name} from {what}: {g} vs {}", w + under);
                }
            }
            match what {
                "C" => from_c = runs[0].clone(),
                "bias" => assert_eq!(runs[0], from_c, "a bias row of 0.5 and C holding 0.5: the same bits"),
                _ => {}
            }
        }
    }

    /// How the bf16 tests' values are drawn.
    #[derive(Clone, Copy, Debug)]
    enum Values {
        /// Uniform in (−1, 1).
        Moderate,
        /// Magnitudes 2^-75..2^-55: products near and below 2^-126, where the emulations must
        /// flush as the instruction does (and cannot be certified).
        Tiny,
        /// Mostly moderate, with ∞, NaN, zeros, huge and subnormal values.
        Specials,
    }

    fn values(len: usize, kind: Values, seed: u64) -> Vec<f32> {
        use crate::kernels::bf16::lanes::Rng;
        let mut rng = Rng::new(seed);
        let moderate = |rng: &mut Rng| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0;
        (0..len)
            .map(|_| match kind {
                Values::Moderate => moderate(&mut rng),
                Values::Tiny => {
                    let e = rng.range(-75, -55);
                    rng.f32_with_exponent(e)
                }
                Values::Specials => match rng.below(40) {
                    0 => f32::INFINITY,
                    1 => f32::NEG_INFINITY,
                    2 => f32::from_bits(0x7FC1_2345),
                    3 => 0.0,
                    4 => -0.0,
                    5 => 3.0e38,
                    6 => f32::from_bits(0x0012_3456),
                    _ => moderate(&mut rng),
                },
            })
            .collect()
    }

    /// `gemm_packed` with bf16 pairs on every instruction set this CPU has and on portable
    /// vectors of both geometries (12×32, 4×16), each output with the padding around C.
    fn bf16_paths(
        a: MatRef<'_>,
        b: MatRef<'_>,
        c0: &[f32],
        ld: usize,
        start: Start<'_>,
    ) -> Vec<(&'static str, Vec<f32>)> {
        use crate::kernels::microkernel::Bf16;
        let (m, n) = (a.rows(), b.cols());
        let ws = Workspace::default();
        let (b32, b16) = (PackedB::bf16(b, 32), PackedB::bf16(b, 16));
        let run = |name: &'static str, f: &dyn Fn(&mut MatMut<'_>)| {
            let mut c = c0.to_vec();
            f(&mut MatMut::new(&mut c, m, n, ld));
            (name, c)
        };
        let mut out = vec![
            run("portable16", &|c| gemm_packed::<_, Bf16, 12, 2>(Portable::<16>, a, &b32, start, c, &ws)),
            run("portable8", &|c| gemm_packed::<_, Bf16, 4, 2>(Portable::<8>, a, &b16, start, c, &ws)),
        ];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::kernels::simd::{Avx2, Avx512, Avx512Bf16};
            if let Some(s) = Avx512Bf16::detect() {
                out.push(run("avx512bf16", &|c| gemm_packed::<_, Bf16, 12, 2>(s, a, &b32, start, c, &ws)));
            }
            if let Some(s) = Avx512::detect() {
                out.push(run("avx512 emulation", &|c| gemm_packed::<_, Bf16, 12, 2>(s, a, &b32, start, c, &ws)));
            }
            if let Some(s) = Avx2::detect() {
                out.push(run("avx2 emulation", &|c| gemm_packed::<_, Bf16, 4, 2>(s, a, &b16, start, c, &ws)));
            }
        }
        out
    }

    /// Equal bits, or (`nan_payloads` false) both NaN.
    fn assert_same(got: &[f32], want: &[f32], nan_payloads: bool, what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let same = g.to_bits() == w.to_bits() || (!nan_payloads && g.is_nan() && w.is_nan());
            assert!(same, "{what} at {i}: {g:e} ({:08X}) vs {w:e} ({:08X})", g.to_bits(), w.to_bits());
        }
    }

    #[test]
    fn bf16_paths_give_the_instructions_bits_on_odd_depths_edges_and_extreme_values() {
        // Every element is one chain of pair steps over the depth in block order, whatever the
        // tile geometry: every path must give the portable model's bits (NaN payloads aside on
        // the emulations). Depths: odd, one, several blocks of 512.
        for (shape, kind) in [
            ((29, 17, 71), Values::Moderate),
            ((13, 1, 33), Values::Moderate),
            ((30, 1100, 40), Values::Moderate),
            ((25, 129, 37), Values::Tiny),
            ((25, 64, 37), Values::Specials),
        ] {
            let (m, k, n) = shape;
            let a = values(m * k, kind, 1 + k as u64);
            let b = values(k * n, kind, 2 + k as u64);
            let (a, b) = (MatRef::new(&a, 0, m, k, k), MatRef::new(&b, 0, k, n, n));
            let ld = n + 2;
            for accumulate in [false, true] {
                let c0: Vec<f32> =
                    (0..m * ld).map(|i| if i % ld >= n { f32::NAN } else { (i % 7) as f32 - 3.0 }).collect();
                let paths = bf16_paths(a, b, &c0, ld, Start::beta(accumulate as u8 as f32));
                let want = &paths[0].1;
                for (name, c) in &paths {
                    let exact_nans = !name.contains("emulation");
                    assert_same(c, want, exact_nans, &format!("{name} {shape:?} {kind:?} accumulate {accumulate}"));
                    for i in 0..m {
                        assert!(c[i * ld + n..(i + 1) * ld].iter().all(|v| v.is_nan()), "{name}: padding written");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_product_is_the_f64_product_of_the_rounded_operands() {
        use crate::kernels::bf16::round_to_bf16;
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (17, 300, 2), (70, 41, 90), (25, 1031, 65), (14, 1100, 270)] {
            let a = values(m * k, Values::Moderate, 3);
            let bt = values(n * k, Values::Moderate, 4);
            // A row-major and transposed; B stored transposed (as the layers' weights).
            let a_cols: Vec<f32> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect();
            let b = MatRef::new(&bt, 0, n, k, k).t();
            for a in [MatRef::new(&a, 0, m, k, k), MatRef::new(&a_cols, 0, k, m, m).t()] {
                let c0 = vec![f32::NAN; m * n];
                for (name, c) in bf16_paths(a, b, &c0, n, Start::Zero) {
                    for i in 0..m {
                        for j in 0..n {
                            let r = |x: f32| round_to_bf16(x) as f64;
                            let (exact, magnitude) = (0..k).fold((0.0f64, 0.0f64), |(s, t), d| {
                                let p = r(a.at(i, d)) * r(b.at(d, j));
                                (s + p, t + p.abs())
                            });
                            let bound = k as f64 * f32::EPSILON as f64 * magnitude + 1e-30;
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - exact).abs() <= bound,
                                "{name} ({m},{k},{n}) at ({i},{j}): {got} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_products_do_not_depend_on_the_thread_count_and_tiny_ones_do_flush() {
        let (m, k, n) = (301, 600, 77);
        let a = values(m * k, Values::Moderate, 5);
        let b = values(k * n, Values::Moderate, 6);
        let (a, b) = (MatRef::new(&a, 0, m, k, k), MatRef::new(&b, 0, k, n, n));
        let c0 = vec![0.5f32; m * n];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let runs: Vec<Vec<(&str, Vec<f32>)>> = [1, 2, 3]
            .iter()
            .map(|&t| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().expect("pool");
                pool.install(|| bf16_paths(a, b, &c0, n, Start::C))
            })
            .collect();
        for run in &runs[1..] {
            for ((name, c), (_, c1)) in run.iter().zip(&runs[0]) {
                assert_eq!(bits(c), bits(c1), "{name}: depends on the thread count");
            }
        }
        // The tiny case does meet the flush: the instruction's result differs from IEEE f32
        // fused multiply-adds on the same rounded operands somewhere, so the emulations'
        // checks are exercised (and the certificate refuses these operands).
        let (m, k, n) = (12, 64, 32);
        let (ta, tb) = (values(m * k, Values::Tiny, 7), values(k * n, Values::Tiny, 8));
        let (ta, tb) = (MatRef::new(&ta, 0, m, k, k), MatRef::new(&tb, 0, k, n, n));
        let packed = PackedB::bf16(tb, 32);
        assert!(!crate::kernels::microkernel::normal_range_certified(Some(-75), packed.exponent_floor));
        let got = &bf16_paths(ta, tb, &vec![0.0; m * n], n, Start::Zero)[0].1;
        let r = crate::kernels::bf16::round_to_bf16;
        let ieee: Vec<f32> = (0..m * n)
            .map(|e| {
                (0..k / 2).fold(0.0f32, |acc, p| {
                    let (i, j) = (e / n, e % n);
                    let odd = r(ta.at(i, 2 * p + 1)).mul_add(r(tb.at(2 * p + 1, j)), acc);
                    r(ta.at(i, 2 * p)).mul_add(r(tb.at(2 * p, j)), odd)
                })
            })
            .collect();
        assert!(got.iter().zip(&ieee).any(|(g, w)| g.to_bits() != w.to_bits()), "no flush met");
    }
}
