//! Arbitrary bytes → safetensors → block → forward on a small input: nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ndarray::Array5;
#[path = "../../tests/oracle/golden.rs"]
#[allow(dead_code)]
mod golden;

use golden::{config_from_metadata, GoldenCase};
use nonlocal::{detect_naming, Mode, NonLocalBlock, NonLocalConfig, TensorFile, WeightKeys};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = TensorFile::from_bytes(data.to_vec()) else { return };
    // Configurations to try: the file's own metadata (golden format), then a few fixed ones
    // under the detected key scheme.
    let mut tries: Vec<(NonLocalConfig, WeightKeys)> = Vec::new();
    if let Ok(found) = config_from_metadata(file.metadata()) {
        tries.push(found);
    }
    let naming = detect_naming(&file, "").unwrap_or(nonlocal::Naming::AlexHex7);
    for mode in Mode::ALL {
        for (c, ci) in [(8, 4), (6, 3)] {
            for sub in [Some([1, 2, 2]), None] {
                for bn in [true, false] {
                    let config = NonLocalConfig::new(c).inter_channels(ci).mode(mode).sub_sample(sub).bn_layer(bn);
                    tries.push((config, WeightKeys::new(naming, "")));
                }
            }
        }
    }
    for (config, keys) in tries {
        let Ok(block) = NonLocalBlock::from_checkpoint(config.clone(), &file, &keys) else { continue };
        if config.in_channels > 64 {
            continue;
        }
        let x = Array5::from_shape_fn((1, 2, 4, 5, config.in_channels), |(_, t, h, w, c)| {
            ((t * 7 + h * 5 + w * 3 + c) % 11) as f32 * 0.2 - 1.0
        });
        let _ = block.forward(&x);
        let _ = block.attention_rows(&x, &[0, 3]);
    }
    if let Ok(case) = GoldenCase::from_file(file) {
        if case.config().is_some_and(|config| config.in_channels <= 64) {
            let _ = case.check();
        }
    }
});
