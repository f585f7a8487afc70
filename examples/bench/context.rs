//! `--block gc`: the global context block (GCNet) at ResNet-50 stage 4 detection size
//! (C = 2048, H = 25, W = 42), against memory bandwidth measured in the same process.

use ndarray::Array5;
use nonlocal::{ContextBlock, ContextConfig, ContextMlp, ContextParameters, Conv1x1};
use rayon::prelude::*;

use crate::{interleaved_medians, Args};

/// The context block's configurations timed by `--block gc`: GCNet's detection settings in
/// mmdetection (ratio 1/16 and 1/4, attention pooling, add fusion) and timm's default.
fn context_configs(c: usize) -> [(&'static str, ContextConfig); 3] {
    [
        ("mmcv-r16-add", ContextConfig::mmcv(c, 1.0 / 16.0)),
        ("mmcv-r4-add", ContextConfig::mmcv(c, 0.25)),
        ("timm-scale", ContextConfig::timm(c)),
    ]
}

/// A context block with every parameter non-trivial.
fn bench_context(config: ContextConfig) -> ContextBlock {
    let (c, p) = (config.in_channels, config.planes);
    let mut state = 0x0123_4567_89ab_cdefu64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut conv = |out: usize, inp: usize| {
        let scale = 1.0 / (inp as f32).sqrt();
        Conv1x1::new(
            ndarray::Array2::from_shape_fn((out, inp), |_| next() * scale),
            Some(ndarray::Array1::from_shape_fn(out, |_| next() * 0.1)),
        )
    };
    let mask = Some(conv(1, c));
    let mut mlp = |on: bool| {
        on.then(|| ContextMlp {
            conv1: conv(p, c),
            ln_weight: ndarray::Array1::ones(p),
            ln_bias: ndarray::Array1::zeros(p),
            conv2: conv(c, p),
        })
    };
    let (add, mul) = (mlp(config.fuse_add), mlp(config.fuse_mul));
    ContextBlock::from_parameters(config, ContextParameters { mask, add, mul }).expect("bench parameters fit")
}

/// One parallel copy of `x` into `out`, in 64k-float chunks over the current rayon pool (as
/// the block's passes run).
fn copy_probe(x: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(1 << 16).zip(x.par_chunks(1 << 16)).for_each(|(o, x)| o.copy_from_slice(x));
    std::hint::black_box(out);
}

/// One parallel sum over `x`: 64 lanes (four AVX-512 vectors) so the adds keep up with
/// the loads.
fn sum_probe(x: &[f32]) {
    let total: f32 = x
        .par_chunks(1 << 16)
        .map(|x| {
            let (blocks, tail) = x.as_chunks::<64>();
            let mut acc = [0.0f32; 64];
            for block in blocks {
                for (a, &v) in acc.iter_mut().zip(block) {
                    *a += v;
                }
            }
            acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
        })
        .sum();
    std::hint::black_box(total);
}

pub fn bench_context_block(args: &Args) {
    let (name, c, h, w) = ("detect-res5", 2048, 25, 42);
    let threads = rayon::current_num_threads();
    let x = Array5::<f32>::from_shape_fn((1, 1, h, w, c), |(_, _, hi, wi, ci)| {
        (((hi * 17 + wi * 7 + ci * 3) % 29) as f32 / 29.0 - 0.5) * 2.0
    });
    let x_images = x.index_axis(ndarray::Axis(1), 0);
    let xs = x.as_slice().expect("standard layout");
    let mut out = Array5::<f32>::zeros(x.raw_dim());
    let mut copy_out = vec![0.0f32; xs.len()];
    let bytes = (x.len() * 4) as f64;
    let gbs = |bytes: f64, seconds: f64| bytes / seconds / 1e9;
    // Sub-millisecond runs: many rounds for stable medians.
    let reps = args.reps.max(5) * 20;
    println!("threads={threads} simd={} x_mb={:.1}", nonlocal::simd_path(), bytes / 1e6);
    for (config_name, config) in context_configs(c) {
        let block = bench_context(config);
        let weights: usize = block.parameters().named(block.config().naming).iter().map(|(_, t)| t.len()).sum();
        let weight_bytes = (weights * 4) as f64;
        // One position: pooling and fusion vanish, the MLPs remain.
        let one = x.slice(ndarray::s![.., .., ..1, ..1, ..]).to_owned();
        let t = interleaved_medians(
            reps,
            &mut [
                &mut || {
                    std::hint::black_box(block.forward(&one).expect("bench forward"));
                },
                &mut || copy_probe(xs, &mut copy_out),
                &mut || sum_probe(xs),
                &mut || {
                    std::hint::black_box(block.context(&x_images).expect("bench context"));
                },
                &mut || block.forward_into(&x, &mut out).expect("bench forward"),
                &mut || {
                    std::hint::black_box(block.forward(&x).expect("bench forward"));
                },
            ],
        );
        let ((mlp, _), (copy, copy_min), (sum, _), (pool, _), (forward, forward_min), (alloc, _)) =
            (t[0], t[1], t[2], t[3], t[4], t[5]);
        // Streaming bound: x read twice, out written once, the MLP weights read once.
        let ideal = copy + sum * (1.0 + weight_bytes / bytes);
        println!(
            "shape={name} block=gc config={config_name} ms={:.3} gbs={:.1} copy_gbs={:.1} sum_gbs={:.1} pct_copy={:.1} \
             pct_ideal={:.1} pool_ms={:.3} mlp_ms={:.3} copy_ms={:.3} sum_ms={:.3} weights_mb={:.1} min_ms={:.3} min_pct_copy={:.1} alloc_ms={:.3}",
            forward * 1e3,
            gbs(2.0 * bytes, forward),
            gbs(2.0 * bytes, copy),
            gbs(bytes, sum),
            100.0 * copy / forward,
            100.0 * ideal / forward,
            pool * 1e3,
            mlp * 1e3,
            copy * 1e3,
            sum * 1e3,
            weight_bytes / 1e6,
            forward_min * 1e3,
            100.0 * copy_min / forward_min,
            alloc * 1e3
        );
        if args.backward {
            let grad_output = x.mapv(|v| v * 0.5);
            let t = interleaved_medians(
                args.reps.max(5) * 4,
                &mut [&mut || copy_probe(xs, &mut copy_out), &mut || {
                    let (z, ctx) = block.forward_train(&x).expect("bench forward_train");
                    std::hint::black_box(z);
                    std::hint::black_box(block.backward(&ctx, &grad_output).expect("bench backward"));
                }],
            );
            println!(
                "shape={name} block=gc config={config_name} pass=train ms={:.3} pct_copy={:.1} copy_ms={:.3}",
                t[1].0 * 1e3,
                100.0 * t[0].0 / t[1].0,
                t[0].0 * 1e3
            );
        }
    }
}
