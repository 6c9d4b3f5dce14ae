//! The README's main job: a few tasks of the synthetic-data example through `grid run`.

use crate::{build_guests, cargo, guest_wasm, root, setup, target_dir};
use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};

const TASKS: u32 = 4;
const ROWS: u32 = 25_000;

pub fn run() -> Result<()> {
    setup::run()?;
    build_guests()?;
    cargo(&["build", "--locked", "-p", "grid-cli"])?;
    let grid = target_dir().join("debug/grid");
    let module = guest_wasm("synth-data");
    let out = root().join("grid-demo-out");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    println!("Running {TASKS} tasks of the synth-data example ({ROWS} rows each) in the sandbox:");
    for index in 0..TASKS {
        let dir = out.join(index.to_string());
        let mut child = Command::new(&grid)
            .args([
                "run",
                module.to_str().unwrap_or_default(),
                "--json",
                "--seed",
                "1",
            ])
            .args([
                "--task-index",
                &index.to_string(),
                "--output",
                dir.to_str().unwrap_or_default(),
            ])
            .args([
                "--memory",
                "64MiB",
                "--timeout",
                "60s",
                "--max-output",
                "100MiB",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", grid.display()))?;
        use std::io::Write;
        if let Some(mut stdin) = child.stdin.take() {
            writeln!(stdin, r#"{{"rows": {ROWS}, "rho": 0.6}}"#)?;
        }
        let output = child.wait_with_output()?;
        let line = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!("task {index} failed: {line}");
        }
        println!("  task {index}: {}", line.trim());
    }
    println!(
        "\nDone. Each task's /out is in {}/<index>/ (CSV shards part-0000N.csv).",
        out.display()
    );
    Ok(())
}
