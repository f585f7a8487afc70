//! The fused attention op (`nonlocal::candle::attention`) against candle's own composition on
//! a transformer-like shape: B 1, 12 heads, d 64, N = M in 1024, 2048, 4096 (or `--n N...`).
//!
//! ```text
//! cargo run --release --features candle --example candle_attention -- [--n 1024 2048 4096] [--reps 5]
//! ```
//!
//! Per N and pass a line `n=… pass=forward|train backend=fused|candle ms=<median> peak_mb=…`:
//! `fused` is the crate's kernel through the custom op; `candle` is `matmul → softmax → matmul`
//! (`softmax_last_dim` forward, the differentiable `candle_nn::ops::softmax` for `train`).
//! `train` times forward + `backward()` of `Σ y ⊙ w` with q, k, v as `Var`s. `peak_mb` is the
//! peak heap of one run above what was live before it (counted by this example's allocator).

use std::time::Instant;

use candle_core::{Device, Tensor, Var};

#[path = "support/peak_alloc.rs"]
mod peak_alloc;

#[global_allocator]
static ALLOC: peak_alloc::PeakAlloc = peak_alloc::PeakAlloc;

fn median_ms(reps: usize, mut run: impl FnMut()) -> f64 {
    run();
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn peak_mb(run: impl FnOnce()) -> f64 {
    let base = peak_alloc::live_bytes();
    peak_alloc::reset_peak();
    run();
    peak_alloc::peak_above(base) as f64 / 1e6
}

fn main() -> candle_core::Result<()> {
    let mut sizes = vec![1024, 2048, 4096];
    let mut reps = 5;
    let mut args = std::env::args().skip(1).peekable();
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--n" => {
                sizes.clear();
                while let Some(v) = args.peek().and_then(|a| a.parse().ok()) {
                    sizes.push(v);
                    args.next();
                }
            }
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps),
            other => candle_core::bail!("unknown argument {other}"),
        }
    }
    let (heads, d) = (12, 64);
    let scale = 1.0 / (d as f64).sqrt();
    println!("threads={} simd={} B=1 heads={heads} d={d}", rayon::current_num_threads(), nonlocal::simd_path());
    for n in sizes {
        let dev = Device::Cpu;
        let var =
            || -> candle_core::Result<Var> { Var::from_tensor(&Tensor::randn(0f32, 1., (1, heads, n, d), &dev)?) };
        let (q, k, v) = (var()?, var()?, var()?);
        let w = Tensor::randn(0f32, 1., (1, heads, n, d), &dev)?;
        for (backend, fused) in [("fused", true), ("candle", false)] {
            let attend = |q: &Tensor, k: &Tensor, v: &Tensor| {
                if fused {
                    nonlocal::candle::attention(q, k, v, scale)
                } else {
                    nonlocal::candle::attention_plain(q, k, v, scale)
                }
            };
            let (qd, kd, vd) = (q.as_tensor().detach(), k.as_tensor().detach(), v.as_tensor().detach());
            let forward = || {
                std::hint::black_box(attend(&qd, &kd, &vd).expect("forward"));
            };
            let ms = median_ms(reps, forward);
            println!("n={n} pass=forward backend={backend} ms={ms:.2} peak_mb={:.1}", peak_mb(forward));
            let train = || {
                let y = attend(q.as_tensor(), k.as_tensor(), v.as_tensor()).expect("forward");
                let loss = (y * &w).and_then(|p| p.sum_all()).expect("loss");
                std::hint::black_box(loss.backward().expect("backward"));
            };
            let ms = median_ms(reps, train);
            println!("n={n} pass=train backend={backend} ms={ms:.2} peak_mb={:.1}", peak_mb(train));
        }
    }
    Ok(())
}
