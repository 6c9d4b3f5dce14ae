//! `cargo xtask bench [sandbox|grid]`: builds each benchmark's inputs, then runs it in release
//! mode and prints ratios measured side by side in one run.
//!
//! - `sandbox`: the synth-data example through the sandbox vs bare wasmtime vs native, and the
//!   per-task fixed cost (see `grid-node/benches/sandbox.rs`).
//! - `grid`: trivial tasks per second through submit → broker → JetStream → node → result, and a
//!   job of ~100 ms tasks against the same task run directly in the sandbox, divided by slots.
//! - `gpu`: the gpu-noise example as a wasm task through `grid_gpu_v1` and the GPU worker vs the
//!   same WGSL from a native program, and the per-dispatch overhead (see `grid-node/benches/gpu.rs`).
//! - `python`: the Python runtime's cold compile, a warm trivial task, and a numpy-heavy script
//!   in the sandbox vs the host's CPython with numpy (see `grid-node/benches/python.rs`).

use crate::{build_guests, cargo, guest_wasm, setup, target_dir};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

pub fn run(which: Option<&str>) -> Result<()> {
    setup::run()?;
    build_guests()?;
    match which.unwrap_or("sandbox") {
        "sandbox" => {
            // The native build of the example, with the same profile as the guest.
            cargo(&[
                "build",
                "--locked",
                "--profile",
                "guest",
                "-p",
                "synth-data",
            ])?;
            cargo(&["bench", "--locked", "-p", "grid-node", "--bench", "sandbox"])
        }
        "grid" => grid(),
        "gpu" => cargo(&["bench", "--locked", "-p", "grid-node", "--bench", "gpu"]),
        "python" => {
            let python = setup::host_python_with_numpy()?;
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["bench", "--locked", "-p", "grid-node", "--bench", "python"])
                .env("GRID_BENCH_HOST_PYTHON", python)
                .current_dir(crate::root())
                .status()?;
            if !status.success() {
                bail!("the Python benchmark failed ({status})");
            }
            Ok(())
        }
        other => {
            bail!(
                "unknown benchmark `{other}`; try `cargo xtask bench sandbox`, `grid`, `gpu` or `python`"
            )
        }
    }
}

/// The smallest WASI command: an empty `_start`.
const EMPTY_START: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // header
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type: () -> ()
    0x03, 0x02, 0x01, 0x00, // one function of type 0
    0x07, 0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, // export "_start"
    0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // body: end
];

const SLOTS: u32 = 2;

fn json_number(line: &str, key: &str) -> Option<f64> {
    let rest = line.split(&format!("\"{key}\":")).nth(1)?;
    rest.split([',', '}']).next()?.trim().parse().ok()
}

fn grid() -> Result<()> {
    cargo(&["build", "--locked", "--release", "-p", "grid-cli"])?;
    let grid = target_dir().join("release/grid");
    let work = std::env::temp_dir().join(format!("grid-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let empty = work.join("empty.wasm");
    std::fs::write(&empty, EMPTY_START)?;

    // The grid's default tenant, for the `grid` commands below (`grid up` makes it).
    // SAFETY: xtask runs on one thread; nothing reads the environment concurrently.
    unsafe {
        std::env::set_var(
            "GRID_CREDS",
            work.join("data/auth/creds/tenant-default.creds"),
        )
    };
    let mut up = Command::new(&grid)
        .args([
            "up",
            "--nodes",
            "1",
            "--slots",
            &SLOTS.to_string(),
            "--nats",
            "nats://127.0.0.1:0",
            "--data-dir",
        ])
        .arg(work.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(up.stdout.take().context("stdout")?).lines();
    let url = loop {
        let line = lines
            .next()
            .context("grid up exited before it was ready")??;
        if let Some(url) = line.strip_prefix("grid: ready ") {
            break url.to_string();
        }
    };
    let result = measure(&grid, &url, &empty, &work);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(up.id().to_string())
        .status();
    let _ = up.wait();
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn submit_wait(grid: &Path, url: &str, module: &Path, extra: &[&str]) -> Result<f64> {
    let started = Instant::now();
    let out = Command::new(grid)
        .args(["submit", "--nats", url, "--wait", "--json"])
        .arg(module)
        .args(extra)
        .stderr(Stdio::inherit())
        .output()?;
    let took = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("\"state\":\"done\"") {
        bail!("the benchmark job did not finish as done: {text}");
    }
    Ok(took)
}

fn measure(grid: &Path, url: &str, empty: &Path, work: &Path) -> Result<()> {
    // Warm up: module upload, compile on the node.
    submit_wait(grid, url, empty, &["--tasks", "10"])?;
    let trivial = 5_000u32;
    let secs = submit_wait(grid, url, empty, &["--tasks", &trivial.to_string()])?;
    let rate = f64::from(trivial) / secs;

    // ~100 ms tasks: synth-data with enough rows, direct in the sandbox vs through the grid.
    let synth = guest_wasm("synth-data");
    let params = r#"{"rows": 120000}"#;
    let mut direct = Vec::new();
    for _ in 0..5 {
        let mut child = Command::new(grid)
            .args(["run", "--json", "--output"])
            .arg(work.join(format!("direct-{}", direct.len())))
            .arg(&synth)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(params.as_bytes())?;
        let out = child.wait_with_output()?;
        let line = String::from_utf8_lossy(&out.stdout);
        direct
            .push(json_number(&line, "wall_seconds").context("wall_seconds in grid run's answer")?);
    }
    direct.sort_by(f64::total_cmp);
    let one = direct[direct.len() / 2];
    let tasks = 40u32;
    let path = work.join("params.jsonl");
    std::fs::write(&path, format!("{params}\n").repeat(tasks as usize))?;
    let grid_secs = submit_wait(
        grid,
        url,
        &synth,
        &["--params", path.to_str().unwrap_or_default()],
    )?;
    let ideal = f64::from(tasks) * one / f64::from(SLOTS);

    println!("grid benchmark: 1 broker, 1 node × {SLOTS} slots, nats-server, all on this machine");
    println!(
        "  trivial tasks (empty _start), {trivial} tasks: {secs:.2} s submit-to-done = {rate:.0} tasks/s"
    );
    println!(
        "  ~100 ms tasks (synth-data, 120k rows), {tasks} tasks: direct {:.1} ms each; grid {grid_secs:.2} s vs ideal {ideal:.2} s (= {tasks} × direct / {SLOTS} slots) → {:.3}×",
        one * 1e3,
        grid_secs / ideal
    );
    Ok(())
}
