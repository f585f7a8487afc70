//! Checkpoints of every format read: the fixtures of `scripts/make_pth_fixtures.py` (views, dtypes, byte order, pickle
//! protocols, training checkpoints), and broken or hostile files.

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, Ix1, Ix2};
use nonlocal::{CheckpointFormat, DType, Error, NonLocalBlock, NonLocalConfig, TensorFile, WeightKeys};

fn pth(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pth").join(name)
}

fn fixture(name: &str) -> PathBuf {
    pth("fixtures").join(name)
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
    let keys = WeightKeys::alexhex7().with_prefix("module.backbone.nl.");
    NonLocalBlock::from_safetensors(NonLocalConfig::new(8), &file, &keys).unwrap();
    // torchvision reference scripts keep the weights under 'model', beside an argparse Namespace.
    let file = TensorFile::open(fixture("train_torchvision.pth")).unwrap();
    assert_eq!(file.state_dict_location(), "model");
    assert_reads_as_torch("train_torchvision.pth", "train_torchvision.expected.safetensors");
    NonLocalBlock::from_safetensors(NonLocalConfig::new(8), &file, &WeightKeys::alexhex7()).unwrap();
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
    let err =
        NonLocalBlock::from_safetensors(NonLocalConfig::new(16).inter_channels(8), &file, &WeightKeys::alexhex7())
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
