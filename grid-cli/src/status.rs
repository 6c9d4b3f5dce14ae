//! Watching jobs and nodes: `grid status` (with `--wait` and `--watch`), `grid jobs`, `grid
//! nodes`, and the progress bar of every `--wait`.

use crate::conn::{Conn, Session, runtime};
use anyhow::{Result, anyhow};
use clap::Args;
use futures::StreamExt;
use grid_client::Grid;
use grid_proto::{JobRecord, JobState, TaskRecord, TaskState, decode, names};
use serde_json::json;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

/// Waits for the job to end, with a progress bar on stderr when it is a terminal.
async fn follow(grid: &Session, job: &str) -> Result<JobRecord> {
    // Subscribed before the first read: no change between them goes unheard.
    let mut changes = grid
        .client
        .subscribe(names::job_events(&grid.tenant, job))
        .await
        .map_err(|e| anyhow!("following job {job}: {e}"))?;
    let mut record = grid.job_record(job).await?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(record.counts.total);
        bar.enable_steady_tick(Duration::from_millis(200));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} ({rate}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&rate(state.per_sec()));
                },
            ),
        );
        bar
    });
    let mut warned = false;
    // Long ago: the first poll reads the nodes.
    let mut nodes_read = tokio::time::Instant::now()
        .checked_sub(NODES_READ_EVERY)
        .unwrap_or_else(tokio::time::Instant::now);
    let mut told = std::collections::HashSet::new();
    // Ctrl-C stops the waiting, not the job: it says so, and how to go on.
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    // What live nodes are doing before they can run tasks (compiling a runtime), by node.
    let mut preparing: Vec<(String, grid_proto::Preparing)> = Vec::new();
    loop {
        if let Some(bar) = &bar {
            let c = &record.counts;
            bar.set_position(c.succeeded + c.failed);
            let now = grid_client::now_unix_ms();
            // A node's words: shown, not obeyed, on a terminal.
            let busy: String = preparing
                .iter()
                .map(|(node, p)| {
                    crate::terminal::for_stderr(&format!(" · {node} {}", p.progress(now)))
                        .into_owned()
                })
                .collect();
            bar.set_message(format!(
                "failed {} running {} waiting {}{busy}",
                c.failed,
                c.running,
                waiting(&record)
            ));
        }
        if record.state.is_final() {
            break;
        }
        // Told by the broker when the record changes (a KV watch would need leave to read
        // every job's record); read again at least every half second in case a word is lost.
        let started = tokio::time::Instant::now();
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_millis(500), changes.next()) => {}
            _ = &mut interrupted => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                eprintln!("{}", left_running(job));
                std::process::exit(130);
            }
        }
        // A closed subscription answers at once: no busy loop. Short, so that a job's end is
        // seen when it is told (the broker tells of a running job's progress once a tick,
        // 100 ms, anyway): a floor of 100 ms here added up to 100 ms to every `--wait`.
        tokio::time::sleep_until(started + Duration::from_millis(20)).await;
        record = grid.job_record(job).await?;
        // Nodes' heartbeats are read (a listing costs the server a consumer) only while none
        // of the job's tasks runs, and at most every 2 s: what they prepare is news only then.
        if record.counts.running > 0 {
            preparing.clear();
        }
        {
            if record.counts.running == 0 && nodes_read.elapsed() >= NODES_READ_EVERY {
                nodes_read = tokio::time::Instant::now();
                // A quiet job may be waiting for a node that prepares a runtime: the bar shows
                // how far along it is; a line says so once.
                preparing.clear();
                for node in grid.live_nodes().await.unwrap_or_default() {
                    let Some(p) = node.preparing else { continue };
                    if !record.state.is_final() && told.insert((node.id.clone(), p.what.clone())) {
                        let about = match p.estimate_ms {
                            0 => String::new(),
                            ms => format!(
                                ", about {}",
                                grid_proto::units::duration_text(Duration::from_secs(
                                    ms.div_ceil(1000)
                                ))
                            ),
                        };
                        // A compile serves the machine's nodes (their cache is shared); a fetch
                        // lays the files out in the node's own folder.
                        let once = match p.what.starts_with("compiling") {
                            true => "once per machine",
                            false => "once per node",
                        };
                        // The node's own words: shown, not obeyed, on a terminal.
                        let note = format!(
                            "grid: node {} is {} ({once}{about}); its tasks start once that is done",
                            crate::terminal::for_stderr(&node.id),
                            crate::terminal::for_stderr(&p.what)
                        );
                        match &bar {
                            Some(bar) => bar.println(note),
                            None => eprintln!("{note}"),
                        }
                    }
                    preparing.push((node.id, p));
                }
                if !warned
                    && !record.state.is_final()
                    && let Some(note) = no_nodes_note(grid, &record).await
                {
                    warned = true;
                    match &bar {
                        Some(bar) => bar.println(note),
                        None => eprintln!("{note}"),
                    }
                }
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(record)
}

/// Tasks per second as a person reads them: `2.5/s`, `37/s`, `1,204/s`.
fn rate(per_sec: f64) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        return "0/s".into();
    }
    if per_sec < 10.0 {
        return format!("{per_sec:.1}/s");
    }
    let whole = per_sec.round() as u64;
    let digits = whole.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{grouped}/s")
}

