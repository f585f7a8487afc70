//! The context block (GCNet; mmcv's `ContextBlock`, timm's `GlobalContext`) against a plain
//! f64 reference, the PyTorch golden cases, finite differences, and every error case.

mod common;

use common::{bits, max_err, on_1_2_3_threads, Rng};
use ndarray::{s, Array1, Array4, Array5, ArrayViewMutD, Axis};
use nonlocal::{
    ContextBlock, ContextConfig, ContextMlp, ContextParameters, Conv1x1, Error, Naming, Pooling, TensorFile, WeightKeys,
};

/// The block straight from its definition, in f64.
mod reference {
    use ndarray::{Array4, ArrayView4};
    use nonlocal::{ContextConfig, ContextMlp, ContextParameters, Pooling};

    fn conv(w: &ndarray::Array2<f32>, b: Option<&ndarray::Array1<f32>>, v: &[f64]) -> Vec<f64> {
        (0..w.nrows())
            .map(|o| {
                let dot: f64 = (0..w.ncols()).map(|i| f64::from(w[[o, i]]) * v[i]).sum();
                dot + b.map_or(0.0, |b| f64::from(b[o]))
            })
            .collect()
    }

    /// conv1 → LayerNorm over the planes (biased variance) → ReLU → conv2.
    pub fn mlp(m: &ContextMlp, context: &[f64], eps: f64) -> Vec<f64> {
        let h = conv(&m.conv1.weight, m.conv1.bias.as_ref(), context);
        let p = h.len() as f64;
        let mean = h.iter().sum::<f64>() / p;
        let var = h.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / p;
        let r: Vec<f64> = h
            .iter()
            .enumerate()
            .map(|(k, v)| {
                let l = (v - mean) / (var + eps).sqrt() * f64::from(m.ln_weight[k]) + f64::from(m.ln_bias[k]);
                l.max(0.0)
            })
            .collect();
        conv(&m.conv2.weight, m.conv2.bias.as_ref(), &r)
    }

    /// The context of one sample (N positions × C).
    pub fn context(config: &ContextConfig, params: &ContextParameters, x: &[Vec<f64>]) -> Vec<f64> {
        let c = config.in_channels;
        let n = x.len();
        let weights: Vec<f64> = match config.pooling {
            Pooling::Average => vec![1.0 / n as f64; n],
            Pooling::Attention => {
                let mask = params.mask.as_ref().expect("attention pooling has a mask");
                let logits: Vec<f64> = x.iter().map(|xj| conv(&mask.weight, mask.bias.as_ref(), xj)[0]).collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                logits.iter().map(|l| (l - max).exp() / total).collect()
            }
        };
        (0..c).map(|k| x.iter().zip(&weights).map(|(xj, p)| p * xj[k]).sum()).collect()
    }

    /// The output for image maps (B, H, W, C).
    pub fn forward(config: &ContextConfig, params: &ContextParameters, x: ArrayView4<'_, f32>) -> Array4<f64> {
        let (b, h, w, c) = x.dim();
        let mut out = Array4::<f64>::zeros((b, h, w, c));
        for s in 0..b {
            let rows: Vec<Vec<f64>> =
                (0..h * w).map(|j| (0..c).map(|k| f64::from(x[[s, j / w, j % w, k]])).collect()).collect();
            let ctx = context(config, params, &rows);
            let gate: Option<Vec<f64>> = params
                .mul
                .as_ref()
                .map(|m| mlp(m, &ctx, config.ln_eps).iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect());
            let term = params.add.as_ref().map(|m| mlp(m, &ctx, config.ln_eps));
            for j in 0..h * w {
                for k in 0..c {
                    let mut v = rows[j][k];
                    if let Some(g) = &gate {
                        v *= g[k];
                    }
                    if let Some(t) = &term {
                        v += t[k];
                    }
                    out[[s, j / w, j % w, k]] = v;
                }
            }
        }
        out
    }
}

const FUSIONS: [(bool, bool); 3] = [(true, false), (false, true), (true, true)];

fn config_for(naming: Naming, c: usize, planes: usize, pooling: Pooling, (add, mul): (bool, bool)) -> ContextConfig {
    let preset = match naming {
        Naming::Timm => ContextConfig::timm(c),
        _ => ContextConfig::mmcv(c, 0.25),
    };
    preset.planes(planes).pooling(pooling).fuse_add(add).fuse_mul(mul)
}

/// Parameters with every part random and non-trivial.
fn random_params(config: &ContextConfig, rng: &mut Rng) -> ContextParameters {
    let (c, p) = (config.in_channels, config.planes);
    let conv = |out: usize, inp: usize, rng: &mut Rng| {
        Conv1x1::new(rng.matrix(out, inp, 1.5 / (inp as f32).sqrt()), Some(rng.vector(out, 0.3)))
    };
    let mlp = |on: bool, rng: &mut Rng| {
        on.then(|| ContextMlp {
            conv1: conv(p, c, rng),
            ln_weight: rng.vector(p, 0.5) + 1.0,
            ln_bias: rng.vector(p, 0.5),
            conv2: conv(c, p, rng),
        })
    };
    let mask = (config.pooling == Pooling::Attention).then(|| conv(1, c, rng).clone());
    let mask = mask.map(|m| Conv1x1::new(m.weight * 2.0, m.bias));
    let add = mlp(config.fuse_add, rng);
    let mul = mlp(config.fuse_mul, rng);
    ContextParameters { mask, add, mul }
}

fn random_block(config: ContextConfig, rng: &mut Rng) -> ContextBlock {
    let params = random_params(&config, rng);
    ContextBlock::from_parameters(config, params).expect("random parameters fit their config")
}

fn images(rng: &mut Rng, shape: (usize, usize, usize, usize)) -> Array4<f32> {
    Array4::from_shape_fn(shape, |_| rng.uniform(1.5))
}

