//! Every bad input comes back as the specific error, never a panic.

mod common;

use std::collections::HashMap;

use common::golden::GoldenCase;
use common::{random_block, Rng};
use ndarray::{Array, Array5, Axis, IxDyn};
use nonlocal::{Error, Mode, NonLocalBlock, NonLocalConfig, TensorFile, WeightKeys};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn data_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// A golden file's tensors as (dtype, shape, bytes), and its metadata, for editing.
struct Editable {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    metadata: HashMap<String, String>,
}

impl Editable {
    fn open(name: &str) -> Self {
        let bytes = std::fs::read(data_path(name)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let tensors =
            st.tensors().into_iter().map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
        Editable { tensors, metadata: meta.metadata().clone().unwrap_or_default() }
    }

    fn remove(mut self, key: &str) -> Self {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.0 != key);
        assert_eq!(self.tensors.len(), before - 1, "{key} was in the file");
        self
    }

    fn replace_f32(mut self, key: &str, shape: &[usize], values: &[f32]) -> Self {
        let t = self.tensors.iter_mut().find(|t| t.0 == key).unwrap_or_else(|| panic!("{key} in file"));
        t.1 = Dtype::F32;
        t.2 = shape.to_vec();
        t.3 = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self
    }

    fn retype(mut self, key: &str, dtype: Dtype) -> Self {
        let t = self.tensors.iter_mut().find(|t| t.0 == key).unwrap();
        t.1 = dtype;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView<'_>)> =
            self.tensors.iter().map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize(views, Some(self.metadata.clone())).unwrap()
    }

    fn load(&self, config: NonLocalConfig) -> Result<NonLocalBlock, Error> {
        let file = TensorFile::from_bytes(self.bytes())?;
        NonLocalBlock::from_checkpoint(config, &file, &WeightKeys::alexhex7())
    }
}

/// eg_video: AlexHex7, C = 8, C' = 4, pooled 1x2x2, BatchNorm.
fn eg_config() -> NonLocalConfig {
    NonLocalConfig::new(8).inter_channels(4)
}

#[test]
fn unmodified_file_loads() {
    Editable::open("eg_video.safetensors").load(eg_config()).unwrap();
}

