//! Arbitrary bytes → checkpoint reader (safetensors, torch zip, legacy torch) → block
//! discovery → every tensor read → each found block loaded and run: nothing may panic,
//! overflow the stack or allocate beyond what the input backs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ndarray::Array5;
use nonlocal::{find_blocks, TensorFile};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = TensorFile::from_bytes(data.to_vec()) else { return };
    for key in file.keys_in_order() {
        let _ = file.shape(key);
        let _ = file.tensor(key);
        let _ = file.tensor_i64(key);
    }
    for info in find_blocks(&file) {
        let _ = info.to_string();
        let Ok(block) = info.load(&file) else { continue };
        if info.in_channels > 64 {
            continue;
        }
        let x = Array5::from_shape_fn((1, 2, 4, 4, info.in_channels), |(_, t, h, w, c)| {
            ((t * 7 + h * 5 + w * 3 + c) % 11) as f32 * 0.2 - 1.0
        });
        let _ = block.forward(&x);
    }
});
