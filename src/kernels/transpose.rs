//! Channel-major results from position-major ones: `out ← mᵀ` or `out ← (xᵀ + b) + mᵀ`
//! for an N × C matrix `m` and a C × N `out`, in register-transposed blocks of the vector
//! width ([`Simd::transpose`]): [`write_transposed`] for a whole `m`, channel blocks in
//! parallel, and [`par_rows_transposed`] for a product computed chunk by chunk in cache.

use std::ops::Range;

use rayon::prelude::*;

use super::simd::{isa, Bf16Simd, Isa, Job, Simd};
use super::views::{MatMut, MatRef};
use crate::workspace::Workspace;

/// Channels per parallel task of [`write_transposed`] (the widest vector).
const CHANNELS: usize = 16;

/// Bytes of one chunk's position-major rows in [`par_rows_transposed`]: well inside L2.
const CHUNK_BYTES: usize = 512 << 10;

/// What the transposed matrix is written onto.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Onto<'a> {
    /// `out ← mᵀ`: a transposing copy.
    Set,
    /// `out ← (xᵀ + bias) + mᵀ`: x (N × C) the residual, `bias` C long.
    Residual(MatRef<'a>, &'a [f32]),
}

impl<'a> Onto<'a> {
    /// The same for positions `range` only.
    fn rows(self, range: Range<usize>) -> Onto<'a> {
        match self {
            Onto::Residual(x, bias) => Onto::Residual(x.rows_range(range.start, range.end), bias),
            set => set,
        }
    }
}

/// `out[ch·ld + col0 + i] ← onto + m[i][ch]` for `m` N × C and `out` C rows `ld` apart
/// (columns `col0..col0 + N` of each written), channel blocks in parallel.
///
/// # Panics
/// If the shapes disagree: `out` shorter than C rows of `ld`, `col0 + N > ld`, or a residual
/// not N × C or a bias not C long.
pub(crate) fn write_transposed(m: MatRef<'_>, onto: Onto<'_>, out: &mut [f32], ld: usize, col0: usize) {
    let (n, c) = (m.rows(), m.cols());
    check(n, c, onto, out.len(), ld, col0);
    if n == 0 || c == 0 {
        return;
    }
    out[..c * ld].par_chunks_mut(CHANNELS * ld).enumerate().for_each(|(b, rows)| {
        let ch0 = b * CHANNELS;
        let width = rows.len() / ld;
        // SAFETY: `rows` holds `width` rows of `ld` ≥ col0 + N floats, borrowed for the call.
        unsafe { Block { m, onto, out: rows.as_mut_ptr(), width, ld, col0, ch0 }.dispatch() };
    });
}

/// `out[ch·ld + i] ← onto + rows[i][ch]` (C rows `ld` apart, columns `0..N`) for the N × C
/// matrix `rows` that `product(range, chunk)` writes, chunk by chunk: chunks of positions in
/// parallel, each computed into scratch from `ws` that stays in cache and written channel-major
/// by the same task.
///
/// Why: a product wanted channel-major (PyTorch's layout) runs fastest position-major on
/// its pre-packed weights; computed channel-major directly, its large transposed operand is
/// packed on every call and streams from memory once per row block.
///
/// # Panics
/// As [`write_transposed`] with N = `n`, C = `c` and `col0` 0.
pub(crate) fn par_rows_transposed<F>(
    n: usize,
    c: usize,
    onto: Onto<'_>,
    out: &mut [f32],
    ld: usize,
    ws: &Workspace,
    product: F,
) where
    F: Fn(Range<usize>, &mut MatMut<'_>) + Sync,
{
    check(n, c, onto, out.len(), ld, 0);
    if n == 0 || c == 0 {
        return;
    }
    let chunk = (CHUNK_BYTES / 4 / c).clamp(CHANNELS, 256) / CHANNELS * CHANNELS;
    let base = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|k| {
        let range = k * chunk..n.min((k + 1) * chunk);
        let len = range.len();
        let mut rows = ws.scratch(len * c);
        product(range.clone(), &mut MatMut::new(&mut rows, len, c, c));
        let m = MatRef::new(&rows, 0, len, c, c);
        let block =
            Block { m, onto: onto.rows(range.clone()), out: base.get(), width: c, ld, col0: range.start, ch0: 0 };
        // SAFETY: `out` holds C rows of `ld` ≥ N floats (checked) and is borrowed for the call;
        // this task alone writes columns `range` of them.
        unsafe { block.dispatch() };
    });
}

/// The shape checks of [`write_transposed`].
fn check(n: usize, c: usize, onto: Onto<'_>, out_len: usize, ld: usize, col0: usize) {
    assert!(col0 + n <= ld && out_len >= c * ld, "write_transposed: shapes");
    if let Onto::Residual(x, bias) = onto {
        assert!((x.rows(), x.cols(), bias.len()) == (n, c, c), "write_transposed: residual");
    }
}

