//! `cargo xtask chaos [--tasks N] [--seed S]`: a job run twice on a local grid of real processes
//! (nats-server with a file store, a broker, three nodes) — once calm, once while a seeded
//! schedule SIGKILLs and restarts nodes, the broker and nats-server at random moments — then
//! checked: the job completes; every task is counted exactly once; every task's outputs are
//! byte-identical to the calm run's; no task used more attempts than its retry budget allows.
//! It prints a summary: kills of each kind, retries used, duplicate results the broker dropped,
//! wall time against the calm run. CI runs a short one (`--tasks 300`).

use crate::manifest::{self, TaskResult};
use crate::part::Part;
use crate::{build_guests, cargo, grid_operator, guest_wasm, setup, target_dir};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NODES: usize = 3;
const RETRIES: u64 = 2;

pub fn run(args: &[String]) -> Result<()> {
    let mut tasks = 2000u64;
    let mut seed = 1u64;
    let mut samples = TASK_SAMPLES;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = it.next().with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--tasks" => tasks = value.parse().context("--tasks N")?,
            "--seed" => seed = value.parse().context("--seed S")?,
            // Fewer samples make short tasks, which travel several to a message.
            "--samples" => samples = value.parse().context("--samples N")?,
            other => {
                bail!(
                    "unknown argument {other}; usage: cargo xtask chaos [--tasks N] [--seed S] [--samples N]"
                )
            }
        }
    }
    setup::run()?;
    build_guests()?;
    cargo(&["build", "--locked", "-p", "grid-cli"])?;
    let work = std::env::temp_dir().join(format!("grid-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "chaos: {tasks} tasks of monte-carlo-pi ({samples} samples each) on {NODES} nodes, schedule seed {seed}"
    );
    let calm = run_job(&work.join("calm"), tasks, samples, None)?;
    println!("chaos: calm run {:.1} s", calm.wall.as_secs_f64());
    let chaos = run_job(&work.join("chaos"), tasks, samples, Some(seed))?;

    let problems = manifest::check(&chaos.tasks, Some(&calm.tasks), tasks, RETRIES + 1);
    let retries: u64 = chaos.tasks.values().map(|t| t.attempts - 1).sum();
    println!(
        "chaos: kills: {} node, {} broker, {} nats-server; redeliveries {}; retries used {retries}; duplicate results dropped {}; wall {:.1} s vs calm {:.1} s ({:.2}×)",
        chaos.kills[0],
        chaos.kills[1],
        chaos.kills[2],
        chaos.redeliveries,
        chaos.duplicates,
        chaos.wall.as_secs_f64(),
        calm.wall.as_secs_f64(),
        chaos.wall.as_secs_f64() / calm.wall.as_secs_f64()
    );
    if !problems.is_empty() {
        bail!(
            "chaos run failed its checks ({} problems; logs in {}): {}",
            problems.len(),
            work.display(),
            problems
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    println!("chaos: every task counted once, outputs identical to the calm run");
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

struct JobRun {
    wall: Duration,
    tasks: BTreeMap<u64, TaskResult>,
    /// Kills of nodes, the broker, nats-server.
    kills: [u32; 3],
    duplicates: u64,
    /// Tasks JetStream delivered again (a node died holding them, or handed them back).
    redeliveries: u64,
}

/// A small seeded generator (SplitMix64): the same seed gives the same schedule.
struct Schedule(u64);

impl Schedule {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// monte-carlo-pi samples for about 40 ms of work per task.
const TASK_SAMPLES: u64 = 7_000_000;

fn run_job(dir: &Path, tasks: u64, samples: u64, chaos: Option<u64>) -> Result<JobRun> {
    std::fs::create_dir_all(dir.join("logs"))?;
    let grid = target_dir()
        .join("debug/grid")
        .to_string_lossy()
        .into_owned();
    let port = free_port()?;
    let url = format!("nats://127.0.0.1:{port}");
    let s = |v: &str| v.to_string();
    // With NATS auth on, as a real grid runs: an operator setup, the default tenant, and a
    // provider per node (the `grid` commands that make them).
    let auth = dir.join("auth");
    let make = |args: &[&str]| grid_operator(&grid, &auth, args);
    let server_config = make(&["auth", "init"])?;
    let tenant = make(&["tenant", "add", "default"])?;
    let operator = auth
        .join("creds/operator-broker.creds")
        .to_string_lossy()
        .into_owned();
    let mut nats = Part::new(
        vec![
            setup::nats_server()?.to_string_lossy().into_owned(),
            s("-c"),
            server_config,
            s("-js"),
            s("-a"),
            s("127.0.0.1"),
            s("-p"),
            port.to_string(),
            s("-sd"),
            dir.join("store").to_string_lossy().into_owned(),
        ],
        Vec::new(),
        dir.join("logs/nats-server.log"),
    )?;
    let debug_log = vec![(s("RUST_LOG"), s("grid_broker=debug"))];
    let mut broker = Part::new(
        vec![
            grid.clone(),
            s("broker"),
            s("--nats"),
            url.clone(),
            s("--creds"),
            operator,
        ],
        debug_log,
        dir.join("logs/broker.log"),
    )?;
    let mut nodes = (0..NODES)
        .map(|i| {
            let creds = make(&["provider", "add", &format!("node-{i}")])?;
            Part::new(
                vec![
                    grid.clone(),
                    s("node"),
                    s("--creds"),
                    creds,
                    s("--nats"),
                    url.clone(),
                    s("--id"),
                    format!("node-{i}"),
                    s("--slots"),
                    s("2"),
                    s("--no-gpu"),
                    s("--cache-dir"),
                    dir.join(format!("node-{i}")).to_string_lossy().into_owned(),
                ],
                vec![(s("RUST_LOG"), s("grid_node::worker=debug"))],
                dir.join(format!("logs/node-{i}.log")),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let grid_cmd = |args: &[&str]| {
        Command::new(&grid)
            .args(args)
            .args(["--nats", &url])
            .env("GRID_CREDS", &tenant)
            .stderr(Stdio::piped())
            .output()
    };

    let module = guest_wasm("monte-carlo-pi");
    let started = Instant::now();
    // A params file, so that the pages path is under the kills too.
    let params = dir.join("params.jsonl");
    let line = format!("{{\"samples\": {samples}}}\n");
    std::fs::write(&params, line.repeat(tasks as usize))?;
    let job = loop {
        let out = grid_cmd(&[
            "submit",
            module.to_str().context("module path")?,
            "--params",
            params.to_str().context("params path")?,
            "--seed",
            "7",
            "--retries",
            &RETRIES.to_string(),
            "--json",
        ])?;
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            let id = text
                .split("\"job_id\":\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .context("submit printed no job id")?;
            break id.to_string();
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("submit failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(300));
    };

    let mut kills = [0u32; 3];
    let mut schedule = chaos.map(Schedule);
    let mut next_kill = Instant::now() + Duration::from_secs(1);
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let out = grid_cmd(&["status", &job, "--json"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("\"state\":\"done\"") {
            break;
        }
        if text.contains("\"state\":\"failed\"") || text.contains("\"state\":\"cancelled\"") {
            bail!("the job ended {text}");
        }
        if Instant::now() > deadline {
            bail!("the job did not finish within 15 min: {text}");
        }
        if let Some(schedule) = schedule.as_mut()
            && Instant::now() >= next_kill
        {
            let roll = schedule.next() % 100;
            let (kind, part): (usize, &mut Part) = if roll < 60 {
                let i = (schedule.next() % NODES as u64) as usize;
                (0, &mut nodes[i])
            } else if roll < 85 {
                (1, &mut broker)
            } else {
                (2, &mut nats)
            };
            part.kill();
            kills[kind] += 1;
            std::thread::sleep(schedule.millis(100, 1500));
            part.start()?;
            next_kill = Instant::now() + schedule.millis(300, 2000);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let wall = started.elapsed();

    let results = dir.join("results");
    let out = grid_cmd(&[
        "results",
        &job,
        "-o",
        results.to_str().context("results path")?,
    ])?;
    if !out.status.success() {
        bail!("results: {}", String::from_utf8_lossy(&out.stderr));
    }
    let tasks_seen = manifest::read(&results.join("manifest.jsonl"))?;
    let count_in_logs = |file: &str, what: &str| {
        std::fs::read_to_string(dir.join("logs").join(file))
            .unwrap_or_default()
            .matches(what)
            .count() as u64
    };
    // Dropped by JetStream's message-id window (a redelivered task published again), or by the
    // broker (a result counted already).
    let duplicates = count_in_logs("broker.log", "duplicate result ignored")
        + (0..NODES)
            .map(|i| {
                count_in_logs(
                    &format!("node-{i}.log"),
                    "duplicate result dropped by JetStream",
                )
            })
            .sum::<u64>();
    let redeliveries = (0..NODES)
        .map(|i| count_in_logs(&format!("node-{i}.log"), "redelivered task"))
        .sum();
    drop(nodes);
    drop(broker);
    drop(nats);
    Ok(JobRun {
        wall,
        tasks: tasks_seen,
        kills,
        duplicates,
        redeliveries,
    })
}
