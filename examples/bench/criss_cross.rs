//! `--block cc`: criss-cross attention (mmcv's `CrissCrossAttention`) at the shape of CCNet's
//! head on a Cityscapes 512×1024 crop at stride 8 (C = 512, H = 64, W = 128), recurrence 1 and 2.

use nonlocal::{Conv1x1, CrissCrossAttention, CrissCrossConfig, CrissCrossParameters};

use crate::{median_and_min_seconds, peak_mb, Args};

/// Criss-cross shapes: (name, C, H, W), B = 1, qk = C/8.
const CC_SHAPES: [(&str, usize, usize, usize); 1] = [("seg-stride8", 512, 64, 128)];

/// Nominal FLOPs of criss-cross attention applied r times: per application the stacked
/// projection 2·N·C·(2·qk + C), the logits 2·N·(H + W − 1)·qk and the aggregation
/// 2·N·(H + W − 1)·C (the energies of the diagonal, computed and dropped, not counted).
fn cc_flops(c: usize, h: usize, w: usize, r: usize) -> f64 {
    let (c, qk, n, keys) = (c as f64, (c / 8) as f64, (h * w) as f64, (h + w - 1) as f64);
    r as f64 * (2.0 * n * c * (2.0 * qk + c) + 2.0 * n * keys * qk + 2.0 * n * keys * c)
}

/// A criss-cross block with every parameter non-trivial.
fn cc_block(c: usize, recurrence: usize) -> CrissCrossAttention {
    let config = CrissCrossConfig::new(c).recurrence(recurrence);
    let qk = config.qk_channels;
    let mut state = 0x0bad_cafe_1234_5678u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut conv = |out: usize| {
        let weight = ndarray::Array2::from_shape_fn((out, c), |_| next() / (c as f32).sqrt());
        Conv1x1::new(weight, Some(ndarray::Array1::from_shape_fn(out, |_| next() * 0.1)))
    };
    let (query, key, value) = (conv(qk), conv(qk), conv(c));
    let params = CrissCrossParameters { query, key, value, gamma: 0.5 };
    CrissCrossAttention::from_parameters(config, params).expect("bench parameters fit")
}

pub fn bench_cc(args: &Args, peak: f64) {
    for (name, c, h, w) in CC_SHAPES {
        if args.shape.as_deref().is_some_and(|s| s != name) {
            continue;
        }
        let x = ndarray::Array4::<f32>::from_shape_fn((1, h, w, c), |(_, hi, wi, ci)| {
            (((hi * 17 + wi * 7 + ci * 3) % 29) as f32 / 29.0 - 0.5) * 2.0
        });
        for recurrence in [1, 2] {
            let block = cc_block(c, recurrence);
            let flops = cc_flops(c, h, w, recurrence);
            let (median, min) = median_and_min_seconds(args.reps, || {
                std::hint::black_box(block.forward_images(&x).expect("bench forward"));
            });
            // A clone starts without the scratch buffers the block keeps, so all of them count.
            let fresh = block.clone();
            let mib = peak_mb(&mut || _ = std::hint::black_box(fresh.forward_images(&x).expect("bench forward")));
            let gflops = flops / median / 1e9;
            println!(
                "shape={name} block=cc recurrence={recurrence} ms={:.2} gflops={gflops:.1} sgemm_gflops={peak:.1} pct_peak={:.1} peak_mb={mib:.1} min_ms={:.2}",
                median * 1e3,
                100.0 * gflops / peak,
                min * 1e3
            );
            if args.backward {
                let grad_output = x.mapv(|v| v * 0.5);
                let step = |block: &CrissCrossAttention| {
                    let (z, ctx) = block.forward_train(&x).expect("bench forward_train");
                    std::hint::black_box(z);
                    std::hint::black_box(block.backward(&ctx, &grad_output).expect("bench backward"));
                };
                let (median, min) = median_and_min_seconds(args.reps, || step(&block));
                let fresh = block.clone();
                let mib = peak_mb(&mut || step(&fresh));
                let gflops = 3.0 * flops / median / 1e9;
                println!(
                    "shape={name} block=cc recurrence={recurrence} pass=train ms={:.2} gflops={gflops:.1} sgemm_gflops={peak:.1} pct_peak={:.1} peak_mb={mib:.1} min_ms={:.2}",
                    median * 1e3,
                    100.0 * gflops / peak,
                    min * 1e3
                );
            }
        }
    }
}
