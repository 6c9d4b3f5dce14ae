//! `cargo xtask bench [sandbox|grid|gpu|python] [--json]`: builds each benchmark's inputs, then
//! runs it in release mode and prints ratios measured side by side in one run.
//!
//! - `sandbox`: the synth-data example through the sandbox vs bare wasmtime vs native, and the
//!   per-task fixed cost (see `grid-sandbox/benches/sandbox.rs`).
//! - `grid`: one table — trivial tasks per second (1 node, then 2) through submit → broker →
//!   JetStream → node → result against JetStream's own publish and pull rates on the same
//!   server (`grid-client/examples/jetstream_ceiling.rs`), and jobs of ~100 ms tasks
//!   (compute-bound, and output-heavy) against the same task run directly in the sandbox,
//!   divided by slots; `--json` prints it as one JSON object.
//! - `gpu`: the gpu-noise example as a wasm task through `grid_gpu_v1` and the GPU worker vs the
//!   same WGSL from a native program, and the per-dispatch overhead (see `grid-sandbox/benches/gpu.rs`).
//! - `flat`: jobs of 1k, 10k, 100k and 1M trivial tasks (`--largest N` to stop sooner), counted
//!   (`--tasks`) and from a params file, each on a fresh `grid up`: tasks per second, the broker's
//!   peak memory and that of `grid submit`, which must not grow with the job.
//! - `python`: the Python runtime's cold compile, a warm trivial task, and a numpy-heavy script
//!   in the sandbox vs the host's CPython with numpy (see `grid-sandbox/benches/python.rs`).

use crate::{build_guests, cargo, guest_wasm, setup, target_dir};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

