//! Checks the block against PyTorch reference cases.
//!
//! ```text
//! cargo run --release --example golden -- tests/data/*.safetensors
//! cargo run --release --example golden -- --weights tests/data/pth/pth_legacy_dp.pth tests/data/pth/pth_legacy_dp.safetensors
//! cargo run --release --example golden -- --precision bf16 tests/data/*.safetensors
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
//!
//! With `--precision bf16` the block runs in bf16 and passes when its output error relative to
//! `max(1, max |want|)` is at most `max(1.25 × PyTorch's bf16-autocast error on the case,
//! 4e-3)` (`tol` is that bound times the scale; the line adds `precision=bf16`, `rel_err`,
//! `torch_err` and `bound`). PyTorch's errors are read per file name from
//! `tests/data/bf16_torch_err.txt`, or from `--torch-err FILE` (lines `name error`); files not
//! listed get the 4e-3 floor. `--precision bf16-logits` (the logits in bf16 too, PyTorch
//! autocast's error class) is held to the looser `max(2 × that error, 8e-3)`.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

#[path = "../tests/oracle/golden.rs"]
#[allow(dead_code)] // what the tests use beside the check
mod golden;

use golden::{torch_errors, vendored_torch_errors, GoldenCase};
use nonlocal::{Precision, TensorFile};

/// The command line: options, then the case files.
struct Args {
    weights: Option<String>,
    precision: Precision,
    torch_err: Option<String>,
    files: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { weights: None, precision: Precision::F32, torch_err: None, files: Vec::new() };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--weights" => args.weights = Some(value()?),
            "--precision" => args.precision = value()?.parse().map_err(|e| format!("--precision: {e}"))?,
            "--torch-err" => args.torch_err = Some(value()?),
            _ => args.files.push(arg),
        }
    }
    if args.files.is_empty() {
        return Err(
            "usage: golden [--weights CHECKPOINT] [--precision f32|bf16|bf16-logits] [--torch-err FILE] CASE.safetensors...".into(),
        );
    }
    Ok(args)
}

/// PyTorch's bf16 errors: the `--torch-err` file, else the vendored tables when they are there.
fn torch_table(path: Option<&str>) -> Result<HashMap<String, f32>, String> {
    let vendored = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    match path {
        Some(path) => torch_errors(path).map_err(|e| e.to_string()),
        None if vendored.join("bf16_torch_err.txt").exists() => {
            vendored_torch_errors(&vendored).map_err(|e| e.to_string())
        }
        None => Ok(HashMap::new()),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let table = match args.precision {
        Precision::F32 => HashMap::new(),
        _ => match torch_table(args.torch_err.as_deref()) {
            Ok(table) => table,
            Err(e) => {
                eprintln!("--torch-err: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let checkpoint = match args.weights.as_deref().map(TensorFile::open).transpose() {
        Ok(file) => file.map(Arc::new),
        Err(e) => {
            for path in &args.files {
                println!("{path}: error: {e} FAIL");
            }
            return ExitCode::FAILURE;
        }
    };
    let mut all_passed = true;
    for path in &args.files {
        let name = Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let case = GoldenCase::open(path).map(|case| {
            let case = case.with_precision(args.precision).with_torch_err(table.get(&name).copied());
            match &checkpoint {
                Some(file) => case.with_weights(Arc::clone(file)),
                None => case,
            }
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
