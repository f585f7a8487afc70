//! Throughput of the block on the paper's shapes, as a fraction of the sgemm peak measured in
//! the same process.
//!
//! ```text
//! cargo run --release --example bench -- [--shape NAME] [--mode eg|dp|concat|gauss] [--reps N] [--backward]
//! ```
//!
//! First measures the sgemm peak: the best 2048×2048×2048 sgemm a Rust crate runs on this
//! machine over the same rayon threads the block uses (one single-threaded sgemm per row block,
//! as the block runs its own GEMMs), best of 5 each: matrixmultiply, the `gemm` crate (with its
//! AVX-512 kernels, feature `x86-v4`) and this crate's own GEMM (the packed AVX-512 kernel where
//! it runs). It prints all three and the path the block uses (`simd=avx512|avx2|portable`, see
//! `NONLOCAL_SIMD` in the README). Then runs each case and prints
//! `shape=… mode=… ms=<median> gflops=<nominal/median> sgemm_gflops=<peak> pct_peak=…`.
//! Nominal FLOPs are the direct algorithm's (see `nominal_flops`), so implementations that do
//! less work (dot product, concatenation) can exceed 100%.
//!
//! With `--backward`, each case adds a line
//! `shape=… mode=… pass=train ms=<median forward_train + backward> gflops=<3 × nominal / ms> …`.
//!
//! `--block gc` times the global context block (GCNet) instead, at ResNet-50 stage 4
//! detection size (C = 2048, H = 25, W = 42): a memory-bound block, so it is compared with
//! memory bandwidth measured in the same process over the same threads, a plain copy of x
//! (read + write) and a sum over x (read). Each configuration prints
//! `shape=detect-res5 block=gc config=… ms=<median> gbs=<(|x| + |out|) / ms> copy_gbs=… sum_gbs=…
//! pct_copy=<copy ms / block ms> pct_ideal=<(copy + sum) ms / block ms>`: the block reads x
//! twice and writes once, so `pct_ideal` 100 is the streaming bound (the MLP weights, read
//! once per call, come on top; `weights_mb` says how much). `ms` is `forward_into` (no
//! allocation); `alloc_ms` is `forward`, which allocates the output (page faults on a fresh
//! 8.6 MB buffer can cost as much as the block), `pool_ms` the context pooling alone,
//! `mlp_ms` the block on one position (the MLPs alone), `min_ms` the fastest round. With
//! `--backward`, a `pass=train` line times forward_train + backward against the same copy.

use std::time::Instant;

use ndarray::Array5;
use nonlocal::internal::kernels::gemm::par_gemm;
use nonlocal::internal::kernels::views::{MatMut, MatRef};
use nonlocal::{
    BatchNorm, ContextBlock, ContextConfig, ContextMlp, ContextParameters, Conv1x1, Mode, NonLocalBlock,
    NonLocalConfig, Parameters,
};
use rayon::prelude::*;

/// (name, C, T, H, W) with B = 1, sub-sampling 1x2x2, C' = C/2, BatchNorm.
const SHAPES: [(&str, usize, usize, usize, usize); 4] = [
    ("video-res4", 1024, 4, 14, 14),
    ("video-res3", 512, 4, 28, 28),
    ("detect-res4", 1024, 1, 50, 84),
    ("video-res2", 256, 8, 56, 56),
];

const MODES: [(&str, Mode); 4] = [
    ("eg", Mode::EmbeddedGaussian),
    ("dp", Mode::DotProduct),
    ("concat", Mode::Concatenation),
    ("gauss", Mode::Gaussian),
];

struct Args {
    shape: Option<String>,
    mode: Option<String>,
    reps: usize,
    backward: bool,
    /// `nl` (the non-local block, default) or `gc` (the global context block).
    block: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { shape: None, mode: None, reps: 5, backward: false, block: "nl".into() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--shape" => args.shape = Some(value()?),
            "--mode" => args.mode = Some(value()?),
            "--backward" => args.backward = true,
            "--block" => args.block = value()?,
            "--reps" => args.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !["nl", "gc"].contains(&args.block.as_str()) {
        return Err(format!("unknown block {}: nl or gc", args.block));
    }
    if args.block == "gc" {
        return Ok(args);
    }
    if let Some(s) = &args.shape {
        if !SHAPES.iter().any(|(n, ..)| n == s) {
            return Err(format!("unknown shape {s}"));
        }
    }
    if let Some(m) = &args.mode {
        if !MODES.iter().any(|(n, _)| n == m) {
            return Err(format!("unknown mode {m}: eg, dp, concat or gauss"));
        }
    }
    Ok(args)
}

/// A single-threaded sgemm `C ← A·B` on row-major n×n blocks: rows of A and C, all of B.
type Sgemm = fn(rows: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]);

