//! `cargo xtask netgrid`: Grid across hosts, on one machine. Network namespaces stand in for
//! machines ([`lab`]): a 3-server NATS core at R3, the broker, a tenant, and provider sites
//! behind leaf nodes that dial out to the core over TLS ([`deploy`]). Real sockets, routes and
//! partitions; the same binaries and configs as a real deployment.
//!
//! | command | what it does |
//! |---|---|
//! | `netgrid` | a job across 3 sites of 2 providers; prints what ran where, and checks it |
//! | `netgrid faults [NAME…]` | each fault on a fresh deployment, mid-job, checked against a calm run: `site-cut`, `core-cut`, `one-way`, `broker-cut`, `slow-link` |
//! | `netgrid scale` | 50 providers across 10 sites: the core's CPU, idle and under a job |
//!
//! Every fault is checked as the chaos run is: the job completes, every task is counted once,
//! its outputs are byte-identical to the calm run's, no task used more attempts than its retry
//! budget, and the usage ledger holds exactly the attempts the results say ran.
//!
//! `tc netem` is not in this machine's kernel, so a slow link is a userspace proxy that delays
//! every byte ([`proxy`]). It cannot lose packets: TCP sits below it. Loss on a real link
//! reaches the grid as retransmission delay, which is what the proxy adds.

mod deploy;
mod lab;
pub mod proxy;

use crate::manifest::{self, TaskResult};
use crate::{build_guests, cargo, guest_wasm, setup};
use anyhow::{Context, Result, bail};
use deploy::{Deployment, Plan};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const RETRIES: u64 = 2;
/// monte-carlo-pi samples for about 20 ms of work per task.
const SAMPLES: u64 = 3_500_000;
/// How long a node's silence lasts before its tasks go to others (grid_client::TASK_ACK_WAIT).
const ACK_WAIT: Duration = Duration::from_secs(10);

pub const FAULTS: &[&str] = &["site-cut", "core-cut", "one-way", "broker-cut", "slow-link"];

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    setup::network_tools()?;
    build_guests()?;
    cargo(&["build", "--locked", "-p", "grid-cli"])?;
    let work = std::env::temp_dir().join(format!("grid-netgrid-{}", std::process::id()));
    // `--keep`: the logs, configs and results stay, also when everything passed.
    let keep = args.iter().any(|a| a == "--keep");
    let args: Vec<String> = args.iter().filter(|a| *a != "--keep").cloned().collect();
    let result = match args.first().map(String::as_str) {
        None => demo(&work),
        Some("faults") => faults(&work, &args[1..]),
        Some("scale") => scale(&work),
        Some(other) => bail!(
            "unknown netgrid command {other}; usage: cargo xtask netgrid [faults [{}]|scale] [--keep]",
            FAULTS.join("|")
        ),
    };
    if result.is_ok() && !keep {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("netgrid: logs are in {}", work.display());
    }
    result
}

/// A job across three sites of two providers each: what ran where.
fn demo(work: &Path) -> Result<()> {
    let plan = Plan {
        sites: 3,
        providers_per_site: 2,
        slots: 1,
        slow_sites: Vec::new(),
    };
    let started = Instant::now();
    let grid = Deployment::start(work, &plan)?;
    println!(
        "netgrid: core of 3 servers ({}), broker, {} sites behind TLS leaf nodes, {} nodes online in {:.1} s",
        grid.core_urls,
        grid.sites.len(),
        grid.providers().count(),
        started.elapsed().as_secs_f64()
    );
    let outcome = run_job(&grid, 300, |_| Ok(String::new()))?;
    print_where(&grid, &outcome);
    let problems = check(&outcome, None, 300);
    if !problems.is_empty() {
        bail!("the job failed its checks: {}", problems.join("; "));
    }
    println!(
        "netgrid: {} tasks in {:.1} s, each counted once; the ledger holds its {} attempts",
        outcome.tasks.len(),
        outcome.wall.as_secs_f64(),
        outcome.ledger_attempts
    );
    Ok(())
}

