//! The candle integration (feature `candle`): the fused attention op against candle's own
//! composition (values and gradients, odd sizes, strided inputs, thread counts), the layer
//! against the PyTorch golden cases (forward, attention maps, gradients), against its plain
//! candle composition in every mode and rank, BF16 input, and the errors of bad weights.
#![cfg(feature = "candle")]

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use nonlocal::candle::{attention, attention_plain, NonLocal};
#[path = "oracle/candle_golden.rs"]
mod candle_golden;
#[path = "oracle/golden.rs"]
#[allow(dead_code)]
mod golden;

use golden::GoldenCase;
use nonlocal::{Mode, Naming, NonLocalConfig};

const CPU: Device = Device::Cpu;

/// Uniform values in ±amp from a seeded xorshift, as a tensor of `dims`.
fn random(dims: &[usize], seed: u64, amp: f32) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let len: usize = dims.iter().product();
    let values: Vec<f32> = (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect();
    Tensor::from_vec(values, dims, &CPU).unwrap()
}

/// max |a − b| / max(1, max |b|).
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let err = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
    (err / scale) as f32
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// The op's output and input gradients for L = Σ y ⊙ w, on q, k, v given as (B, heads, ·, ·)
/// views: `transposed` stores q and v as (B, ·, heads, ·) and permutes them.
fn op_and_grads(
    (b, h, n, m, d, dv): (usize, usize, usize, usize, usize, usize),
    scale: f64,
    transposed: bool,
    fused: bool,
    seed: u64,
) -> (Tensor, [Tensor; 3]) {
    let (qs, vs) = if transposed { ([b, n, h, d], [b, m, h, dv]) } else { ([b, h, n, d], [b, h, m, dv]) };
    let q = Var::from_tensor(&random(&qs, seed, 2.0)).unwrap();
    let k = Var::from_tensor(&random(&[b, h, m, d], seed + 1, 2.0)).unwrap();
    let v = Var::from_tensor(&random(&vs, seed + 2, 1.0)).unwrap();
    let view = |t: &Var| if transposed { t.transpose(1, 2).unwrap() } else { t.as_tensor().clone() };
    let (qv, kv, vv) = (view(&q), k.as_tensor().clone(), view(&v));
    let y = if fused {
        attention(&qv, &kv, &vv, scale).unwrap()
    } else {
        // Ground truth in f64: candle's matmul, softmax, matmul.
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        attention_plain(&f64s(&qv), &f64s(&kv), &f64s(&vv), scale).unwrap()
    };
    let w = random(&[b, h, n, dv], seed + 3, 1.0).to_dtype(y.dtype()).unwrap();
    let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g = |t: &Var| grads.get(t.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
    (y.to_dtype(DType::F32).unwrap(), [g(&q), g(&k), g(&v)])
}

#[test]
fn attention_matches_candle_composition_values_and_gradients() {
    // Odd sizes, more keys than a key tile (252) and queries than a query tile (256), depth 1,
    // one key, and strided (transposed) queries and values.
    for (i, &(dims, scale, transposed)) in [
        ((1, 1, 1, 1, 1, 1), 1.0, false),
        ((2, 3, 7, 5, 4, 3), 0.5, true),
        ((1, 2, 300, 261, 16, 9), 0.25, false),
        ((2, 1, 33, 513, 33, 17), 0.17, true),
        ((1, 12, 64, 64, 64, 64), 0.125, true),
    ]
    .iter()
    .enumerate()
    {
        let seed = 10 * i as u64 + 1;
        let (y, grads) = op_and_grads(dims, scale, transposed, true, seed);
        let (want, want_grads) = op_and_grads(dims, scale, transposed, false, seed);
        assert_eq!(y.dims(), want.dims());
        assert!(rel_err(&y, &want) < 2e-5, "{dims:?}: output error {}", rel_err(&y, &want));
        for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&want_grads)) {
            assert_eq!(g.dims(), w.dims(), "{name} shape");
            assert!(rel_err(g, w) < 5e-5, "{dims:?}: {name} error {}", rel_err(g, w));
        }
    }
}

