//! `cargo xtask bench [sandbox|grid|peers|gpu|python|flat] [--json]`: builds each benchmark's
//! inputs, then runs it in release mode and prints ratios measured side by side in one run.
//!
//! - `sandbox`: the synth-data example through the sandbox vs bare wasmtime vs native, and the
//!   per-task fixed cost (see `grid-sandbox/benches/sandbox.rs`).
//! - `grid [--runs N]`: one table — trivial tasks per second (1 node, then 2) through submit →
//!   broker → JetStream → node → result against JetStream's own publish and pull rates on the
//!   same server (`grid-client/examples/jetstream_ceiling.rs`), and jobs of tasks calibrated to
//!   take ~100 ms here (compute-bound, and output-heavy) against the same task run directly in
//!   the sandbox, divided by slots, with what two tasks at once cost the machine itself. Each of
//!   `N` runs (3 by default) starts fresh grids; the table gives medians and the spread of the
//!   ratios, `--json` every run's figures.
//! - `peers [--runs N]`: Grid's trivial and ~100 ms figures, then Ray's and Dask's (installed into
//!   Grid's venv on demand; `peers.py`), with 2 worker slots each, side by side from one run.
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
    // The benchmark's name: the first word that is neither a flag nor a flag's value.
    let which = args
        .iter()
        .enumerate()
        .find(|(i, a)| {
            !a.starts_with("--")
                && (*i == 0 || !matches!(args[i - 1].as_str(), "--runs" | "--largest"))
        })
        .map(|(_, a)| a.as_str());
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
        "grid" => grid(number(args, "--runs", 3)?.max(1), json),
        "peers" => peers(number(args, "--runs", 1)?.max(1), json),
        "flat" => flat(number(args, "--largest", 1_000_000)?),
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
                "unknown benchmark `{other}`; try `cargo xtask bench sandbox`, `grid`, `peers`, `gpu`, `python` or `flat`"
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

/// The number after `flag` in `args`, or `default` when the flag is absent.
fn number<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> Result<T> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("{flag} takes a number, e.g. {flag} 3")),
        None => Ok(default),
    }
}

fn json_number(line: &str, key: &str) -> Option<f64> {
    let rest = line.split(&format!("\"{key}\":")).nth(1)?;
    rest.split([',', '}']).next()?.trim().parse().ok()
}

/// What one run of `bench grid` measured.
struct Run {
    trivial_1: f64,
    /// CPU seconds per task of each process role while the 1-node trivial job ran.
    trivial_cpu: Cpu,
    trivial_2: f64,
    publish: f64,
    pull: f64,
    compute: Job,
    output: Job,
}

impl Run {
    /// A task crosses JetStream twice (the task, then its result): each is a publish and a pull.
    fn ceiling(&self) -> f64 {
        1.0 / (2.0 / self.publish + 2.0 / self.pull)
    }
}

/// A job of calibrated tasks: run directly in the sandbox, and through the grid.
struct Job {
    tasks: u32,
    params: String,
    /// One task run directly (`grid run`), alone: the median of 5.
    direct_s: f64,
    /// One task run directly while another runs beside it: what two slots give a task on this
    /// machine when nothing else runs.
    pair_s: f64,
    /// The whole job through the grid, from `grid submit --wait` to its end.
    grid_s: f64,
    /// CPU seconds per task of each process role of the grid while the job ran.
    cpu: Cpu,
}

/// CPU seconds per task by process role (`nats-server`, `broker`, `node`).
type Cpu = std::collections::BTreeMap<String, f64>;

fn per_task(mut cpu: Cpu, tasks: u32) -> Cpu {
    for seconds in cpu.values_mut() {
        *seconds /= f64::from(tasks);
    }
    cpu
}

impl Job {
    /// What a grid with no overhead would take: every task as long as run directly, `SLOTS`
    /// at a time.
    fn ideal_s(&self) -> f64 {
        f64::from(self.tasks) * self.direct_s / f64::from(SLOTS)
    }
}

/// One figure of the table across runs: the grid's value and its anchor in each run.
struct Figure {
    name: String,
    anchor_name: String,
    grid: Vec<f64>,
    anchor: Vec<f64>,
}

