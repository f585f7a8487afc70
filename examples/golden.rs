//! Checks the block against PyTorch reference cases.
//!
//! ```text
//! cargo run --release --example golden -- tests/data/*.safetensors
//! cargo run --release --example golden -- --weights tests/data/pth/pth_legacy_dp.pth tests/data/pth/pth_legacy_dp.safetensors
//! ```
//!
//! For each file: configure a block from the metadata, load its parameters, run it on `input`
//! and print one line with `output_err`, `tol`, `attention_err` (when present), `bits` (FNV-1a
//! 64 of the output) and PASS or FAIL. Exit status 0 when every file passes, 1 otherwise
//! (including files that cannot be loaded or run, whose error is printed).
//!
//! With `--weights CHECKPOINT` the parameters come from CHECKPOINT (safetensors, a torch zip
//! `.pth` or a legacy torch file), under each case's `naming` and `prefix` metadata; the case
//! files then need hold only `input` and `output`.

use std::process::ExitCode;
use std::sync::Arc;

#[path = "../tests/oracle/golden.rs"]
#[allow(dead_code)] // what the tests use beside the check
mod golden;

use golden::GoldenCase;
use nonlocal::TensorFile;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let weights = match args.iter().position(|a| a == "--weights") {
        Some(i) if i + 1 < args.len() => {
            let path = args.remove(i + 1);
            args.remove(i);
            Some(path)
        }
        Some(_) => {
            eprintln!("--weights needs a checkpoint path");
            return ExitCode::FAILURE;
        }
        None => None,
    };
    if args.is_empty() {
        eprintln!("usage: golden [--weights CHECKPOINT] CASE.safetensors...");
        return ExitCode::FAILURE;
    }
    let checkpoint = match weights.as_deref().map(TensorFile::open).transpose() {
        Ok(file) => file.map(Arc::new),
        Err(e) => {
            for path in &args {
                println!("{path}: error: {e} FAIL");
            }
            return ExitCode::FAILURE;
        }
    };
    let mut all_passed = true;
    for path in &args {
        let case = GoldenCase::open(path).map(|case| match &checkpoint {
            Some(file) => case.with_weights(Arc::clone(file)),
            None => case,
        });
        match case.and_then(|case| case.check()) {
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
