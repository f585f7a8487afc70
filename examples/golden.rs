//! Checks the block against PyTorch reference cases.
//!
//! ```text
//! cargo run --release --example golden -- tests/data/*.safetensors
//! ```
//!
//! For each file: configure a block from the metadata, load its parameters, run it on `input`
//! and print one line with `output_err`, `tol`, `attention_err` (when present), `bits` (FNV-1a
//! 64 of the output) and PASS or FAIL. Exit status 0 when every file passes, 1 otherwise
//! (including files that cannot be loaded or run, whose error is printed).

use std::process::ExitCode;

use nonlocal::internal::golden::GoldenCase;

fn main() -> ExitCode {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        eprintln!("usage: golden FILE.safetensors...");
        return ExitCode::FAILURE;
    }
    let mut all_passed = true;
    for path in &paths {
        match GoldenCase::open(path).and_then(|case| case.check()) {
            Ok(report) => {
                all_passed &= report.passed();
                println!("{path}: {report}");
            }
            Err(e) => {
                all_passed = false;
                println!("{path}: error: {e} FAIL");
            }
        }
    }
    if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