#[test]
fn attention_is_bit_identical_for_any_thread_count() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| op_and_grads((2, 3, 300, 270, 24, 20), 0.3, true, true, 5))
    };
    let (y1, g1) = run(1);
    for threads in [2, 3] {
        let (y, g) = run(threads);
        assert_eq!(bits(&y), bits(&y1), "output, {threads} threads");
        for (a, b) in g.iter().zip(&g1) {
            assert_eq!(bits(a), bits(b), "gradients, {threads} threads");
        }
    }
}

#[test]
fn attention_converts_half_types_and_refuses_bad_arguments() {
    let q = random(&[1, 2, 9, 8], 1, 1.0);
    let (k, v) = (random(&[1, 2, 11, 8], 2, 1.0), random(&[1, 2, 11, 5], 3, 1.0));
    let want = attention_plain(&q, &k, &v, 0.5).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let y = attention(&cast(&q), &cast(&k), &cast(&v), 0.5).unwrap();
        assert_eq!(y.dtype(), dtype);
        // Inputs rounded to 8 (BF16) or 11 (F16) bits, then f32 inside, the output rounded.
        let bound = if dtype == DType::BF16 { 2e-2 } else { 3e-3 };
        assert!(rel_err(&y, &want) < bound, "{dtype:?}: {}", rel_err(&y, &want));
    }
    assert!(attention(&q, &k, &random(&[1, 2, 10, 5], 3, 1.0), 1.0).is_err(), "keys and values disagree");
    assert!(attention(&q, &random(&[1, 2, 11, 7], 2, 1.0), &v, 1.0).is_err(), "depths disagree");
    assert!(attention(&q, &k, &v, -1.0).is_err(), "negative scale");
    assert!(attention(&q, &k, &v, f64::NAN).is_err(), "NaN scale");
    assert!(attention(&q.squeeze(0).unwrap(), &k, &v, 1.0).is_err(), "rank 3");
    let none = Tensor::zeros((1, 2, 0, 8), DType::F32, &CPU).unwrap();
    assert!(attention(&q, &none, &none.narrow(3, 0, 5).unwrap(), 1.0).is_err(), "no keys");
    // No queries: an empty result, not a panic.
    let y = attention(&q.narrow(2, 0, 0).unwrap(), &k, &v, 1.0).unwrap();
    assert_eq!(y.dims(), &[1, 2, 0, 5]);
}

fn golden_files() -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut files: Vec<_> = [root.clone(), root.join("grad")]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).expect("tests/data and tests/data/grad exist"))
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

#[test]
fn layer_passes_every_golden_case_forward_attention_and_gradients() {
    let files = golden_files();
    assert!(files.len() >= 21, "expected the vendored golden cases, found {}", files.len());
    let (mut gradient_cases, mut attention_maps) = (0, 0);
    for path in files {
        let case = GoldenCase::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let report = candle_golden::check(&case).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(report.passed(), "{}: {report}", path.display());
        gradient_cases += report.grad_param_err.is_some() as usize;
        attention_maps += report.attention_err.is_some() as usize;
    }
    assert!(gradient_cases >= 5 && attention_maps >= 14, "{gradient_cases} gradient cases, {attention_maps} maps");
}

/// A block with every parameter non-trivial (BatchNorm γ, β and statistics too), in a VarMap.
fn random_block(config: &NonLocalConfig, naming: Naming, seed: u64) -> (NonLocal, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &CPU);
    let block = NonLocal::new(config.clone(), naming, vb.pp("nl")).unwrap();
    for (i, (name, var)) in varmap.data().lock().unwrap().iter().enumerate() {
        let amp = if name.contains("running_var") { 0.5 } else { 0.6 };
        let mut values = random(var.dims(), seed + i as u64 * 7, amp);
        if name.contains("running_var") {
            values = (values + 1.0).unwrap();
        }
        var.set(&values).unwrap();
    }
    (block, varmap)
}

