//! The README's main job: a local grid runs the synthetic-data example.
//!
//! Starts `grid up` (nats-server, a broker, two nodes) on a free port with its data under
//! `grid-demo/`, submits 300 tasks of `examples/synth-data` with a params file, follows the job
//! with a progress bar, collects the results into `grid-demo/results/` and stops the grid.
//!
//! `cargo xtask demo python` does the same with the scikit-learn sweep of
//! `examples/python-sweep` (one model per task), and joins every task's metrics row into
//! `grid-demo/results/metrics.csv`.

use crate::{build_guests, cargo, guest_wasm, root, setup, target_dir};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

const TASKS: u32 = 300;
const ROWS: u32 = 2_000;

pub fn run(which: Option<&str>) -> Result<()> {
    let python = match which {
        None => false,
        Some("python") => true,
        Some(other) => {
            bail!("unknown demo `{other}`; try `cargo xtask demo` or `cargo xtask demo python`")
        }
    };
    setup::run()?;
    build_guests()?;
    cargo(&["build", "--locked", "-p", "grid-cli"])?;
    let grid = target_dir().join("debug/grid");
    let demo = root().join("grid-demo");
    if demo.exists() {
        std::fs::remove_dir_all(&demo).with_context(|| format!("clearing {}", demo.display()))?;
    }
    std::fs::create_dir_all(&demo)?;

    // The grid's default tenant, for the `grid` commands below (`grid up` makes it).
    // SAFETY: xtask runs on one thread; nothing reads the environment concurrently.
    unsafe {
        std::env::set_var(
            "GRID_CREDS",
            demo.join("data/auth/creds/tenant-default.creds"),
        )
    };
    println!("Starting a local grid (nats-server, a broker, 2 nodes)…");
    let mut up = Command::new(&grid)
        .args([
            "up",
            "--nodes",
            "2",
            "--nats",
            "nats://127.0.0.1:0",
            "--data-dir",
        ])
        .arg(demo.join("data"))
        // The Rust demo needs no Python runtime: no compile beside it.
        .args((!python).then_some("--no-warm-runtimes"))
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", grid.display()))?;
    let stdout = up.stdout.take().context("grid up's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        match lines.next() {
            Some(line) => {
                if let Some(url) = line?.strip_prefix("grid: ready ") {
                    break url.to_string();
                }
            }
            None => {
                let status = up.wait()?;
                bail!(
                    "grid up exited before it was ready ({status}); see {}",
                    demo.join("data/logs").display()
                );
            }
        }
    };
    let result = if python {
        python_sweep(&grid, &url, &demo)
    } else {
        submit_and_collect(&grid, &url, &demo)
    };
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(up.id().to_string())
        .status();
    let _ = up.wait();
    result
}

fn submit_and_collect(grid: &Path, url: &str, demo: &Path) -> Result<()> {
    let params = demo.join("params.jsonl");
    let mut file = std::fs::File::create(&params)?;
    for _ in 0..TASKS {
        writeln!(file, r#"{{"rows": {ROWS}, "rho": 0.6}}"#)?;
    }
    drop(file);
    println!("Submitting {TASKS} tasks of synth-data ({ROWS} rows each) to {url}…");
    let job = submit_wait(grid, url, &params, &guest_wasm("synth-data"))?;
    let results = demo.join("results");
    collect(grid, url, &job, &results, &[])?;
    println!(
        "\nDone: job {job}, {TASKS} CSV shards of {ROWS} rows in {}/<task>/part-<task>.csv, \
         index in {}/manifest.jsonl",
        results.display(),
        results.display()
    );
    Ok(())
}

/// The scikit-learn sweep: one task per line of `examples/python-sweep/params.jsonl`.
fn python_sweep(grid: &Path, url: &str, demo: &Path) -> Result<()> {
    let example = root().join("examples/python-sweep");
    let params = example.join("params.jsonl");
    println!(
        "Submitting the scikit-learn sweep ({}) to {url}; each node compiles the Python runtime once (about a minute)…",
        params.display()
    );
    let job = submit_wait(grid, url, &params, &example.join("sweep.py"))?;
    let results = demo.join("results");
    collect(grid, url, &job, &results, &["--concat", "metrics.csv"])?;
    let table = results.join("metrics.csv");
    println!(
        "\n{}\nDone: job {job}; the table is {}",
        std::fs::read_to_string(&table)?,
        table.display()
    );
    Ok(())
}

/// `grid submit --wait` of one task per line of `params`; the job id once it is done.
fn submit_wait(grid: &Path, url: &str, params: &Path, job_file: &Path) -> Result<String> {
    let out = Command::new(grid)
        .args([
            "submit", "--nats", url, "--seed", "1", "--wait", "--json", "--params",
        ])
        .arg(params)
        .arg(job_file)
        .stderr(Stdio::inherit())
        .output()?;
    let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!("{status}");
    if !out.status.success() {
        bail!("the job did not finish as done");
    }
    Ok(status
        .split("\"job_id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("job id in grid's answer")?
        .to_string())
}

/// `grid results JOB -o RESULTS EXTRA…`.
fn collect(grid: &Path, url: &str, job: &str, results: &Path, extra: &[&str]) -> Result<()> {
    let ok = Command::new(grid)
        .args(["results", "--nats", url, job])
        .args(extra)
        .arg("-o")
        .arg(results)
        .status()?
        .success();
    if !ok {
        bail!("collecting results failed");
    }
    Ok(())
}