/// `--wait`: follows the job to its end and prints its status; exit status 0 only if it is done.
pub(crate) async fn follow_to_end(grid: &Session, job: &str, json: bool) -> Result<ExitCode> {
    let record = follow(grid, job).await?;
    print_status(&record, json);
    if !json && let Some(hint) = retry_hint(&record) {
        eprintln!("{hint}");
    }
    Ok(wait_exit_code(&record))
}

/// What a user who stopped waiting (Ctrl-C) is told: the job goes on.
fn left_running(job: &str) -> String {
    format!(
        "grid: stopped waiting; job {job} keeps running: `grid status {job} --wait` follows it again, `grid cancel {job}` stops it"
    )
}

/// What to do about a failed job: for a task over a limit a flag raises, `grid retry` with
/// that flag; for another failure, where to read why.
fn retry_hint(record: &JobRecord) -> Option<String> {
    if record.state != JobState::Failed {
        return None;
    }
    let id = &record.id;
    let reason = record.reason.as_deref().unwrap_or_default();
    Some(
        match crate::flags::limit_named(reason)
            .and_then(|limit| crate::flags::raise_hint(limit, &record.spec.limits))
        {
            Some((was, flag)) => format!(
                "grid: a task ran out of room ({was}): give the failed tasks more with `grid retry {id} --failed {flag}`"
            ),
            None => format!(
                "grid: why each task failed: `grid status {id} --failed`, `grid logs {id} --failed`"
            ),
        },
    )
}