fn print_where(grid: &Deployment, outcome: &Outcome) {
    let mut by_node: BTreeMap<&str, u64> = BTreeMap::new();
    for task in outcome.tasks.values() {
        *by_node.entry(task.node.as_str()).or_default() += 1;
    }
    for (site, providers) in &grid.sites {
        let counts: Vec<String> = providers
            .iter()
            .map(|p| format!("{p} {}", by_node.get(p.as_str()).copied().unwrap_or(0)))
            .collect();
        let link = grid.leaf_link_of(site).unwrap_or_else(|| "?".into());
        println!(
            "netgrid:   {site} (leaf linked to {link}): {}",
            counts.join(", ")
        );
    }
}

/// Each fault on a fresh deployment, mid-job, against a calm run.
fn faults(work: &Path, names: &[String]) -> Result<()> {
    let names: Vec<&str> = if names.is_empty() {
        FAULTS.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    if let Some(bad) = names.iter().find(|n| !FAULTS.contains(n)) {
        bail!("no fault {bad}; the faults are {}", FAULTS.join(", "));
    }
    const TASKS: u64 = 400;
    let plan = |slow: bool| Plan {
        sites: 3,
        providers_per_site: 1,
        slots: 2,
        slow_sites: if slow {
            vec![(1, Duration::from_millis(100))]
        } else {
            Vec::new()
        },
    };
    let calm = {
        let grid = Deployment::start(&work.join("calm"), &plan(false))?;
        run_job(&grid, TASKS, |_| Ok(String::new()))?
    };
    println!(
        "netgrid: calm run: {TASKS} tasks in {:.1} s",
        calm.wall.as_secs_f64()
    );
    let mut failed = Vec::new();
    for name in names {
        let grid = Deployment::start(&work.join(name), &plan(name == "slow-link"))?;
        let outcome = run_job(&grid, TASKS, |grid| inject(grid, name));
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                println!("netgrid: {name}: FAILED: {e:#}");
                failed.push(name);
                continue;
            }
        };
        let problems = check(&outcome, Some(&calm), TASKS);
        let retries: u64 = outcome.tasks.values().map(|t| t.attempts - 1).sum();
        let ran_on_site_1 = outcome
            .tasks
            .values()
            .filter(|t| t.node.starts_with("p1-"))
            .count();
        println!(
            "netgrid: {name}: {}; {:.1} s ({:.2}× calm); retries used {retries}; redelivered {}; duplicate results dropped {}; site-1 ran {ran_on_site_1} tasks; ledger {} attempts",
            outcome.during,
            outcome.wall.as_secs_f64(),
            outcome.wall.as_secs_f64() / calm.wall.as_secs_f64(),
            outcome.redeliveries,
            outcome.duplicates,
            outcome.ledger_attempts,
        );
        if problems.is_empty() {
            println!(
                "netgrid: {name}: passed: every task counted once, outputs identical to the calm run, attempts within budget, ledger = attempts"
            );
        } else {
            println!(
                "netgrid: {name}: FAILED ({} problems): {}",
                problems.len(),
                problems
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("faults failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Injects fault `name` into a running job and heals it; says what it did.
fn inject(grid: &Deployment, name: &str) -> Result<String> {
    let sleep = std::thread::sleep;
    sleep(Duration::from_secs(2));
    let outage = ACK_WAIT + Duration::from_secs(5);
    Ok(match name {
        "site-cut" => {
            grid.lab.cut("site-1")?;
            sleep(outage);
            grid.lab.restore("site-1")?;
            format!("site-1's link down {} s", outage.as_secs())
        }
        "core-cut" => {
            grid.lab.cut("core-2")?;
            sleep(outage);
            grid.lab.restore("core-2")?;
            format!("core-2's link down {} s", outage.as_secs())
        }
        "one-way" => {
            let core = grid
                .leaf_link_of("site-1")
                .context("site-1's leaf names no core server in its log")?;
            grid.lab.blackhole("site-1", &core)?;
            sleep(outage);
            grid.lab.unblackhole("site-1", &core)?;
            format!(
                "site-1's packets to {core} (its leaf's link) dropped {} s, {core}'s to site-1 delivered",
                outage.as_secs()
            )
        }
        "broker-cut" => {
            grid.lab.cut("broker")?;
            sleep(outage);
            grid.lab.restore("broker")?;
            format!(
                "the broker's link down {} s (ack wait {} s)",
                outage.as_secs(),
                ACK_WAIT.as_secs()
            )
        }
        "slow-link" => "site-1's leaf link delayed 100 ms each way (200 ms round trip)".into(),
        other => bail!("no fault {other}"),
    })
}

/// 50 providers across 10 sites: the core's CPU while they idle, and while they run a job of
/// light tasks.
fn scale(work: &Path) -> Result<()> {
    let plan = Plan {
        sites: 10,
        providers_per_site: 5,
        slots: 1,
        slow_sites: Vec::new(),
    };
    let started = Instant::now();
    let grid = Deployment::start(work, &plan)?;
    println!(
        "netgrid: {} providers across {} sites online in {:.1} s",
        grid.providers().count(),
        grid.sites.len(),
        started.elapsed().as_secs_f64()
    );
    let is_core = |n: &str| n.starts_with("core-");
    let is_leaf = |n: &str| n.starts_with("leaf-");
    let is_broker = |n: &str| n == "broker";
    let sample = |grid: &Deployment| {
        (
            Instant::now(),
            grid.cpu_seconds(is_core),
            grid.cpu_seconds(is_broker),
            grid.cpu_seconds(is_leaf),
        )
    };
    // Settle: the nodes' first heartbeats and compiles are done.
    std::thread::sleep(Duration::from_secs(5));
    let idle = sample(&grid);
    std::thread::sleep(Duration::from_secs(30));
    let after_idle = sample(&grid);
    let idle_wall = after_idle.0.duration_since(idle.0).as_secs_f64();
    println!(
        "netgrid: idle, 50 nodes heartbeating: core {:.2}% of one core (3 servers together), broker {:.2}%, leaves {:.2}%",
        100.0 * (after_idle.1 - idle.1) / idle_wall,
        100.0 * (after_idle.2 - idle.2) / idle_wall,
        100.0 * (after_idle.3 - idle.3) / idle_wall,
    );
    const TASKS: u64 = 5000;
    let before = sample(&grid);
    let outcome = run_job_with(&grid, TASKS, 1000, |_| Ok(String::new()))?;
    let after = sample(&grid);
    let wall = after.0.duration_since(before.0).as_secs_f64();
    let problems = check(&outcome, None, TASKS);
    let nodes_used = outcome
        .tasks
        .values()
        .map(|t| t.node.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    println!(
        "netgrid: a job of {TASKS} light tasks ran on {nodes_used} nodes in {:.1} s ({:.0} tasks/s): core {:.1}% of one core, {:.0} µs per task; broker {:.1}%, {:.0} µs per task; leaves {:.1}%",
        outcome.wall.as_secs_f64(),
        TASKS as f64 / outcome.wall.as_secs_f64(),
        100.0 * (after.1 - before.1) / wall,
        1e6 * (after.1 - before.1) / TASKS as f64,
        100.0 * (after.2 - before.2) / wall,
        1e6 * (after.2 - before.2) / TASKS as f64,
        100.0 * (after.3 - before.3) / wall,
    );
    if !problems.is_empty() {
        bail!("the job failed its checks: {}", problems.join("; "));
    }
    Ok(())
}

struct Outcome {
    /// From submit until the job was done (the fault may still have been healing).
    wall: Duration,
    /// What was done to the grid meanwhile.
    during: String,
    tasks: BTreeMap<u64, TaskResult>,
    /// Attempts the usage ledger holds for the job.
    ledger_attempts: u64,
    /// Results dropped as already counted: by the broker, or by JetStream's duplicate window.
    duplicates: u64,
    /// Tasks JetStream delivered again (a node went silent holding them, or handed them back).
    redeliveries: u64,
}

fn run_job(
    grid: &Deployment,
    tasks: u64,
    during: impl FnOnce(&Deployment) -> Result<String> + Send,
) -> Result<Outcome> {
    run_job_with(grid, tasks, SAMPLES, during)
}

/// Submits monte-carlo-pi with `tasks` params lines as the tenant, runs `during` beside it,
/// waits for both to finish, and reads the job's results and its ledger.
fn run_job_with(
    grid: &Deployment,
    tasks: u64,
    samples: u64,
    during: impl FnOnce(&Deployment) -> Result<String> + Send,
) -> Result<Outcome> {
    let params = grid.dir.join("params.jsonl");
    std::fs::write(
        &params,
        format!("{{\"samples\": {samples}}}\n").repeat(tasks as usize),
    )?;
    let module = guest_wasm("monte-carlo-pi");
    let started = Instant::now();
    let out = grid.grid(&[
        "submit",
        path(&module)?,
        "--params",
        path(&params)?,
        "--seed",
        "7",
        "--retries",
        &RETRIES.to_string(),
        "--json",
    ])?;
    if !out.status.success() {
        bail!(
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let job = json_field(&String::from_utf8_lossy(&out.stdout), "job_id")
        .context("submit printed no job id")?;
    let (wall, during) = std::thread::scope(|scope| -> Result<(Duration, String)> {
        let during = scope.spawn(|| during(grid));
        let deadline = Instant::now() + Duration::from_secs(300);
        let wall = loop {
            let out = grid.grid(&["status", &job, "--json"])?;
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("\"state\":\"done\"") {
                break started.elapsed();
            }
            if text.contains("\"state\":\"failed\"") || text.contains("\"state\":\"cancelled\"") {
                bail!("the job ended {text}");
            }
            if Instant::now() > deadline {
                bail!("the job did not finish within 5 min: {text}");
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let during = during
            .join()
            .map_err(|_| anyhow::anyhow!("the fault's thread panicked"))??;
        Ok((wall, during))
    })?;
    // Results a cut-off node finished meanwhile arrive once its link is back: give them time to
    // be dropped (or, wrongly, counted) before the ledger is read.
    std::thread::sleep(Duration::from_secs(3));

    let results = grid.dir.join(format!("results-{job}"));
    let out = grid.grid(&["results", &job, "-o", path(&results)?])?;
    if !out.status.success() {
        bail!("results: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let seen = manifest::read(&results.join("manifest.jsonl"))?;
    let out = grid.grid(&["usage", "--job", &job, "--json"])?;
    if !out.status.success() {
        bail!("usage: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let usage: serde_json::Value = serde_json::from_slice(&out.stdout).context("usage --json")?;
    let ledger_attempts = usage["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["job_id"] == job.as_str())
        .filter_map(|j| j["attempts"].as_u64())
        .sum();
    let nodes = |n: &str| n.starts_with("node-");
    Ok(Outcome {
        wall,
        during,
        tasks: seen,
        ledger_attempts,
        duplicates: grid.count_in_logs(|n| n == "broker", "duplicate result ignored")
            + grid.count_in_logs(nodes, "duplicate result dropped by JetStream"),
        redeliveries: grid.count_in_logs(nodes, "redelivered task"),
    })
}

/// The chaos run's checks, and the ledger's; what is wrong, if anything.
fn check(outcome: &Outcome, calm: Option<&Outcome>, tasks: u64) -> Vec<String> {
    let mut problems = manifest::check(&outcome.tasks, calm.map(|c| &c.tasks), tasks, RETRIES + 1);
    let attempts: u64 = outcome.tasks.values().map(|t| t.attempts).sum();
    if outcome.ledger_attempts != attempts {
        problems.push(format!(
            "the ledger holds {} attempts, the results {attempts}",
            outcome.ledger_attempts
        ));
    }
    problems
}

fn json_field(text: &str, field: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text.lines().next()?).ok()?;
    v[field].as_str().map(str::to_string)
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