#[test]
fn broken_files_are_refused() {
    let good = std::fs::read(data_path("eg_video.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut rng = Rng::new(3);
    let random: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    let mut huge_header = good.clone();
    huge_header[..8].copy_from_slice(&(good.len() as u64 * 2).to_le_bytes());
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("seven bytes", good[..7].to_vec()),
        ("truncated header", good[..8 + header_len / 2].to_vec()),
        ("truncated data", good[..good.len() - 10].to_vec()),
        ("random bytes", random),
        ("header length past the end", huge_header),
    ];
    // A tensor whose offsets run past the end of the data.
    let header = std::str::from_utf8(&good[8..8 + header_len]).unwrap();
    let data_len = good.len() - 8 - header_len;
    let bad_header = header.replacen(&format!(",{data_len}]"), &format!(",{}]", data_len + 64), 1);
    assert_ne!(bad_header, header, "the last tensor's end offset is in the header");
    let mut past_end = (bad_header.len() as u64).to_le_bytes().to_vec();
    past_end.extend_from_slice(bad_header.as_bytes());
    past_end.extend_from_slice(&good[8 + header_len..]);
    cases.push(("offsets past the end", past_end));
    for (what, bytes) in cases {
        // Too short or random: not a checkpoint; a safetensors header, broken: a bad one.
        match TensorFile::from_bytes(bytes) {
            Err(Error::NotACheckpoint { .. }) if ["empty", "seven bytes", "random bytes"].contains(&what) => {}
            Err(Error::BadCheckpoint { format: nonlocal::CheckpointFormat::Safetensors, .. }) => {}
            other => panic!("{what}: expected NotACheckpoint or BadCheckpoint, got {other:?}"),
        }
    }
}

#[test]
fn missing_file_is_io_error() {
    let err = TensorFile::open("/nonexistent/weights.safetensors").unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/weights.safetensors"));
}

#[test]
fn unsupported_dtype_names_the_key() {
    // Same byte count, declared I32.
    let err = Editable::open("eg_video.safetensors").retype("theta.weight", Dtype::I32).load(eg_config()).unwrap_err();
    match err {
        Error::UnsupportedDtype { key, dtype } => {
            assert_eq!(key, "theta.weight");
            assert_eq!(dtype, "I32");
        }
        other => panic!("expected UnsupportedDtype, got {other}"),
    }
}

#[test]
fn missing_keys_are_named() {
    for key in ["theta.weight", "theta.bias", "phi.0.weight", "g.0.bias", "W.0.weight", "W.1.running_var", "W.1.bias"] {
        let err = Editable::open("eg_video.safetensors").remove(key).load(eg_config()).unwrap_err();
        match err {
            Error::MissingKey { key: k } => assert_eq!(k, key),
            other => panic!("{key}: expected MissingKey, got {other}"),
        }
    }
    // The concatenation projection.
    let config = NonLocalConfig::new(6).inter_channels(3).mode(Mode::Concatenation);
    let err = Editable::open("concat_video.safetensors").remove("concat_project.0.weight").load(config).unwrap_err();
    assert!(matches!(err, Error::MissingKey { ref key } if key == "concat_project.0.weight"), "{err}");
}

#[test]
fn the_wrong_key_scheme_or_prefix_names_the_blocks_the_file_has() {
    // mmcv weights loaded with AlexHex7 keys.
    let file = TensorFile::open(data_path("eg_mmcv_scaled.safetensors")).unwrap();
    let config = NonLocalConfig::mmcv(16).sub_sample(Some([1, 2, 2])).bn_layer(true).conv_dims(2);
    let err = NonLocalBlock::from_checkpoint(config.clone(), &file, &WeightKeys::alexhex7()).unwrap_err();
    match &err {
        Error::BlockNotFound { naming: "alexhex7", prefix, found } => {
            assert!(prefix.is_empty());
            assert_eq!(found, &["mmcv at \"\""]);
        }
        other => panic!("expected BlockNotFound, got {other:?}"),
    }
    assert!(err.to_string().contains("the file has: mmcv at \"\""), "{err}");
    // The right scheme under a prefix the file does not use.
    let err = NonLocalBlock::from_checkpoint(config, &file, &WeightKeys::mmcv().with_prefix("backbone.")).unwrap_err();
    assert!(matches!(&err, Error::BlockNotFound { naming: "mmcv", .. }), "{err:?}");
    // A file with no block at all says so.
    let mut e = Editable::open("eg_video.safetensors");
    e.tensors.retain(|t| t.0 == "input" || t.0 == "output");
    let file = TensorFile::from_bytes(e.bytes()).unwrap();
    let err = NonLocalBlock::from_checkpoint(eg_config(), &file, &WeightKeys::alexhex7()).unwrap_err();
    assert!(err.to_string().ends_with("the file holds no non-local block"), "{err}");
}

#[test]
fn wrong_shapes_name_key_and_both_shapes() {
    let cases: Vec<(&str, Vec<usize>)> = vec![
        ("theta.weight", vec![4, 7, 1, 1, 1]),
        ("phi.0.weight", vec![3, 8, 1, 1, 1]),
        ("g.0.weight", vec![4, 8, 2, 1, 1]),
        ("W.0.weight", vec![8, 5, 1, 1, 1]),
        ("theta.bias", vec![5]),
        ("W.1.running_mean", vec![7]),
        ("W.1.weight", vec![8, 1]),
    ];
    for (key, shape) in cases {
        let len: usize = shape.iter().product();
        let err = Editable::open("eg_video.safetensors")
            .replace_f32(key, &shape, &vec![0.1; len])
            .load(eg_config())
            .unwrap_err();
        match &err {
            Error::WrongShape { key: k, actual, expected } => {
                assert_eq!(k, key);
                assert_eq!(actual, &shape);
                assert_ne!(expected, &shape);
                let msg = err.to_string();
                assert!(msg.contains(key) && msg.contains(&format!("{shape:?}")), "{msg}");
            }
            other => panic!("{key}: expected WrongShape, got {other}"),
        }
    }
    let config = NonLocalConfig::new(6).inter_channels(3).mode(Mode::Concatenation);
    let err = Editable::open("concat_video.safetensors")
        .replace_f32("concat_project.0.weight", &[1, 5, 1, 1], &[0.1; 5])
        .load(config)
        .unwrap_err();
    assert!(
        matches!(&err, Error::WrongShape { key, expected, .. } if key == "concat_project.0.weight" && expected == &[1, 6, 1, 1]),
        "{err}"
    );
}

#[test]
fn channel_counts_that_disagree_with_the_weights() {
    let file = Editable::open("eg_video.safetensors");
    for config in [NonLocalConfig::new(8).inter_channels(3), NonLocalConfig::new(6).inter_channels(4)] {
        let err = file.load(config).unwrap_err();
        assert!(matches!(err, Error::WrongShape { ref key, .. } if key == "theta.weight"), "{err}");
    }
}

#[test]
fn configuration_that_disagrees_with_the_keys() {
    let file = Editable::open("eg_video.safetensors");
    for (config, what) in [
        (eg_config().bn_layer(false), "bn_layer"),
        (eg_config().sub_sample(None), "sub_sample"),
        (eg_config().conv_dims(2), "conv_dims"),
    ] {
        match file.load(config) {
            Err(Error::ConfigMismatch { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: expected ConfigMismatch, got {other:?}"),
        }
    }
    let nobn = Editable::open("eg_nobn_nopool.safetensors");
    let config = NonLocalConfig::new(10).inter_channels(3).sub_sample(None);
    nobn.load(config.clone().bn_layer(false)).unwrap();
    assert!(matches!(nobn.load(config.clone()), Err(Error::ConfigMismatch { what: "bn_layer", .. })));
    assert!(matches!(
        nobn.load(config.bn_layer(false).sub_sample(Some([1, 2, 2]))),
        Err(Error::ConfigMismatch { what: "sub_sample", .. })
    ));
}

#[test]
fn non_finite_or_negative_variance_is_rejected() {
    for bad in [f32::NAN, f32::INFINITY, -1.0] {
        let mut var = vec![1.0f32; 8];
        var[5] = bad;
        let err = Editable::open("eg_video.safetensors")
            .replace_f32("W.1.running_var", &[8], &var)
            .load(eg_config())
            .unwrap_err();
        match err {
            Error::InvalidParameter { key, .. } => assert_eq!(key, "W.1.running_var"),
            other => panic!("{bad}: expected InvalidParameter, got {other}"),
        }
    }
    let mut w = vec![0.1f32; 32];
    w[3] = f32::NAN;
    let err = Editable::open("eg_video.safetensors")
        .replace_f32("theta.weight", &[4, 8, 1, 1, 1], &w)
        .load(eg_config())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { ref key, .. } if key == "theta.weight"), "{err}");
}

#[test]
fn bad_configurations() {
    let cases = [
        NonLocalConfig::new(0),
        NonLocalConfig::new(8).inter_channels(0),
        NonLocalConfig::new(8).sub_sample(Some([1, 0, 2])),
        NonLocalConfig::new(8).conv_dims(4),
        NonLocalConfig::new(8).bn_eps(f64::NAN),
    ];
    for config in cases {
        let err = NonLocalBlock::new(config.clone()).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{config:?}: {err}");
    }
    let err = "softmax".parse::<Mode>().unwrap_err();
    assert!(matches!(err, Error::UnknownMode { ref name } if name == "softmax"), "{err}");
    let err = nonlocal::internal::parse_sub_sample("2x2").unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }));
    let too_big = NonLocalConfig::new(usize::MAX / 2).inter_channels(usize::MAX / 4);
    assert!(matches!(NonLocalBlock::new(too_big), Err(Error::TooLarge { .. })));
}