/// The exit status of a `--wait` that followed the job to `record`: 0 only if it is done.
fn wait_exit_code(record: &JobRecord) -> ExitCode {
    if record.state == JobState::Done {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A line saying that no live node serves the job's class, so it cannot make progress now.
async fn no_nodes_note(grid: &Grid, record: &JobRecord) -> Option<String> {
    let class = &record.spec.class;
    let nodes = grid.live_nodes().await.ok()?;
    (!nodes.iter().any(|n| n.classes.contains(class))).then(|| {
        format!(
            "grid: no node of class {class} is online; job {} waits until one joins \
             (`grid cancel {}` drops it)",
            record.id, record.id
        )
    })
}

pub(crate) fn status_json(record: &JobRecord) -> serde_json::Value {
    let c = &record.counts;
    let finished = c.succeeded + c.failed + c.disputed + c.cancelled;
    json!({
        "job_id": record.id,
        "name": record.spec.name,
        "state": record.state.as_str(),
        "reason": record.reason,
        "retried": record.retried,
        // What the job's tasks draw their numbers from (`--seed`, or the one submit drew).
        "seed": record.spec.seed,
        "tasks": {
            "total": c.total,
            // Not sent out yet; sent out but not started (in the queue, or held by a node
            // until a slot frees); started on a node.
            "queued": c.total.saturating_sub(finished + c.in_flight),
            "waiting": c.in_flight.saturating_sub(c.running),
            "running": c.running,
            "succeeded": c.succeeded,
            "failed": c.failed,
            "disputed": c.disputed,
            "cancelled": c.cancelled,
        }
    })
}

/// Tasks of a job that have not started: not sent out yet, in the queue, or held by a node
/// until one of its slots frees.
fn waiting(record: &JobRecord) -> u64 {
    let c = &record.counts;
    c.total
        .saturating_sub(c.succeeded + c.failed + c.disputed + c.cancelled + c.running)
}

pub(crate) fn print_status(record: &JobRecord, as_json: bool) {
    if as_json {
        println!("{}", crate::terminal::json_line(&status_json(record)));
        return;
    }
    let c = &record.counts;
    let disputed = if c.disputed > 0 {
        format!(", {} disputed", c.disputed)
    } else {
        String::new()
    };
    let retried = match record.retried {
        0 => String::new(),
        1 => ", retried once".into(),
        n => format!(", retried {n} times"),
    };
    anstream::println!(
        "job {}: {} — {} of {} succeeded, {} failed{disputed}, {}{retried}{}",
        record.id,
        crate::style::state(record.state.as_str()),
        c.succeeded,
        c.total,
        c.failed,
        match record.state {
            JobState::Cancelled => format!("{} cancelled", c.cancelled),
            _ => format!("{} running, {} waiting", c.running, waiting(record)),
        },
        // A reason may quote a provider or a guest: shown, not obeyed, on a terminal.
        record
            .reason
            .as_ref()
            .filter(|r| *r != record.state.as_str())
            .map(|r| format!(" ({})", crate::terminal::for_stdout(r)))
            .unwrap_or_default()
    );
}

/// `grid status --watch`: the status line each time it changes, until the job ends. On a
/// terminal the line is redrawn in place, with the nodes' activity under it.
async fn watch(grid: &Session, job: &str, as_json: bool) -> Result<JobRecord> {
    let mut changes = grid
        .client
        .subscribe(names::job_events(&grid.tenant, job))
        .await
        .map_err(|e| anyhow!("watching job {job}: {e}"))?;
    let terminal = std::io::stdout().is_terminal() && !as_json;
    let mut last = None;
    loop {
        let record = grid.job_record(job).await?;
        if terminal {
            // Home, clear, then the status and a line per node.
            print!("\x1b[H\x1b[2J");
            print_status(&record, false);
            for node in grid.live_nodes().await.unwrap_or_default() {
                anstream::println!(
                    "  {}  running {} of {} slots, {} held, {} done",
                    crate::style::dim(&crate::terminal::for_stdout(&node.id)),
                    node.running,
                    node.slots,
                    node.busy,
                    node.tasks_done
                );
            }
            let _ = std::io::Write::flush(&mut std::io::stdout());
        } else if last.as_ref() != Some(&(record.state, record.counts.clone())) {
            print_status(&record, as_json);
        }
        if record.state.is_final() {
            return Ok(record);
        }
        last = Some((record.state, record.counts.clone()));
        let started = tokio::time::Instant::now();
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.next()).await;
        // A closed subscription answers at once: still one read a second at most.
        tokio::time::sleep_until(started + Duration::from_millis(200)).await;
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(value_name = "JOB", help = crate::help::JOB)]
    pub job: String,
    /// Follow the job to its end; exit 0 only if it is done (1 if it failed or was cancelled),
    /// as `grid submit --wait` does.
    #[arg(long)]
    pub wait: bool,
    /// Show the status as it changes (redrawn in place on a terminal) until the job ends.
    #[arg(long, conflicts_with = "wait")]
    pub watch: bool,
    /// Also list the failed and disputed tasks, a line each in index order: why each failed
    /// and after how many attempts (at most 1,000 lines; `--json` lists them all, as the
    /// status's `failed` array of `{index, state, reason, attempts, failures, node, round}`).
    #[arg(long, conflicts_with = "watch")]
    pub failed: bool,
    /// Print the status as one JSON object: job_id, name, state, reason, retried, seed and
    /// tasks {total, queued, running, succeeded, failed, disputed, cancelled}; with --watch,
    /// one line per change.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

pub fn status(args: StatusArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("status").await?;
        let job = grid.resolve_job(&args.job).await?;
        let record = if args.wait {
            follow(&grid, &job).await?
        } else if args.watch {
            watch(&grid, &job, args.json).await?
        } else {
            grid.job_record(&job).await?
        };
        if args.failed {
            print_failed(&grid, &record, args.json).await?;
        } else if !args.watch {
            print_status(&record, args.json);
        }
        if !record.state.is_final()
            && let Some(note) = no_nodes_note(&grid, &record).await
        {
            eprintln!("{note}");
        }
        // As `grid submit --wait`: 0 only for a job that is done.
        Ok(if args.wait {
            wait_exit_code(&record)
        } else {
            ExitCode::SUCCESS
        })
    })
}

/// Whether `task` is one of its job's failures now: failed or disputed in the job's latest
/// round. An earlier round's failure that `grid retry` is running again is not, as the job's
/// counts do not count it.
pub(crate) fn failed_now(task: &TaskRecord, job: &JobRecord) -> bool {
    task.state != TaskState::Succeeded && task.round >= job.retried
}

