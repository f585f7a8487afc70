//! Checks the candle layer (`nonlocal::candle::NonLocal`) against the PyTorch reference cases.
//!
//! ```text
//! cargo run --release --features candle --example candle_golden -- tests/data/*.safetensors tests/data/grad/*.safetensors
//! ```
//!
//! For each file: build the layer from the metadata with its parameters in a `VarMap` (under
//! the case's naming and prefix), run it on `input` permuted to channels-first (a strided
//! view) and print the fields of `examples/golden.rs`: `output_err`, `tol`, `attention_err`
//! (through `NonLocal::attention_map`), for gradient cases `grad_input_err` and
//! `grad_param_err` (candle's autograd through the layer), `bits` (FNV-1a 64 of the output)
//! and PASS or FAIL. Exit status 1 if any file fails or cannot be read or run.
//! `--weights CHECKPOINT` takes the parameters from a checkpoint, as in `examples/golden.rs`.

use std::process::ExitCode;
use std::sync::Arc;

#[path = "../tests/oracle/candle_golden.rs"]
mod candle_golden;
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
        eprintln!("usage: candle_golden [--weights CHECKPOINT] CASE.safetensors...");
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
        let report = case.map_err(candle_core::Error::wrap).and_then(|case| candle_golden::check(&case));
        match report {
            Ok(report) => {
                all_passed &= report.passed();
                println!("{path}: {report}");
            }
            Err(e) => {
                all_passed = false;
                // One line per file: candle appends a backtrace when RUST_BACKTRACE is set.
                let message = e.to_string();
                println!("{path}: error: {} FAIL", message.lines().next().unwrap_or_default());
            }
        }
    }
    if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
