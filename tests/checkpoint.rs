//! Checkpoints of every format read: the shared PyTorch files (golden cases through their
//! `.pth`), the fixtures of `scripts/make_pth_fixtures.py` (views, dtypes, byte order, pickle
//! protocols, training checkpoints), and broken or hostile files.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::golden::GoldenCase;
use ndarray::{Array1, Array2, Ix1, Ix2};
use nonlocal::{
    find_blocks, load_blocks, CheckpointFormat, DType, Error, Mode, NonLocalBlock, NonLocalConfig, TensorFile,
    WeightKeys,
};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn pth(name: &str) -> PathBuf {
    data().join("pth").join(name)
}

fn fixture(name: &str) -> PathBuf {
    pth("fixtures").join(name)
}

#[test]
fn every_shared_case_passes_with_its_checkpoint() {
    let cases = [
        ("pth_alexhex7_zip.safetensors", CheckpointFormat::TorchZip),
        ("pth_legacy_dp.safetensors", CheckpointFormat::TorchLegacy),
        ("pth_f16_concat.safetensors", CheckpointFormat::TorchZip),
        ("pth_bf16_mmcv2d.safetensors", CheckpointFormat::TorchZip),
        ("pth_mmaction_layer2_0.safetensors", CheckpointFormat::TorchZip),
        ("pth_mmaction_layer3_4.safetensors", CheckpointFormat::TorchZip),
    ];
    for (name, format) in cases {
        let case = GoldenCase::open(pth(name)).unwrap();
        // The case file has no parameters of its own.
        assert!(case.block().is_err(), "{name} loads without its checkpoint");
        let checkpoint = TensorFile::open(pth(case.checkpoint_name().unwrap())).unwrap();
        assert_eq!(checkpoint.format(), format, "{name}");
        let report = case.with_weights(Arc::new(checkpoint)).check().unwrap();
        assert!(report.passed(), "{name}: {report}");
    }
}

#[test]
fn mmaction_training_checkpoint_lists_its_five_blocks() {
    let file = TensorFile::open(pth("pth_mmaction_i3d.pth")).unwrap();
    assert_eq!(file.state_dict_location(), "state_dict");
    let lines: Vec<String> = find_blocks(&file).iter().map(ToString::to_string).collect();
    let prefixes = std::fs::read_to_string(pth("pth_mmaction_i3d.blocks.txt")).unwrap();
    let expected: Vec<String> = prefixes
        .lines()
        .map(|p| {
            let (c, ci) = if p.contains("layer2") { (32, 16) } else { (40, 20) };
            format!(
                "prefix={p} naming=mmcv in_channels={c} inter_channels={ci} sub_sample=true bn=true dims=3 dtype=f32"
            )
        })
        .collect();
    assert_eq!(lines, expected);
    // Loaded all at once, with the configuration read off the keys (and mmcv's preset).
    let blocks = load_blocks(&file, |info| info.config()).unwrap();
    assert_eq!(blocks.len(), 5);
    for (info, block) in &blocks {
        assert_eq!(block.config(), &info.config());
        assert!(block.config().use_scale, "mmcv preset");
        let x = ndarray::Array5::<f32>::from_elem((1, 2, 4, 4, info.in_channels), 0.5);
        assert_eq!(block.forward(&x).unwrap().shape(), x.shape());
    }
    // The entries around the state dict are never needed, so never an error; the integer
    // buffers read as integers.
    let key = "backbone.layer2.0.non_local_block.conv_out.bn.num_batches_tracked";
    assert_eq!(file.dtype(key).unwrap(), &DType::I64);
    assert_eq!(file.tensor_i64(key).unwrap().ndim(), 0);
}