/// Calls `each` with every task record of `job` that is a failure now ([`failed_now`]), in the
/// order the tasks were decided. One ordered read of the job's records rather than a `get` per
/// index: a job may have a million tasks, and none is read when its counts have no failure.
pub(crate) async fn for_each_failed(
    grid: &Grid,
    job: &JobRecord,
    mut each: impl FnMut(TaskRecord),
) -> Result<()> {
    if job.counts.failed + job.counts.disputed == 0 {
        return Ok(());
    }
    let prefix = format!("{}.{}", job.spec.tenant, job.id);
    let mut records = grid
        .kv_follow(
            names::TASKS_BUCKET,
            Some(&prefix),
            async_nats::jetstream::consumer::DeliverPolicy::LastPerSubject,
        )
        .await?;
    while let Some(entry) = records.next_until_caught_up().await {
        let Some(bytes) = entry?.value else {
            continue;
        };
        if let Ok(task) = decode::<TaskRecord>(&bytes)
            && failed_now(&task, job)
        {
            each(task);
        }
    }
    Ok(())
}

/// How often `--wait` reads the nodes' heartbeats while none of its job's tasks runs.
const NODES_READ_EVERY: Duration = Duration::from_secs(2);

/// Lines of failed tasks `grid status --failed` prints; `--json` has them all.
const FAILED_LINES: usize = 1000;

/// One failed or disputed task, as `grid status --failed` shows it.
struct FailedTask {
    index: u64,
    state: TaskState,
    reason: Option<String>,
    /// The guest's last line of stderr (see `grid_proto::ResultMsg::detail`).
    detail: Option<String>,
    attempts: u32,
    failures: Vec<String>,
    node: String,
    round: u32,
    votes: usize,
}

impl FailedTask {
    fn of(task: &TaskRecord) -> Self {
        Self {
            index: task.result.index,
            state: task.state,
            reason: task.result.outcome.reason().map(|r| r.to_string()),
            detail: task.result.detail.clone(),
            attempts: task.attempts,
            failures: task.failures.clone(),
            node: task.result.node_id.clone(),
            round: task.round,
            votes: task.votes.len(),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "index": self.index,
            "state": self.state.as_str(),
            "reason": self.reason,
            "detail": self.detail,
            "attempts": self.attempts,
            "failures": self.failures,
            "node": self.node,
            "round": self.round,
        })
    }

    /// `task 3: failed: exit: 1 (1 attempt, on node-0)`; the failures of earlier attempts are
    /// listed when there were any.
    fn line(&self) -> String {
        let what = match (self.state, &self.reason) {
            (TaskState::Disputed, _) => format!("disputed: its {} replicas disagreed", self.votes),
            (_, Some(reason)) => match &self.detail {
                Some(detail) => format!("failed: {reason} — {detail}"),
                None => format!("failed: {reason}"),
            },
            (_, None) => "failed".to_string(),
        };
        let attempts = match self.attempts {
            1 => "1 attempt".to_string(),
            n => format!("{n} attempts"),
        };
        let how = if self.failures.len() > 1 {
            format!("{attempts}: {}", self.failures.join(", "))
        } else {
            format!("{attempts}, on {}", self.node)
        };
        // A reason or node is a provider's word, on one line.
        grid_proto::one_line(&format!("task {}: {what} ({how})", self.index), " ")
    }
}

/// The lowest-indexed `keep` of the failed tasks offered (all of them when `None`), holding at
/// most twice `keep` at once however many are offered: a job may have a million failures.
struct Lowest {
    keep: Option<usize>,
    kept: Vec<FailedTask>,
    offered: u64,
}

impl Lowest {
    fn new(keep: Option<usize>) -> Self {
        Self {
            keep,
            kept: Vec::new(),
            offered: 0,
        }
    }

    fn offer(&mut self, task: FailedTask) {
        self.offered += 1;
        self.kept.push(task);
        if let Some(keep) = self.keep
            && self.kept.len() >= 2 * keep.max(1)
        {
            self.kept.sort_by_key(|t| t.index);
            self.kept.truncate(keep);
        }
    }

    /// The tasks kept, in index order, and how many were offered.
    fn into_sorted(mut self) -> (Vec<FailedTask>, u64) {
        self.kept.sort_by_key(|t| t.index);
        if let Some(keep) = self.keep {
            self.kept.truncate(keep);
        }
        (self.kept, self.offered)
    }
}

