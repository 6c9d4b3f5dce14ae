//! Prerequisites: install what is missing, or stop with the exact command to run.

use anyhow::{Context, Result, bail};
use std::process::Command;

pub fn run() -> Result<()> {
    ensure_wasm_target()
}

fn ensure_wasm_target() -> Result<()> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc")?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if std::path::Path::new(&sysroot)
        .join("lib/rustlib/wasm32-wasip1")
        .is_dir()
    {
        return Ok(());
    }
    eprintln!("xtask: installing the wasm32-wasip1 target (rustup target add wasm32-wasip1)");
    let status = Command::new("rustup")
        .args(["target", "add", "wasm32-wasip1"])
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => bail!("`rustup target add wasm32-wasip1` failed ({s}); run it by hand and retry"),
        Err(_) => bail!(
            "the wasm32-wasip1 target is missing and rustup is not installed: install rustup \
             (https://rustup.rs), then run `rustup target add wasm32-wasip1`"
        ),
    }
}