#[test]
fn every_shared_checkpoint_is_one_block_with_its_layout() {
    let expect = [
        (
            "pth_alexhex7_zip.pth",
            "prefix= naming=alexhex7 in_channels=16 inter_channels=8 sub_sample=true bn=true dims=3 dtype=f32",
            "",
        ),
        (
            "pth_bf16_mmcv2d.pth",
            "prefix= naming=mmcv in_channels=16 inter_channels=8 sub_sample=true bn=true dims=2 dtype=bf16",
            "model",
        ),
        (
            "pth_f16_concat.pth",
            "prefix= naming=alexhex7 in_channels=12 inter_channels=6 sub_sample=true bn=true dims=3 dtype=f16",
            "",
        ),
        (
            "pth_legacy_dp.pth",
            "prefix= naming=alexhex7 in_channels=12 inter_channels=6 sub_sample=true bn=false dims=3 dtype=f32",
            "",
        ),
    ];
    for (name, line, location) in expect {
        let file = TensorFile::open(pth(name)).unwrap();
        assert_eq!(file.state_dict_location(), location, "{name}");
        let blocks = find_blocks(&file);
        assert_eq!(blocks.iter().map(ToString::to_string).collect::<Vec<_>>(), [line], "{name}");
    }
    let concat = find_blocks(&TensorFile::open(pth("pth_f16_concat.pth")).unwrap()).remove(0);
    assert_eq!(concat.modes, [Mode::Concatenation]);
    assert_eq!(concat.config().mode, Mode::Concatenation);
}

/// Every tensor of `name` equals what torch read from it (the `.expected` file), exactly.
fn assert_reads_as_torch(name: &str, expected: &str) {
    let file = TensorFile::open(fixture(name)).unwrap();
    let want = TensorFile::open(fixture(expected)).unwrap();
    assert!(!want.keys().is_empty());
    for key in want.keys() {
        assert_eq!(file.shape(key).unwrap(), want.shape(key).unwrap(), "{name}: {key}");
        if want.dtype(key).unwrap() == &DType::I64 {
            assert_eq!(file.tensor_i64(key).unwrap(), want.tensor_i64(key).unwrap(), "{name}: {key}");
        } else {
            assert_eq!(file.tensor(key).unwrap(), want.tensor(key).unwrap(), "{name}: {key}");
        }
    }
}

#[test]
fn views_dtypes_byte_orders_and_protocols_read_as_torch_reads_them() {
    for (name, format) in [
        ("views_zip.pth", CheckpointFormat::TorchZip),
        ("views_zip_protocol4.pth", CheckpointFormat::TorchZip),
        ("views_zip_bigendian.pth", CheckpointFormat::TorchZip),
        ("views_legacy.pth", CheckpointFormat::TorchLegacy),
        ("views_legacy_protocol4.pth", CheckpointFormat::TorchLegacy),
    ] {
        assert_eq!(TensorFile::open(fixture(name)).unwrap().format(), format, "{name}");
        assert_reads_as_torch(name, "views.expected.safetensors");
    }
    let file = TensorFile::open(fixture("views_zip.pth")).unwrap();
    for (key, dtype) in [("half_t", DType::F16), ("bf16", DType::BF16), ("double", DType::F64), ("long", DType::I64)] {
        assert_eq!(file.dtype(key).unwrap(), &dtype, "{key}");
    }
    // Floats are not integers and the other way round.
    assert!(matches!(file.tensor("long"), Err(Error::UnsupportedDtype { .. })));
    assert!(matches!(file.tensor_i64("full"), Err(Error::UnsupportedDtype { .. })));
}

#[test]
fn types_never_read_open_and_are_refused_only_when_read() {
    for name in ["odd_dtypes_zip.pth", "odd_dtypes_legacy.pth"] {
        let file = TensorFile::open(fixture(name)).unwrap();
        assert_eq!(file.tensor("after").unwrap().as_slice().unwrap(), [0.0, 1.0, 2.0, 3.0], "{name}");
        assert_eq!(file.shape("complex").unwrap(), &[3]);
        match file.tensor("complex") {
            Err(Error::UnsupportedDtype { key, dtype }) => {
                assert_eq!((key.as_str(), dtype.as_str()), ("complex", "ComplexFloat"))
            }
            other => panic!("{name}: expected UnsupportedDtype, got {other:?}"),
        }
    }
}

#[test]
fn typed_getters_work_with_the_question_mark() -> Result<(), Error> {
    let file = TensorFile::open(fixture("views_zip.pth"))?;
    let t: Array2<f32> = file.tensor_as("half_t")?;
    assert_eq!(t.shape(), &[6, 4]);
    let row = file.tensor_as::<Ix1>("row")?;
    assert_eq!(row.len(), 5);
    match file.tensor_as::<Ix2>("row") {
        Err(Error::WrongRank { key, expected: 2, actual: 1 }) => assert_eq!(key, "row"),
        other => panic!("expected WrongRank, got {other:?}"),
    }
    // ndarray's ShapeError converts into the crate's error.
    let reshaped: Result<Array1<f32>, Error> = (|| Ok(file.tensor("full")?.into_shape_with_order(60)?.into_owned()))();
    assert_eq!(reshaped?.len(), 60);
    let bad: Result<Array2<f32>, Error> =
        (|| Ok(Array2::from_shape_vec((7, 7), file.tensor("row")?.into_raw_vec_and_offset().0)?))();
    assert!(matches!(bad, Err(Error::Shape(_))));
    Ok(())
}

