//! safetensors files: the header's tensors, in the order of their data, and its metadata.

use std::collections::HashMap;

use ::safetensors::SafeTensors;

use super::tensor::{contiguous_strides, ByteOrder, DType, TensorLayout};
use super::Entry;

/// A file's tensors in the order of their data, and the header's `__metadata__`.
pub(crate) type Tensors = (Vec<(String, Entry)>, HashMap<String, String>);

/// The tensors of a safetensors file (every offset checked against the bytes), in the order
/// of their data, and the header's `__metadata__`.
///
/// # Errors
/// What safetensors finds wrong with the header or the offsets, in words.
pub(crate) fn read(bytes: &[u8]) -> Result<Tensors, String> {
    // `deserialize` validates the header and every tensor's offsets against the buffer.
    SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let data_start = 8 + header_len;
    let entries = metadata
        .offset_keys()
        .into_iter()
        .filter_map(|key| Some((metadata.info(&key)?, key)))
        .map(|(info, key)| {
            let (start, end) = info.data_offsets;
            let layout = TensorLayout {
                dtype: dtype(info.dtype),
                strides: contiguous_strides(&info.shape),
                shape: info.shape.clone(),
                offset: 0,
                storage: data_start + start..data_start + end,
                order: ByteOrder::Little,
            };
            (key, Entry::Tensor(layout))
        })
        .collect();
    Ok((entries, metadata.metadata().clone().unwrap_or_default()))
}

fn dtype(dtype: ::safetensors::Dtype) -> DType {
    use ::safetensors::Dtype as S;
    match dtype {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        S::I8 => DType::I8,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool,
        other => DType::Other(format!("{other:?}")),
    }
}
