//! The PyTorch reference cases in tests/data (copied from the project's shared golden set or
//! made by the upstream modules; see tests/data/README.md and tests/data/family/README.md)
//! must all pass, and the corrupted ones must fail.

mod common;

use common::golden::GoldenCase;

/// Blocks whose family cases the harness does not run yet.
const NOT_YET: [&str; 0] = [];

/// The `.safetensors` files of the test data folders, sorted: tests/data, its gradient cases,
/// mmcv's checks of the exports, and the family cases made by the upstream modules.
fn data_files() -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut files: Vec<_> = [root.clone(), root.join("grad"), root.join("mmcv_export"), root.join("family")]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).expect("the test data folders exist"))
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            !NOT_YET.iter().any(|prefix| name.trim_start_matches("corrupt_").starts_with(prefix))
        })
        .collect();
    files.sort();
    files
}

fn is_corrupt(path: &std::path::Path) -> bool {
    path.file_name().unwrap().to_string_lossy().starts_with("corrupt_")
}

/// The golden cases that must pass.
fn golden_files() -> Vec<std::path::PathBuf> {
    data_files().into_iter().filter(|p| !is_corrupt(p)).collect()
}

#[test]
fn corrupted_references_fail() {
    let corrupt: Vec<_> = data_files().into_iter().filter(|p| is_corrupt(p)).collect();
    assert!(corrupt.len() >= 4, "corrupted cases: {}", corrupt.len());
    for path in corrupt {
        let report = GoldenCase::open(&path).unwrap().check().unwrap();
        assert!(!report.passed(), "{}: {report}", path.display());
    }
}

#[test]
fn every_golden_case_passes() {
    let files = golden_files();
    assert!(files.len() >= 70, "expected the vendored golden cases, found {}", files.len());
    let mut gradient_cases = 0;
    for path in files {
        let case = GoldenCase::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let report = case.check().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(report.passed(), "{}: {report}", path.display());
        gradient_cases += report.grad_param_err.is_some() as usize;
    }
    assert!(gradient_cases >= 16, "gradient cases checked: {gradient_cases}");
}

#[test]
fn golden_output_bits_do_not_depend_on_thread_count() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eg_many_keys.safetensors");
    let case = GoldenCase::open(path).unwrap();
    let mut bits = Vec::new();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        bits.push(pool.install(|| case.check().unwrap().bits));
    }
    assert!(bits.windows(2).all(|w| w[0] == w[1]), "{bits:x?}");
}