/// Every (mode, conv_dims, pooling, BatchNorm) the layer has, on small odd shapes.
fn layer_cases() -> Vec<(NonLocalConfig, Vec<usize>)> {
    let mut cases = Vec::new();
    for (i, mode) in Mode::ALL.into_iter().enumerate() {
        for (dims, shape, kernel) in [
            (3, vec![2, 6, 3, 5, 7], [1, 2, 2]),
            (3, vec![1, 5, 4, 4, 3], [2, 2, 2]),
            (2, vec![2, 7, 5, 9], [1, 2, 2]),
            (1, vec![3, 4, 11], [1, 1, 2]),
        ] {
            for pooled in [true, false] {
                let c = shape[1];
                let config = NonLocalConfig::new(c)
                    .mode(mode)
                    .conv_dims(dims)
                    .inter_channels(c / 2 + 1)
                    .sub_sample(pooled.then_some(kernel))
                    .use_scale(pooled)
                    .bn_layer(!pooled || i % 2 == 0);
                cases.push((config, shape.clone()));
            }
        }
    }
    cases
}

#[test]
fn layer_matches_its_plain_composition_in_every_mode_values_and_gradients() {
    for (k, (config, shape)) in layer_cases().into_iter().enumerate() {
        let what = format!("{:?} {shape:?}", config);
        let naming = if k % 2 == 0 { Naming::AlexHex7 } else { Naming::Mmcv };
        let (block, varmap) = random_block(&config, naming, k as u64 * 101);
        let x = Var::from_tensor(&random(&shape, k as u64, 1.5)).unwrap();
        let w = random(&shape, k as u64 + 1000, 1.0);
        let run = |fused: bool| {
            let z = if fused { block.forward(&x).unwrap() } else { block.forward_plain(&x).unwrap() };
            let grads = (&z * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let mut all = vec![("input".to_string(), grads.get(x.as_tensor()).unwrap().clone())];
            for (name, var) in varmap.data().lock().unwrap().iter() {
                if let Some(g) = grads.get(var.as_tensor()) {
                    all.push((name.clone(), g.clone()));
                }
            }
            all.sort_by(|a, b| a.0.cmp(&b.0));
            (z, all)
        };
        let ((z, grads), (want, want_grads)) = (run(true), run(false));
        assert_eq!(z.dims(), x.dims(), "{what}");
        assert!(rel_err(&z, &want) < 2e-5, "{what}: output {}", rel_err(&z, &want));
        let names: Vec<&String> = grads.iter().map(|g| &g.0).collect();
        assert_eq!(names, want_grads.iter().map(|g| &g.0).collect::<Vec<_>>(), "{what}: gradient set");
        assert!(!names.iter().any(|n| n.contains("running")), "{what}: running statistics are not trained");
        for ((name, g), (_, w)) in grads.iter().zip(&want_grads) {
            assert!(rel_err(g, w) < 1e-4, "{what}: {name} {}", rel_err(g, w));
        }
    }
}

#[test]
fn strided_inputs_give_the_contiguous_result() {
    let config = NonLocalConfig::new(6).mode(Mode::EmbeddedGaussian);
    let (block, _) = random_block(&config, Naming::AlexHex7, 3);
    let x = random(&[2, 6, 3, 6, 5], 9, 1.0);
    let want = block.forward(&x).unwrap();
    // Channels-last storage viewed channels-first; a narrowed batch; reversed-order strides.
    let cl = x.permute((0, 2, 3, 4, 1)).unwrap().contiguous().unwrap().permute((0, 4, 1, 2, 3)).unwrap();
    let wide = Tensor::cat(&[&x, &x], 3).unwrap().narrow(3, 6, 6).unwrap();
    let hw = x.transpose(3, 4).unwrap().contiguous().unwrap().transpose(3, 4).unwrap();
    for (name, view) in [("channels-last", cl), ("narrowed", wide), ("h/w swapped", hw)] {
        assert!(!view.is_contiguous(), "{name}");
        let z = block.forward(&view).unwrap();
        assert!(z.is_contiguous() && z.dims() == x.dims(), "{name}");
        assert!(rel_err(&z, &want) < 1e-6, "{name}: {}", rel_err(&z, &want));
    }
}

#[test]
fn bf16_and_f16_inputs_stay_within_their_rounding() {
    for mode in Mode::ALL {
        let config = NonLocalConfig::new(8).mode(mode);
        let (block, _) = random_block(&config, Naming::AlexHex7, 17);
        let x = random(&[1, 8, 2, 6, 6], 4, 1.0);
        let want = block.forward(&x).unwrap();
        for (dtype, bound) in [(DType::BF16, 2e-2), (DType::F16, 3e-3)] {
            let z = block.forward(&x.to_dtype(dtype).unwrap()).unwrap();
            assert_eq!(z.dtype(), dtype);
            assert!(rel_err(&z, &want) < bound, "{mode} {dtype:?}: {}", rel_err(&z, &want));
        }
    }
    // Half-precision weights too (a VarBuilder of BF16).
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let config = NonLocalConfig::new(8);
    let (block, varmap) = random_block(&config, Naming::AlexHex7, 23);
    for (name, var) in varmap.data().lock().unwrap().iter() {
        tensors.insert(name.clone(), var.as_tensor().clone());
    }
    let vb = VarBuilder::from_tensors(tensors, DType::BF16, &CPU);
    let half = NonLocal::new(config, Naming::AlexHex7, vb.pp("nl")).unwrap();
    let x = random(&[1, 8, 2, 6, 6], 4, 1.0);
    let z = half.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
    assert!(rel_err(&z, &block.forward(&x).unwrap()) < 3e-2);
}

/// The parameters of a 3-d AlexHex7 block with pooling and BatchNorm, C = 4, C' = 2.
fn alexhex7_tensors() -> HashMap<String, Tensor> {
    let mut t = HashMap::new();
    for stem in ["theta", "phi.0", "g.0"] {
        t.insert(format!("{stem}.weight"), random(&[2, 4, 1, 1, 1], 1, 0.5));
        t.insert(format!("{stem}.bias"), random(&[2], 2, 0.5));
    }
    t.insert("W.0.weight".into(), random(&[4, 2, 1, 1, 1], 3, 0.5));
    t.insert("W.0.bias".into(), random(&[4], 4, 0.5));
    for name in ["weight", "bias", "running_mean", "running_var"] {
        t.insert(format!("W.1.{name}"), (random(&[4], 5, 0.3) + 1.0).unwrap());
    }
    t
}

fn load(tensors: &HashMap<String, Tensor>, config: NonLocalConfig) -> candle_core::Result<NonLocal> {
    NonLocal::new(config, Naming::AlexHex7, VarBuilder::from_tensors(tensors.clone(), DType::F32, &CPU))
}

#[test]
fn bad_weights_and_inputs_are_errors_naming_what_is_wrong() {
    let good = alexhex7_tensors();
    let block = load(&good, NonLocalConfig::new(4)).expect("the good tensors load");
    let message = |r: candle_core::Result<NonLocal>| r.expect_err("refused").to_string();

    let mut wrong = good.clone();
    wrong.insert("theta.weight".into(), random(&[2, 5, 1, 1, 1], 1, 0.5));
    let e = message(load(&wrong, NonLocalConfig::new(4)));
    assert!(e.contains("theta.weight") && e.contains("[2, 4, 1, 1, 1]") && e.contains("[2, 5, 1, 1, 1]"), "{e}");

    // A 2-d checkpoint (two trailing 1s) for a 3-d configuration.
    let e = message(load(&good, NonLocalConfig::new(4).conv_dims(2)));
    assert!(e.contains("theta.weight") && e.contains("[2, 4, 1, 1]"), "{e}");

    let mut missing = good.clone();
    missing.remove("g.0.bias");
    let e = message(load(&missing, NonLocalConfig::new(4)));
    assert!(e.contains("g.0.bias"), "{e}");

    let e = message(load(&good, NonLocalConfig::new(4).sub_sample(None)));
    assert!(e.contains("sub_sample") && e.contains("g.0.weight"), "{e}");
    let e = message(load(&good, NonLocalConfig::new(4).bn_layer(false)));
    assert!(e.contains("bn_layer") && e.contains("W.1.weight"), "{e}");
    let e = message(load(&good, NonLocalConfig::new(4).mode(Mode::Gaussian)));
    assert!(e.contains("gaussian"), "{e}");
    let e = message(load(&good, NonLocalConfig::new(4).mode(Mode::Concatenation)));
    assert!(e.contains("concat_project"), "{e}");
    let e = message(load(&good, NonLocalConfig::new(0)));
    assert!(e.contains("in_channels"), "{e}");

    let input = |dims: &[usize]| block.forward(&random(dims, 1, 1.0)).expect_err("refused").to_string();
    let e = input(&[1, 3, 2, 4, 4]);
    assert!(e.contains("channels") && e.contains("[1, 3, 2, 4, 4]"), "{e}");
    let e = input(&[1, 4, 4, 4]);
    assert!(e.contains("rank 4") && e.contains("(B, C, T, H, W)"), "{e}");
    let e = input(&[1, 4, 2, 1, 4]);
    assert!(e.contains("pool kernel"), "{e}");
    let e = input(&[0, 4, 2, 4, 4]);
    assert!(e.contains("zero"), "{e}");
    let ints = Tensor::zeros((1, 4, 2, 4, 4), DType::U32, &CPU).unwrap();
    assert!(block.forward(&ints).is_err());
    let ok = block.forward(&random(&[1, 4, 2, 4, 4], 1, 1.0)).unwrap();
    assert_eq!(ok.dims(), &[1, 4, 2, 4, 4]);
}

#[test]
fn attention_map_rows_are_the_softmax_and_sum_to_one() {
    let config = NonLocalConfig::new(6).conv_dims(2);
    let (block, _) = random_block(&config, Naming::Mmcv, 5);
    let x = random(&[2, 6, 6, 7], 8, 1.0);
    let a = block.attention_map(&x).unwrap();
    assert_eq!(a.dims(), &[2, 42, 9]);
    let sums = a.sum(D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
}

#[test]
fn layer_is_the_native_block_and_thread_count_independent() {
    // The same parameters through nonlocal::NonLocalBlock on channels-last input.
    for mode in Mode::ALL {
        let config = NonLocalConfig::new(6).mode(mode);
        let (block, varmap) = random_block(&config, Naming::AlexHex7, 31);
        let mut tensors = HashMap::new();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            tensors.insert(name.trim_start_matches("nl.").to_string(), var.as_tensor().clone());
        }
        let path = std::env::temp_dir().join(format!("nonlocal_candle_test_{mode}_{}.safetensors", std::process::id()));
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let keys = nonlocal::WeightKeys::alexhex7();
        let native = nonlocal::NonLocalBlock::from_checkpoint_file(config.clone(), &path, &keys).unwrap();
        std::fs::remove_file(&path).unwrap();
        let x = random(&[2, 6, 3, 6, 5], 2, 1.0);
        let xl: Vec<f32> = x.permute((0, 2, 3, 4, 1)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let xl = ndarray::Array5::from_shape_vec((2, 3, 6, 5, 6), xl).unwrap();
        let want = native.forward(&xl).unwrap();
        // Inference: plain tensors, no gradient tracked.
        let detached = block.forward(&x).unwrap();
        let got: Vec<f32> = detached.permute((0, 2, 3, 4, 1)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let err = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-6, "{mode}: {err}");
        // Training: through Vars, 1, 2 and 3 threads, output and gradients bit for bit.
        let xv = Var::from_tensor(&x).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let z = block.forward(xv.as_tensor()).unwrap();
                let grads = z.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let mut out = vec![bits(&z), bits(grads.get(xv.as_tensor()).unwrap())];
                for (_, var) in varmap.data().lock().unwrap().iter() {
                    out.extend(grads.get(var.as_tensor()).map(bits));
                }
                out
            })
        };
        let one = run(1);
        assert!(one.len() > 4, "{mode}: parameter gradients");
        assert_eq!(run(2), one, "{mode}: 2 threads");
        assert_eq!(run(3), one, "{mode}: 3 threads");
    }
}

