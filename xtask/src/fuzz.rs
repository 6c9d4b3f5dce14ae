//! `cargo xtask fuzz [--seconds N] [--seed S] [TARGET...]`: builds `grid-fuzz`, replays every
//! saved input under `fuzz/regressions/<target>/` (each a former finding, now a regression
//! test), then fuzzes each target for N seconds (default 60; `cargo xtask test` runs 20).
//! Findings are written to `<target dir>/fuzz-findings/`; move one into `fuzz/regressions/`
//! once it is fixed.

use crate::{cargo, root, setup, target_dir};
use anyhow::{Result, bail};
use std::process::Command;

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    cargo(&["build", "--locked", "-p", "grid-fuzz"])?;
    let fuzzer = target_dir().join("debug/grid-fuzz");
    let mut failed = Vec::new();
    let regressions = root().join("fuzz/regressions");
    for target in ["wire", "sandbox", "gpu"] {
        let Ok(entries) = std::fs::read_dir(regressions.join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for file in files {
            let status = Command::new(&fuzzer)
                .args(["replay", target])
                .arg(&file)
                .status()?;
            if !status.success() {
                failed.push(format!("regression {}", file.display()));
            }
        }
    }
    let mut fuzz_args: Vec<String> = vec![
        "--findings".into(),
        target_dir()
            .join("fuzz-findings")
            .to_string_lossy()
            .into_owned(),
    ];
    if !args.iter().any(|a| a == "--seconds") {
        fuzz_args.extend(["--seconds".into(), "60".into()]);
    }
    fuzz_args.extend(args.iter().cloned());
    let status = Command::new(&fuzzer).args(&fuzz_args).status()?;
    if !status.success() {
        failed.push("the fuzz run".into());
    }
    if !failed.is_empty() {
        bail!("fuzzing found problems: {}", failed.join(", "));
    }
    Ok(())
}