#[test]
fn training_checkpoints_give_their_weights_and_never_run_anything() {
    // mmengine style: numpy arrays, a Counter, unknown classes and an os.system call around
    // a DataParallel state dict.
    let file = TensorFile::open(fixture("train_mmengine.pth")).unwrap();
    assert_eq!(file.state_dict_location(), "state_dict");
    assert_reads_as_torch("train_mmengine.pth", "train_mmengine.expected.safetensors");
    let blocks = find_blocks(&file);
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].keys, WeightKeys::alexhex7().with_prefix("module.backbone.nl."));
    NonLocalBlock::from_checkpoint(blocks[0].config(), &file, &blocks[0].keys).unwrap();
    // torchvision reference scripts keep the weights under 'model', beside an argparse Namespace.
    let file = TensorFile::open(fixture("train_torchvision.pth")).unwrap();
    assert_eq!(file.state_dict_location(), "model");
    assert_reads_as_torch("train_torchvision.pth", "train_torchvision.expected.safetensors");
    assert_eq!(find_blocks(&file)[0].keys, WeightKeys::alexhex7());
}

#[test]
fn the_code_execution_file_loads_inertly_and_fails_where_the_value_is_needed() {
    let file = TensorFile::open(pth("bad/code_execution.pth")).unwrap();
    match file.tensor("theta.weight") {
        Err(Error::NotATensor { key, found }) => {
            assert_eq!(key, "theta.weight");
            assert!(found.contains("__builtin__.eval") && found.contains("never called"), "{found}");
        }
        other => panic!("expected NotATensor, got {other:?}"),
    }
    let err = NonLocalBlock::from_checkpoint(NonLocalConfig::new(16).inter_channels(8), &file, &WeightKeys::alexhex7())
        .unwrap_err();
    assert!(matches!(err, Error::NotATensor { .. } | Error::MissingKey { .. }), "{err}");
}

#[test]
fn broken_files_are_refused_with_their_path() {
    let cases = [("bad/not_a_checkpoint.pth", "is not a checkpoint"), ("bad/truncated.pth", "truncated")];
    for (name, what) in cases {
        let err = TensorFile::open(pth(name)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(what) && text.contains(name), "{name}: {text}");
        assert!(matches!(err, Error::NotACheckpoint { .. } | Error::BadCheckpoint { .. }), "{err:?}");
    }
    let err = TensorFile::open(pth("bad/not_a_checkpoint.pth")).unwrap_err();
    assert!(err.to_string().contains("safetensors") && err.to_string().contains("torch < 1.6"), "{err}");
}

#[test]
fn hostile_archives_are_refused_before_allocating() {
    let cases = [
        ("hostile_storage_larger_than_file.pth", "claims 1099511627776"),
        ("hostile_tensor_past_storage.pth", "claims 100 elements"),
        ("hostile_huge_offset.pth", "reaches past"),
        ("hostile_huge_stride.pth", "reaches past"),
        ("hostile_shape_overflow.pth", "overflows"),
        ("hostile_missing_storage.pth", "not in the archive"),
        ("hostile_crc.pth", "CRC"),
        ("hostile_legacy_truncated.pth", "past the end of the file"),
    ];
    for (name, what) in cases {
        let err = TensorFile::open(fixture(name)).unwrap_err();
        assert!(matches!(err, Error::BadCheckpoint { .. }), "{name}: {err:?}");
        assert!(err.to_string().contains(what), "{name}: {err}");
    }
    // A negative stride is a malformed tensor: kept as a description, an error when needed.
    let file = TensorFile::open(fixture("hostile_negative_stride.pth")).unwrap();
    match file.tensor("theta.weight") {
        Err(Error::NotATensor { found, .. }) => assert!(found.contains("stride"), "{found}"),
        other => panic!("expected NotATensor, got {other:?}"),
    }
    // A whole pickled model is not a state dict.
    let err = TensorFile::open(fixture("whole_model.pth")).unwrap_err();
    assert!(
        err.to_string().contains("torch.nn.modules.conv.Conv2d") && err.to_string().contains("state_dict()"),
        "{err}"
    );
    // 100 000 nested lists: refused (not a dict), without a stack overflow.
    let err = TensorFile::open(fixture("hostile_deep_nesting.pth")).unwrap_err();
    assert!(err.to_string().contains("not a dict"), "{err}");
}

