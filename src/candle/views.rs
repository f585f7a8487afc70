//! Reading candle storage as the kernels' strided matrices: a [`Layout`] split into batch
//! dimensions (any strides) and one row group and one column group (each collapsible to a
//! single stride), checked against the storage length once, so every view made from it is
//! in bounds.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

use crate::kernels::views::MatRef;

/// A batch of equally shaped strided matrices inside one f32 buffer.
#[derive(Clone, Debug)]
pub(crate) struct MatBatch {
    /// Offset of element (0, 0) of each matrix.
    offsets: Vec<usize>,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// The length and stride of dims collapsed into one (row-major), ignoring size-1 dims; `None`
/// when their strides do not nest.
fn collapse(dims: &[usize], strides: &[usize]) -> Option<(usize, usize)> {
    let mut len = 1usize;
    let mut stride: Option<usize> = None;
    // From the innermost dim outwards: each stride must be the previous one times the span.
    for (&d, &s) in dims.iter().zip(strides).rev() {
        if d == 1 {
            continue;
        }
        match stride {
            None => stride = Some(s),
            Some(inner) if s != inner.checked_mul(len)? => return None,
            Some(_) => {}
        }
        len = len.checked_mul(d)?;
    }
    Some((len, stride.unwrap_or(1)))
}

/// Whether `dims[groups[i]..groups[i+1]]` collapse for a tensor's strides (see [`MatBatch::new`]).
pub(crate) fn collapsible(t: &Tensor, batch_dims: usize, row_dims: usize) -> bool {
    let (dims, strides) = (t.dims(), t.stride());
    let rows = batch_dims..batch_dims + row_dims;
    dims.len() >= batch_dims + row_dims
        && collapse(&dims[rows.clone()], &strides[rows]).is_some()
        && collapse(&dims[batch_dims + row_dims..], &strides[batch_dims + row_dims..]).is_some()
}

/// `t` itself when its layout collapses as [`MatBatch::new`] needs, else a contiguous copy
/// (a candle op: gradients flow through it).
pub(crate) fn collapsed(t: &Tensor, batch_dims: usize, row_dims: usize) -> Result<Tensor> {
    if collapsible(t, batch_dims, row_dims) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

impl MatBatch {
    /// The first `batch_dims` dims of `layout` index matrices, the next `row_dims` form the
    /// rows and the rest the columns, in a buffer of `len` elements.
    ///
    /// # Errors
    /// When the rank is too small, a row or column group does not collapse to one stride, or
    /// a matrix reaches past the buffer.
    pub(crate) fn new(layout: &Layout, batch_dims: usize, row_dims: usize, len: usize) -> Result<Self> {
        let (dims, strides) = (layout.dims(), layout.stride());
        if dims.len() < batch_dims + row_dims {
            candle_core::bail!("nonlocal: rank {} is below {} batch and {row_dims} row dims", dims.len(), batch_dims);
        }
        let split = batch_dims + row_dims;
        let bad =
            || candle_core::Error::Msg(format!("nonlocal: layout {dims:?} strides {strides:?} does not collapse"));
        let (rows, rs) = collapse(&dims[batch_dims..split], &strides[batch_dims..split]).ok_or_else(bad)?;
        let (cols, cs) = collapse(&dims[split..], &strides[split..]).ok_or_else(bad)?;
        // Offsets in row-major order of the batch dims: each outer dim repeats the list built
        // for the dims inside it.
        let mut offsets = vec![layout.start_offset()];
        for (&d, &s) in dims[..batch_dims].iter().zip(&strides[..batch_dims]).rev() {
            let mut next = Vec::with_capacity(offsets.len() * d);
            for i in 0..d {
                next.extend(offsets.iter().map(|&o| o + i * s));
            }
            offsets = next;
        }
        if rows > 0 && cols > 0 {
            let extent = (rows - 1).checked_mul(rs).and_then(|r| (cols - 1).checked_mul(cs)?.checked_add(r));
            let end = offsets.iter().max().and_then(|&o| o.checked_add(extent?));
            if end.is_none_or(|end| end >= len) {
                candle_core::bail!("nonlocal: layout {dims:?} strides {strides:?} reaches past {len} elements");
            }
        }
        Ok(MatBatch { offsets, rows, cols, rs, cs })
    }

    /// How many matrices.
    pub(crate) fn count(&self) -> usize {
        self.offsets.len()
    }

    /// Rows of each matrix.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of each matrix.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Matrix `i` of `data`, the buffer this batch was checked against.
    pub(crate) fn mat<'a>(&self, data: &'a [f32], i: usize) -> MatRef<'a> {
        let offset = self.offsets[i];
        assert!(offset <= data.len(), "MatBatch used on another buffer");
        if self.rows == 0 || self.cols == 0 {
            return MatRef::new(data, offset, 0, 0, 0);
        }
        // SAFETY: `new` checked that every element of every matrix lies inside a buffer of
        // this length (the assert above catches a shorter one for the offset at least).
        unsafe { MatRef::from_raw(data.as_ptr().add(offset), self.rows, self.cols, self.rs as isize, self.cs as isize) }
    }
}

/// The f32 data of a CPU storage.
pub(crate) fn f32_data<'a>(storage: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(data) => Ok(data),
        other => candle_core::bail!("nonlocal: {what} must be f32, got {:?}", other.dtype()),
    }
}

/// Runs `f` on the f32 CPU data of `t` and its layout.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32], &Layout) -> Result<R>) -> Result<R> {
    // The read guard of the storage is held while `f` runs. Tensors of one graph may share a
    // storage (views of one projection); several read guards on one thread are fine while
    // nobody writes, which nothing does during a backward pass.
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(f32_data(cpu, what)?, layout),
        _ => candle_core::bail!("nonlocal: {what} is not on the CPU"),
    }
}

/// A new contiguous f32 CPU tensor.
pub(crate) fn cpu_tensor(data: Vec<f32>, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, dims, &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Shape};

    #[test]
    fn batches_are_in_row_major_order_and_groups_collapse() {
        // (2, 3, 4, 5) permuted to (3, 2, 5, 4): batch (3, 2), rows 5, cols 4.
        let t = Tensor::zeros((2, 3, 4, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let t = t.permute((1, 0, 3, 2)).unwrap();
        let t = t.layout();
        let b = MatBatch::new(t, 2, 1, 120).unwrap();
        assert_eq!((b.count(), b.rows(), b.cols()), (6, 5, 4));
        let data: Vec<f32> = (0..120).map(|i| i as f32).collect();
        // Batch 1 is (i=0, j=1): element (0, 1, r, c) of the original (offset 20·1 + ...).
        let m = b.mat(&data, 1);
        assert_eq!(m.at(2, 3), (60 + 3 * 5 + 2) as f32);
        let m = b.mat(&data, 4); // (i=2, j=0)
        assert_eq!(m.at(0, 1), (2 * 20 + 5) as f32);
        // A transposed pair of dims does not collapse.
        assert!(MatBatch::new(t, 1, 1, 120).is_err());
        assert!(MatBatch::new(&Layout::contiguous(Shape::from((2, 3))), 0, 1, 5).is_err(), "past the buffer");
    }

    #[test]
    fn collapsed_copies_only_when_needed() {
        let t = Tensor::arange(0f32, 24., &Device::Cpu).unwrap().reshape((2, 3, 4)).unwrap();
        assert!(collapsible(&t, 1, 1));
        let p = t.permute((0, 2, 1)).unwrap();
        assert!(collapsible(&p, 1, 1));
        assert!(!collapsible(&p, 0, 2));
        assert!(collapsed(&p, 0, 2).unwrap().is_contiguous());
    }
}