impl Figure {
    fn ratios(&self) -> Vec<f64> {
        self.grid
            .iter()
            .zip(&self.anchor)
            .map(|(g, a)| g / a)
            .collect()
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// `bench grid`: `runs` runs (each on fresh grids), then the table of medians and spreads.
fn grid(runs: u32, json: bool) -> Result<()> {
    let grid = build_grid()?;
    let mut measured = Vec::new();
    for run in 1..=runs {
        eprintln!("bench: run {run} of {runs}");
        measured.push(grid_run(&grid)?);
    }
    let figures = figures(&measured);
    if json {
        println!("{}", figures_json(&figures, &measured));
    } else {
        println!(
            "grid benchmark: 1 broker, 1 node × {SLOTS} slots (2 nodes in the second row), nats-server, all on this machine; {runs} runs, each on fresh grids"
        );
        print_figures(&figures);
        print_cpu(&measured);
    }
    Ok(())
}

/// Where the CPU went while each job ran: per task, by process, medians of the runs. On a
/// machine whose cores the tasks fill, every millisecond here comes out of the tasks' time.
fn print_cpu(runs: &[Run]) {
    println!("CPU per task while each job ran, by process (medians of the runs):");
    type Pick = fn(&Run) -> &Cpu;
    let rows: [(&str, Pick, f64, &str); 3] = [
        ("trivial job, 1 node", |r| &r.trivial_cpu, 1e6, "µs"),
        ("~100 ms compute job", |r| &r.compute.cpu, 1e3, "ms"),
        ("~100 ms output-heavy job", |r| &r.output.cpu, 1e3, "ms"),
    ];
    for (name, cpu, scale, unit) in rows {
        let roles: std::collections::BTreeSet<&String> =
            runs.iter().flat_map(|r| cpu(r).keys()).collect();
        let parts: Vec<String> = roles
            .into_iter()
            .map(|role| {
                let values: Vec<f64> = runs
                    .iter()
                    .map(|r| cpu(r).get(role).copied().unwrap_or(0.0) * scale)
                    .collect();
                format!("{role} {:.1} {unit}", median(&values))
            })
            .collect();
        println!("  {name:<26} {}", parts.join(", "));
    }
}

/// `bench peers`: Grid's figures (as `bench grid` measures them), then Ray's and Dask's on this
/// machine right after, with the same number of worker slots.
fn peers(runs: u32, json: bool) -> Result<()> {
    let python = setup::ensure_python_modules(
        &[("ray", "ray"), ("dask.distributed", "dask[distributed]")],
        "for `cargo xtask bench peers`",
    )?;
    let grid = build_grid()?;
    let mut measured = Vec::new();
    for run in 1..=runs {
        eprintln!("bench: Grid, run {run} of {runs}");
        measured.push(grid_run(&grid)?);
    }
    let script = std::env::temp_dir().join(format!("grid-peers-{}.py", std::process::id()));
    std::fs::write(&script, include_str!("peers.py"))?;
    let out = Command::new(&python)
        .arg(&script)
        .args([TRIVIAL_TASKS.to_string(), COMPUTE_TASKS.to_string()])
        .stderr(Stdio::inherit())
        .output();
    let _ = std::fs::remove_file(&script);
    let out = out.context("running the peers' benchmark")?;
    if !out.status.success() {
        bail!("the peers' benchmark failed ({})", out.status);
    }
    let peers: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("the peers' benchmark's answer")?;
    let of = |f: &dyn Fn(&Run) -> f64| median(&measured.iter().map(f).collect::<Vec<_>>());
    let grid_trivial = of(&|r| r.trivial_1);
    let grid_trivial_2 = of(&|r| r.trivial_2);
    let grid_compute = of(&|r| r.compute.grid_s / r.compute.ideal_s());
    let peer = |name: &str, key: &str| {
        peers
            .iter()
            .find(|p| p["peer"] == name)
            .and_then(|p| p[key].as_f64())
            .unwrap_or(f64::NAN)
    };
    let version = |name: &str| {
        peers
            .iter()
            .find(|p| p["peer"] == name)
            .and_then(|p| p["version"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "benchmark": "peers", "slots": SLOTS, "grid_runs": runs,
                "grid": {"trivial_per_s_1_node": grid_trivial, "trivial_per_s_2_nodes": grid_trivial_2, "compute_ratio": grid_compute},
                "peers": peers,
            })
        );
        return Ok(());
    }
    println!(
        "Grid and its peers, {SLOTS} worker slots each, all on this machine (Grid: median of {runs} run(s))"
    );
    println!(
        "{:<44} {:>18} {:>14} {:>14}",
        "figure",
        "Grid",
        format!("Ray {}", version("ray")),
        format!("Dask {}", version("dask"))
    );
    println!(
        "{:<44} {:>18} {:>14.0} {:>14.0}",
        format!("trivial tasks/s ({TRIVIAL_TASKS} tasks)"),
        format!("{grid_trivial:.0} ({grid_trivial_2:.0} on 2 nodes)"),
        peer("ray", "trivial_per_s"),
        peer("dask", "trivial_per_s")
    );
    println!(
        "{:<44} {:>17.3}× {:>13.3}× {:>13.3}×",
        format!("{COMPUTE_TASKS} ~100 ms tasks vs direct × tasks ÷ {SLOTS}"),
        grid_compute,
        peer("ray", "compute_ratio"),
        peer("dask", "compute_ratio")
    );
    println!(
        "Grid's task is monte-carlo-pi in the sandbox, calibrated to ~100 ms; the peers' is a pure-Python loop calibrated the same way in their own process."
    );
    Ok(())
}

fn build_grid() -> Result<std::path::PathBuf> {
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
    Ok(target_dir().join("release/grid"))
}

/// One run: the trivial job on 1 node, the calibrated jobs, JetStream's ceiling on the same
/// server, then the trivial job on a fresh grid of 2 nodes.
fn grid_run(grid: &Path) -> Result<Run> {
    let work = std::env::temp_dir().join(format!("grid-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let empty = work.join("empty.wasm");
    std::fs::write(&empty, EMPTY_START)?;
    let run = (|| -> Result<Run> {
        let (pi, synth) = (guest_wasm("monte-carlo-pi"), guest_wasm("synth-data"));
        let mut compute = calibrated(grid, &work, &pi, ("samples", 17_000_000), COMPUTE_TASKS)?;
        let mut output = calibrated(grid, &work, &synth, ("rows", 500_000), OUTPUT_TASKS)?;
        let (up, url) = start_up(grid, &work, 1)?;
        let one_node = (|| -> Result<_> {
            run_job(grid, up.id(), &url, &work, &pi, &mut compute)?;
            run_job(grid, up.id(), &url, &work, &synth, &mut output)?;
            let (trivial_1, trivial_cpu) = trivial_rate(grid, up.id(), &url, &empty)?;
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
            Ok((trivial_1, trivial_cpu, compute, output, publish, pull))
        })();
        stop_up(up);
        let (trivial_1, trivial_cpu, compute, output, publish, pull) = one_node?;
        let two = work.join("two-nodes");
        std::fs::create_dir_all(&two)?;
        let (up, url) = start_up(grid, &two, 2)?;
        let trivial_2 = trivial_rate(grid, up.id(), &url, &empty);
        stop_up(up);
        Ok(Run {
            trivial_1,
            trivial_cpu,
            trivial_2: trivial_2?.0,
            publish,
            pull,
            compute,
            output,
        })
    })();
    let _ = std::fs::remove_dir_all(&work);
    run
}

fn figures(runs: &[Run]) -> Vec<Figure> {
    let of = |f: &dyn Fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    let first = &runs[0];
    vec![
        Figure {
            name: format!("trivial tasks/s, 1 node (empty _start, {TRIVIAL_TASKS} tasks)"),
            anchor_name: "JetStream ceiling (a publish and a pull+ack each way per task)".into(),
            grid: of(&|r| r.trivial_1),
            anchor: of(&Run::ceiling),
        },
        Figure {
            name: format!("trivial tasks/s, 2 nodes (empty _start, {TRIVIAL_TASKS} tasks)"),
            anchor_name: "the same ceiling".into(),
            grid: of(&|r| r.trivial_2),
            anchor: of(&Run::ceiling),
        },
        Figure {
            name: format!(
                "~100 ms tasks, {} × monte-carlo-pi {}: s",
                first.compute.tasks, first.compute.params
            ),
            anchor_name: format!(
                "ideal: direct ({:.1} ms) × tasks ÷ {SLOTS} slots",
                median(&of(&|r| r.compute.direct_s)) * 1e3
            ),
            grid: of(&|r| r.compute.grid_s),
            anchor: of(&|r| r.compute.ideal_s()),
        },
        Figure {
            name: "— the same task run directly, 2 at once: s".into(),
            anchor_name: "1 at a time (the machine's own cost of 2 slots)".into(),
            grid: of(&|r| r.compute.pair_s),
            anchor: of(&|r| r.compute.direct_s),
        },
        Figure {
            name: format!(
                "~100 ms output-heavy tasks, {} × synth-data {}: s",
                first.output.tasks, first.output.params
            ),
            anchor_name: format!(
                "ideal: direct ({:.1} ms) × tasks ÷ {SLOTS} slots",
                median(&of(&|r| r.output.direct_s)) * 1e3
            ),
            grid: of(&|r| r.output.grid_s),
            anchor: of(&|r| r.output.ideal_s()),
        },
        Figure {
            name: "— the same task run directly, 2 at once: s".into(),
            anchor_name: "1 at a time".into(),
            grid: of(&|r| r.output.pair_s),
            anchor: of(&|r| r.output.direct_s),
        },
    ]
}

fn figures_json(figures: &[Figure], runs: &[Run]) -> serde_json::Value {
    let rows: Vec<_> = figures
        .iter()
        .map(|f| {
            let ratios = f.ratios();
            let (min, max) = spread(&ratios);
            serde_json::json!({
                "figure": f.name, "grid": f.grid, "anchor": f.anchor_name,
                "anchor_value": f.anchor, "ratio": ratios, "ratio_median": median(&ratios),
                "ratio_min": min, "ratio_max": max,
            })
        })
        .collect();
    let cpu: Vec<_> = runs
        .iter()
        .map(|r| serde_json::json!({"trivial": r.trivial_cpu, "compute": r.compute.cpu, "output": r.output.cpu}))
        .collect();
    serde_json::json!({
        "benchmark": "grid", "slots": SLOTS, "runs": runs.len(), "rows": rows,
        "cpu_seconds_per_task": cpu,
    })
}

fn print_figures(figures: &[Figure]) {
    println!(
        "{:<66} {:>10}  {:<62} {:>10}  {:>7}  {:>13}",
        "figure (medians)", "grid", "anchor", "", "ratio", "ratio min–max"
    );
    for f in figures {
        let ratios = f.ratios();
        let (min, max) = spread(&ratios);
        println!(
            "{:<66} {:>10.2}  {:<62} {:>10.2}  {:>7.3}  {:>6.3}–{:<6.3}",
            f.name,
            median(&f.grid),
            f.anchor_name,
            median(&f.anchor),
            median(&ratios),
            min,
            max
        );
    }
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
            "--no-warm-runtimes",
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

/// The processes `grid up` (pid `up`) started, each with its role: `nats-server`, or the
/// `grid` subcommand it runs (`broker`, `node`).
fn children(up: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The parent's pid is the second field after the command name (in parentheses).
            let parent: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            if parent != up {
                return None;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|b| *b == 0);
            let program = String::from_utf8_lossy(args.next()?).into_owned();
            let role = if program.ends_with("nats-server") {
                "nats-server".to_string()
            } else {
                String::from_utf8_lossy(args.next()?).into_owned()
            };
            Some((pid, role))
        })
        .collect()
}

/// The pid of the `grid broker` that `grid up` (pid `up`) started.
fn broker_pid(up: u32) -> Option<u32> {
    children(up)
        .into_iter()
        .find_map(|(pid, role)| (role == "broker").then_some(pid))
}

/// CPU seconds (user and system) that process `pid` has used.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit(')').next()?.split_whitespace();
    // After the command name: state is field 3; utime and stime are fields 14 and 15.
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    // Linux reports them in clock ticks of 1/100 s (USER_HZ).
    Some((utime + stime) / 100.0)
}

/// CPU seconds used so far by the processes of `grid up` (pid `up`), summed by role.
fn cpu_by_role(up: u32) -> std::collections::BTreeMap<String, f64> {
    let mut by_role = std::collections::BTreeMap::new();
    for (pid, role) in children(up) {
        *by_role.entry(role).or_insert(0.0) += cpu_seconds(pid).unwrap_or(0.0);
    }
    by_role
}

/// What each role of `grid up` used while `work` ran: CPU seconds by role.
fn cpu_during<T>(
    up: u32,
    work: impl FnOnce() -> Result<T>,
) -> Result<(T, std::collections::BTreeMap<String, f64>)> {
    let before = cpu_by_role(up);
    let done = work()?;
    let mut used = cpu_by_role(up);
    for (role, seconds) in &mut used {
        *seconds -= before.get(role).copied().unwrap_or(0.0);
    }
    Ok((done, used))
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

/// The wall time of one `grid run MODULE` with `params` on stdin, in seconds (the task's own
/// `wall_seconds`, not the process's).
fn direct_once(
    grid: &Path,
    module: &Path,
    params: &str,
    out: &Path,
) -> Result<std::process::Child> {
    let mut child = Command::new(grid)
        .args(["run", "--json", "--output"])
        .arg(out)
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
    Ok(child)
}

fn wall_seconds(child: std::process::Child) -> Result<f64> {
    let out = child.wait_with_output()?;
    let line = String::from_utf8_lossy(&out.stdout);
    json_number(&line, "wall_seconds").context("wall_seconds in grid run's answer")
}

/// The median wall time of `grid run MODULE` with `params` on stdin (5 runs), in seconds.
fn direct(grid: &Path, module: &Path, params: &str, work: &Path) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..5 {
        let out = work.join(format!("direct-{i}"));
        let _ = std::fs::remove_dir_all(&out);
        times.push(wall_seconds(direct_once(grid, module, params, &out)?)?);
    }
    Ok(median(&times))
}

/// The median wall time of `grid run MODULE` when two run at once (3 pairs), in seconds.
fn direct_pair(grid: &Path, module: &Path, params: &str, work: &Path) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..3 {
        let (a, b) = (
            work.join(format!("pair-{i}-a")),
            work.join(format!("pair-{i}-b")),
        );
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
        let first = direct_once(grid, module, params, &a)?;
        let second = direct_once(grid, module, params, &b)?;
        times.push(wall_seconds(first)?);
        times.push(wall_seconds(second)?);
    }
    Ok(median(&times))
}

