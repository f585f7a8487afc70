//! Criterion benches: the whole block in each mode at small shapes, and each kernel alone.
//!
//! ```text
//! cargo bench --bench kernels
//! ```
//! The large shapes and the comparison with the sgemm peak are in `examples/bench.rs`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::Array5;
use nonlocal::internal::kernels::attention::softmax_attention;
use nonlocal::internal::kernels::concat::concat_attention;
use nonlocal::internal::kernels::dot_product::key_value_product;
use nonlocal::internal::kernels::exp::exp_sum;
use nonlocal::internal::kernels::gemm::par_gemm;
use nonlocal::internal::kernels::pool::max_pool;
use nonlocal::internal::kernels::views::{MatMut, MatRef};
use nonlocal::{Mode, NonLocalBlock, NonLocalConfig, Parameters};

fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as f32 / u32::MAX as f32 - 0.5
        })
        .collect()
}

/// A block whose every parameter is non-zero (a fresh block would have zero BN weight).
fn block(mode: Mode, c: usize) -> NonLocalBlock {
    let config = NonLocalConfig::new(c).mode(mode);
    let mut params = Parameters::init(&config, 1);
    if let Some(bn) = params.bn.as_mut() {
        bn.weight.fill(1.0);
    }
    NonLocalBlock::from_parameters(config, params).expect("valid parameters")
}

fn bench_block(c: &mut Criterion) {
    // video-res3 scaled down: C = 128, 4×28×28 positions.
    let (ch, t, h, w) = (128, 4, 28, 28);
    let x = Array5::from_shape_vec((1, t, h, w, ch), data(t * h * w * ch, 1)).expect("shape");
    let mut group = c.benchmark_group("block_4x28x28_c128");
    group.sample_size(20);
    for mode in Mode::ALL {
        let b = block(mode, ch);
        group.bench_function(BenchmarkId::from_parameter(mode), |bench| bench.iter(|| b.forward(&x).expect("forward")));
    }
    group.finish();
}

fn bench_kernels(c: &mut Criterion) {
    let (n, m, d) = (3136, 784, 64);
    let q = data(n * d, 1);
    let k = data(m * d, 2);
    let v = data(m * d, 3);
    let mut out = vec![0.0f32; n * d];
    let mut group = c.benchmark_group("kernels");
    group.sample_size(20);
    group.throughput(Throughput::Elements((n * m) as u64));
    group.bench_function("softmax_attention_3136x784x64", |b| {
        b.iter(|| {
            softmax_attention(
                MatRef::new(&q, 0, n, d, d),
                MatRef::new(&k, 0, m, d, d),
                MatRef::new(&v, 0, m, d, d),
                1.0,
                &mut out,
            )
        })
    });
    group.bench_function("concat_attention_3136x784x64", |b| {
        let a = &q[..n];
        let bk = &k[..m];
        b.iter(|| concat_attention(MatRef::new(a, 0, n, 1, 1), bk, MatRef::new(&v, 0, m, d, d), &mut out))
    });
    group.bench_function("key_value_product_784x64x64", |b| {
        b.iter(|| key_value_product(MatRef::new(&k, 0, m, d, d), MatRef::new(&v, 0, m, d, d), 1.0))
    });
    group.throughput(Throughput::Elements((n * d) as u64));
    group.bench_function("max_pool_4x28x28x64", |b| {
        let mut pooled = vec![0.0f32; m * d];
        b.iter(|| max_pool(MatRef::new(&q, 0, n, d, d), [4, 28, 28], [1, 2, 2], &mut pooled))
    });
    group.throughput(Throughput::Elements(512 * 512));
    group.bench_function("exp_sum_512x512", |b| {
        let mut rows = data(512 * 512, 4);
        b.iter(|| rows.chunks_mut(512).map(|r| exp_sum(r, 1e-3, 0.0)).sum::<f32>())
    });
    group.throughput(Throughput::Elements(2 * 512 * 512 * 512));
    group.bench_function("par_gemm_512", |b| {
        let a = data(512 * 512, 5);
        let bm = data(512 * 512, 6);
        let mut cm = vec![0.0f32; 512 * 512];
        b.iter(|| {
            par_gemm(
                1.0,
                MatRef::new(&a, 0, 512, 512, 512),
                MatRef::new(&bm, 0, 512, 512, 512),
                0.0,
                &mut MatMut::new(&mut cm, 512, 512, 512),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench_block, bench_kernels);
criterion_main!(benches);
