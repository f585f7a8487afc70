//! The PyTorch reference cases in tests/data (copied from the project's shared golden set or
//! made by the upstream modules; see tests/data/README.md and tests/data/family/README.md)
//! must all pass, and the corrupted ones must fail.

mod common;

use common::golden::GoldenCase;

/// The golden cases the harness runs: tests/data, its gradient cases, mmcv's checks of the
/// exports, and the family cases of the blocks supported so far (timm's non-local block).
fn golden_files() -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let supported_family = |name: &str| {
        ["nl_timm", "non_local_", "grad_non_local_", "dnl_", "disentangled_", "grad_disentangled_"]
            .iter()
            .any(|p| name.starts_with(p))
    };
    let mut files: Vec<_> = [root.clone(), root.join("grad"), root.join("mmcv_export"), root.join("family")]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).expect("the test data folders exist"))
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            !p.parent().unwrap().ends_with("family") || supported_family(&name)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn corrupted_references_fail() {
    for block in ["non_local", "disentangled"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/data/family/corrupt_{block}.safetensors"));
        let report = GoldenCase::open(&path).unwrap().check().unwrap();
        assert!(!report.passed(), "{block}: {report}");
    }
}

#[test]
fn every_golden_case_passes() {
    let files = golden_files();
    assert!(files.len() >= 45, "expected the vendored golden cases, found {}", files.len());
    let mut gradient_cases = 0;
    for path in files {
        let case = GoldenCase::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let report = case.check().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(report.passed(), "{}: {report}", path.display());
        gradient_cases += report.grad_param_err.is_some() as usize;
    }
    assert!(gradient_cases >= 10, "gradient cases checked: {gradient_cases}");
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
