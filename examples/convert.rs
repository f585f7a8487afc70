//! Converts the non-local blocks of a checkpoint to another key scheme, for PyTorch.
//!
//! ```text
//! cargo run --release --example convert -- --to mmcv IN OUT.safetensors
//! ```
//!
//! IN is any checkpoint the crate reads (safetensors, torch zip `.pth`, legacy torch). Every
//! block [`find_blocks`] lists is loaded with the configuration its keys show and written to
//! OUT under the keys of `--to` (`alexhex7` or `mmcv`), at its own prefix: the file PyTorch's
//! strict `load_state_dict` takes for that implementation's module (mmcv's `conv_out` has no
//! bias when BatchNorm follows, so AlexHex7's `W.0.bias` is folded into the BatchNorm's
//! running mean). Other tensors of IN are not copied. Exit status 1 on any error.

use std::process::ExitCode;

use nonlocal::{find_blocks, Naming, NonLocalBlock, Result, TensorFile, WeightKeys};
use safetensors::tensor::{Dtype, TensorView};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (naming, input, output) = match args.as_slice() {
        [flag, naming, input, output] if flag == "--to" => match naming.parse::<Naming>() {
            Ok(naming) => (naming, input, output),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => {
            eprintln!("usage: convert --to alexhex7|mmcv IN OUT.safetensors");
            return ExitCode::FAILURE;
        }
    };
    match convert(naming, input, output) {
        Ok(blocks) => {
            eprintln!("{output}: {blocks} block(s) under {naming} keys");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes every block of `input` to `output` under `naming`; returns how many.
fn convert(naming: Naming, input: &str, output: &str) -> Result<usize> {
    let file = TensorFile::open(input)?;
    let blocks = find_blocks(&file);
    if blocks.is_empty() {
        return Err(nonlocal::Error::MissingKey { key: format!("a non-local block in {input}") });
    }
    // Each block's export, read back: (key, dtype, shape, little-endian bytes).
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for info in &blocks {
        let block = NonLocalBlock::from_checkpoint(info.config(), &file, &info.keys)?;
        let keys = WeightKeys::new(naming, info.keys.prefix.clone());
        let exported = TensorFile::from_bytes(block.to_safetensors_with_keys(&keys)?)?;
        for key in exported.keys() {
            let shape = exported.shape(key)?.to_vec();
            let (dtype, bytes) = if key.ends_with("num_batches_tracked") {
                (Dtype::I64, exported.tensor_i64(key)?.iter().flat_map(|v| v.to_le_bytes()).collect())
            } else {
                (Dtype::F32, exported.tensor(key)?.iter().flat_map(|v| v.to_le_bytes()).collect())
            };
            tensors.push((key.to_string(), dtype, shape, bytes));
        }
    }
    let views = tensors
        .iter()
        .map(|(key, dtype, shape, bytes)| Ok((key.clone(), TensorView::new(*dtype, shape.clone(), bytes)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .and_then(|views| safetensors::serialize(views, None))
        .map_err(|e| nonlocal::Error::SaveFailed { reason: e.to_string() })?;
    std::fs::write(output, views).map_err(|source| nonlocal::Error::Io { path: output.to_string(), source })?;
    Ok(blocks.len())
}