fn assert_matches_reference(block: &ContextBlock, x: &Array4<f32>, what: &str) {
    let want = reference::forward(block.config(), block.parameters(), x.view());
    let got = block.forward_images(x).expect("forward_images");
    assert_eq!(got.shape(), want.shape());
    let (err, tol) = max_err(&got, &want);
    assert!(err <= tol, "{what}: error {err:.3e} > {tol:.3e}");
}

#[test]
fn every_pooling_and_fusion_matches_the_reference_at_odd_sizes() {
    let mut rng = Rng::new(1);
    for naming in [Naming::Mmcv, Naming::Timm] {
        for pooling in [Pooling::Attention, Pooling::Average] {
            for fusion in FUSIONS {
                for _ in 0..3 {
                    let c = rng.range(1, 37);
                    let planes = rng.range(1, c.max(2));
                    let config = config_for(naming, c, planes, pooling, fusion);
                    let block = random_block(config.clone(), &mut rng);
                    let shape = (rng.range(1, 3), rng.range(1, 9), rng.range(1, 11), c);
                    let x = images(&mut rng, shape);
                    assert_matches_reference(&block, &x, &format!("{config:?} on {shape:?}"));
                }
            }
        }
    }
}

#[test]
fn large_inputs_span_many_chunks_and_match_the_reference() {
    // N·C well above one chunk of 65536 floats, C not a multiple of 16.
    let mut rng = Rng::new(2);
    for (pooling, fusion, c, h, w) in
        [(Pooling::Attention, (true, true), 67, 41, 37), (Pooling::Average, (false, true), 129, 23, 29)]
    {
        let block = random_block(config_for(Naming::Mmcv, c, 9, pooling, fusion), &mut rng);
        let x = images(&mut rng, (2, h, w, c));
        assert_matches_reference(&block, &x, &format!("{pooling} {c}x{h}x{w}"));
    }
}

#[test]
fn peaked_attention_is_stable() {
    // Large logits: a softmax without the max shift would overflow.
    let mut rng = Rng::new(3);
    let config = config_for(Naming::Timm, 8, 3, Pooling::Attention, (true, true));
    let mut params = random_params(&config, &mut rng);
    if let Some(mask) = &mut params.mask {
        mask.weight.mapv_inplace(|v| v * 60.0);
    }
    let block = ContextBlock::from_parameters(config, params).unwrap();
    let x = images(&mut rng, (2, 30, 40, 8));
    assert_matches_reference(&block, &x, "peaked");
}

#[test]
fn entry_points_and_layouts_agree_bit_for_bit() {
    let mut rng = Rng::new(4);
    let block = random_block(config_for(Naming::Mmcv, 12, 5, Pooling::Attention, (true, true)), &mut rng);
    let x = images(&mut rng, (3, 7, 9, 12));
    let want = block.forward_images(&x).unwrap();
    let clips = x.clone().insert_axis(Axis(1));
    assert_eq!(block.forward(&clips).unwrap().remove_axis(Axis(1)), want);
    let mut out = Array5::<f32>::from_elem(clips.raw_dim(), f32::NAN);
    block.forward_into(&clips, &mut out).unwrap();
    assert_eq!(out.remove_axis(Axis(1)), want);
    // An output array in another layout is filled element by element.
    let mut out_t = Array5::<f32>::from_elem((12, 9, 7, 1, 3), f32::NAN);
    let mut out_view = out_t.view_mut().reversed_axes();
    block.forward_into(&clips, &mut out_view).unwrap();
    assert_eq!(out_view.to_owned().remove_axis(Axis(1)), want);
    let (z, _) = block.forward_train(&clips).unwrap();
    assert_eq!(z.remove_axis(Axis(1)), want, "forward_train's output is forward's");
    // Channels-first data permuted to channels last, a strided view, a batch slice.
    let channels_first = x.clone().permuted_axes([0, 3, 1, 2]).as_standard_layout().into_owned();
    let permuted = channels_first.view().permuted_axes([0, 2, 3, 1]);
    assert_eq!(block.forward_images(&permuted).unwrap(), want);
    let wide = Array4::from_shape_fn((3, 7, 18, 12), |(b, h, w, c)| if w % 2 == 0 { x[[b, h, w / 2, c]] } else { 1e9 });
    assert_eq!(block.forward_images(&wide.slice(s![.., .., ..;2, ..])).unwrap(), want);
    let batch = block.forward_images(&x.slice(s![1..3, .., .., ..])).unwrap();
    assert_eq!(batch, want.slice(s![1..3, .., .., ..]), "samples are independent");
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Rng::new(5);
    for pooling in [Pooling::Attention, Pooling::Average] {
        let block = random_block(config_for(Naming::Timm, 64, 8, pooling, (true, true)), &mut rng);
        // 2500 positions × 64 channels: three chunks per sample.
        let x = images(&mut rng, (2, 50, 50, 64)).insert_axis(Axis(1));
        let r = images(&mut rng, (2, 50, 50, 64)).insert_axis(Axis(1));
        let runs = on_1_2_3_threads(|| {
            let mut all = bits(block.forward(&x).unwrap().iter());
            let (_, ctx) = block.forward_train(&x).unwrap();
            let grads = block.backward(&ctx, &r).unwrap();
            all.extend(bits(grads.input.iter()));
            for (_, t) in grads.params.named() {
                all.extend(bits(t.iter()));
            }
            all
        });
        assert_eq!(runs[0], runs[1], "{pooling}: 1 vs 2 threads");
        assert_eq!(runs[0], runs[2], "{pooling}: 1 vs 3 threads");
    }
}