pub fn run(args: &[String]) -> Result<()> {
    let which = args
        .iter()
        .map(String::as_str)
        .find(|a| !a.starts_with("--"));
    let json = args.iter().any(|a| a == "--json");
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
            cargo(&[
                "bench",
                "--locked",
                "-p",
                "grid-sandbox",
                "--bench",
                "sandbox",
            ])
        }
        "grid" => grid(json),
        "flat" => {
            let largest = match args.iter().position(|a| a == "--largest") {
                Some(i) => args
                    .get(i + 1)
                    .and_then(|n| n.parse().ok())
                    .context("--largest takes a number of tasks, e.g. --largest 100000")?,
                None => 1_000_000,
            };
            flat(largest)
        }
        "gpu" => cargo(&["bench", "--locked", "-p", "grid-sandbox", "--bench", "gpu"]),
        "python" => {
            let python = setup::host_python_with_numpy()?;
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args([
                    "bench",
                    "--locked",
                    "-p",
                    "grid-sandbox",
                    "--bench",
                    "python",
                ])
                .env("GRID_BENCH_HOST_PYTHON", python)
                .env("GRID_RUNTIME_DIR", setup::python_runtime_dir()?)
                .current_dir(crate::root())
                .status()?;
            if !status.success() {
                bail!("the Python benchmark failed ({status})");
            }
            Ok(())
        }
        other => {
            bail!(
                "unknown benchmark `{other}`; try `cargo xtask bench sandbox`, `grid`, `gpu`, `python` or `flat`"
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

fn grid(json: bool) -> Result<()> {
    cargo(&["build", "--locked", "--release", "-p", "grid-cli"])?;
    cargo(&[
        "build",
        "--locked",
        "--release",
        "-p",
        "grid-client",
        "--example",
        "jetstream_ceiling",
    ])?;
    let grid = target_dir().join("release/grid");
    let work = std::env::temp_dir().join(format!("grid-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let empty = work.join("empty.wasm");
    std::fs::write(&empty, EMPTY_START)?;

    let (up, url) = start_up(&grid, &work, 1)?;
    let result = measure(&grid, &url, &empty, &work).and_then(|rows| {
        // JetStream's own rates, on the same server, after the grid's runs.
        let operator = work.join("data/auth/creds/operator-broker.creds");
        let out = Command::new(target_dir().join("release/examples/jetstream_ceiling"))
            .arg(&url)
            .arg(&operator)
            .arg("100000")
            .stderr(Stdio::inherit())
            .output()?;
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        let publish =
            json_number(&line, "publish_per_s").context("the ceiling benchmark's answer")?;
        let pull =
            json_number(&line, "pull_ack_per_s").context("the ceiling benchmark's answer")?;
        Ok((rows, publish, pull))
    });
    stop_up(up);
    // The same trivial job with two nodes on a fresh grid.
    let two_nodes = result.and_then(|measured| {
        let work = work.join("two-nodes");
        std::fs::create_dir_all(&work)?;
        let (up, url) = start_up(&grid, &work, 2)?;
        let rate = trivial_rate(&grid, &url, &empty);
        stop_up(up);
        Ok((measured, rate?))
    });
    let _ = std::fs::remove_dir_all(&work);
    let ((rows, publish, pull), two_nodes_rate) = two_nodes?;
    // A task crosses JetStream twice (the task, then its result): each is a publish and a pull.
    let ceiling = 1.0 / (2.0 / publish + 2.0 / pull);
    let table = [
        Row {
            figure: format!("trivial tasks/s, 1 node (empty _start, {TRIVIAL_TASKS} tasks)"),
            grid: rows.trivial_rate,
            anchor_name: format!(
                "JetStream ceiling (publish {publish:.0}/s, pull+ack {pull:.0}/s, 2 of each per task)"
            ),
            anchor: ceiling,
        },
        Row {
            figure: format!("trivial tasks/s, 2 nodes (empty _start, {TRIVIAL_TASKS} tasks)"),
            grid: two_nodes_rate,
            anchor_name: "the same ceiling".into(),
            anchor: ceiling,
        },
        Row {
            figure: format!(
                "~100 ms tasks, {} × monte-carlo-pi: seconds",
                rows.compute_tasks
            ),
            grid: rows.compute_grid_s,
            anchor_name: format!(
                "ideal: direct {:.1} ms × tasks ÷ {SLOTS} slots",
                rows.compute_direct_s * 1e3
            ),
            anchor: rows.compute_ideal_s,
        },
        Row {
            figure: format!(
                "~100 ms output-heavy tasks, {} × synth-data (500k rows): seconds",
                rows.output_tasks
            ),
            grid: rows.output_grid_s,
            anchor_name: format!(
                "ideal: direct {:.1} ms × tasks ÷ {SLOTS} slots",
                rows.output_direct_s * 1e3
            ),
            anchor: rows.output_ideal_s,
        },
    ];
    if json {
        let rows: Vec<_> = table
            .iter()
            .map(|r| serde_json::json!({"figure": r.figure, "grid": r.grid, "anchor": r.anchor_name, "anchor_value": r.anchor, "ratio": r.grid / r.anchor}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"benchmark": "grid", "slots": SLOTS, "rows": rows})
        );
    } else {
        println!(
            "grid benchmark: 1 broker, 1 node × {SLOTS} slots (2 nodes in the second row), nats-server, all on this machine"
        );
        println!(
            "{:<62} {:>10}  {:<72} {:>10}  {:>7}",
            "figure", "grid", "anchor", "", "ratio"
        );
        for r in &table {
            println!(
                "{:<62} {:>10.2}  {:<72} {:>10.2}  {:>7.3}",
                r.figure,
                r.grid,
                r.anchor_name,
                r.anchor,
                r.grid / r.anchor
            );
        }
    }
    Ok(())
}

/// Starts `grid up` (`nodes` nodes × [`SLOTS`] slots, its data under `work`) and points the `grid`
/// commands run from here at its default tenant. Returns the process and the NATS URL.
fn start_up(grid: &Path, work: &Path, nodes: u32) -> Result<(std::process::Child, String)> {
    // SAFETY: xtask runs on one thread; nothing reads the environment concurrently.
    unsafe {
        std::env::set_var(
            "GRID_CREDS",
            work.join("data/auth/creds/tenant-default.creds"),
        )
    };
    let mut up = Command::new(grid)
        .args([
            "up",
            "--nodes",
            &nodes.to_string(),
            "--slots",
            &SLOTS.to_string(),
            "--nats",
            "nats://127.0.0.1:0",
            "--data-dir",
        ])
        .arg(work.join("data"))
        .stdout(Stdio::piped())
        // `GRID_BENCH_LOG=FILE` keeps the grid's log (with `RUST_LOG` as set) for a look after.
        .stderr(match std::env::var_os("GRID_BENCH_LOG") {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            None => Stdio::null(),
        })
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
    // What it prints later (on shutdown) still has somewhere to go.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((up, url))
}

fn stop_up(mut up: std::process::Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(up.id().to_string())
        .status();
    let _ = up.wait();
}

/// The peak resident memory (VmHWM) of process `pid`, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The pid of the `grid broker` that `grid up` (pid `up`) started.
fn broker_pid(up: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The parent's pid is the second field after the command name (which is in parentheses).
            let parent: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let is_broker = cmdline.split(|b| *b == 0).nth(1) == Some(b"broker");
            (parent == up && is_broker).then_some(pid)
        })
}

/// Jobs of growing size, each on a fresh grid: rate and peak memory (see the module docs).
fn flat(largest: u64) -> Result<()> {
    cargo(&["build", "--locked", "--release", "-p", "grid-cli"])?;
    let grid = target_dir().join("release/grid");
    println!("flat with size: 1 broker, 1 node × {SLOTS} slots, nats-server; empty _start tasks");
    println!(
        "{:<8} {:>9} {:>10} {:>18} {:>18}",
        "source", "tasks", "tasks/s", "broker peak RSS", "submit peak RSS"
    );
    let sizes = [1_000u64, 10_000, 100_000, 1_000_000];
    for source in ["--tasks", "--params"] {
        for &tasks in sizes.iter().filter(|&&n| n <= largest) {
            let work = std::env::temp_dir().join(format!("grid-flat-{}", std::process::id()));
            std::fs::create_dir_all(&work)?;
            let empty = work.join("empty.wasm");
            std::fs::write(&empty, EMPTY_START)?;
            let (up, url) = start_up(&grid, &work, 1)?;
            let measured = (|| -> Result<(f64, u64, u64)> {
                let broker = broker_pid(up.id()).context("finding the broker of grid up")?;
                submit_wait(&grid, &url, &empty, &["--tasks", "10"])?; // warm: compiled
                let what = if source == "--params" {
                    let path = work.join("params.jsonl");
                    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
                    for i in 0..tasks {
                        use std::io::Write;
                        writeln!(file, r#"{{"task": {i}}}"#)?;
                    }
                    file.into_inner().map_err(|e| e.into_error())?;
                    path.to_string_lossy().into_owned()
                } else {
                    tasks.to_string()
                };
                let started = Instant::now();
                let mut submit = Command::new(&grid)
                    .args(["submit", "--nats", &url, "--wait", "--json"])
                    .arg(&empty)
                    .args([source, &what])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()?;
                // VmHWM only grows: the last reading before the process ends is its peak.
                let mut submit_peak = 0;
                while submit.try_wait()?.is_none() {
                    submit_peak = peak_rss(submit.id()).unwrap_or(submit_peak);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                let out = submit.wait_with_output()?;
                let took = started.elapsed().as_secs_f64();
                let text = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() || !text.contains("\"state\":\"done\"") {
                    bail!("the {tasks}-task job did not finish as done: {text}");
                }
                let broker_peak = peak_rss(broker).context("reading the broker's memory")?;
                Ok((tasks as f64 / took, broker_peak, submit_peak))
            })();
            stop_up(up);
            let _ = std::fs::remove_dir_all(&work);
            let (rate, broker_peak, submit_peak) = measured?;
            let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
            println!(
                "{:<8} {:>9} {:>10.0} {:>18} {:>18}",
                source.trim_start_matches('-'),
                tasks,
                rate,
                mb(broker_peak),
                mb(submit_peak)
            );
        }
    }
    Ok(())
}

struct Row {
    figure: String,
    grid: f64,
    anchor_name: String,
    anchor: f64,
}

struct Measured {
    trivial_rate: f64,
    compute_tasks: u32,
    compute_direct_s: f64,
    compute_grid_s: f64,
    compute_ideal_s: f64,
    output_tasks: u32,
    output_direct_s: f64,
    output_grid_s: f64,
    output_ideal_s: f64,
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

/// The median wall time of `grid run MODULE` with `params` on stdin, in seconds.
fn direct(grid: &Path, module: &Path, params: &str, work: &Path) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..5 {
        let mut child = Command::new(grid)
            .args(["run", "--json", "--output"])
            .arg(work.join(format!("direct-{}-{i}", module.display().to_string().len())))
            .arg(module)
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
        times
            .push(json_number(&line, "wall_seconds").context("wall_seconds in grid run's answer")?);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Tasks in the trivial job: its first window goes out one task to a message (no task times are
/// known yet); the steady state is what counts.
const TRIVIAL_TASKS: u32 = 20_000;

/// Tasks per second of a job of [`TRIVIAL_TASKS`] empty tasks, after a warm-up job that uploads
/// and compiles the module.
fn trivial_rate(grid: &Path, url: &str, empty: &Path) -> Result<f64> {
    submit_wait(grid, url, empty, &["--tasks", "10"])?;
    let secs = submit_wait(grid, url, empty, &["--tasks", &TRIVIAL_TASKS.to_string()])?;
    Ok(f64::from(TRIVIAL_TASKS) / secs)
}

/// The ~100 ms compute-bound job: 120 tasks, about 6 s on 2 slots, so that a job's fixed
/// latency (CLI start, connect, upload check, submit, the last result's way back: 60–120 ms)
/// weighs as it does in a real job rather than dominating a 2 s one.
const COMPUTE_TASKS: u32 = 120;
/// The output-heavy job: 40 tasks of ~25 MB each.
const OUTPUT_TASKS: u32 = 40;

fn measure(grid: &Path, url: &str, empty: &Path, work: &Path) -> Result<Measured> {
    let trivial_rate = trivial_rate(grid, url, empty)?;

    // ~100 ms tasks: direct in the sandbox vs through the grid (`tasks` × direct ÷ slots is
    // what a grid with no overhead would take). One compute-bound (a few bytes out), one that
    // writes a few MB of CSV per task.
    let run = |module: &Path, params: &str, tasks: u32, name: &str| -> Result<(f64, f64, f64)> {
        let one = direct(grid, module, params, work)?;
        let path = work.join(format!("{name}.jsonl"));
        std::fs::write(&path, format!("{params}\n").repeat(tasks as usize))?;
        submit_wait(grid, url, module, &["--tasks", "1"])?; // warm: uploaded and compiled
        let grid_s = submit_wait(
            grid,
            url,
            module,
            &["--params", path.to_str().unwrap_or_default()],
        )?;
        Ok((one, grid_s, f64::from(tasks) * one / f64::from(SLOTS)))
    };
    let (compute_direct_s, compute_grid_s, compute_ideal_s) = run(
        &guest_wasm("monte-carlo-pi"),
        r#"{"samples": 17000000}"#,
        COMPUTE_TASKS,
        "compute",
    )?;
    let (output_direct_s, output_grid_s, output_ideal_s) = run(
        &guest_wasm("synth-data"),
        r#"{"rows": 500000}"#,
        OUTPUT_TASKS,
        "output",
    )?;
    Ok(Measured {
        trivial_rate,
        compute_tasks: COMPUTE_TASKS,
        compute_direct_s,
        compute_grid_s,
        compute_ideal_s,
        output_tasks: OUTPUT_TASKS,
        output_direct_s,
        output_grid_s,
        output_ideal_s,
    })
}
