//! Arbitrary bytes → checkpoint reader (safetensors, torch zip, legacy torch) → block
//! discovery (every kind of the family) → every tensor read → each found block loaded and
//! run: nothing may panic,
//! overflow the stack or allocate beyond what the input backs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ndarray::Array5;
use nonlocal::{
    find_all_blocks, BlockKind, ContextBlock, CrissCrossAttention, DisentangledConfig, DisentangledNonLocal,
    FoundBlock, NonLocalBlock, TensorFile,
};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = TensorFile::from_bytes(data.to_vec()) else { return };
    for key in file.keys_in_order() {
        let _ = file.shape(key);
        let _ = file.tensor(key);
        let _ = file.tensor_i64(key);
    }
    for found in find_all_blocks(&file) {
        let _ = found.to_string();
        let (c, dims) = match &found {
            FoundBlock::NonLocal(info) => (info.in_channels, info.conv_dims),
            FoundBlock::Context { config, .. } => (config.in_channels, 2),
            FoundBlock::CrissCross { config, .. } => (config.in_channels, 2),
            _ => continue,
        };
        if c > 64 {
            continue;
        }
        // A clip the block's rank takes: T = 1 for 2-d blocks, T = H = 1 for 1-d ones.
        let (t, h) = match dims {
            1 => (1, 1),
            2 => (1, 4),
            _ => (2, 4),
        };
        let x = Array5::from_shape_fn((1, t, h, 4, c), |(_, t, h, w, c)| {
            ((t * 7 + h * 5 + w * 3 + c) % 11) as f32 * 0.2 - 1.0
        });
        match found {
            FoundBlock::NonLocal(info) if info.kind == BlockKind::Disentangled => {
                let config = DisentangledConfig::from_info(&info);
                let Ok(block) = DisentangledNonLocal::from_checkpoint(config, &file, &info.keys) else { continue };
                let _ = block.forward(&x);
            }
            FoundBlock::NonLocal(info) => {
                let Ok(block) = NonLocalBlock::from_checkpoint(info.config(), &file, &info.keys) else { continue };
                let _ = block.forward(&x);
            }
            FoundBlock::Context { keys, config } => {
                let Ok(block) = ContextBlock::from_checkpoint(config, &file, &keys) else { continue };
                let _ = block.forward(&x);
            }
            FoundBlock::CrissCross { keys, config } => {
                let Ok(block) = CrissCrossAttention::from_checkpoint(config, &file, &keys) else { continue };
                let _ = block.forward(&x);
            }
            _ => {}
        }
    }
});