#[test]
fn new_blocks_follow_the_upstream_init() {
    let x = Array4::<f32>::from_shape_fn((2, 5, 6, 16), |(b, h, w, c)| ((b * 7 + h * 5 + w * 3 + c) % 11) as f32 - 5.0);
    // mmcv zero-inits the last conv of each MLP: add is the identity, mul halves.
    let add = ContextBlock::new(ContextConfig::mmcv(16, 0.25)).unwrap();
    assert_eq!(add.forward_images(&x).unwrap(), x);
    let mul = ContextBlock::new(ContextConfig::mmcv(16, 0.25).fuse_add(false).fuse_mul(true)).unwrap();
    assert_eq!(mul.forward_images(&x).unwrap(), x.mapv(|v| v * 0.5));
    let mask = &add.parameters().mask.as_ref().unwrap();
    assert_eq!(mask.bias.as_ref().unwrap()[0], 0.0);
    let std = (mask.weight.iter().map(|v| v * v).sum::<f32>() / 16.0).sqrt();
    assert!((0.1..0.8).contains(&std), "kaiming-normal std √(2/16) ≈ 0.35, got {std}");
    // timm zeroes mlp_add.fc2.weight only: its bias is PyTorch's default, so not the identity.
    let timm = ContextBlock::new(ContextConfig::timm(16).fuse_add(true)).unwrap();
    let mlp_add = timm.parameters().add.as_ref().unwrap();
    assert!(mlp_add.conv2.weight.iter().all(|&v| v == 0.0));
    assert!(mlp_add.conv2.bias.as_ref().unwrap().iter().any(|&v| v != 0.0));
    assert!(timm.parameters().mul.as_ref().unwrap().conv2.weight.iter().any(|&v| v != 0.0));
    assert_ne!(timm.forward_images(&x).unwrap(), x);
    assert_matches_reference(&timm, &x, "timm init");
}

#[test]
fn presets_follow_upstream_defaults() {
    let mmcv = ContextConfig::mmcv(2048, 1.0 / 16.0);
    assert_eq!(
        (mmcv.planes, mmcv.pooling, mmcv.fuse_add, mmcv.fuse_mul, mmcv.ln_eps, mmcv.naming),
        (128, Pooling::Attention, true, false, 1e-5, Naming::Mmcv)
    );
    // int(in_channels * ratio) truncates.
    assert_eq!(ContextConfig::mmcv(10, 0.25).planes, 2);
    let timm = ContextConfig::timm(2048);
    assert_eq!(
        (timm.planes, timm.pooling, timm.fuse_add, timm.fuse_mul, timm.ln_eps, timm.naming),
        (256, Pooling::Attention, false, true, 1e-6, Naming::Timm)
    );
    // make_divisible(C / 8, 1, round_limit=0): rounds halves up, at least 1.
    assert_eq!([12, 20, 3, 1].map(|c| ContextConfig::timm(c).planes), [2, 3, 1, 1]);
}

fn family_file(name: &str) -> TensorFile {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/family").join(name);
    TensorFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every context-block case in tests/data/family: (file name, naming).
fn golden_cases() -> Vec<(String, WeightKeys)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/family");
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(dir).expect("tests/data/family exists") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".safetensors") || name.contains("corrupt") {
            continue;
        }
        let file = TensorFile::open(&path).unwrap();
        let meta = file.metadata();
        if !matches!(meta.get("block").map(String::as_str), Some("context_block" | "global_context")) {
            continue;
        }
        let naming: Naming = meta["naming"].parse().unwrap();
        let prefix = meta.get("prefix").cloned().unwrap_or_default();
        cases.push((name, WeightKeys { naming, prefix }));
    }
    cases.sort_by(|a, b| a.0.cmp(&b.0));
    cases
}

#[test]
fn golden_cases_match_pytorch() {
    let cases = golden_cases();
    assert!(cases.len() >= 25, "the context and global-context cases of tests/data/family, found {}", cases.len());
    for (name, keys) in cases {
        let file = family_file(&name);
        let meta = file.metadata();
        let mut config = ContextConfig::from_keys(&file, &keys).unwrap();
        if let Some(eps) = meta.get("ln_eps") {
            assert_eq!(config.ln_eps, eps.parse::<f64>().unwrap(), "{name}: the preset's epsilon");
            config.ln_eps = eps.parse().unwrap();
        }
        if let Some(planes) = meta.get("planes").or(meta.get("rd_channels")) {
            assert_eq!(config.planes, planes.parse::<usize>().unwrap(), "{name}: planes");
        }
        let block = ContextBlock::from_checkpoint(config, &file, &keys).unwrap_or_else(|e| panic!("{name}: {e}"));
        let x: Array5<f32> = file.tensor_as("input").unwrap();
        let want: Array5<f32> = file.tensor_as("output").unwrap();
        let got = block.forward(&x).unwrap();
        let want64 = want.mapv(f64::from);
        let (err, tol) = max_err(&got, &want64);
        assert!(err <= tol, "{name}: error {err:.3e} > {tol:.3e}");
        // The f64 reference agrees too (it checks the reference as much as the block).
        let ours = reference::forward(block.config(), block.parameters(), x.index_axis(Axis(1), 0));
        let (err, tol) = max_err(&want.index_axis(Axis(1), 0), &ours);
        assert!(err <= tol, "{name}: reference error {err:.3e}");
    }
}

