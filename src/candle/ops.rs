//! The custom candle ops of the non-local layer besides the attention: each runs the crate's
//! kernels forward and has an exact `bwd`, so the layer is a short chain of candle ops with
//! autograd through all of them, and only O(N·C) tensors between them.
//!
//! - [`Projection`]: `P = x·Wᵀ + b` from channels-first `x` (B, C, N) to channels-last P
//!   (B, N, K), the layout the attention kernels read;
//! - [`Pool`]: max-pool over (T, H, W) with kernel = stride, floor on odd sizes, gradients
//!   to the first maximum (PyTorch's rule; candle's own max-pool splits ties and needs
//!   sizes that divide);
//! - [`Output`]: `z = x + W·yᵀ + b` written channels-first, the residual added in the GEMM;
//! - [`Concat`]: concatenation attention by sorted prefix sums, never N×M.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::views::{cpu_tensor, f32_data, with_cpu_f32, MatBatch};
use crate::kernels::concat::{concat_attention, concat_attention_backward};
use crate::kernels::gemm::{par_gemm, MatMut, MatRef};
use crate::kernels::pool::{max_pool, max_pool_argmax, pooled_grid};

/// Adds the column sums of `m` (in f64, rows in order) to `out`.
fn add_column_sums(m: MatRef<'_>, out: &mut [f64]) {
    let mut row = vec![0.0f32; m.cols()];
    for i in 0..m.rows() {
        m.copy_row(i, &mut row);
        out.iter_mut().zip(&row).for_each(|(s, &v)| *s += v as f64);
    }
}

/// `P = x·Wᵀ + b`: `x` (B, C, positions…) channels-first, `W` (K, C), `b` (K); P is
/// (B, N, K) contiguous, N the product of the position dims.
pub(crate) struct Projection;

impl CustomOp3 for Projection {
    fn name(&self) -> &'static str {
        "nonlocal-projection"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (f32_data(sx, "x")?, f32_data(sw, "projection weight")?, f32_data(sb, "projection bias")?);
        let (xs, ws) = (MatBatch::new(lx, 1, 1, x.len())?, MatBatch::new(lw, 0, 1, w.len())?);
        let bs = MatBatch::new(lb, 0, 0, b.len())?;
        let (batch, n, k) = (xs.count(), xs.cols(), ws.rows());
        let mut bias = vec![0.0f32; k];
        bs.mat(b, 0).copy_row(0, &mut bias);
        let wt = ws.mat(w, 0).t();
        let mut out = vec![0.0f32; batch * n * k];
        for (s, out) in out.chunks_mut(n * k).enumerate() {
            out.par_chunks_mut(k * 256).for_each(|rows| rows.chunks_mut(k).for_each(|r| r.copy_from_slice(&bias)));
            par_gemm(1.0, xs.mat(x, s).t(), wt, 1.0, &mut MatMut::new(out, n, k, k));
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, n, k))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = with_cpu_f32(x, "x", |xd, lx| {
            with_cpu_f32(w, "projection weight", |wd, lw| {
                with_cpu_f32(grad, "projection gradient", |gd, lg| {
                    let (xs, ws, gs) = (
                        MatBatch::new(lx, 1, 1, xd.len())?,
                        MatBatch::new(lw, 0, 1, wd.len())?,
                        MatBatch::new(lg, 1, 1, gd.len())?,
                    );
                    let (batch, c, n, k) = (xs.count(), xs.rows(), xs.cols(), ws.rows());
                    let wm = ws.mat(wd, 0);
                    let mut dx = vec![0.0f32; batch * c * n];
                    let mut dw = vec![0.0f32; k * c];
                    let mut db = vec![0.0f64; k];
                    for s in 0..batch {
                        let (xm, gm) = (xs.mat(xd, s), gs.mat(gd, s));
                        // dx (C × N) = Wᵀ·dPᵀ, channels-first; dW += dPᵀ·xᵀ; db += Σ_n dP.
                        par_gemm(
                            1.0,
                            wm.t(),
                            gm.t(),
                            0.0,
                            &mut MatMut::new(&mut dx[s * c * n..(s + 1) * c * n], c, n, n),
                        );
                        par_gemm(1.0, gm.t(), xm.t(), 1.0, &mut MatMut::new(&mut dw, k, c, c));
                        add_column_sums(gm, &mut db);
                    }
                    Ok((dx, dw, db.into_iter().map(|v| v as f32).collect::<Vec<_>>()))
                })
            })
        })?;
        Ok((Some(cpu_tensor(dx, x.dims())?), Some(cpu_tensor(dw, w.dims())?), Some(cpu_tensor(db, b.dims())?)))
    }
}