#[test]
fn what_is_not_a_checkpoint_says_so() {
    for (bytes, what) in [
        (vec![], "empty"),
        (vec![1, 2, 3], "too short"),
        (b"\x80\x02K\x01.".to_vec(), "not a torch.save stream"),
        (vec![0x5a; 4096], "unrecognised"),
    ] {
        match TensorFile::from_bytes(bytes) {
            Err(Error::NotACheckpoint { found, .. }) => assert!(found.contains(what), "{found}"),
            other => panic!("{what}: expected NotACheckpoint, got {other:?}"),
        }
    }
    // A zip that is not a torch archive.
    let mut zip = Vec::new();
    {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(&mut zip));
        w.start_file("notes/readme.txt", zip::write::SimpleFileOptions::default()).unwrap();
        std::io::Write::write_all(&mut w, b"hello").unwrap();
        w.finish().unwrap();
    }
    match TensorFile::from_bytes(zip) {
        Err(Error::NotACheckpoint { found, .. }) => assert!(found.contains("without notes/data.pkl"), "{found}"),
        other => panic!("expected NotACheckpoint, got {other:?}"),
    }
}

#[test]
fn configurations_that_contradict_the_keys_are_refused() {
    let mode_mismatch = |file: &str, config: NonLocalConfig, keys: WeightKeys| match NonLocalBlock::from_checkpoint_file(
        config,
        pth(file),
        &keys,
    ) {
        Err(Error::ConfigMismatch { what: "mode", .. }) => {}
        other => panic!("{file}: expected a mode mismatch, got {other:?}"),
    };
    // Concatenation weights as embedded Gaussian; embedded Gaussian weights as Gaussian.
    let concat = NonLocalConfig::new(12).inter_channels(6);
    mode_mismatch("pth_f16_concat.pth", concat.clone(), WeightKeys::alexhex7());
    NonLocalBlock::from_checkpoint_file(
        concat.mode(Mode::Concatenation),
        pth("pth_f16_concat.pth"),
        &WeightKeys::alexhex7(),
    )
    .unwrap();
    let eg = NonLocalConfig::new(16).inter_channels(8);
    mode_mismatch("pth_alexhex7_zip.pth", eg.clone().mode(Mode::Gaussian), WeightKeys::alexhex7());
    // Dot product has the same parameters as embedded Gaussian: the keys cannot refuse it.
    NonLocalBlock::from_checkpoint_file(
        eg.clone().mode(Mode::DotProduct),
        pth("pth_alexhex7_zip.pth"),
        &WeightKeys::alexhex7(),
    )
    .unwrap();
    // BatchNorm, pooling and conv rank as before.
    for (config, what) in [
        (eg.clone().bn_layer(false), "bn_layer"),
        (eg.clone().sub_sample(None), "sub_sample"),
        (eg.clone().conv_dims(2), "conv_dims"),
    ] {
        match NonLocalBlock::from_checkpoint_file(config, pth("pth_alexhex7_zip.pth"), &WeightKeys::alexhex7()) {
            Err(Error::ConfigMismatch { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: expected ConfigMismatch, got {other:?}"),
        }
    }
}

#[test]
fn presets_carry_each_implementations_defaults() {
    let file = TensorFile::open(pth("pth_bf16_mmcv2d.pth")).unwrap();
    let info = find_blocks(&file).remove(0);
    let config = info.config();
    assert_eq!(
        config,
        NonLocalConfig::mmcv(16).inter_channels(8).sub_sample(Some([1, 2, 2])).bn_layer(true).conv_dims(2)
    );
    assert!(config.use_scale);
    let file = TensorFile::open(pth("pth_alexhex7_zip.pth")).unwrap();
    assert!(!find_blocks(&file)[0].config().use_scale);
}

#[test]
fn export_to_mmcv_keys_is_what_mmcv_loads_strictly() {
    // Each fixture: the export of an AlexHex7 case with BatchNorm, loaded by mmcv's NonLocal3d
    // with a strict load_state_dict and run by it (tests/data/mmcv_export/README.md).
    let dir = data().join("mmcv_export");
    for case in ["eg_video", "dp_video", "concat_video", "gauss_video"] {
        let source = GoldenCase::open(data().join(format!("{case}.safetensors"))).unwrap();
        let exported =
            TensorFile::from_bytes(source.block().unwrap().to_safetensors_with_keys(&WeightKeys::mmcv()).unwrap())
                .unwrap();
        let fixture_path = dir.join(format!("{case}_as_mmcv.safetensors"));
        let fixture = TensorFile::open(&fixture_path).unwrap();
        let mmcv_keys: Vec<&str> = fixture.keys().into_iter().filter(|k| !["input", "output"].contains(k)).collect();
        assert_eq!(exported.keys(), mmcv_keys, "{case}: the keys mmcv's module has, no other");
        assert!(!exported.contains("conv_out.conv.bias"), "{case}: mmcv's conv_out has no bias before BatchNorm");
        for key in mmcv_keys {
            if key.ends_with("num_batches_tracked") {
                assert_eq!(exported.tensor_i64(key).unwrap(), fixture.tensor_i64(key).unwrap());
            } else {
                let (got, want) = (exported.tensor(key).unwrap(), fixture.tensor(key).unwrap());
                assert_eq!(got.mapv(f32::to_bits), want.mapv(f32::to_bits), "{case}: {key}");
            }
        }
        // mmcv's output from those tensors, through the crate under mmcv's keys.
        let report = GoldenCase::open(&fixture_path).unwrap().check().unwrap();
        assert!(report.passed(), "{case}: {report}");
    }
}

#[test]
fn timm_non_local_blocks_are_found_configured_and_exported() {
    let file = TensorFile::open(data().join("family/nl_timm.safetensors")).unwrap();
    let blocks = find_blocks(&file);
    assert_eq!(blocks.len(), 1);
    let info = &blocks[0];
    assert_eq!(info.keys, WeightKeys::timm());
    assert_eq!(nonlocal::detect_naming(&file, "").unwrap(), nonlocal::Naming::Timm);
    let config = info.config();
    assert_eq!((config.in_channels, config.inter_channels, config.sub_sample, config.conv_dims), (32, 8, None, 2));
    assert_eq!(config.logit_scale(), 32f32.powf(-0.5));
    // The configuration read off the keys is timm's: the golden output, through the harness's
    // own configuration and through this one.
    let case = GoldenCase::open(data().join("family/nl_timm.safetensors")).unwrap();
    assert_eq!(case.config(), Some(&config));
    let block = NonLocalBlock::from_checkpoint(config.clone(), &file, &info.keys).unwrap();
    // Exported under timm's keys: exactly the keys of the file's block.
    let exported = TensorFile::from_bytes(block.to_safetensors().unwrap()).unwrap();
    let want: Vec<&str> = file.keys().into_iter().filter(|k| !["input", "output"].contains(k)).collect();
    assert_eq!(exported.keys(), want);
    // timm's module always has its BatchNorm: a block without one cannot be written for it.
    let no_bn = NonLocalBlock::new(NonLocalConfig::timm(32).bn_layer(false)).unwrap();
    assert!(matches!(
        no_bn.to_safetensors_with_keys(&WeightKeys::timm()),
        Err(Error::ConfigMismatch { what: "bn_layer", .. })
    ));
}

#[test]
fn disentangled_blocks_are_found_as_such_and_not_loaded_as_non_local_blocks() {
    let file = TensorFile::open(data().join("family/disentangled_prefix.safetensors")).unwrap();
    let blocks = find_blocks(&file);
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    let info = &blocks[0];
    assert_eq!(info.kind, nonlocal::BlockKind::Disentangled);
    assert!(info.to_string().ends_with(" block=disentangled"), "{info}");
    // load_blocks loads non-local blocks only: a disentangled one run as one would be wrong.
    assert!(load_blocks(&file, |info| info.config()).unwrap().is_empty());
    let case = GoldenCase::open(data().join("family/disentangled_prefix.safetensors")).unwrap();
    assert_eq!(info.keys, case.keys);
    // A plain mmcv block is still a non-local one.
    let plain = TensorFile::open(data().join("eg_mmcv_scaled.safetensors")).unwrap();
    assert_eq!(find_blocks(&plain)[0].kind, nonlocal::BlockKind::NonLocal);
}

#[test]
fn every_family_case_is_found_as_its_block_with_the_configuration_its_keys_show() {
    let dir = data().join("family");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let file = TensorFile::open(&path).unwrap();
        let meta = file.metadata();
        // The case's block, under its prefix (a prefixed case may hold other blocks of a
        // surrounding model, and a gradient case the `grad.<key>` tensors, which have the
        // parameters' shapes: blocks too).
        let prefix = meta.get("prefix").cloned().unwrap_or_default();
        let found: Vec<_> =
            nonlocal::find_all_blocks(&file).into_iter().filter(|b| b.keys().prefix == prefix).collect();
        assert_eq!(found.len(), 1, "{}: {found:?}", path.display());
        assert_eq!(found[0].block_name(), meta["block"], "{}", path.display());
        match &found[0] {
            nonlocal::FoundBlock::Context { config, .. } => {
                let planes = meta.get("planes").or(meta.get("rd_channels")).unwrap();
                assert_eq!(config.planes.to_string(), *planes, "{}", path.display());
            }
            nonlocal::FoundBlock::CrissCross { config, .. } => {
                assert_eq!(config.qk_channels.to_string(), meta["qk_channels"], "{}", path.display());
            }
            nonlocal::FoundBlock::NonLocal(info) => {
                assert_eq!(info.inter_channels.to_string(), meta["inter_channels"], "{}", path.display());
            }
            _ => unreachable!(),
        }
        checked += 1;
    }
    assert!(checked >= 60, "family files: {checked}");
}

#[test]
fn a_model_with_blocks_of_every_kind_lists_them_in_file_order() {
    // One checkpoint holding a criss-cross block, a context block, a non-local block and a
    // disentangled one, under model-like prefixes.
    let parts = [
        ("family/cc_mmcv.safetensors", "head.cc."),
        ("family/gc_timm_scale.safetensors", "stage4.gc."),
        ("eg_video.safetensors", "stage3.nl."),
        ("family/dnl_mmseg.safetensors", "head.dnl."),
    ];
    let mut owned = Vec::new();
    for (name, prefix) in parts {
        let bytes = std::fs::read(data().join(name)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (key, view) in st.tensors() {
            if ["input", "output", "attention"].contains(&key.as_str()) {
                continue;
            }
            owned.push((format!("{prefix}{key}"), view.dtype(), view.shape().to_vec(), view.data().to_vec()));
        }
    }
    let views: Vec<_> = owned
        .iter()
        .map(|(k, d, s, b)| (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let file = TensorFile::from_bytes(safetensors::serialize(views, None).unwrap()).unwrap();
    let found = nonlocal::find_all_blocks(&file);
    let names: Vec<(&str, &str)> = found.iter().map(|b| (b.block_name(), b.keys().prefix.as_str())).collect();
    let mut want = vec![
        ("criss_cross", "head.cc."),
        ("global_context", "stage4.gc."),
        ("non_local", "stage3.nl."),
        ("disentangled", "head.dnl."),
    ];
    // safetensors keeps its own key order: the listing follows the file's.
    let at = |prefix: &str| file.keys_in_order().position(|k| k.starts_with(prefix)).unwrap();
    want.sort_by_key(|(_, prefix)| at(prefix));
    assert_eq!(names, want);
    // Each loads with the configuration found.
    for block in &found {
        match block {
            nonlocal::FoundBlock::CrissCross { keys, config } => {
                nonlocal::CrissCrossAttention::from_checkpoint(config.clone(), &file, keys).unwrap();
            }
            nonlocal::FoundBlock::Context { keys, config } => {
                nonlocal::ContextBlock::from_checkpoint(config.clone(), &file, keys).unwrap();
            }
            nonlocal::FoundBlock::NonLocal(info) if info.kind == nonlocal::BlockKind::Disentangled => {
                let config = nonlocal::DisentangledConfig::from_info(info);
                nonlocal::DisentangledNonLocal::from_checkpoint(config, &file, &info.keys).unwrap();
            }
            nonlocal::FoundBlock::NonLocal(info) => {
                NonLocalBlock::from_checkpoint(info.config(), &file, &info.keys).unwrap();
            }
            _ => unreachable!(),
        }
    }
}
