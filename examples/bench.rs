//! Throughput of the block on the paper's shapes, as a fraction of the sgemm peak measured in
//! the same process.
//!
//! ```text
//! cargo run --release --example bench -- [--shape NAME] [--mode eg|dp|concat|gauss] [--reps N] [--backward]
//! cargo run --release --example bench -- --block cc [--reps N] [--backward]
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
//! `--block cc` runs criss-cross attention (mmcv's `CrissCrossAttention`) instead, at the
//! shape of CCNet's head on a Cityscapes 512×1024 crop at stride 8 (C = 512, H = 64, W = 128,
//! qk = C/8), recurrence 1 and 2: `shape=seg-stride8 block=cc recurrence=… ms=… gflops=… …
//! peak_mb=…`, nominal FLOPs r·(2·N·C·(2·qk + C) + 2·N·(H + W − 1)·(qk + C)) (projections,
//! logits, aggregation; see `cc_flops`), `peak_mb` the most heap one call on a fresh block (no
//! scratch buffers kept yet) held above what was allocated before it, its output included, and
//! `min_ms` the fastest run (steadier than the median on a shared machine).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ndarray::Array5;
use nonlocal::internal::kernels::gemm::{par_gemm, MatMut, MatRef};
use nonlocal::{
    BatchNorm, Conv1x1, CrissCrossAttention, CrissCrossConfig, CrissCrossParameters, Mode, NonLocalBlock,
    NonLocalConfig, Parameters,
};
use rayon::prelude::*;

/// The system allocator, counting the bytes held and their high-water mark.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller promises for `GlobalAlloc::alloc`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let held = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(held, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller promises for `GlobalAlloc::dealloc`.
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most heap `run` held above what was held before it, in MiB.
fn peak_mib(run: impl FnOnce()) -> f64 {
    let before = HELD.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    run();
    (PEAK.load(Ordering::Relaxed) - before) as f64 / (1 << 20) as f64
}

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
    block: String,
    shape: Option<String>,
    mode: Option<String>,
    reps: usize,
    backward: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { block: "nl".into(), shape: None, mode: None, reps: 5, backward: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--block" => args.block = value()?,
            "--shape" => args.shape = Some(value()?),
            "--mode" => args.mode = Some(value()?),
            "--backward" => args.backward = true,
            "--reps" => args.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.block != "nl" && args.block != "cc" {
        return Err(format!("unknown block {}: nl (non-local) or cc (criss-cross)", args.block));
    }
    if let Some(s) = &args.shape {
        if !SHAPES.iter().any(|(n, ..)| n == s) && !CC_SHAPES.iter().any(|(n, ..)| n == s) {
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

fn bench_cc(args: &Args, peak: f64) {
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
            let mib = peak_mib(|| _ = std::hint::black_box(fresh.forward_images(&x).expect("bench forward")));
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
                let mib = peak_mib(|| step(&fresh));
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

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    let threads = rayon::current_num_threads();
    let peaks = sgemm_peaks();
    let peak = peaks.iter().map(|p| p.1).fold(0.0, f64::max);
    let each: Vec<String> = peaks.iter().map(|(name, g)| format!("{name}={g:.1}")).collect();
    println!(
        "threads={threads} simd={} sgemm 2048^3 GFLOP/s: {} peak={peak:.1}",
        nonlocal::simd_path(),
        each.join(" ")
    );
    if args.block == "cc" {
        return bench_cc(&args, peak);
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