#[test]
fn golden_gradients_match_pytorch_autograd() {
    let mut checked = 0;
    for (name, keys) in golden_cases() {
        let file = family_file(&name);
        if !file.contains("grad_output") {
            continue;
        }
        checked += 1;
        let config = ContextConfig::from_keys(&file, &keys).unwrap();
        let block = ContextBlock::from_checkpoint(config, &file, &keys).unwrap();
        let x: Array5<f32> = file.tensor_as("input").unwrap();
        let r: Array5<f32> = file.tensor_as("grad_output").unwrap();
        let (z, ctx) = block.forward_train(&x).unwrap();
        let want = file.tensor("output").unwrap().mapv(f64::from);
        let (err, tol) = max_err(&z, &want);
        assert!(err <= tol, "{name}: output error {err:.3e} > {tol:.3e}");
        let grads = block.backward(&ctx, &r).unwrap();
        let want = file.tensor("grad_input").unwrap().mapv(f64::from);
        let (err, tol) = max_err(&grads.input, &want);
        assert!(err <= tol, "{name}: grad_input error {err:.3e} > {tol:.3e}");
        let named = grads.params.named();
        let expected: Vec<&str> =
            file.keys().into_iter().filter(|k| k.starts_with("grad.") && *k != "grad_input").collect();
        assert_eq!(named.len(), expected.len(), "{name}: one gradient per parameter");
        for (key, got) in named {
            let full = format!("grad.{}{key}", keys.prefix);
            let want = file.tensor(&full).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got.shape(), want.shape(), "{name}: {full} shape");
            let want = want.mapv(f64::from);
            let (err, tol) = max_err(&got, &want);
            assert!(err <= tol, "{name}: {full} error {err:.3e} > {tol:.3e}");
        }
    }
    assert!(checked >= 6, "gradient cases checked: {checked}");
}

#[test]
fn golden_configurations_read_off_the_keys() {
    let add = ContextConfig::from_keys(&family_file("gc_mmcv_add.safetensors"), &WeightKeys::mmcv()).unwrap();
    assert_eq!(add, ContextConfig::mmcv(16, 0.25));
    let avg = ContextConfig::from_keys(&family_file("gc_mmcv_mul_avg.safetensors"), &WeightKeys::mmcv()).unwrap();
    assert_eq!(avg, ContextConfig::mmcv(12, 0.5).pooling(Pooling::Average).fuse_add(false).fuse_mul(true));
    let timm = ContextConfig::from_keys(&family_file("gc_timm_scale.safetensors"), &WeightKeys::timm()).unwrap();
    assert_eq!(timm, ContextConfig::timm(16));
}

#[test]
fn checkpoints_round_trip_under_their_keys_and_a_prefix() {
    let mut rng = Rng::new(6);
    for naming in [Naming::Mmcv, Naming::Timm] {
        for pooling in [Pooling::Attention, Pooling::Average] {
            for fusion in FUSIONS {
                let what = format!("{naming} {pooling} {fusion:?}");
                let config = config_for(naming, 10, 3, pooling, fusion);
                let block = random_block(config.clone(), &mut rng);
                // Without a prefix: exactly the upstream state_dict, in PyTorch shapes.
                let plain = WeightKeys { naming, prefix: String::new() };
                let file = TensorFile::from_bytes(block.to_safetensors().unwrap()).unwrap();
                let named = block.parameters().named(naming);
                let mut names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
                names.sort();
                assert_eq!(file.keys(), names, "{what}");
                for (name, t) in &named {
                    assert_eq!(file.shape(name).unwrap(), t.shape(), "{what}: {name}");
                }
                let norm = format!("{}.weight", if naming == Naming::Timm { "norm" } else { "1" });
                let (_, ln) = named.iter().find(|(n, _)| n.ends_with(&norm)).unwrap();
                assert_eq!(ln.shape(), if naming == Naming::Timm { &[3][..] } else { &[3, 1, 1][..] }, "{what}");
                assert_eq!(ContextConfig::from_keys(&file, &plain).unwrap(), config, "{what}");
                let reloaded = ContextBlock::from_checkpoint(config.clone(), &file, &plain).unwrap();
                assert_eq!(reloaded.parameters(), block.parameters(), "{what}");
                // Under a prefix, among other tensors of a model; saved again under it.
                let keys = WeightKeys { naming, prefix: "backbone.layer4.0.gc.".into() };
                let file = TensorFile::from_bytes(prefixed_checkpoint(&block, &keys)).unwrap();
                assert_eq!(ContextConfig::from_keys(&file, &keys).unwrap(), config, "{what}");
                let loaded = ContextBlock::from_checkpoint(config.clone(), &file, &keys).unwrap();
                assert_eq!(loaded.parameters(), block.parameters(), "{what}");
                assert_eq!(loaded.weight_keys(), Some(&keys));
                let again = TensorFile::from_bytes(loaded.to_safetensors().unwrap()).unwrap();
                assert_eq!(again.keys().len(), named.len());
                assert!(again.keys().iter().all(|k| k.starts_with("backbone.layer4.0.gc.")), "{what}");
            }
        }
    }
}