#[test]
fn bad_inputs() {
    let mut rng = Rng::new(5);
    let block = random_block(NonLocalConfig::new(4).inter_channels(2), &mut rng);
    let rank3 = Array::<f32, _>::zeros((4, 4, 4));
    assert!(matches!(block.forward(&rank3), Err(Error::InputRank { actual: 3, .. })));
    let rank6 = Array::<f32, _>::zeros(IxDyn(&[1, 1, 2, 2, 2, 4]));
    assert!(matches!(block.forward(&rank6), Err(Error::InputRank { actual: 6, .. })));
    let wrong_c = Array5::<f32>::zeros((1, 1, 4, 4, 5));
    assert!(matches!(block.forward(&wrong_c), Err(Error::InputChannels { expected: 4, actual: 5, .. })));
    for (axis, shape) in [(0, [0, 1, 4, 4, 4]), (1, [1, 0, 4, 4, 4]), (3, [1, 1, 4, 0, 4])] {
        let x = Array5::<f32>::zeros(shape);
        match block.forward(&x) {
            Err(Error::EmptyInput { axis: a, .. }) => assert_eq!(a, axis),
            other => panic!("{shape:?}: expected EmptyInput, got {other:?}"),
        }
    }
    let images = Array::<f32, _>::zeros((1, 0, 4, 4));
    assert!(matches!(block.forward_images(&images), Err(Error::EmptyInput { axis: 1, name: "H", .. })));
    let sequences = Array::<f32, _>::zeros((2, 0, 4));
    assert!(matches!(block.forward_sequences(&sequences), Err(Error::EmptyInput { axis: 1, name: "L", .. })));
    // 1x2x2 pooling needs H, W ≥ 2.
    let small = Array5::<f32>::zeros((1, 3, 1, 5, 4));
    assert!(matches!(block.forward(&small), Err(Error::NoKeys { size: [3, 1, 5], kernel: [1, 2, 2] })));
    assert!(matches!(block.attention(&small), Err(Error::NoKeys { .. })));
    // A sequence is one row: H = 1 is below a 1x2x2 kernel.
    let sequence = Array::<f32, _>::zeros((1, 6, 4));
    assert!(matches!(block.forward_sequences(&sequence), Err(Error::NoKeys { size: [1, 1, 6], .. })));
    // A broadcast view claims a huge shape without memory: sizes must be checked, not allocated.
    let one = ndarray::Array1::<f32>::zeros(4);
    let huge = one.broadcast((1usize << 20, 1usize << 12, 1usize << 12, 2, 4)).unwrap();
    // 2^49 bytes of output fit the address space but not this machine: the allocation fails.
    match block.forward(&huge) {
        Err(e @ Error::AllocationFailed { bytes, .. }) => {
            assert_eq!(bytes, 1usize << 49);
            assert!(e.to_string().contains("cannot allocate"), "{e}");
        }
        other => panic!("expected AllocationFailed, got {other:?}"),
    }
    // 2^59 positions of 6 projection columns: the buffer sizes overflow, nothing is allocated.
    let overflowing = one.broadcast((1usize << 20, 1usize << 20, 1usize << 18, 2, 4)).unwrap();
    match block.forward(&overflowing) {
        Err(e @ Error::TooLarge { .. }) => assert!(e.to_string().contains("overflows"), "{e}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Attention queries out of range.
    let x = Array5::<f32>::zeros((1, 1, 4, 4, 4));
    assert!(matches!(block.attention_rows(&x, &[3, 16]), Err(Error::QueryOutOfRange { index: 16, positions: 16 })));
    // forward_into with the wrong output shape.
    let mut out = Array5::<f32>::zeros((1, 1, 4, 2, 4));
    assert!(matches!(block.forward_into(&x, &mut out), Err(Error::WrongShape { .. })));
}

#[test]
fn every_entry_point_checks_its_rank() {
    let mut rng = Rng::new(6);
    let block = random_block(NonLocalConfig::new(4).inter_channels(2), &mut rng);
    // A batch of two images is not one clip of two frames, in any entry point.
    let images = rng.input((2, 1, 4, 6, 4), 1.0).index_axis_move(Axis(1), 0);
    let rank4 = |r: Result<(), Error>| matches!(r, Err(Error::InputRank { actual: 4, .. }));
    assert!(rank4(block.forward(&images).map(drop)));
    assert!(rank4(block.forward_into(&images, &mut images.clone()).map(drop)));
    assert!(rank4(block.attention(&images).map(drop)));
    assert!(rank4(block.attention_rows(&images, &[0]).map(drop)));
    assert!(rank4(block.forward_train(&images).map(drop)));
    assert!(rank4(block.forward_sequences(&images).map(drop)));
    let clips = images.clone().insert_axis(Axis(1));
    assert!(matches!(block.forward_images(&clips), Err(Error::InputRank { actual: 5, .. })));
    // The message says where image maps go.
    let message = block.forward(&images).unwrap_err().to_string();
    assert!(message.contains("rank 4") && message.contains("forward_images"), "{message}");
}

#[test]
fn wrong_channels_hint_that_channels_come_last() {
    let mut rng = Rng::new(8);
    let block = random_block(NonLocalConfig::new(8).inter_channels(4), &mut rng);
    // An NCHW image batch (2, 8, 6, 6): its last axis is W, not C.
    let nchw = Array::<f32, _>::zeros((2, 8, 6, 6));
    let err = block.forward_images(&nchw).unwrap_err();
    assert!(matches!(err, Error::InputChannels { expected: 8, actual: 6, .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("channels-last") && message.contains("axis 1 has 8"), "{message}");
    assert!(message.contains(".permuted_axes([0, 2, 3, 1])"), "{message}");
    // Permuted as the message says, it runs.
    assert!(block.forward_images(&nchw.view().permuted_axes([0, 2, 3, 1])).is_ok());
    // NCTHW clips get the 5-D permutation; a plain wrong count gets no channels-first hint.
    let ncthw = Array::<f32, _>::zeros((1, 8, 2, 4, 4));
    let message = block.forward(&ncthw).unwrap_err().to_string();
    assert!(message.contains(".permuted_axes([0, 2, 3, 4, 1])"), "{message}");
    let message = block.forward(&Array5::<f32>::zeros((1, 2, 4, 4, 6))).unwrap_err().to_string();
    assert!(message.contains("channels-last") && !message.contains("permute"), "{message}");
}

#[test]
fn the_channels_hint_permutes_the_axis_it_names_for_every_axis_and_rank() {
    let mut rng = Rng::new(9);
    let block = random_block(NonLocalConfig::new(8).inter_channels(4).sub_sample(None), &mut rng);
    for rank in 3..=5 {
        for axis in 1..rank - 1 {
            // Channels at `axis`, every other size different from 8.
            let mut shape: Vec<usize> = (0..rank).map(|a| [2, 3, 5, 6, 7][a]).collect();
            shape[axis] = 8;
            let x = ndarray::ArrayD::<f32>::zeros(shape.clone());
            let run = |x: &ndarray::ArrayViewD<'_, f32>| match rank {
                3 => block.forward_sequences(x).map(|_| ()),
                4 => block.forward_images(x).map(|_| ()),
                _ => block.forward(x).map(|_| ()),
            };
            let message = run(&x.view()).unwrap_err().to_string();
            assert!(message.contains(&format!("axis {axis} has 8")), "{shape:?}: {message}");
            let order: Vec<usize> = message
                .split(".permuted_axes([")
                .nth(1)
                .and_then(|rest| rest.split("])").next())
                .unwrap_or_else(|| panic!("{shape:?}: no permutation in {message}"))
                .split(", ")
                .map(|a| a.parse().unwrap())
                .collect();
            let permuted = x.view().permuted_axes(order.clone());
            assert_eq!(permuted.shape()[rank - 1], 8, "{shape:?}: {order:?} does not move the channels last");
            run(&permuted).unwrap_or_else(|e| panic!("{shape:?} permuted by {order:?}: {e}"));
        }
    }
}

#[test]
fn inputs_must_fit_conv_dims() {
    let mut rng = Rng::new(10);
    let two_d = random_block(NonLocalConfig::new(4).inter_channels(2).conv_dims(2), &mut rng);
    // NonLocal2d attends within one image: a clip with T > 1 is an error, T = 1 is fine.
    let clip = rng.input((1, 3, 4, 4, 4), 1.0);
    assert!(matches!(two_d.forward(&clip), Err(Error::LayoutMismatch { conv_dims: 2, grid: [3, 4, 4] })));
    assert!(matches!(two_d.forward_train(&clip), Err(Error::LayoutMismatch { .. })));
    let message = two_d.attention(&clip).unwrap_err().to_string();
    assert!(message.contains("NonLocal2d") && message.contains("forward_images"), "{message}");
    assert!(two_d.forward(&rng.input((1, 1, 4, 4, 4), 1.0)).is_ok());
    assert!(two_d.forward_images(&rng.input((3, 1, 4, 4, 4), 1.0).index_axis_move(Axis(1), 0)).is_ok());
    // NonLocal1d attends along one axis: image maps with H > 1 are an error.
    let one_d =
        random_block(NonLocalConfig::new(4).inter_channels(2).conv_dims(1).sub_sample(Some([1, 1, 2])), &mut rng);
    let images = rng.input((1, 1, 3, 4, 4), 1.0).index_axis_move(Axis(1), 0);
    assert!(matches!(one_d.forward_images(&images), Err(Error::LayoutMismatch { conv_dims: 1, grid: [1, 3, 4] })));
    let sequences = rng.input((2, 1, 1, 6, 4), 1.0).index_axis_move(Axis(1), 0).index_axis_move(Axis(1), 0);
    assert!(one_d.forward_sequences(&sequences).is_ok());
}

#[test]
fn position_conversions_check_their_range() {
    let block = NonLocalBlock::new(NonLocalConfig::new(4).sub_sample(Some([1, 2, 2]))).unwrap();
    let grid = [2, 5, 6];
    assert!(matches!(
        block.query_index(grid, [0, 5, 0]),
        Err(Error::PositionOutOfRange { position: [0, 5, 0], grid: [2, 5, 6] })
    ));
    assert!(matches!(block.query_position(grid, 60), Err(Error::QueryOutOfRange { index: 60, positions: 60 })));
    // Keys: 2x2x3 = 12.
    assert!(matches!(block.key_position(grid, 12), Err(Error::KeyOutOfRange { index: 12, keys: 12 })));
    assert!(matches!(block.key_region(grid, 12), Err(Error::KeyOutOfRange { .. })));
    assert_eq!(block.key_position(grid, 11).unwrap(), [1, 1, 2]);
    assert_eq!(block.key_region(grid, 11).unwrap(), [1..2, 2..4, 4..6]);
    for i in 0..60 {
        assert_eq!(block.query_index(grid, block.query_position(grid, i).unwrap()).unwrap(), i);
    }
}

#[test]
fn non_finite_inputs_propagate_without_panicking() {
    let mut rng = Rng::new(9);
    for mode in Mode::ALL {
        let block = random_block(NonLocalConfig::new(4).inter_channels(2).mode(mode), &mut rng);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = rng.input((1, 2, 4, 4, 4), 1.0);
            x[[0, 1, 2, 3, 1]] = bad;
            let z = block.forward(&x).unwrap();
            let finite = z.iter().filter(|v| v.is_finite()).count();
            // Every query attends to the key pooled from the bad position (and dot product's
            // φᵀg sums over it), so in these modes every output depends on it, as in PyTorch.
            // Concatenation's ReLU makes a key with b = ±∞ either dominate or vanish: its set
            // of affected positions may differ from PyTorch's (README), but NaN reaches all.
            let all_affected = mode != Mode::Concatenation || bad.is_nan();
            if all_affected {
                assert_eq!(finite, 0, "{mode}: {bad} did not reach every output");
            } else {
                assert!(!z[[0, 1, 2, 3, 1]].is_finite(), "{mode}: {bad} vanished from its own position");
            }
            // A NaN key makes every softmax row NaN; an infinite one may leave rows whose logit
            // for it is −∞ finite, as in PyTorch.
            let a = block.attention(&x).unwrap();
            if bad.is_nan() && mode.is_softmax() {
                assert!(a.iter().all(|v| v.is_nan()), "{mode}: NaN left a finite attention weight");
            }
        }
    }
}

#[test]
fn golden_check_reports_errors_for_bad_cases() {
    // Rank-4 input in a golden file is an error, not a reshape.
    let mut e = Editable::open("eg_video.safetensors");
    let input = e.tensors.iter().find(|t| t.0 == "input").unwrap().clone();
    let values: Vec<f32> = input.3.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    e = e.replace_f32("input", &input.2[1..], &values);
    let case = GoldenCase::from_file(TensorFile::from_bytes(e.bytes()).unwrap()).unwrap();
    assert!(matches!(case.check(), Err(Error::InputRank { actual: 4, .. })));
    // Metadata that disagrees with the parameters.
    let mut e = Editable::open("eg_video.safetensors");
    e.metadata.insert("inter_channels".into(), "3".into());
    let case = GoldenCase::from_file(TensorFile::from_bytes(e.bytes()).unwrap()).unwrap();
    assert!(matches!(case.check(), Err(Error::WrongShape { .. })));
    // An unknown mode in the metadata.
    let mut e = Editable::open("eg_video.safetensors");
    e.metadata.insert("mode".into(), "attention".into());
    let err = GoldenCase::from_file(TensorFile::from_bytes(e.bytes()).unwrap()).unwrap_err();
    assert!(matches!(err, Error::UnknownMode { .. }));
}

#[test]
fn golden_example_exits_1_on_a_bad_file() {
    // The example binary is built by `cargo test` next to the test binaries.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().join("examples");
    let golden = dir.join(format!("golden{}", std::env::consts::EXE_SUFFIX));
    if !golden.exists() {
        panic!("examples/golden not built at {}", golden.display());
    }
    let bad = std::env::temp_dir().join(format!("nonlocal-bad-{}.safetensors", std::process::id()));
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    let out = std::process::Command::new(&golden).arg(data_path("eg_video.safetensors")).arg(&bad).output().unwrap();
    std::fs::remove_file(&bad).ok();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PASS"), "{stdout}");
    assert!(stdout.contains("error:") && stdout.contains("FAIL"), "{stdout}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
