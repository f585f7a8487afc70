//! Throughput of the block on the paper's shapes, as a fraction of the sgemm peak measured in
//! the same process.
//!
//! ```text
//! cargo run --release --example bench -- [--shape NAME] [--mode eg|dp|concat|gauss] [--reps N] [--backward]
//!     [--block nl|gc|cc|dnl] [--candle] [--precision f32|bf16|bf16-logits|both|all] [--keep-freed-memory]
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
//! With `--candle` (build with `--features candle`), every line says its `backend` and the peak
//! heap of one run above what was live before it (`peak_mb`, counted by the bench's allocator),
//! and each case adds `backend=candle` (the `nonlocal::candle::NonLocal` layer on the same
//! parameters, channels-first input (1, C, T, H, W)) and `backend=candle-plain` (the same layer
//! in plain candle ops, `NonLocal::forward_plain`: the N×M attention); with `--backward` their
//! `pass=train` lines time forward + `backward()` of `Σ z ⊙ grad_output` (every parameter is a
//! `Var`, and so is the input, as the output of earlier layers would be). Two more `pass=train`
//! lines take that step apart: `backend=candle-injected` hands candle's `backward()` the output
//! gradient itself (a scalar op whose backward returns it: no product or sum for the loss, as
//! the native step is handed `grad_output`), and `backend=native-channels-first` is the native
//! block's `forward_train_channels_first` + `backward_channels_first` on (B, C, T, H, W), the
//! pass the candle op runs. The backends run in turn within each repetition, so a change of
//! machine load moves them alike; `candle-plain` runs its repetitions after the others (its
//! N×M buffers would otherwise change how the C allocator treats theirs between steps).
//!
//! `--keep-freed-memory` calls [`nonlocal::keep_freed_memory`] first (the header then says
//! `malloc=kept`, else `malloc=default`): glibc keeps freed memory for the next allocations
//! instead of returning it to the kernel, which decides how fast a candle training step runs
//! (candle allocates a fresh tensor per op and per gradient).
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
//!
//! `--block cc` runs criss-cross attention (mmcv's `CrissCrossAttention`) instead, at the
//! shape of CCNet's head on a Cityscapes 512×1024 crop at stride 8 (C = 512, H = 64, W = 128,
//! qk = C/8), recurrence 1 and 2: `shape=seg-stride8 block=cc recurrence=… ms=… gflops=… …
//! peak_mb=…`, nominal FLOPs r·(2·N·C·(2·qk + C) + 2·N·(H + W − 1)·(qk + C)) (projections,
//! logits, aggregation; see `cc_flops`), `peak_mb` the most heap one call on a fresh block (no
//! scratch buffers kept yet) held above what was allocated before it, its output included, and
//! `min_ms` the fastest run (steadier than the median on a shared machine).
//!
//! `--block dnl` runs the disentangled non-local block (mmsegmentation's `DNLHead` block:
//! embedded Gaussian, temperature 0.05, BatchNorm) at the same segmentation shape (C = 512,
//! 64×128, every position a key): `shape=seg-stride8 block=dnl ms=… gflops=… peak_mb=…`,
//! nominal FLOPs 2·N·C·(3C' + 1) + 2·N·C'·C + 4·N²·C' (`dnl_flops`).
//!
//! `--precision bf16` (or `both`, f32 and bf16 lines one after the other for each case) runs
//! blocks configured with `Precision::Bf16`: the header adds the bf16 GEMM peak, this crate's
//! packed bf16 GEMM at 2048³ over the same threads (`VDPBF16PS` where the CPU has
//! AVX512_BF16), and each bf16 line says `precision=bf16` and gives `pct_peak` against that
//! peak (`bf16_gemm_gflops`), with `speedup=<f32 ms / bf16 ms>` when the f32 line was measured
//! in the same rounds (with `both`, each round runs the f32 block then the bf16 one, so both
//! medians see the same load). `--precision bf16-logits` runs `Precision::Bf16Logits` blocks
//! the same way, `all` the three precisions in each round. Every line ends with `rss_peak_mb`, the process's peak resident
//! memory during that case (Linux; reset before each case; with `both`, over both blocks).

use std::time::Instant;

