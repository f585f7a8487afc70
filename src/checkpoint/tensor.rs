//! Where a tensor's elements sit in a checkpoint's bytes, and reading them out.
//!
//! A tensor is a view of a storage: element `(i_0, …, i_k)` is storage element
//! `offset + Σ i_d·stride_d`. Views, transposes and several tensors sharing one storage are
//! all this one formula. [`TensorLayout::new`] checks, with overflow-checked arithmetic, that
//! every element the view can reach lies inside its storage and that the view does not claim
//! more elements than the storage holds, so reading allocates only what the file backs.

use std::fmt;
use std::ops::Range;

/// The element type of a stored tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
    /// 64-bit signed integer (e.g. BatchNorm's `num_batches_tracked`).
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean, one byte.
    Bool,
    /// Any other type, by the name the file gives it; never read.
    Other(String),
}

impl DType {
    /// The lower-case short name: `f32`, `f16`, `bf16`, `f64`, `i64`, … (as `inspect` prints).
    pub fn name(&self) -> &str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
            DType::Other(name) => name,
        }
    }

    /// Bytes per element, `None` for [`DType::Other`].
    pub fn size(&self) -> Option<usize> {
        Some(match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::Other(_) => return None,
        })
    }
}

impl fmt::Display for DType {
    /// Upper case, as safetensors writes it: `F32`, `BF16`, `I64`, … (other names unchanged).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DType::Other(name) => f.write_str(name),
            DType::Bool => f.write_str("BOOL"),
            known => f.write_str(&known.name().to_ascii_uppercase()),
        }
    }
}

/// Byte order of a storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ByteOrder {
    Little,
    Big,
}

/// One tensor of a checkpoint: its type, shape, and where its elements are.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TensorLayout {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub strides: Vec<usize>,
    /// The first element's index in the storage.
    pub offset: usize,
    /// The storage's bytes in the file.
    pub storage: Range<usize>,
    pub order: ByteOrder,
}

/// The strides of a row-major (C-contiguous) tensor of `shape`.
pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1].saturating_mul(shape[d + 1]);
    }
    strides
}

impl TensorLayout {
    /// A tensor viewing `storage` (bytes of whole `dtype` elements), checked to stay inside it.
    ///
    /// # Errors
    /// A reason in words when the shape and strides differ in rank, a size overflows, an
    /// element lies outside the storage, the view claims more elements than the storage has,
    /// or the storage is not a whole number of elements.
    pub fn new(
        dtype: DType,
        shape: Vec<usize>,
        strides: Vec<usize>,
        offset: usize,
        storage: Range<usize>,
        order: ByteOrder,
    ) -> Result<Self, String> {
        if shape.len() != strides.len() {
            return Err(format!("shape {shape:?} and strides {strides:?} differ in rank"));
        }
        let layout = TensorLayout { dtype, shape, strides, offset, storage, order };
        // Types nobody reads are kept for their name and shape only.
        let Some(size) = layout.dtype.size() else { return Ok(layout) };
        let bytes = layout.storage.len();
        if !bytes.is_multiple_of(size) {
            return Err(format!("storage of {bytes} bytes is not a whole number of {} elements", layout.dtype.name()));
        }
        let capacity = bytes / size;
        let numel = layout
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("shape {:?} overflows", layout.shape))?;
        if numel == 0 {
            return Ok(layout);
        }
        if numel > capacity {
            return Err(format!("shape {:?} claims {numel} elements, its storage holds {capacity}", layout.shape));
        }
        let last = layout
            .shape
            .iter()
            .zip(&layout.strides)
            .try_fold(layout.offset, |end, (&d, &s)| (d - 1).checked_mul(s).and_then(|step| end.checked_add(step)));
        match last {
            Some(last) if last < capacity => Ok(layout),
            _ => Err(format!(
                "offset {} with shape {:?} and strides {:?} reaches past the storage's {capacity} elements",
                layout.offset, layout.shape, layout.strides
            )),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The storage element index of every tensor element, in row-major order.
    fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        let numel = self.numel();
        let mut index = vec![0usize; self.shape.len()];
        let mut at = self.offset;
        (0..numel).map(move |i| {
            if i > 0 {
                // Odometer: bump the last axis, carrying into earlier ones.
                for d in (0..index.len()).rev() {
                    index[d] += 1;
                    at += self.strides[d];
                    if index[d] < self.shape[d] {
                        break;
                    }
                    at -= self.strides[d] * index[d];
                    index[d] = 0;
                }
            }
            at
        })
    }

