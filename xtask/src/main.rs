//! `cargo xtask <task>`: what `cargo build` / `cargo test` cannot do alone.
//!
//! | task | what it does |
//! |---|---|
//! | `setup` | installs what is missing (the wasm32-wasip1 target) or says exactly how |
//! | `build-guests` | builds the example jobs and the test guests to `target/wasm32-wasip1/guest/` |
//! | `demo [python]` | the README's main job: a local grid runs the synthetic-data example (or the scikit-learn sweep) |
//! | `test` | setup, `cargo fmt --check`, clippy with warnings denied, build-guests, every test of the workspace, then a short chaos run, the netgrid faults and a short fuzz run |
//! | `bench [sandbox|grid|peers|gpu|python|flat]` | benchmarks: sandbox vs bare wasmtime vs native; tasks per second through the grid; Grid beside Ray and Dask; GPU binding vs native; Python in the sandbox vs host CPython; rate and memory as jobs grow |
//! | `chaos [--tasks N] [--seed S] [--samples N]` | a job on a local grid while nodes, the broker and nats-server are killed at random; checked against a calm run |
//! | `netgrid [faults [NAME…]\|scale]` | Grid across network namespaces: a 3-server core, the broker and provider sites behind TLS leaf nodes; faults of the network mid-job; 50 providers (needs root) |
//! | `fuzz [--seconds N] [--seed S] [wire\|sandbox\|gpu…]` | replays `fuzz/regressions/`, then fuzzes wire decoding, the sandbox and the GPU ABI for N seconds each |

mod bench;
mod chaos;
mod demo;
mod fuzz;
mod manifest;
mod netgrid;
mod part;
mod python;
mod setup;

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup::run()
            .and_then(|()| setup::lint_tools())
            .and_then(|()| setup::browser())
            .and_then(|()| setup::network_tools()),
        Some("build-guests") => {
            setup::run()?;
            build_guests()
        }
        Some("demo") => demo::run(args.get(1).map(String::as_str)),
        Some("test") => {
            setup::run()?;
            setup::lint_tools()?;
            setup::browser()?;
            setup::network_tools()?;
            // House rules first: formatted, and no clippy warning anywhere.
            cargo(&["fmt", "--all", "--check"])
                .context("the code is not formatted: run `cargo fmt --all`")?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
            ])?;
            build_guests()?;
            cargo_within(&["test", "--workspace", "--locked"], TEST_LIMIT)?;
            // The Python package and its example notebook, against the `grid` just built.
            python::test()?;
            // The short chaos run: the grid under kills of every kind of process.
            chaos::run(&["--tasks".into(), "300".into(), "--seed".into(), "1".into()])?;
            // The grid across network namespaces, under each fault a network has (needs root,
            // as CI and the development machines are; about 4 minutes).
            netgrid::run(&["faults".into()])?;
            // A short fuzz run of every target, seeded so that CI repeats the same inputs (a
            // longer `cargo xtask fuzz --seed S` explores new ones); a finding fails the run.
            fuzz::run(&["--seconds".into(), "20".into(), "--seed".into(), "1".into()])
        }
        // The Python package's tests alone (after a `cargo build -p grid-cli`).
        Some("test-python") => python::test(),
        Some("bench") => bench::run(&args[1..]),
        Some("chaos") => chaos::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("netgrid") => netgrid::run(&args[1..]),
        // The slow link of `netgrid faults slow-link`, run inside a site's namespace.
        Some("netgrid-proxy") => netgrid::proxy::run(&args[1..]),
        _ => bail!(
            "usage: cargo xtask <setup|build-guests|demo [python]|test|test-python|bench [sandbox|grid|peers|gpu|python] [--runs N] [--json]|bench flat [--largest N]|chaos [--tasks N] [--seed S] [--samples N]|fuzz [--seconds N] [--seed S] [wire|sandbox|gpu...]|netgrid [faults [NAME...]|scale]>"
        ),
    }
}

/// The workspace root (the parent of this crate). `cargo xtask` (a `cargo run` alias) says at
/// run time where this checkout's xtask is; the path compiled in names the checkout that built
/// the binary, which is another one when two checkouts share a target folder.
pub fn root() -> PathBuf {
    let xtask = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    xtask
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

/// How long `cargo test` (building included) may take in `cargo xtask test`: far above a cold
/// run (about 12 minutes on 2 cores), so that a hung test fails the run with a clear message
/// instead of stalling CI until it is killed without one.
const TEST_LIMIT: Duration = Duration::from_secs(45 * 60);

/// Runs cargo like [`cargo`], but kills it and everything it started (test binaries, and the
/// grids and nats-servers they run) once `limit` has passed.
pub fn cargo_within(args: &[&str], limit: Duration) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .spawn()
        .with_context(|| format!("running {cargo}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            // Cargo, the test binary and whatever it spawned.
            let mut pids = descendants(child.id());
            pids.push(child.id());
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(pids.iter().map(u32::to_string))
                .status();
            let _ = child.wait();
            bail!(
                "`cargo {}` still ran after {} minutes: a test hangs; killed it (the output above names it: \"… has been running for over 60 seconds\")",
                args.join(" "),
                limit.as_secs() / 60
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Every process below `pid`, from `/proc` (collected before anything is killed, so that
/// none is missed by being handed to init).
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((child, ppid))
        })
        .collect();
    let mut found = vec![pid];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        next += 1;
    }
    found.remove(0);
    found
}

/// `grid ARGS --auth-dir AUTH`, one of the operator's commands (`auth init`, `tenant add`,
/// `provider add`) that set up a test grid's NATS auth: the path it printed.
pub fn grid_operator(grid: &str, auth: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = Command::new(grid)
        .args(args)
        .arg("--auth-dir")
        .arg(auth)
        .stderr(std::process::Stdio::piped())
        .output()
        .with_context(|| format!("running {grid}"))?;
    if !out.status.success() {
        bail!(
            "grid {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
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