/// The block's parameters under `keys.prefix`, beside unrelated tensors of a model.
fn prefixed_checkpoint(block: &ContextBlock, keys: &WeightKeys) -> Vec<u8> {
    let plain = TensorFile::from_bytes(block.to_safetensors().unwrap()).unwrap();
    let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = plain
        .keys()
        .iter()
        .map(|k| {
            let t = plain.tensor(k).unwrap();
            (format!("{}{k}", keys.prefix), t.shape().to_vec(), t.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    entries.push((
        "backbone.layer4.0.conv1.weight".into(),
        vec![2, 2],
        [1.0f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect(),
    ));
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
        .iter()
        .map(|(k, s, b)| {
            (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// L = Σ out ⊙ r in f64, from the reference.
fn reference_loss(config: &ContextConfig, params: &ContextParameters, x: &Array4<f32>, r: &Array4<f32>) -> f64 {
    let out = reference::forward(config, params, x.view());
    out.iter().zip(r.iter()).map(|(a, &b)| a * f64::from(b)).sum()
}

/// Central difference along one element, with the step actually taken in f32.
fn central_difference(mut loss_at: impl FnMut(f32) -> f64, value: f32, h: f32) -> f64 {
    let (up, down) = (value + h, value - h);
    (loss_at(up) - loss_at(down)) / (f64::from(up) - f64::from(down))
}

fn set_element(t: &mut ArrayViewMutD<'_, f32>, idx: usize, v: f32) {
    *t.iter_mut().nth(idx).unwrap() = v;
}

#[test]
fn gradients_match_finite_differences_in_every_configuration() {
    let mut seed = 100;
    for naming in [Naming::Mmcv, Naming::Timm] {
        for pooling in [Pooling::Attention, Pooling::Average] {
            for fusion in FUSIONS {
                seed += 1;
                let what = format!("{naming} {pooling} {fusion:?}");
                let mut rng = Rng::new(seed);
                let config = config_for(naming, 7, 4, pooling, fusion);
                let params = random_params(&config, &mut rng);
                let block = ContextBlock::from_parameters(config.clone(), params.clone()).unwrap();
                let x = images(&mut rng, (2, 3, 5, 7));
                let r = images(&mut rng, (2, 3, 5, 7));
                let (_, ctx) = block.forward_train(&x.view().insert_axis(Axis(1))).unwrap();
                let grads = block.backward(&ctx, &r.view().insert_axis(Axis(1))).unwrap();
                assert_eq!(grads.input.shape(), &[2, 1, 3, 5, 7]);
                let h = 1e-3f32;
                let tol = |fd: f64| 2e-3 * fd.abs().max(1.0);
                for idx in (0..x.len()).step_by(5) {
                    let value = x.as_slice().unwrap()[idx];
                    let fd = central_difference(
                        |v| {
                            let mut xv = x.clone();
                            xv.as_slice_mut().unwrap()[idx] = v;
                            reference_loss(&config, &params, &xv, &r)
                        },
                        value,
                        h,
                    );
                    let got = f64::from(grads.input.as_slice().unwrap()[idx]);
                    assert!((fd - got).abs() <= tol(fd), "{what}: input[{idx}] fd {fd} vs {got}");
                }
                // Every parameter tensor, named and shaped as in the checkpoint.
                let named = grads.params.named();
                let want: Vec<(String, Vec<usize>)> =
                    params.named(naming).into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
                let got: Vec<(String, Vec<usize>)> =
                    named.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect();
                assert_eq!(got, want, "{what}: gradient names and shapes");
                for (t, (name, grad)) in named.iter().enumerate() {
                    let len = grad.len();
                    for idx in [0, len / 2, len - 1] {
                        let value = *params.named(naming)[t].1.iter().nth(idx).unwrap();
                        let fd = central_difference(
                            |v| {
                                let mut p = params.clone();
                                set_element(&mut p.named_mut(naming)[t].1, idx, v);
                                reference_loss(&config, &p, &x, &r)
                            },
                            value,
                            h,
                        );
                        let got = f64::from(*grad.iter().nth(idx).unwrap());
                        assert!((fd - got).abs() <= tol(fd), "{what}: {name}[{idx}] fd {fd} vs {got}");
                    }
                }
                // The mask bias shifts every logit alike: the softmax does not see it.
                if let Some(mask) = &grads.params.values.mask {
                    assert!(mask.bias.as_ref().unwrap()[0].abs() < 1e-5, "{what}");
                }
            }
        }
    }
}

#[test]
fn update_parameters_pairs_gradients_by_name_and_refreshes_the_block() {
    let mut rng = Rng::new(11);
    for naming in [Naming::Mmcv, Naming::Timm] {
        let config = config_for(naming, 6, 3, Pooling::Attention, (true, true));
        let mut block = random_block(config.clone(), &mut rng);
        let x = images(&mut rng, (2, 4, 4, 6)).insert_axis(Axis(1));
        let r = images(&mut rng, (2, 4, 4, 6)).insert_axis(Axis(1));
        let (_, ctx) = block.forward_train(&x).unwrap();
        let grads = block.backward(&ctx, &r).unwrap();
        let mut expected = block.parameters().clone();
        let named = grads.params.named();
        for (name, mut p) in expected.named_mut(naming) {
            let (_, g) = named.iter().find(|(n, _)| *n == name).unwrap();
            p.zip_mut_with(g, |p, &g| *p -= 0.1 * g);
        }
        let mut seen = Vec::new();
        block
            .update_parameters(&grads.params, |name, mut p, g| {
                assert_eq!(p.shape(), g.shape(), "{name}");
                seen.push(name.to_string());
                p.scaled_add(-0.1, &g);
            })
            .unwrap();
        assert_eq!(seen, named.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
        assert_eq!(block.parameters(), &expected);
        let fresh = ContextBlock::from_parameters(config, expected).unwrap();
        assert_eq!(block.forward(&x).unwrap(), fresh.forward(&x).unwrap(), "{naming}: the block follows");
        assert!(matches!(block.backward(&ctx, &r), Err(Error::StaleContext)));
    }
}

#[test]
fn update_parameters_rejects_gradients_of_another_block() {
    let mut rng = Rng::new(12);
    let config = config_for(Naming::Mmcv, 6, 3, Pooling::Attention, (true, false));
    let mut block = random_block(config.clone(), &mut rng);
    let before = block.parameters().clone();
    let grads_of = |config: ContextConfig, rng: &mut Rng| {
        let block = random_block(config.clone(), rng);
        let x = images(rng, (1, 3, 3, config.in_channels)).insert_axis(Axis(1));
        let (z, ctx) = block.forward_train(&x).unwrap();
        block.backward(&ctx, &z).unwrap().params
    };
    let never = |_: &str, _: ArrayViewMutD<'_, f32>, _: ndarray::ArrayViewD<'_, f32>| panic!("called");
    let timm = grads_of(config_for(Naming::Timm, 6, 3, Pooling::Attention, (true, false)), &mut rng);
    let err = block.update_parameters(&timm, never).unwrap_err();
    assert!(matches!(&err, Error::MissingKey { key } if key.starts_with("conv_mask.weight")), "{err}");
    let avg = grads_of(config.clone().pooling(Pooling::Average), &mut rng);
    let err = block.update_parameters(&avg, never).unwrap_err();
    assert!(matches!(&err, Error::MissingKey { key } if key.starts_with("conv_mask.weight")), "{err}");
    let both = grads_of(config.clone().fuse_mul(true), &mut rng);
    let err = block.update_parameters(&both, never).unwrap_err();
    assert!(matches!(&err, Error::MissingKey { key } if key.starts_with("channel_mul_conv.")), "{err}");
    let wider = grads_of(config.clone().planes(4), &mut rng);
    let err = block.update_parameters(&wider, never).unwrap_err();
    assert!(matches!(&err, Error::WrongShape { key, .. } if key == "channel_add_conv.0.weight"), "{err}");
    assert_eq!(block.parameters(), &before, "nothing changed");
    let own = grads_of(config, &mut rng);
    let err = block
        .update_parameters(&own, |name, mut p, _| {
            if name == "channel_add_conv.1.bias" {
                p.fill(f32::INFINITY)
            }
        })
        .unwrap_err();
    assert!(matches!(&err, Error::InvalidParameter { key, .. } if key == "channel_add_conv.1.bias"), "{err}");
}

#[test]
fn training_input_errors() {
    let mut rng = Rng::new(13);
    let mut block = random_block(config_for(Naming::Timm, 4, 2, Pooling::Attention, (false, true)), &mut rng);
    let x = images(&mut rng, (1, 4, 4, 4)).insert_axis(Axis(1));
    let (z, ctx) = block.forward_train(&x).unwrap();
    let wrong = Array5::<f32>::zeros((1, 1, 4, 2, 4));
    assert!(matches!(block.backward(&ctx, &wrong), Err(Error::WrongShape { key, .. }) if key == "grad_output"));
    // A gradient in another layout is read by its logical order.
    let transposed = z.t().to_owned();
    let want = block.backward(&ctx, &z).unwrap();
    assert_eq!(block.backward(&ctx, &transposed.t()).unwrap(), want);
    assert!(matches!(block.forward_train(&x.index_axis(Axis(1), 0)), Err(Error::InputRank { actual: 4, .. })));
    let params = block.parameters().clone();
    block.set_parameters(params).unwrap();
    assert!(matches!(block.backward(&ctx, &z), Err(Error::StaleContext)));
}

#[test]
fn non_finite_inputs_poison_their_own_sample_only() {
    let mut rng = Rng::new(14);
    for pooling in [Pooling::Attention, Pooling::Average] {
        let block = random_block(config_for(Naming::Mmcv, 5, 2, pooling, (true, true)), &mut rng);
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = images(&mut rng, (2, 3, 4, 5));
            x[[1, 2, 1, 3]] = bad;
            let z = block.forward_images(&x).unwrap();
            assert!(z.slice(s![1, .., .., ..]).iter().all(|v| v.is_nan()), "{pooling} {bad}");
            assert!(z.slice(s![0, .., .., ..]).iter().all(|v| v.is_finite()), "{pooling} {bad}");
        }
    }
}

#[test]
fn input_errors_are_typed() {
    let block = ContextBlock::new(ContextConfig::mmcv(8, 0.25)).unwrap();
    let err = block.forward(&Array4::<f32>::zeros((1, 4, 4, 8))).unwrap_err();
    assert!(matches!(err, Error::InputRank { actual: 4, .. }), "{err}");
    let err = block.forward_images(&Array5::<f32>::zeros((1, 1, 4, 4, 8))).unwrap_err();
    assert!(matches!(err, Error::InputRank { actual: 5, .. }), "{err}");
    let err = block.forward_images(&ndarray::Array3::<f32>::zeros((4, 4, 8))).unwrap_err();
    assert!(matches!(err, Error::InputRank { actual: 3, .. }), "{err}");
    // Channels first: the message points at the axis with 8.
    let err = block.forward_images(&Array4::<f32>::zeros((1, 8, 4, 4))).unwrap_err();
    assert!(matches!(err, Error::InputChannels { expected: 8, actual: 4, .. }), "{err}");
    assert!(err.to_string().contains("channels-first"), "{err}");
    let err = block.forward_images(&Array4::<f32>::zeros((1, 0, 4, 8))).unwrap_err();
    assert!(matches!(err, Error::EmptyInput { axis: 1, name: "H", .. }), "{err}");
    let err = block.forward_images(&Array4::<f32>::zeros((0, 3, 4, 8))).unwrap_err();
    assert!(matches!(err, Error::EmptyInput { axis: 0, name: "B", .. }), "{err}");
    let err = block.forward(&Array5::<f32>::zeros((1, 2, 4, 4, 8))).unwrap_err();
    assert!(matches!(err, Error::LayoutMismatch { conv_dims: 2, grid: [2, 4, 4] }), "{err}");
    let err = block.forward(&Array5::<f32>::zeros((1, 0, 4, 4, 8))).unwrap_err();
    assert!(matches!(err, Error::EmptyInput { axis: 1, name: "T", .. }), "{err}");
    let x = Array5::<f32>::zeros((1, 1, 4, 4, 8));
    let err = block.forward_into(&x, &mut Array5::<f32>::zeros((1, 1, 4, 5, 8))).unwrap_err();
    assert!(matches!(err, Error::WrongShape { ref key, .. } if key == "out"), "{err}");
    let err = block.context(&x).unwrap_err();
    assert!(matches!(err, Error::InputRank { actual: 5, .. }), "{err}");
    assert_eq!(block.context(&x.index_axis(Axis(1), 0)).unwrap().shape(), &[1, 8]);
}

#[test]
fn configuration_errors_are_typed() {
    let invalid = |config: ContextConfig| matches!(config.validate(), Err(Error::InvalidConfig { .. }));
    assert!(invalid(ContextConfig::mmcv(0, 0.25)));
    assert!(invalid(ContextConfig::mmcv(8, 0.1)), "int(8 · 0.1) = 0 planes");
    assert!(invalid(ContextConfig::mmcv(8, f64::NAN)));
    assert!(invalid(ContextConfig::mmcv(8, -1.0)));
    assert!(invalid(ContextConfig::mmcv(8, 0.25).fuse_add(false)));
    assert!(invalid(ContextConfig::mmcv(8, 0.25).ln_eps(-1.0)));
    assert!(invalid(ContextConfig::mmcv(8, 0.25).ln_eps(f64::INFINITY)));
    let mut alex = ContextConfig::mmcv(8, 0.25);
    alex.naming = Naming::AlexHex7;
    assert!(invalid(alex.clone()));
    assert!(matches!(ContextBlock::new(alex), Err(Error::InvalidConfig { .. })));
    assert!(matches!(ContextConfig::preset(Naming::AlexHex7, 8), Err(Error::InvalidConfig { .. })));
    let huge = ContextConfig::mmcv(usize::MAX / 2, 0.25).planes(1 << 40);
    assert!(matches!(huge.validate(), Err(Error::TooLarge { .. })));
}

#[test]
fn parameter_errors_are_typed() {
    let mut rng = Rng::new(15);
    let config = config_for(Naming::Timm, 6, 2, Pooling::Attention, (true, false));
    let good = random_params(&config, &mut rng);
    let check = |f: &dyn Fn(&mut ContextParameters)| {
        let mut p = good.clone();
        f(&mut p);
        ContextBlock::from_parameters(config.clone(), p).unwrap_err()
    };
    let err = check(&|p| p.mask = None);
    assert!(matches!(&err, Error::MissingKey { key } if key == "conv_attn.weight"), "{err}");
    let err = check(&|p| p.add = None);
    assert!(matches!(&err, Error::MissingKey { key } if key == "mlp_add.fc1.weight"), "{err}");
    let err = check(&|p| p.mul = p.add.clone());
    assert!(matches!(&err, Error::ConfigMismatch { what: "fuse_mul", .. }), "{err}");
    let err = check(&|p| p.add.as_mut().unwrap().conv2.weight = ndarray::Array2::zeros((6, 3)));
    assert!(matches!(&err, Error::WrongShape { key, .. } if key == "mlp_add.fc2.weight"), "{err}");
    let err = check(&|p| p.add.as_mut().unwrap().ln_bias = Array1::zeros(3));
    assert!(matches!(&err, Error::WrongShape { key, .. } if key == "mlp_add.norm.bias"), "{err}");
    let err = check(&|p| p.mask.as_mut().unwrap().bias = Some(Array1::zeros(2)));
    assert!(matches!(&err, Error::WrongShape { key, .. } if key == "conv_attn.bias"), "{err}");
    let err = check(&|p| p.add.as_mut().unwrap().conv1.weight[[1, 2]] = f32::NAN);
    assert!(matches!(&err, Error::InvalidParameter { key, .. } if key == "mlp_add.fc1.weight"), "{err}");
    let avg = config.clone().pooling(Pooling::Average);
    let err = ContextBlock::from_parameters(avg, good.clone()).unwrap_err();
    assert!(matches!(&err, Error::ConfigMismatch { what: "pooling", .. }), "{err}");
    // Biases may be absent (zero); the block then has no gradient for them.
    let mut no_bias = good.clone();
    no_bias.add.as_mut().unwrap().conv2.bias = None;
    let block = ContextBlock::from_parameters(config, no_bias).unwrap();
    let x = images(&mut rng, (1, 3, 3, 6)).insert_axis(Axis(1));
    let (z, ctx) = block.forward_train(&x).unwrap();
    let names: Vec<String> = block.backward(&ctx, &z).unwrap().params.named().into_iter().map(|(n, _)| n).collect();
    assert!(!names.contains(&"mlp_add.fc2.bias".to_string()) && names.contains(&"mlp_add.fc2.weight".to_string()));
}

/// A checkpoint of the golden mmcv add block with one tensor replaced (or removed: `None`).
fn edited(name: &str, key: &str, replace: Option<(Vec<usize>, Vec<f32>)>) -> TensorFile {
    let file = family_file(name);
    let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for k in file.keys() {
        let t = file.tensor(k).unwrap();
        let (shape, values) = if k == key {
            match &replace {
                Some((s, v)) => (s.clone(), v.clone()),
                None => continue,
            }
        } else {
            (t.shape().to_vec(), t.iter().copied().collect())
        };
        entries.push((k.to_string(), shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
        .iter()
        .map(|(k, s, b)| {
            (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    TensorFile::from_bytes(safetensors::serialize(views, None).unwrap()).unwrap()
}

#[test]
fn checkpoint_errors_name_the_key() {
    let name = "gc_mmcv_add.safetensors";
    let file = family_file(name);
    let config = ContextConfig::mmcv(16, 0.25);
    let mmcv = WeightKeys::mmcv();
    let load = |file: &TensorFile, config: &ContextConfig, keys: &WeightKeys| {
        ContextBlock::from_checkpoint(config.clone(), file, keys).unwrap_err()
    };
    let err = load(&file, &config, &WeightKeys::alexhex7());
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    let err = ContextConfig::from_keys(&file, &WeightKeys::alexhex7()).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    // timm keys on an mmcv file: the configuration says mmcv.
    let err = load(&file, &config, &WeightKeys::timm());
    assert!(matches!(err, Error::ConfigMismatch { what: "naming", .. }), "{err}");
    let err = load(&file, &ContextConfig::timm(16).fuse_add(true).fuse_mul(false).planes(4), &WeightKeys::timm());
    assert!(matches!(&err, Error::ConfigMismatch { what: "pooling", .. }), "{err}");
    let err = ContextConfig::from_keys(&file, &WeightKeys::timm()).unwrap_err();
    assert!(matches!(&err, Error::MissingKey { key } if key == "mlp_scale.fc1.weight"), "{err}");
    let err = ContextConfig::from_keys(&file, &mmcv.clone().with_prefix("neck.")).unwrap_err();
    assert!(matches!(&err, Error::MissingKey { key } if key == "neck.channel_add_conv.0.weight"), "{err}");
    // Configurations the keys contradict.
    let err = load(&file, &config.clone().pooling(Pooling::Average), &mmcv);
    assert!(matches!(&err, Error::ConfigMismatch { what: "pooling", .. }), "{err}");
    let err = load(&file, &config.clone().fuse_mul(true), &mmcv);
    assert!(matches!(&err, Error::ConfigMismatch { what: "fuse_mul", .. }), "{err}");
    let err = load(&file, &config.clone().fuse_add(false).fuse_mul(true), &mmcv);
    assert!(matches!(&err, Error::ConfigMismatch { what: "fuse_add", .. }), "{err}");
    let err = load(&file, &config.clone().planes(5), &mmcv);
    assert!(
        matches!(&err, Error::WrongShape { key, expected, actual } if key == "channel_add_conv.0.weight" && expected == &[5, 16, 1, 1] && actual == &[4, 16, 1, 1]),
        "{err}"
    );
    let err = load(&file, &ContextConfig::mmcv(12, 0.25).planes(4), &mmcv);
    assert!(matches!(&err, Error::WrongShape { key, .. } if key == "conv_mask.weight"), "{err}");
    // Missing and misshapen tensors, values that are not finite.
    let err = load(&edited(name, "channel_add_conv.3.bias", None), &config, &mmcv);
    assert!(matches!(&err, Error::MissingKey { key } if key == "channel_add_conv.3.bias"), "{err}");
    let err = load(&edited(name, "conv_mask.bias", None), &config, &mmcv);
    assert!(matches!(&err, Error::MissingKey { key } if key == "conv_mask.bias"), "{err}");
    let err = load(&edited(name, "channel_add_conv.1.weight", Some((vec![4], vec![1.0; 4]))), &config, &mmcv);
    assert!(
        matches!(&err, Error::WrongShape { key, expected, .. } if key == "channel_add_conv.1.weight" && expected == &[4, 1, 1]),
        "{err}"
    );
    let err = load(&edited(name, "channel_add_conv.3.weight", Some((vec![16, 4], vec![0.0; 64]))), &config, &mmcv);
    assert!(matches!(&err, Error::WrongShape { key, .. } if key == "channel_add_conv.3.weight"), "{err}");
    let mut nan = vec![0.5f32; 16];
    nan[3] = f32::NAN;
    let err = load(&edited(name, "channel_add_conv.3.bias", Some((vec![16], nan))), &config, &mmcv);
    assert!(matches!(&err, Error::InvalidParameter { key, .. } if key == "channel_add_conv.3.bias"), "{err}");
    let bad_rank = edited(name, "channel_add_conv.0.weight", Some((vec![4, 16], vec![0.0; 64])));
    let err = ContextConfig::from_keys(&bad_rank, &mmcv).unwrap_err();
    assert!(matches!(&err, Error::WrongRank { expected: 4, actual: 2, .. }), "{err}");
    let bad_dims = edited(name, "channel_add_conv.0.weight", Some((vec![4, 16, 1, 2], vec![0.0; 128])));
    let err = ContextConfig::from_keys(&bad_dims, &mmcv).unwrap_err();
    assert!(matches!(&err, Error::WrongShape { .. }), "{err}");
    // timm's LayerNorm is 1-d: mmcv's (planes, 1, 1) shape is refused there.
    let tname = "gc_timm_scale.safetensors";
    let tconfig = ContextConfig::timm(16);
    let err = load(
        &edited(tname, "mlp_scale.norm.weight", Some((vec![2, 1, 1], vec![1.0; 2]))),
        &tconfig,
        &WeightKeys::timm(),
    );
    assert!(
        matches!(&err, Error::WrongShape { key, expected, .. } if key == "mlp_scale.norm.weight" && expected == &[2]),
        "{err}"
    );
}

#[test]
fn naming_parses_timm() {
    assert_eq!("timm".parse::<Naming>().unwrap(), Naming::Timm);
    assert_eq!(Naming::Timm.to_string(), "timm");
    assert_eq!(WeightKeys::timm().naming, Naming::Timm);
    // timm keys of another block (NonLocalAttn) hold no context block.
    let file = family_file("nl_timm.safetensors");
    let err = ContextConfig::from_keys(&file, &WeightKeys::timm()).unwrap_err();
    assert!(matches!(&err, Error::MissingKey { key } if key == "mlp_scale.fc1.weight"), "{err}");
    let err = ContextBlock::from_checkpoint(ContextConfig::timm(16), &file, &WeightKeys::timm()).unwrap_err();
    assert!(matches!(&err, Error::ConfigMismatch { what: "pooling", .. }), "{err}");
}

#[test]
fn corrupt_golden_cases_are_rejected() {
    let mut rejected = 0;
    for name in ["corrupt_context_block.safetensors", "corrupt_global_context.safetensors"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/family").join(name);
        if !path.exists() {
            continue;
        }
        let file = TensorFile::open(&path).unwrap();
        let naming: Naming = file.metadata()["naming"].parse().unwrap();
        let keys = WeightKeys { naming, prefix: file.metadata().get("prefix").cloned().unwrap_or_default() };
        let block =
            ContextBlock::from_checkpoint(ContextConfig::from_keys(&file, &keys).unwrap(), &file, &keys).unwrap();
        let x: Array5<f32> = file.tensor_as("input").unwrap();
        let want = file.tensor("output").unwrap().mapv(f64::from);
        let (err, tol) = max_err(&block.forward(&x).unwrap(), &want);
        assert!(err > tol, "{name}: a corrupted output passed ({err:.3e} <= {tol:.3e})");
        rejected += 1;
    }
    assert_eq!(rejected, 2, "both corrupt context cases are in tests/data/family");
}