use ndarray::Array5;
use nonlocal::internal::kernels::gemm::{par_gemm, par_gemm_in};
use nonlocal::internal::kernels::views::{MatMut, MatRef};
use nonlocal::{BatchNorm, Conv1x1, Mode, NonLocalBlock, NonLocalConfig, Parameters, Precision};
use rayon::prelude::*;

#[cfg(feature = "candle")]
mod candle_backend;
mod context;
mod criss_cross;
mod disentangled;
#[path = "../support/peak_alloc.rs"]
mod peak_alloc;

#[global_allocator]
static ALLOC: peak_alloc::PeakAlloc = peak_alloc::PeakAlloc;

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
    candle: bool,
    /// Whether `--keep-freed-memory` was given.
    keep_freed_memory: bool,
    /// `nl` (the non-local block, default), `gc` (the global context block), `cc`
    /// (criss-cross attention) or `dnl` (the disentangled non-local block).
    block: String,
    precisions: Vec<Precision>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        shape: None,
        mode: None,
        reps: 5,
        backward: false,
        candle: false,
        keep_freed_memory: false,
        block: "nl".into(),
        precisions: vec![Precision::F32],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--shape" => args.shape = Some(value()?),
            "--mode" => args.mode = Some(value()?),
            "--backward" => args.backward = true,
            "--keep-freed-memory" => args.keep_freed_memory = true,
            "--block" => args.block = value()?,
            "--candle" if cfg!(feature = "candle") => args.candle = true,
            "--candle" => return Err("--candle needs the bench built with --features candle".into()),
            "--reps" => args.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--precision" => {
                args.precisions = match value()?.as_str() {
                    "both" => vec![Precision::F32, Precision::Bf16],
                    "all" => vec![Precision::F32, Precision::Bf16, Precision::Bf16Logits],
                    other => vec![other.parse().map_err(|e| format!("--precision: {e}"))?],
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.candle && args.precisions != [Precision::F32] {
        return Err("--candle runs the f32 block only (no --precision other than f32)".into());
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

/// Best-of-5 GFLOP/s of this crate's bf16 GEMM (operands rounded as they are packed, sums in
/// f32) at 2048³ over the rayon pool: the peak the bf16 lines are measured against.
fn bf16_gemm_peak() -> f64 {
    let n = 2048;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; n * n];
    let flops = 2.0 * (n * n * n) as f64;
    let (am, bm) = (MatRef::new(&a, 0, n, n, n), MatRef::new(&b, 0, n, n, n));
    let best = (0..5)
        .map(|_| {
            let start = Instant::now();
            par_gemm_in(Precision::Bf16, 1.0, am, bm, 0.0, &mut MatMut::new(&mut c, n, n, n));
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    flops / best / 1e9
}

/// Resets the process's peak resident memory to its current value (Linux; elsewhere nothing).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident memory in MB since the last reset (Linux), else `None`.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn rss_field() -> String {
    peak_rss_mb().map_or_else(|| "rss_peak_mb=unknown".into(), |mb| format!("rss_peak_mb={mb:.0}"))
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
fn bench_block(mode: Mode, c: usize, precision: Precision) -> NonLocalBlock {
    let config = NonLocalConfig::new(c).mode(mode).sub_sample(Some([1, 2, 2])).precision(precision);
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

/// The peak heap of one run of `run` above what was live before, in MB.
fn peak_mb(run: &mut dyn FnMut()) -> f64 {
    let base = peak_alloc::live_bytes();
    peak_alloc::reset_peak();
    run();
    peak_alloc::peak_above(base) as f64 / 1e6
}

/// Median wall time of `reps` runs after one warm-up run.
fn median_seconds(reps: usize, run: impl FnMut()) -> f64 {
    median_and_min_seconds(reps, run).0
}

/// Median and minimum wall time of `reps` runs after one warm-up run (the minimum is the
/// steadier figure on a machine shared with other work).
fn median_and_min_seconds(reps: usize, mut run: impl FnMut()) -> (f64, f64) {
    run();
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    let malloc = if args.keep_freed_memory && nonlocal::keep_freed_memory() { "kept" } else { "default" };
    if args.block == "gc" {
        context::bench_context_block(&args);
        return;
    }
    let threads = rayon::current_num_threads();
    let peaks = sgemm_peaks();
    let peak = peaks.iter().map(|p| p.1).fold(0.0, f64::max);
    let each: Vec<String> = peaks.iter().map(|(name, g)| format!("{name}={g:.1}")).collect();
    println!(
        "threads={threads} simd={} malloc={malloc} sgemm 2048^3 GFLOP/s: {} peak={peak:.1}",
        nonlocal::simd_path(),
        each.join(" ")
    );
    if args.block == "cc" {
        return criss_cross::bench_cc(&args, peak);
    }
    if args.block == "dnl" {
        return disentangled::bench_dnl(&args, peak);
    }
    let bf16_peak = args.precisions.iter().any(|&p| p != Precision::F32).then(bf16_gemm_peak);
    if let Some(bf16_peak) = bf16_peak {
        println!("threads={threads} simd={} bf16 gemm 2048^3 GFLOP/s: nonlocal={bf16_peak:.1}", nonlocal::simd_path());
    }
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
            let flops = nominal_flops(mode, c, n, m);
            let blocks: Vec<(Precision, NonLocalBlock)> =
                args.precisions.iter().map(|&p| (p, bench_block(mode, c, p))).collect();
            // The training runs' output gradient, made only for them: a forward-only run holds no
            // second input-sized array (its rss_peak_mb is the block's).
            let grad_output = || x.mapv(|v| v * 0.5);
            #[cfg(feature = "candle")]
            if args.candle {
                // parse_args allows --candle with f32 only: blocks[0] is the f32 block.
                candle_backend::bench_case(&args, &blocks[0].1, &x, &grad_output(), (name, mode_name, flops, peak));
                continue;
            }
            // With both precisions the runs alternate, one of each per repetition, so that the
            // speed-up compares runs under the same load.
            reset_peak_rss();
            let mut forwards: Vec<_> = blocks
                .iter()
                .map(|(_, block)| {
                    || {
                        std::hint::black_box(block.forward(&x).expect("bench forward"));
                    }
                })
                .collect();
            let mut runs: Vec<&mut dyn FnMut()> = forwards.iter_mut().map(|f| f as &mut dyn FnMut()).collect();
            let medians: Vec<f64> = interleaved_medians(args.reps, &mut runs).into_iter().map(|(m, _)| m).collect();
            let rss = rss_field();
            let f32_ms = blocks.iter().zip(&medians).find(|((p, _), _)| *p == Precision::F32).map(|(_, m)| m * 1e3);
            for ((precision, block), &median) in blocks.iter().zip(&medians) {
                let precision = *precision;
                let gflops = flops / median / 1e9;
                let (peak_name, peak) = match (precision, bf16_peak) {
                    (Precision::F32, _) | (_, None) => ("sgemm_gflops", peak),
                    (_, Some(bf16)) => ("bf16_gemm_gflops", bf16),
                };
                let speedup = match (precision, f32_ms) {
                    (Precision::F32, _) | (_, None) => String::new(),
                    (_, Some(ms)) => format!(" speedup={:.2}", ms / (median * 1e3)),
                };
                println!(
                    "shape={name} mode={mode_name} precision={precision} ms={:.2} gflops={gflops:.1} {peak_name}={peak:.1} pct_peak={:.1}{speedup} {rss}",
                    median * 1e3,
                    100.0 * gflops / peak,
                );
                if args.backward {
                    let grad_output = grad_output();
                    reset_peak_rss();
                    let median = median_seconds(args.reps, || {
                        let (z, ctx) = block.forward_train(&x).expect("bench forward_train");
                        std::hint::black_box(z);
                        std::hint::black_box(block.backward(&ctx, &grad_output).expect("bench backward"));
                    });
                    let gflops = 3.0 * flops / median / 1e9;
                    println!(
                        "shape={name} mode={mode_name} precision={precision} pass=train ms={:.2} gflops={gflops:.1} sgemm_gflops={peak:.1} pct_peak={:.1} {}",
                        median * 1e3,
                        100.0 * gflops / peak,
                        rss_field()
                    );
                }
            }
        }
    }
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