/// The failed tasks of `job` in index order, at most `keep` of them (all when `None`), and
/// how many there are.
async fn failed_tasks(
    grid: &Grid,
    job: &JobRecord,
    keep: Option<usize>,
) -> Result<(Vec<FailedTask>, u64)> {
    let mut lowest = Lowest::new(keep);
    for_each_failed(grid, job, |task| lowest.offer(FailedTask::of(&task))).await?;
    Ok(lowest.into_sorted())
}

/// `grid status JOB --failed`: the status, then the failed tasks (see [`StatusArgs::failed`]).
async fn print_failed(grid: &Grid, record: &JobRecord, as_json: bool) -> Result<()> {
    if as_json {
        let (failed, _) = failed_tasks(grid, record, None).await?;
        let mut status = status_json(record);
        status["failed"] = failed.iter().map(FailedTask::json).collect();
        println!("{}", crate::terminal::json_line(&status));
        return Ok(());
    }
    let (failed, total) = failed_tasks(grid, record, Some(FAILED_LINES)).await?;
    print_status(record, false);
    for task in &failed {
        println!("  {}", crate::terminal::for_stdout(&task.line()));
    }
    let more = total.saturating_sub(failed.len() as u64);
    if more > 0 {
        eprintln!(
            "grid: … and {more} more failed tasks; `grid status {} --failed --json` lists them all",
            record.id
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print one JSON object per line (what each holds: `grid jobs --help`, `grid nodes
    /// --help`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

pub fn jobs(args: ListArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("jobs").await?;
        let entries = grid.entries(names::JOBS_BUCKET, Some(&grid.tenant)).await?;
        if entries.is_empty() && !args.json {
            eprintln!(
                "grid: no jobs of tenant {} yet: submit one with `grid submit JOB.wasm --tasks N`",
                grid.tenant
            );
        }
        let now = grid_client::now_unix_ms();
        for (_, bytes) in entries {
            let Ok(record) = decode::<JobRecord>(&bytes) else {
                continue;
            };
            if args.json {
                let mut v = status_json(&record);
                v["module"] = json!(record.spec.module_name);
                v["created_unix_ms"] = json!(record.created_unix_ms);
                println!("{}", crate::terminal::json_line(&v));
            } else {
                anstream::println!("{}", job_line(&record, now));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// One job in `grid jobs`: id, name, module, state, progress and age, in columns.
fn job_line(record: &JobRecord, now_ms: u64) -> String {
    let c = &record.counts;
    let name = match record.spec.name.as_str() {
        "" => "-",
        name => name,
    };
    let failed = match c.failed + c.disputed {
        0 => String::new(),
        n => format!(", {n} failed"),
    };
    // Padded before it is coloured: the colour's escapes take no room on the screen.
    let state = record.state.as_str();
    let pad = " ".repeat(9usize.saturating_sub(state.len()));
    format!(
        "{}  {:<16}  {:<20}  {}{pad}  {:>7} of {} succeeded{failed}  {}",
        record.id,
        crate::terminal::for_stdout(name),
        crate::terminal::for_stdout(&record.spec.module_name),
        crate::style::state(state),
        c.succeeded,
        c.total,
        age(now_ms.saturating_sub(record.created_unix_ms))
    )
}

/// How long ago, as a person says it: `42s ago`, `5min ago`, `3h ago`, `2d ago`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}min ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

pub fn nodes(args: ListArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("nodes").await?;
        let nodes = grid.live_nodes().await?;
        if nodes.is_empty() && !args.json {
            eprintln!(
                "grid: no node is online: start one with `grid up`, or `grid-node --nats URL --creds FILE` on a provider's machine"
            );
        }
        for node in nodes {
            let tally = match grid.tally().await?.get(&node.id).await {
                Ok(Some(bytes)) => decode::<grid_proto::NodeTally>(&bytes).unwrap_or_default(),
                _ => grid_proto::NodeTally::default(),
            };
            if args.json {
                println!(
                    "{}",
                    crate::terminal::json_line(&json!({"id": node.id, "classes": node.classes, "gpu": node.gpu, "slots": node.slots, "busy": node.busy, "running": node.running, "memory_reserved_bytes": node.memory_reserved_bytes, "memory_budget_bytes": node.memory_budget_bytes, "tasks_done": node.tasks_done, "votes_agreed": tally.agreed, "votes_lost": tally.outvoted, "preparing": node.preparing, "runtimes_ready": node.runtimes_ready, "accepts": {"memory_bytes": node.accepts.memory_bytes, "timeout_ms": node.accepts.timeout_ms, "max_output_bytes": node.accepts.max_output_bytes, "gpu_memory_bytes": node.accepts.gpu_memory_bytes, "gpu_time_ms": node.accepts.gpu_time_ms}}))
                );
            } else {
                // A node's words are its provider's: shown, not obeyed, on a terminal.
                use crate::terminal::for_stdout;
                let gpu = node.gpu.as_deref().map(|g| format!("  gpu {}", for_stdout(g))).unwrap_or_default();
                let preparing = node.preparing.as_ref().map(|p| format!("  ({})", for_stdout(&p.progress(grid_client::now_unix_ms())))).unwrap_or_default();
                let ready = if node.runtimes_ready.is_empty() { String::new() } else { format!("  {} ready", for_stdout(&node.runtimes_ready.join(", "))) };
                let votes = if tally.agreed + tally.outvoted > 0 {
                    format!("  votes agreed {} lost {}", tally.agreed, tally.outvoted)
                } else {
                    String::new()
                };
                println!(
                    // Held: handed to it, running or waiting for one of its slots.
                    "{}  {}  running {} of {} slots, {} held  memory {} of {}  done {}{votes}{gpu}{ready}{preparing}",
                    for_stdout(&node.id),
                    for_stdout(&node.classes.join(",")),
                    node.running,
                    node.slots,
                    node.busy,
                    bytesize::ByteSize(node.memory_reserved_bytes),
                    bytesize::ByteSize(node.memory_budget_bytes),
                    node.tasks_done
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(index: u64) -> FailedTask {
        FailedTask {
            index,
            state: TaskState::Failed,
            reason: Some("exit: 1".into()),
            detail: None,
            attempts: 1,
            failures: vec!["exit: 1".into()],
            node: "node-0".into(),
            round: 0,
            votes: 0,
        }
    }

    #[test]
    fn the_failed_listing_keeps_the_lowest_indices_in_bounded_memory() {
        let mut lowest = Lowest::new(Some(3));
        // Decided in no particular order, as a job's records are read.
        for index in (0..10_000u64).rev().map(|i| (i * 7919) % 10_000) {
            lowest.offer(failed(index));
            assert!(lowest.kept.len() < 6, "{} held", lowest.kept.len());
        }
        let (kept, offered) = lowest.into_sorted();
        let indices: Vec<u64> = kept.iter().map(|t| t.index).collect();
        assert_eq!(indices, [0, 1, 2]);
        assert_eq!(offered, 10_000);

        let mut all = Lowest::new(None);
        for index in [5, 1, 3] {
            all.offer(failed(index));
        }
        let (kept, offered) = all.into_sorted();
        assert_eq!(kept.iter().map(|t| t.index).collect::<Vec<_>>(), [1, 3, 5]);
        assert_eq!(offered, 3);
    }

    #[test]
    fn a_failed_task_reads_as_one_line_with_why() {
        assert_eq!(
            failed(3).line(),
            "task 3: failed: exit: 1 (1 attempt, on node-0)"
        );
        let retried = FailedTask {
            attempts: 3,
            reason: Some("trap: unreachable\nat 0x2a".into()),
            failures: vec![
                "lost".into(),
                "lost".into(),
                "trap: unreachable\nat 0x2a".into(),
            ],
            ..failed(7)
        };
        assert_eq!(
            retried.line(),
            "task 7: failed: trap: unreachable at 0x2a (3 attempts: lost, lost, trap: unreachable at 0x2a)"
        );
        let disputed = FailedTask {
            state: TaskState::Disputed,
            reason: None,
            failures: Vec::new(),
            votes: 3,
            ..failed(9)
        };
        assert_eq!(
            disputed.line(),
            "task 9: disputed: its 3 replicas disagreed (1 attempt, on node-0)"
        );
        let as_json = failed(3).json();
        assert_eq!(as_json["index"], 3);
        assert_eq!(as_json["reason"], "exit: 1");
        assert_eq!(as_json["failures"], json!(["exit: 1"]));
    }

    #[test]
    fn rates_read_as_a_person_writes_them() {
        assert_eq!(rate(2.5212), "2.5/s");
        assert_eq!(rate(37.4), "37/s");
        assert_eq!(rate(1204.2), "1,204/s");
        assert_eq!(rate(0.0), "0/s");
        assert_eq!(rate(f64::NAN), "0/s");
    }
}
