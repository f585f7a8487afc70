//! The PyTorch reference cases in tests/data (copied from the project's shared golden set;
//! see tests/data/README.md) must all pass.

mod common;

use common::golden::GoldenCase;

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
fn every_golden_case_passes() {
    let files = golden_files();
    assert!(files.len() >= 21, "expected the vendored golden cases, found {}", files.len());
    let mut gradient_cases = 0;
    for path in files {
        let case = GoldenCase::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let report = case.check().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(report.passed(), "{}: {report}", path.display());
        gradient_cases += report.grad_param_err.is_some() as usize;
    }
    assert!(gradient_cases >= 5, "gradient cases checked: {gradient_cases}");
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