    /// Every element, decoded from `file` (the whole checkpoint) by `decode` on its bytes in
    /// little-endian order.
    fn read<T, const N: usize>(&self, file: &[u8], decode: impl Fn([u8; N]) -> T) -> Vec<T> {
        let data = &file[self.storage.clone()];
        let big = self.order == ByteOrder::Big;
        self.indices()
            .map(|i| {
                let mut bytes: [u8; N] = data[i * N..i * N + N].try_into().expect("N bytes");
                if big {
                    bytes.reverse();
                }
                decode(bytes)
            })
            .collect()
    }

    /// The elements as f32, or `None` when the type is not a float.
    pub fn read_f32(&self, file: &[u8]) -> Option<Vec<f32>> {
        Some(match self.dtype {
            DType::F32 => self.read(file, f32::from_le_bytes),
            DType::F64 => self.read(file, |b| f64::from_le_bytes(b) as f32),
            DType::F16 => self.read(file, |b| half::f16::from_le_bytes(b).to_f32()),
            DType::BF16 => self.read(file, |b| half::bf16::from_le_bytes(b).to_f32()),
            _ => return None,
        })
    }

    /// The elements as i64, or `None` when the type is not an integer.
    pub fn read_i64(&self, file: &[u8]) -> Option<Vec<i64>> {
        Some(match self.dtype {
            DType::I64 => self.read(file, i64::from_le_bytes),
            DType::I32 => self.read(file, |b| i32::from_le_bytes(b) as i64),
            DType::I16 => self.read(file, |b| i16::from_le_bytes(b) as i64),
            DType::I8 => self.read(file, |b: [u8; 1]| b[0] as i8 as i64),
            DType::U8 | DType::Bool => self.read(file, |b: [u8; 1]| b[0] as i64),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayView, IxDyn, ShapeBuilder};
    use proptest::prelude::*;

    fn f32_storage(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    fn layout(shape: &[usize], strides: &[usize], offset: usize, storage_elems: usize) -> Result<TensorLayout, String> {
        TensorLayout::new(DType::F32, shape.to_vec(), strides.to_vec(), offset, 0..storage_elems * 4, ByteOrder::Little)
    }

    /// A view (shape, strides, offset) of a storage of `extra` more elements than it needs.
    fn view() -> impl Strategy<Value = (Vec<usize>, Vec<usize>, usize, usize)> {
        (prop::collection::vec((0usize..5, 0usize..7), 0..5), 0usize..9, 0usize..5).prop_map(|(dims, offset, extra)| {
            let shape: Vec<usize> = dims.iter().map(|d| d.0).collect();
            let strides: Vec<usize> = dims.iter().map(|d| d.1).collect();
            let reach = shape.iter().zip(&strides).map(|(&d, &s)| d.saturating_sub(1) * s).sum::<usize>();
            let numel: usize = shape.iter().product();
            (shape, strides, offset, (offset + reach + 1).max(numel) + extra)
        })
    }

    proptest! {
        /// Reading a view gives exactly ndarray's strided view of the same storage.
        #[test]
        fn views_read_as_ndarray_sees_them((shape, strides, offset, len) in view()) {
            let file = f32_storage(len);
            let t = layout(&shape, &strides, offset, len).unwrap();
            let values: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let expected = ArrayView::from_shape(IxDyn(&shape).strides(IxDyn(&strides)), &values[offset..]);
            // ndarray refuses some aliasing views; compare where it accepts them, else by formula.
            let got = t.read_f32(&file).unwrap();
            match expected {
                Ok(view) => prop_assert_eq!(got, view.iter().copied().collect::<Vec<_>>()),
                Err(_) => prop_assert_eq!(got.len(), t.numel()),
            }
        }

        /// Any view reaching one element past the storage is refused, and nothing is read.
        #[test]
        fn views_past_the_storage_are_refused((shape, strides, offset, _) in view()) {
            prop_assume!(shape.iter().all(|&d| d > 0));
            let reach = shape.iter().zip(&strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>();
            let needed = (offset + reach + 1).max(shape.iter().product());
            prop_assert!(layout(&shape, &strides, offset, needed).is_ok());
            prop_assert!(layout(&shape, &strides, offset, needed - 1).is_err());
        }

        /// Big-endian storages read the same values as little-endian ones.
        #[test]
        fn byte_order_is_honoured(values in prop::collection::vec(any::<f32>().prop_filter("no NaN", |v| !v.is_nan()), 1..20)) {
            let le: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let be: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
            let n = values.len();
            let read = |bytes: &[u8], order| {
                TensorLayout::new(DType::F32, vec![n], vec![1], 0, 0..bytes.len(), order).unwrap().read_f32(bytes).unwrap()
            };
            prop_assert_eq!(read(&le, ByteOrder::Little), values.clone());
            prop_assert_eq!(read(&be, ByteOrder::Big), values);
        }
    }

    #[test]
    fn transposes_offsets_and_shared_storages() {
        let file = f32_storage(12);
        // A 3x4 matrix at offset 0, its transpose, and row 1 alone: one storage.
        let m = layout(&[3, 4], &[4, 1], 0, 12).unwrap().read_f32(&file).unwrap();
        assert_eq!(m, (0..12).map(|i| i as f32).collect::<Vec<_>>());
        let t = layout(&[4, 3], &[1, 4], 0, 12).unwrap().read_f32(&file).unwrap();
        assert_eq!(t, [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
        let row = layout(&[4], &[1], 4, 12).unwrap().read_f32(&file).unwrap();
        assert_eq!(row, [4., 5., 6., 7.]);
        // A scalar at offset 11.
        assert_eq!(layout(&[], &[], 11, 12).unwrap().read_f32(&file).unwrap(), [11.]);
    }

    #[test]
    fn hostile_layouts_are_refused_before_reading() {
        let huge = usize::MAX / 2;
        for (shape, strides, offset, what) in [
            (vec![huge, 4], vec![0, 0], 0, "overflows"),
            (vec![3], vec![huge], 0, "reaches past"),
            (vec![2], vec![1], usize::MAX, "reaches past"),
            (vec![1_000_000], vec![0], 0, "claims"),
            (vec![13], vec![1], 0, "claims"),
            (vec![2, 2], vec![1], 0, "rank"),
        ] {
            let err = layout(&shape, &strides, offset, 12).unwrap_err();
            assert!(err.contains(what), "{err} should say {what:?}");
        }
        let err = TensorLayout::new(DType::F32, vec![1], vec![1], 0, 0..7, ByteOrder::Little).unwrap_err();
        assert!(err.contains("whole number"), "{err}");
        // An empty tensor reads nothing, wherever it points.
        assert_eq!(layout(&[0, 5], &[5, 1], 99, 0).unwrap().read_f32(&[]).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn every_dtype_decodes() {
        let le = |t: DType, bytes: Vec<u8>, n: usize| {
            TensorLayout::new(t, vec![n], vec![1], 0, 0..bytes.len(), ByteOrder::Little).unwrap()
        };
        let f16: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        assert_eq!(le(DType::F16, f16.clone(), 2).read_f32(&f16).unwrap(), [1.5, -2.0]);
        let bf16: Vec<u8> = [0.25f32, 3.0].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        assert_eq!(le(DType::BF16, bf16.clone(), 2).read_f32(&bf16).unwrap(), [0.25, 3.0]);
        let f64s: Vec<u8> = [0.1f64, -7.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(le(DType::F64, f64s.clone(), 2).read_f32(&f64s).unwrap(), [0.1f32, -7.0]);
        let i64s: Vec<u8> = [-3i64, 1 << 40].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = le(DType::I64, i64s.clone(), 2);
        assert_eq!(t.read_i64(&i64s).unwrap(), [-3, 1 << 40]);
        assert!(t.read_f32(&i64s).is_none());
        let i8s = vec![0xffu8, 7];
        assert_eq!(le(DType::I8, i8s.clone(), 2).read_i64(&i8s).unwrap(), [-1, 7]);
        assert_eq!(le(DType::U8, i8s.clone(), 2).read_i64(&i8s).unwrap(), [255, 7]);
        assert_eq!(DType::BF16.to_string(), "BF16");
        assert_eq!(DType::Bool.to_string(), "BOOL");
        assert_eq!(DType::BF16.name(), "bf16");
    }

    #[test]
    fn contiguous_strides_are_row_major() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), [12, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
    }
}
