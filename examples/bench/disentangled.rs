//! `--block dnl`: the disentangled non-local block (DNLNet, mmsegmentation's `DNLHead`) at a
//! segmentation head's shape on a Cityscapes 512×1024 crop at stride 8 (C = 512, H = 64,
//! W = 128: N = 8192 positions, every one a key), embedded Gaussian, temperature 0.05.

use ndarray::Array4;
use nonlocal::{BatchNorm, Conv1x1, DisentangledConfig, DisentangledNonLocal, Parameters};

use crate::{median_and_min_seconds, peak_mb, Args};

/// (name, C, H, W), B = 1, C' = C/2.
const SHAPES: [(&str, usize, usize, usize); 1] = [("seg-stride8", 512, 64, 128)];

/// Nominal FLOPs: θ, φ, g and the mask 2·N·C·(3C' + 1), `W_z` 2·N·C'·C, logits and aggregation
/// 2·N·N·C' each.
fn dnl_flops(c: usize, n: usize) -> f64 {
    let (c, ci, n) = (c as f64, (c / 2) as f64, n as f64);
    2.0 * n * c * (3.0 * ci + 1.0) + 2.0 * n * ci * c + 4.0 * n * n * ci
}

/// A disentangled block with every parameter non-trivial.
fn dnl_block(c: usize) -> DisentangledNonLocal {
    let config = DisentangledConfig::mmseg(c);
    let ci = config.non_local.inter_channels;
    let mut state = 0x5eed_d11e_1234_5678u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut conv = |out: usize, inp: usize, bias: bool| {
        let weight = ndarray::Array2::from_shape_fn((out, inp), |_| next() / (inp as f32).sqrt());
        Conv1x1::new(weight, bias.then(|| ndarray::Array1::from_shape_fn(out, |_| next() * 0.1)))
    };
    let (theta, phi, g) = (conv(ci, c, true), conv(ci, c, true), conv(ci, c, true));
    let w_z = conv(c, ci, false);
    let bn = BatchNorm {
        weight: ndarray::Array1::ones(c),
        bias: ndarray::Array1::zeros(c),
        running_mean: ndarray::Array1::zeros(c),
        running_var: ndarray::Array1::ones(c),
    };
    let params = Parameters { theta: Some(theta), phi: Some(phi), g, w_z, bn: Some(bn), concat_project: None };
    let mask = conv(1, c, true);
    DisentangledNonLocal::from_parameters(config, params, mask).expect("bench parameters fit")
}

pub fn bench_dnl(args: &Args, peak: f64) {
    for (name, c, h, w) in SHAPES {
        if args.shape.as_deref().is_some_and(|s| s != name) {
            continue;
        }
        let x = Array4::<f32>::from_shape_fn((1, h, w, c), |(_, hi, wi, ci)| {
            (((hi * 17 + wi * 7 + ci * 3) % 29) as f32 / 29.0 - 0.5) * 2.0
        });
        let block = dnl_block(c);
        let flops = dnl_flops(c, h * w);
        let (median, min) = median_and_min_seconds(args.reps, || {
            std::hint::black_box(block.forward_images(&x).expect("bench forward"));
        });
        let mib = peak_mb(&mut || _ = std::hint::black_box(block.forward_images(&x).expect("bench forward")));
        let gflops = flops / median / 1e9;
        println!(
            "shape={name} block=dnl ms={:.2} gflops={gflops:.1} sgemm_gflops={peak:.1} pct_peak={:.1} peak_mb={mib:.1} min_ms={:.2}",
            median * 1e3,
            100.0 * gflops / peak,
            min * 1e3
        );
        if args.backward {
            let x5 = x.view().insert_axis(ndarray::Axis(1)).to_owned();
            let grad_output = x5.mapv(|v| v * 0.5);
            let mut step = || {
                let (z, ctx) = block.forward_train(&x5).expect("bench forward_train");
                std::hint::black_box(z);
                std::hint::black_box(block.backward(&ctx, &grad_output).expect("bench backward"));
            };
            let (median, min) = median_and_min_seconds(args.reps, &mut step);
            let mib = peak_mb(&mut step);
            let gflops = 3.0 * flops / median / 1e9;
            println!(
                "shape={name} block=dnl pass=train ms={:.2} gflops={gflops:.1} sgemm_gflops={peak:.1} pct_peak={:.1} peak_mb={mib:.1} min_ms={:.2}",
                median * 1e3,
                100.0 * gflops / peak,
                min * 1e3
            );
        }
    }
}
