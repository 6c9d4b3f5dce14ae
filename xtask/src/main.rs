//! `cargo xtask <task>`: what `cargo build` / `cargo test` cannot do alone.
//!
//! | task | what it does |
//! |---|---|
//! | `setup` | installs what is missing (the wasm32-wasip1 target) or says exactly how |
//! | `build-guests` | builds the example jobs and the test guests to `target/wasm32-wasip1/guest/` |
//! | `demo` | the README's main job: runs the synthetic-data example, a few tasks, via `grid run` |
//! | `test` | setup, build-guests, every test of the workspace, then a short chaos run |
//! | `bench [sandbox|grid|gpu]` | benchmarks: sandbox vs bare wasmtime vs native; tasks per second through the grid; GPU binding vs native |
//! | `chaos [--tasks N] [--seed S]` | a job on a local grid while nodes, the broker and nats-server are killed at random; checked against a calm run |

mod bench;
mod chaos;
mod demo;
mod setup;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("build-guests") => {
            setup::run()?;
            build_guests()
        }
        Some("demo") => demo::run(),
        Some("test") => {
            setup::run()?;
            build_guests()?;
            cargo(&["test", "--workspace", "--locked"])?;
            // The short chaos run: the grid under kills of every kind of process.
            chaos::run(&["--tasks".into(), "300".into(), "--seed".into(), "1".into()])
        }
        Some("bench") => bench::run(args.get(1).map(String::as_str)),
        Some("chaos") => chaos::run(&args[1..]),
        _ => bail!(
            "usage: cargo xtask <setup|build-guests|demo|test|bench [sandbox|grid|gpu]|chaos [--tasks N] [--seed S]>"
        ),
    }
}

/// The workspace root (the parent of this crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Where cargo puts build output: `CARGO_TARGET_DIR` or `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The guest modules, built with the `guest` profile.
pub const GUESTS: &[&str] = &[
    "synth-data",
    "monte-carlo-pi",
    "gpu-noise",
    "grid-test-guests",
];

pub fn guest_wasm(name: &str) -> PathBuf {
    target_dir()
        .join("wasm32-wasip1/guest")
        .join(format!("{name}.wasm"))
}

pub fn build_guests() -> Result<()> {
    let mut args = vec![
        "build",
        "--locked",
        "--profile",
        "guest",
        "--target",
        "wasm32-wasip1",
    ];
    for g in GUESTS {
        args.extend(["-p", g]);
    }
    cargo(&args)
}

/// Runs cargo in the workspace root, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