#[test]
fn a_graph_can_be_differentiated_twice() {
    let (block, varmap) = random_block(&NonLocalConfig::new(4), Naming::Mmcv, 8);
    let x = Var::from_tensor(&random(&[1, 4, 2, 4, 4], 3, 1.0)).unwrap();
    let loss = block.forward(x.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap();
    let (a, b) = (loss.backward().unwrap(), loss.backward().unwrap());
    assert_eq!(bits(a.get(x.as_tensor()).unwrap()), bits(b.get(x.as_tensor()).unwrap()));
    let theta = varmap.data().lock().unwrap()["nl.theta.conv.weight"].clone();
    assert_eq!(bits(a.get(theta.as_tensor()).unwrap()), bits(b.get(theta.as_tensor()).unwrap()));
}

#[test]
fn inference_sees_parameters_that_change_under_it() {
    // Plain tensors sharing storage with Vars: the inference block kept by the layer must be
    // rebuilt when their values change.
    let config = NonLocalConfig::new(4);
    let (trained, varmap) = random_block(&config, Naming::AlexHex7, 12);
    let tensors: HashMap<String, Tensor> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_detached_tensor())).collect();
    let plain =
        NonLocal::new(config, Naming::AlexHex7, VarBuilder::from_tensors(tensors, DType::F32, &CPU).pp("nl")).unwrap();
    let x = random(&[1, 4, 2, 4, 4], 6, 1.0);
    let before = plain.forward(&x).unwrap();
    assert_eq!(bits(&before), bits(&plain.forward(&x).unwrap()), "same parameters, same output");
    let gamma = varmap.data().lock().unwrap()["nl.W.1.weight"].clone();
    gamma.set(&(gamma.as_tensor() * 2.0).unwrap()).unwrap();
    let after = plain.forward(&x).unwrap();
    assert!(rel_err(&after, &before) > 1e-3, "the kept block went stale");
    assert!(rel_err(&after, &trained.forward(&x.detach()).unwrap()) < 1e-6);
}

#[test]
fn candle_golden_example_passes_good_files_and_exits_1_on_a_bad_one() {
    // The example binary is built by `cargo test --features candle` next to the test binaries.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().join("examples");
    let example = dir.join(format!("candle_golden{}", std::env::consts::EXE_SUFFIX));
    assert!(example.exists(), "examples/candle_golden not built at {}", example.display());
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let bad = std::env::temp_dir().join(format!("nonlocal-candle-bad-{}.safetensors", std::process::id()));
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    let run = |files: &[std::path::PathBuf]| std::process::Command::new(&example).args(files).output().unwrap();
    let good = [data.join("eg_video.safetensors"), data.join("grad/grad_concat.safetensors")];
    let out = run(&good);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("attention_err=") && stdout.contains("grad_param_err="), "{stdout}");
    assert_eq!(stdout.matches("PASS").count(), 2, "{stdout}");
    let out = run(&[good[0].clone(), bad.clone()]);
    std::fs::remove_file(&bad).ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(stdout.lines().count(), 2, "one line per file: {stdout}");
    assert!(stdout.contains("error:") && stdout.contains("FAIL"), "{stdout}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