/// The length of one task run directly that the calibrated jobs aim at.
const TASK_S: f64 = 0.1;

/// Params for `module` whose `key` makes one task take about [`TASK_S`] run directly on this
/// machine (scaled from `start`), and that time.
fn calibrate(
    grid: &Path,
    module: &Path,
    (key, start): (&str, u64),
    work: &Path,
) -> Result<(String, f64)> {
    let took = direct(grid, module, &format!(r#"{{"{key}": {start}}}"#), work)?;
    let n = (start as f64 * TASK_S / took).round().max(1.0) as u64;
    let params = format!(r#"{{"{key}": {n}}}"#);
    let took = direct(grid, module, &params, work)?;
    Ok((params, took))
}

/// Tasks in the trivial job: its first window goes out one task to a message (no task times are
/// known yet); the steady state is what counts.
const TRIVIAL_TASKS: u32 = 20_000;

/// Tasks per second of a job of [`TRIVIAL_TASKS`] empty tasks on the grid of `grid up` (pid
/// `up`), after a warm-up job that uploads and compiles the module; and the CPU per task of
/// the grid's processes meanwhile.
fn trivial_rate(grid: &Path, up: u32, url: &str, empty: &Path) -> Result<(f64, Cpu)> {
    submit_wait(grid, url, empty, &["--tasks", "10"])?;
    let (secs, cpu) = cpu_during(up, || {
        submit_wait(grid, url, empty, &["--tasks", &TRIVIAL_TASKS.to_string()])
    })?;
    Ok((
        f64::from(TRIVIAL_TASKS) / secs,
        per_task(cpu, TRIVIAL_TASKS),
    ))
}

/// The ~100 ms compute-bound job: 120 tasks, about 6 s on 2 slots, so that a job's fixed
/// latency (CLI start, connect, upload check, submit, the last result's way back: 60–120 ms)
/// weighs as it does in a real job rather than dominating a 2 s one.
const COMPUTE_TASKS: u32 = 120;
/// The output-heavy job: 40 tasks of ~25 MB of CSV each.
const OUTPUT_TASKS: u32 = 40;

/// A job of `tasks` tasks of `module`, calibrated to ~[`TASK_S`] each (see [`calibrate`]) and
/// run directly, alone and two at once: measured before the grid starts, on a quiet machine.
fn calibrated(
    grid: &Path,
    work: &Path,
    module: &Path,
    param: (&str, u64),
    tasks: u32,
) -> Result<Job> {
    let (params, direct_s) = calibrate(grid, module, param, work)?;
    let pair_s = direct_pair(grid, module, &params, work)?;
    Ok(Job {
        tasks,
        params,
        direct_s,
        pair_s,
        grid_s: f64::NAN,
        cpu: Cpu::new(),
    })
}

/// Runs `job` through the grid at `url` (started by `grid up`, pid `up`) after a warm-up task
/// that uploads and compiles `module`: its time, and the CPU of the grid's processes meanwhile.
fn run_job(
    grid: &Path,
    up: u32,
    url: &str,
    work: &Path,
    module: &Path,
    job: &mut Job,
) -> Result<()> {
    let path = work.join("job.jsonl");
    std::fs::write(
        &path,
        format!("{}\n", job.params).repeat(job.tasks as usize),
    )?;
    submit_wait(grid, url, module, &["--tasks", "1"])?;
    let (grid_s, cpu) = cpu_during(up, || {
        submit_wait(
            grid,
            url,
            module,
            &["--params", path.to_str().unwrap_or_default()],
        )
    })?;
    job.grid_s = grid_s;
    job.cpu = per_task(cpu, job.tasks);
    Ok(())
}