fn matrixmultiply_sgemm(rows: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    let ld = n as isize;
    // SAFETY: a is rows × n, b n × n, c rows × n, all row-major.
    unsafe { matrixmultiply::sgemm(rows, n, n, 1.0, a.as_ptr(), ld, 1, b.as_ptr(), ld, 1, 0.0, c.as_mut_ptr(), ld, 1) }
}

fn gemm_crate_sgemm(rows: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    let ld = n as isize;
    // SAFETY: as above; `gemm` computes dst ← alpha·dst + beta·lhs·rhs (alpha 0, beta 1).
    unsafe {
        gemm::gemm(
            rows,
            n,
            n,
            c.as_mut_ptr(),
            1,
            ld,
            false,
            a.as_ptr(),
            1,
            ld,
            b.as_ptr(),
            1,
            ld,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Best-of-5 GFLOP/s of a 2048³ sgemm over the rayon pool, one row block per thread, for
/// matrixmultiply, the gemm crate and this crate's own `par_gemm`.
fn sgemm_peaks() -> [(&'static str, f64); 3] {
    let n = 2048;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; n * n];
    let flops = 2.0 * (n * n * n) as f64;
    let best_of_5 = |c: &mut Vec<f32>, run: &dyn Fn(&mut Vec<f32>)| {
        let times = (0..5).map(|_| {
            let start = Instant::now();
            run(c);
            start.elapsed().as_secs_f64()
        });
        flops / times.fold(f64::MAX, f64::min) / 1e9
    };
    let (a, b) = (&a, &b);
    let blocks = move |f: Sgemm| {
        move |c: &mut Vec<f32>| {
            let rows = n.div_ceil(rayon::current_num_threads()).next_multiple_of(8);
            c.par_chunks_mut(rows * n).enumerate().for_each(|(i, c)| {
                let r = c.len() / n;
                f(r, n, &a[i * rows * n..(i * rows + r) * n], b, c)
            });
        }
    };
    let own = |c: &mut Vec<f32>| {
        let (am, bm) = (MatRef::new(a, 0, n, n, n), MatRef::new(b, 0, n, n, n));
        par_gemm(1.0, am, bm, 0.0, &mut MatMut::new(c, n, n, n));
    };
    [
        ("matrixmultiply", best_of_5(&mut c, &blocks(matrixmultiply_sgemm))),
        ("gemm", best_of_5(&mut c, &blocks(gemm_crate_sgemm))),
        ("nonlocal", best_of_5(&mut c, &own)),
    ]
}

/// The direct algorithm's FLOPs: projections 2·N·C·C' each (θ, φ, g; Gaussian only g) and
/// 2·N·C'·C for W_z; pairwise 2·N·M·d (d = C' for EG/DP, C for Gaussian, 2C' for
/// concatenation); aggregation 2·N·M·C'.
fn nominal_flops(mode: Mode, c: usize, n: usize, m: usize) -> f64 {
    let (c, ci, n, m) = (c as f64, (c / 2) as f64, n as f64, m as f64);
    let projections = if mode == Mode::Gaussian { 1.0 } else { 3.0 };
    let d = match mode {
        Mode::EmbeddedGaussian | Mode::DotProduct => ci,
        Mode::Gaussian => c,
        Mode::Concatenation => 2.0 * ci,
    };
    2.0 * n * c * ci * projections + 2.0 * n * ci * c + 2.0 * n * m * d + 2.0 * n * m * ci
}

/// A block with every parameter non-trivial (so no work can be skipped).
fn bench_block(mode: Mode, c: usize) -> NonLocalBlock {
    let config = NonLocalConfig::new(c).mode(mode).sub_sample(Some([1, 2, 2]));
    let ci = config.inter_channels;
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut matrix = |r: usize, k: usize| ndarray::Array2::from_shape_fn((r, k), |_| next() / (k as f32).sqrt());
    let theta = Conv1x1::new(matrix(ci, c), Some(ndarray::Array1::zeros(ci)));
    let phi = Conv1x1::new(matrix(ci, c), Some(ndarray::Array1::zeros(ci)));
    let g = Conv1x1::new(matrix(ci, c), Some(ndarray::Array1::zeros(ci)));
    let w_z = Conv1x1::new(matrix(c, ci), Some(ndarray::Array1::zeros(c)));
    let bn = BatchNorm {
        weight: ndarray::Array1::ones(c),
        bias: ndarray::Array1::zeros(c),
        running_mean: ndarray::Array1::zeros(c),
        running_var: ndarray::Array1::ones(c),
    };
    let theta_phi = mode != Mode::Gaussian;
    let params = Parameters {
        theta: theta_phi.then_some(theta),
        phi: theta_phi.then_some(phi),
        g,
        w_z,
        bn: Some(bn),
        concat_project: (mode == Mode::Concatenation).then(|| matrix(1, 2 * ci).into_shape_with_order(2 * ci).unwrap()),
    };
    NonLocalBlock::from_parameters(config, params).expect("bench parameters fit")
}

/// Median wall time of `reps` runs after one warm-up run.
fn median_seconds(reps: usize, mut run: impl FnMut()) -> f64 {
    run();
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    if args.block == "gc" {
        bench_context_block(&args);
        return;
    }
    let threads = rayon::current_num_threads();
    let peaks = sgemm_peaks();
    let peak = peaks.iter().map(|p| p.1).fold(0.0, f64::max);
    let each: Vec<String> = peaks.iter().map(|(name, g)| format!("{name}={g:.1}")).collect();
    println!(
        "threads={threads} simd={} sgemm 2048^3 GFLOP/s: {} peak={peak:.1}",
        nonlocal::simd_path(),
        each.join(" ")
    );
    for (name, c, t, h, w) in SHAPES {
        if args.shape.as_deref().is_some_and(|s| s != name) {
            continue;
        }
        let x = Array5::<f32>::from_shape_fn((1, t, h, w, c), |(_, ti, hi, wi, ci)| {
            (((ti * 31 + hi * 17 + wi * 7 + ci * 3) % 29) as f32 / 29.0 - 0.5) * 2.0
        });
        let (n, m) = (t * h * w, t * (h / 2) * (w / 2));
        for (mode_name, mode) in MODES {
            if args.mode.as_deref().is_some_and(|s| s != mode_name) {
                continue;
            }
            let block = bench_block(mode, c);
            let flops = nominal_flops(mode, c, n, m);
            let median = median_seconds(args.reps, || {
                std::hint::black_box(block.forward(&x).expect("bench forward"));
            });
            let gflops = flops / median / 1e9;
            println!(
                "shape={name} mode={mode_name} ms={:.2} gflops={gflops:.1} sgemm_gflops={peak:.1} pct_peak={:.1}",
                median * 1e3,
                100.0 * gflops / peak
            );
            if args.backward {
                let grad_output = x.mapv(|v| v * 0.5);
                let median = median_seconds(args.reps, || {
                    let (z, ctx) = block.forward_train(&x).expect("bench forward_train");
                    std::hint::black_box(z);
                    std::hint::black_box(block.backward(&ctx, &grad_output).expect("bench backward"));
                });
                let gflops = 3.0 * flops / median / 1e9;
                println!(
                    "shape={name} mode={mode_name} pass=train ms={:.2} gflops={gflops:.1} sgemm_gflops={peak:.1} pct_peak={:.1}",
                    median * 1e3,
                    100.0 * gflops / peak
                );
            }
        }
    }
}

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

/// (median, min) seconds of each of `runs`, timed interleaved (one of each per round, `reps`
/// rounds after a warm-up round), so all see the same machine load.
fn interleaved_medians(reps: usize, runs: &mut [&mut dyn FnMut()]) -> Vec<(f64, f64)> {
    let mut times = vec![Vec::with_capacity(reps); runs.len()];
    for round in 0..=reps {
        for (run, t) in runs.iter_mut().zip(&mut times) {
            let start = Instant::now();
            run();
            if round > 0 {
                t.push(start.elapsed().as_secs_f64());
            }
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            (t[t.len() / 2], t[0])
        })
        .collect()
}

fn bench_context_block(args: &Args) {
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