/// Max-pool over the position grid (T, H, W) with kernel = stride: from (B, N, c)
/// channels-last (or, with `channels_first`, (B, c, positions…)) to (B, M, c) contiguous.
pub(crate) struct Pool {
    pub(crate) grid: [usize; 3],
    pub(crate) kernel: [usize; 3],
    pub(crate) channels_first: bool,
}

impl Pool {
    /// The N × c matrices of the source.
    fn source(&self, layout: &Layout, len: usize) -> Result<(MatBatch, bool)> {
        let batch = MatBatch::new(layout, 1, 1, len)?;
        let n: usize = self.grid.iter().product();
        let rows = if self.channels_first { batch.cols() } else { batch.rows() };
        if rows != n {
            candle_core::bail!("nonlocal pool: {rows} positions for the grid {:?}", self.grid);
        }
        Ok((batch, self.channels_first))
    }

    fn keys(&self) -> usize {
        pooled_grid(self.grid, self.kernel).iter().product()
    }
}

/// Matrix `s` of a pooling source as N × c.
fn source_mat<'a>(batch: &MatBatch, data: &'a [f32], s: usize, channels_first: bool) -> MatRef<'a> {
    let m = batch.mat(data, s);
    if channels_first {
        m.t()
    } else {
        m
    }
}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        "nonlocal-max-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = f32_data(storage, "pool input")?;
        let (batch, cf) = self.source(layout, data.len())?;
        let c = if cf { batch.rows() } else { batch.cols() };
        let m = self.keys();
        let mut out = vec![0.0f32; batch.count() * m * c];
        for (s, out) in out.chunks_mut((m * c).max(1)).enumerate().take(batch.count()) {
            max_pool(source_mat(&batch, data, s, cf), self.grid, self.kernel, out);
        }
        Ok((CpuStorage::F32(out), Shape::from((batch.count(), m, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx = with_cpu_f32(arg, "pool input", |data, layout| {
            with_cpu_f32(&grad, "pool gradient", |gd, lg| {
                let (batch, cf) = self.source(layout, data.len())?;
                let c = if cf { batch.rows() } else { batch.cols() };
                let (n, m) = (self.grid.iter().product::<usize>(), self.keys());
                let gd = &gd[lg.start_offset()..];
                let mut dx = vec![0.0f32; batch.count() * n * c];
                for (s, dx) in dx.chunks_mut((n * c).max(1)).enumerate().take(batch.count()) {
                    // The winners again (one pass over the source) rather than kept from the
                    // forward pass: candle gives a custom op nowhere to keep them.
                    let arg = max_pool_argmax(source_mat(&batch, data, s, cf), self.grid, self.kernel);
                    let g = &gd[s * m * c..(s + 1) * m * c];
                    for (j, (g_row, a_row)) in g.chunks(c.max(1)).zip(arg.chunks(c.max(1))).enumerate() {
                        let _ = j;
                        for (ch, (&g, &i)) in g_row.iter().zip(a_row).enumerate() {
                            let at = if cf { ch * n + i as usize } else { i as usize * c + ch };
                            dx[at] += g;
                        }
                    }
                }
                Ok(dx)
            })
        })?;
        Ok(Some(cpu_tensor(dx, arg.dims())?))
    }
}

/// `z = x + W·yᵀ + b`: `x` (B, C, positions…) channels-first, `y` (B, N, C') channels-last,
/// `wb` (Bw, C, C' + 1) = `[W | b]` with Bw 1 (shared) or B (per sample); `z` has the shape
/// of `x`, contiguous.
pub(crate) struct Output;

impl Output {
    fn views(
        (lx, nx): (&Layout, usize),
        (ly, ny): (&Layout, usize),
        (lw, nw): (&Layout, usize),
    ) -> Result<(MatBatch, MatBatch, MatBatch)> {
        let (xs, ys, ws) = (MatBatch::new(lx, 1, 1, nx)?, MatBatch::new(ly, 1, 1, ny)?, MatBatch::new(lw, 1, 1, nw)?);
        let ok = ys.count() == xs.count()
            && ys.rows() == xs.cols()
            && ws.rows() == xs.rows()
            && ws.cols() == ys.cols() + 1
            && (ws.count() == 1 || ws.count() == xs.count());
        if !ok {
            candle_core::bail!(
                "nonlocal output: x {:?}, y {:?}, [W | b] {:?} do not fit",
                lx.dims(),
                ly.dims(),
                lw.dims()
            );
        }
        Ok((xs, ys, ws))
    }
}

impl CustomOp3 for Output {
    fn name(&self) -> &'static str {
        "nonlocal-output"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sy: &CpuStorage,
        ly: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, y, w) = (f32_data(sx, "x")?, f32_data(sy, "y")?, f32_data(sw, "output weight")?);
        let (xs, ys, ws) = Output::views((lx, x.len()), (ly, y.len()), (lw, w.len()))?;
        let (batch, c, n, ci) = (xs.count(), xs.rows(), xs.cols(), ys.cols());
        let mut z = vec![0.0f32; batch * c * n];
        for (s, z) in z.chunks_mut((c * n).max(1)).enumerate().take(batch) {
            let (xm, wm) = (xs.mat(x, s), ws.mat(w, s.min(ws.count() - 1)));
            // Residual and bias first, then the GEMM adds W·yᵀ (β = 1).
            z.par_chunks_mut(n.max(1)).enumerate().for_each(|(ch, row)| {
                xm.copy_row(ch, row);
                let bias = wm.at(ch, ci);
                row.iter_mut().for_each(|v| *v += bias);
            });
            par_gemm(1.0, wm.cols_range(0, ci), ys.mat(y, s).t(), 1.0, &mut MatMut::new(z, c, n, n));
        }
        Ok((CpuStorage::F32(z), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        wb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dy, dwb) = with_cpu_f32(x, "x", |xd, lx| {
            with_cpu_f32(y, "y", |yd, ly| {
                with_cpu_f32(wb, "output weight", |wd, lw| {
                    with_cpu_f32(grad, "output gradient", |gd, lg| {
                        let (xs, ys, ws) = Output::views((lx, xd.len()), (ly, yd.len()), (lw, wd.len()))?;
                        let gs = MatBatch::new(lg, 1, 1, gd.len())?;
                        let (batch, c, n, ci) = (xs.count(), xs.rows(), xs.cols(), ys.cols());
                        let mut dy = vec![0.0f32; batch * n * ci];
                        let mut dwb = vec![0.0f32; ws.count() * c * (ci + 1)];
                        let mut dw = vec![0.0f32; c * ci];
                        let mut db = vec![0.0f64; c];
                        for s in 0..batch {
                            let (gm, wm, ym) = (gs.mat(gd, s), ws.mat(wd, s.min(ws.count() - 1)), ys.mat(yd, s));
                            // dy (N × C') = dzᵀ·W; dW += dz·y; db += Σ_n dz.
                            let dys = &mut dy[s * n * ci..(s + 1) * n * ci];
                            par_gemm(1.0, gm.t(), wm.cols_range(0, ci), 0.0, &mut MatMut::new(dys, n, ci, ci));
                            par_gemm(1.0, gm, ym, 1.0, &mut MatMut::new(&mut dw, c, ci, ci));
                            add_column_sums(gm.t(), &mut db);
                            if ws.count() > 1 || s + 1 == batch {
                                // Per-sample weights take this sample's sums; shared ones all.
                                let at = s.min(ws.count() - 1) * c * (ci + 1);
                                for ch in 0..c {
                                    let row = &mut dwb[at + ch * (ci + 1)..at + (ch + 1) * (ci + 1)];
                                    row[..ci].copy_from_slice(&dw[ch * ci..(ch + 1) * ci]);
                                    row[ci] = db[ch] as f32;
                                }
                                dw.fill(0.0);
                                db.fill(0.0);
                            }
                        }
                        Ok((dy, dwb))
                    })
                })
            })
        })?;
        // ∂z/∂x is the identity.
        let dx = grad.clone();
        Ok((Some(dx), Some(cpu_tensor(dy, y.dims())?), Some(cpu_tensor(dwb, wb.dims())?)))
    }
}

/// Concatenation attention `y_i = Σ_j ReLU(a_i + b_j)·v_j / M`: `a` (B, N, 1), `b` (B, M, 1),
/// `v` (B, M, C'); `y` (B, N, C') contiguous.
pub(crate) struct Concat;

impl Concat {
    fn views(
        (la, na): (&Layout, usize),
        (lb, nb): (&Layout, usize),
        (lv, nv): (&Layout, usize),
    ) -> Result<(MatBatch, MatBatch, MatBatch)> {
        let (a, b, v) = (MatBatch::new(la, 1, 1, na)?, MatBatch::new(lb, 1, 1, nb)?, MatBatch::new(lv, 1, 1, nv)?);
        let ok =
            a.cols() == 1 && b.cols() == 1 && b.count() == a.count() && v.count() == a.count() && v.rows() == b.rows();
        if !ok || b.rows() == 0 {
            candle_core::bail!("nonlocal concat: a {:?}, b {:?}, v {:?} do not fit", la.dims(), lb.dims(), lv.dims());
        }
        Ok((a, b, v))
    }
}

/// Column 0 of a matrix as a vector.
fn column(m: MatRef<'_>) -> Vec<f32> {
    (0..m.rows()).map(|j| m.at(j, 0)).collect()
}

impl CustomOp3 for Concat {
    fn name(&self) -> &'static str {
        "nonlocal-concat-attention"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b, v) = (f32_data(sa, "a")?, f32_data(sb, "b")?, f32_data(sv, "v")?);
        let (as_, bs, vs) = Concat::views((la, a.len()), (lb, b.len()), (lv, v.len()))?;
        let (batch, n, ci) = (as_.count(), as_.rows(), vs.cols());
        let mut y = vec![0.0f32; batch * n * ci];
        for (s, y) in y.chunks_mut((n * ci).max(1)).enumerate().take(batch) {
            concat_attention(as_.mat(a, s), &column(bs.mat(b, s)), vs.mat(v, s), y);
        }
        Ok((CpuStorage::F32(y), Shape::from((batch, n, ci))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db, dv) = with_cpu_f32(a, "a", |ad, la| {
            with_cpu_f32(b, "b", |bd, lb| {
                with_cpu_f32(v, "v", |vd, lv| {
                    with_cpu_f32(grad, "concat gradient", |gd, lg| {
                        let (as_, bs, vs) = Concat::views((la, ad.len()), (lb, bd.len()), (lv, vd.len()))?;
                        let gs = MatBatch::new(lg, 1, 1, gd.len())?;
                        let (batch, n, m, ci) = (as_.count(), as_.rows(), bs.rows(), vs.cols());
                        let (mut da, mut db, mut dv) =
                            (vec![0.0f32; batch * n], vec![0.0f32; batch * m], vec![0.0f32; batch * m * ci]);
                        for s in 0..batch {
                            let outs = (
                                &mut da[s * n..(s + 1) * n],
                                &mut db[s * m..(s + 1) * m],
                                &mut dv[s * m * ci..(s + 1) * m * ci],
                            );
                            let bcol = column(bs.mat(bd, s));
                            concat_attention_backward(as_.mat(ad, s), &bcol, vs.mat(vd, s), gs.mat(gd, s), outs);
                        }
                        Ok((da, db, dv))
                    })
                })
            })
        })?;
        Ok((Some(cpu_tensor(da, a.dims())?), Some(cpu_tensor(db, b.dims())?), Some(cpu_tensor(dv, v.dims())?)))
    }
}