/// A raw pointer the parallel tasks share; each writes its own elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: the tasks of `par_rows_transposed` write disjoint elements through it.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Channels `ch0..ch0 + width` of [`write_transposed`], written through `out`: row `j` of
/// the block (channel `ch0 + j`) at `out + j·ld`, its columns `col0..col0 + N`.
struct Block<'a> {
    m: MatRef<'a>,
    onto: Onto<'a>,
    out: *mut f32,
    width: usize,
    ld: usize,
    col0: usize,
    ch0: usize,
}

impl Block<'_> {
    /// Runs the block on the widest vectors this CPU has, or element by element.
    ///
    /// # Safety
    /// `out` is valid for writes of `width` rows of `ld` floats (the columns `col0..col0 + N`
    /// of each no other thread touches meanwhile), `col0 + N ≤ ld`, and `m` has columns
    /// `ch0..ch0 + width`.
    unsafe fn dispatch(self) {
        match isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 => match super::simd::Avx512::detect() {
                Some(s) => s.vectorize(self),
                None => self.scalar(),
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => match super::simd::Avx2::detect() {
                Some(s) => s.vectorize(self),
                None => self.scalar(),
            },
            _ => self.scalar(),
        }
    }

    /// The value of element (channel `ch0 + j`, position i).
    #[inline(always)]
    fn value(&self, j: usize, i: usize) -> f32 {
        let ch = self.ch0 + j;
        let base = match self.onto {
            Onto::Set => return self.m.at(i, ch),
            Onto::Residual(x, bias) => x.at(i, ch) + bias[ch],
        };
        base + self.m.at(i, ch)
    }

    /// The `len` floats of block row `j` from column `col0 + i`.
    ///
    /// # Safety
    /// As [`Block::dispatch`], with `j < width` and `i + len ≤ N`.
    #[inline(always)]
    unsafe fn dst(&mut self, j: usize, i: usize, len: usize) -> &mut [f32] {
        debug_assert!(j < self.width && i + len <= self.m.rows());
        // SAFETY: inside the block's rows and columns (the caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.out.add(j * self.ld + self.col0 + i), len) }
    }

    /// Elements `positions` of channels `channels` (relative to `ch0`), one at a time.
    fn scalar_part(&mut self, channels: Range<usize>, positions: Range<usize>) {
        for j in channels {
            for i in positions.clone() {
                let v = self.value(j, i);
                // SAFETY: j < width, i < N (the ranges callers pass); the contract of `dispatch`.
                unsafe { self.dst(j, i, 1)[0] = v };
            }
        }
    }

    /// The whole block one element at a time (paths without vectors).
    fn scalar(mut self) {
        self.scalar_part(0..self.width, 0..self.m.rows());
    }
}

