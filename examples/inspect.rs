//! Lists the blocks of a checkpoint (safetensors, torch zip `.pth`, legacy torch): non-local,
//! disentangled, context (GCNet) and criss-cross blocks.
//!
//! ```text
//! cargo run --release --example inspect -- tests/data/pth/pth_mmaction_i3d.pth
//! ```
//!
//! Prints one line per block, as `nonlocal::FoundBlock` displays it: for a non-local block
//! `prefix=<p> naming=<alexhex7|mmcv|timm> in_channels=<C> inter_channels=<C'> sub_sample=<true|false> bn=<true|false> dims=<1|2|3> dtype=<f32|f16|bf16|f64>`
//! (` block=disentangled` after it for a disentangled one), for the others
//! `prefix=<p> naming=<n> block=<context_block|global_context|criss_cross> in_channels=<C> …`,
//! and on stderr the file's format and where its state dict was found. With several files,
//! each line starts with the file's path. Exit status 1 when a file cannot be read or holds
//! no block.

use std::process::ExitCode;

use nonlocal::{find_all_blocks, TensorFile};

fn main() -> ExitCode {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        eprintln!("usage: inspect CHECKPOINT...");
        return ExitCode::FAILURE;
    }
    let mut ok = true;
    for path in &paths {
        let file = match TensorFile::open(path) {
            Ok(file) => file,
            Err(e) => {
                eprintln!("error: {e}");
                ok = false;
                continue;
            }
        };
        let location = match file.state_dict_location() {
            "" => String::new(),
            key => format!(", state dict under {key:?}"),
        };
        let blocks = find_all_blocks(&file);
        eprintln!("{path}: {}{location}, {} tensors, {} blocks", file.format(), file.keys().len(), blocks.len());
        ok &= !blocks.is_empty();
        for block in blocks {
            if paths.len() > 1 {
                println!("{path}: {block}");
            } else {
                println!("{block}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