impl Job for Block<'_> {
    type Out = ();

    #[inline(always)]
    fn run<S: Bf16Simd>(mut self, s: S) {
        const MAX: usize = CHANNELS * CHANNELS;
        let lanes = S::LANES;
        let (n, width) = (self.m.rows(), self.width);
        // Whole vector tiles where m's rows are contiguous; the rest element by element.
        let (full_n, full_w) = match self.m.col_stride() == 1 {
            true => (n / lanes * lanes, width / lanes * lanes),
            false => (0, 0),
        };
        let mut tile = [0.0f32; MAX];
        let mut residual = [0.0f32; CHANNELS];
        let rs = self.m.row_stride();
        // A channel block's rows written along the positions: long runs of each output row.
        for cb in (0..full_w).step_by(lanes) {
            for i0 in (0..full_n).step_by(lanes) {
                // SAFETY: rows i0..i0 + lanes and columns ch0 + cb.. + lanes of m exist (whole
                // tiles only; m's rows contiguous); the tile holds lanes² floats.
                unsafe {
                    let src = self.m.as_ptr().offset(i0 as isize * rs + (self.ch0 + cb) as isize);
                    s.transpose(src, rs as usize, tile.as_mut_ptr(), lanes);
                }
                for j in cb..cb + lanes {
                    let t = s.load_slice(&tile[(j - cb) * lanes..]);
                    let value = match self.onto {
                        Onto::Set => t,
                        Onto::Residual(x, bias) => {
                            let ch = self.ch0 + j;
                            let xs = match x.col(ch) {
                                Some(col) => &col[i0..i0 + lanes],
                                None => {
                                    residual
                                        .iter_mut()
                                        .take(lanes)
                                        .enumerate()
                                        .for_each(|(i, r)| *r = x.at(i0 + i, ch));
                                    &residual[..lanes]
                                }
                            };
                            s.add(s.add(s.load_slice(xs), s.splat(bias[ch])), t)
                        }
                    };
                    // SAFETY: j < full_w ≤ width and i0 + lanes ≤ N; the contract of `dispatch`.
                    s.store_slice(unsafe { self.dst(j, i0, lanes) }, value);
                }
            }
        }
        self.scalar_part(full_w..width, 0..n);
        self.scalar_part(0..full_w, full_n..n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::Portable;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The definition, element by element.
    fn reference(m: MatRef<'_>, onto: Onto<'_>, out: &[f32], ld: usize, col0: usize) -> Vec<f32> {
        let mut want = out.to_vec();
        for ch in 0..m.cols() {
            for i in 0..m.rows() {
                let at = ch * ld + col0 + i;
                let base = match onto {
                    Onto::Set => -0.0,
                    Onto::Residual(x, bias) => x.at(i, ch) + bias[ch],
                };
                want[at] = base + m.at(i, ch);
            }
        }
        want
    }

    #[test]
    fn every_path_adds_the_transpose_with_the_definitions_bits() {
        // Odd sizes (edges in both directions), whole tiles, a strided m and both residual
        // layouts (contiguous columns as channels-first input, and rows).
        for &(n, c) in &[(1, 1), (5, 3), (16, 16), (37, 21), (64, 48), (130, 35)] {
            let (ld, col0) = (n + 7, 5);
            let m_data = values(n * (c + 3), 1);
            let m = MatRef::new(&m_data, 0, n, c, c + 3);
            let x_cf = values(c * n, 2);
            let x_rows = values(n * c, 3);
            let bias = values(c, 4);
            let out0 = values(c * ld, 5);
            let residual_cf = MatRef::new(&x_cf, 0, c, n, n).t();
            let onto = [
                Onto::Set,
                Onto::Residual(residual_cf, &bias),
                Onto::Residual(MatRef::new(&x_rows, 0, n, c, c), &bias),
            ];
            for onto in onto {
                let want = reference(m, onto, &out0, ld, col0);
                let mut got = out0.clone();
                write_transposed(m, onto, &mut got, ld, col0);
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{n}×{c} {onto:?}");
                // The portable tiles of both widths, one channel block.
                for lanes in [8, 16] {
                    let mut got = out0.clone();
                    let width = c.min(CHANNELS);
                    let job = Block { m, onto, out: got.as_mut_ptr(), width, ld, col0, ch0: 0 };
                    match lanes {
                        8 => Portable::<8>.vectorize(job),
                        _ => Portable::<16>.vectorize(job),
                    }
                    let rows = width * ld;
                    assert!(got[..rows].iter().zip(&want[..rows]).all(|(a, b)| a.to_bits() == b.to_bits()), "{lanes}");
                }
            }
        }
    }

    #[test]
    fn chunked_products_are_written_transposed_with_the_definitions_bits() {
        let ws = Workspace::default();
        // Several chunks with a short last one (C 40: chunks of 256), one chunk, edges.
        for &(n, c) in &[(1, 1), (37, 21), (600, 40), (300, 4096)] {
            let ld = n + 3;
            let m_data = values(n * c, 11);
            let m = MatRef::new(&m_data, 0, n, c, c);
            let x_cf = values(c * n, 12);
            let bias = values(c, 13);
            let residual = MatRef::new(&x_cf, 0, c, n, n).t();
            for onto in [Onto::Set, Onto::Residual(residual, &bias)] {
                let out0 = values(c * ld, 14);
                let want = reference(m, onto, &out0, ld, 0);
                let mut got = out0.clone();
                par_rows_transposed(n, c, onto, &mut got, ld, &ws, |range, rows| {
                    for (r, i) in range.enumerate() {
                        m.copy_row(i, &mut rows.data_mut()[r * c..(r + 1) * c]);
                    }
                });
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{n}×{c} {onto:?}");
            }
        }
    }

    #[test]
    fn the_register_transposes_are_transposes() {
        let src = values(16 * 19, 9);
        let check = |lanes: usize, got: &[f32]| {
            for i in 0..lanes {
                for j in 0..lanes {
                    assert_eq!(got[j * 21 + i], src[i * 19 + j], "{lanes}: ({i}, {j})");
                }
            }
        };
        let mut dst = vec![0.0f32; 16 * 21];
        // SAFETY: 16 rows of 19 floats and 16 of 21.
        unsafe { Portable::<16>.transpose(src.as_ptr(), 19, dst.as_mut_ptr(), 21) };
        check(16, &dst);
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(s) = crate::kernels::simd::Avx512::detect() {
                let mut dst = vec![0.0f32; 16 * 21];
                // SAFETY: as above.
                unsafe { s.transpose(src.as_ptr(), 19, dst.as_mut_ptr(), 21) };
                check(16, &dst);
            }
            if let Some(s) = crate::kernels::simd::Avx2::detect() {
                let mut dst = vec![0.0f32; 16 * 21];
                // SAFETY: 8 rows of 19 floats and 8 of 21.
                unsafe { s.transpose(src.as_ptr(), 19, dst.as_mut_ptr(), 21) };
                check(8, &dst);
            }
        }
    }
}
