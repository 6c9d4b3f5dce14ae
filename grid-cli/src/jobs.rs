//! The commands that talk to a grid: submit, status, jobs, nodes, results, logs, cancel.

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use futures::StreamExt;
use grid_client::Grid;
use grid_proto::{
    ApiReply, CancelRequest, InputRef, JobLimits, JobRecord, JobSpec, JobState, SubmitRequest,
    TaskRecord, TaskSource, TaskState, decode, encode, names,
};
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::run::TaskFlags;

/// `--nats URL` and `--creds FILE`, shared by every command that talks to a grid.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// NATS server(s) of the grid [default: GRID_NATS_URL or nats://127.0.0.1:4222]
    #[arg(long, value_name = "URL", global = true)]
    pub nats: Option<String>,
    /// Your credentials on the grid (`grid tenant add` makes them) [default: GRID_CREDS, else
    /// the default tenant's of `grid up` in its default data dir]
    #[arg(long, value_name = "FILE", global = true)]
    pub creds: Option<PathBuf>,
}

/// A connection to a grid as one tenant: the tenant is the one the credentials name (the
/// default tenant on a grid without auth, and for the operator's credentials).
pub struct Session {
    pub grid: Grid,
    pub tenant: String,
    /// Who the credentials name (`None` on a grid without auth).
    pub identity: Option<grid_client::auth::Identity>,
}

impl std::ops::Deref for Session {
    type Target = Grid;
    fn deref(&self) -> &Grid {
        &self.grid
    }
}

impl Conn {
    /// Connects for `grid COMMAND`, a tenant's command: a provider's credentials are refused
    /// here, with the line to fix it, rather than by the server after a timeout.
    pub async fn open(&self, command: &str) -> Result<Session> {
        let url = grid_client::nats_url(self.nats.as_deref());
        let creds = grid_client::auth::creds_path(self.creds.as_deref());
        // Read once: who the credentials name, and what the connection presents.
        let text = creds
            .as_deref()
            .map(grid_client::auth::read_creds)
            .transpose()?;
        let identity = match (&text, &creds) {
            (Some(text), Some(path)) => Some(
                grid_client::auth::Identity::of_creds(text)
                    .with_context(|| format!("credentials {}", path.display()))?,
            ),
            _ => None,
        };
        if let Some(who) = &identity
            && who.role == grid_client::auth::Role::Provider
        {
            bail!(
                "permission denied: provider {} cannot use `grid {command}` (a tenant's command: pass a tenant's --creds)",
                who.name
            );
        }
        let tenant = match &identity {
            Some(who) if who.role == grid_client::auth::Role::Tenant => who.name.clone(),
            _ => names::DEFAULT_TENANT.to_string(),
        };
        let client = grid_client::connect_with_text(&url, false, text.as_deref()).await?;
        Ok(Session {
            grid: Grid::open(client).await?,
            tenant,
            identity,
        })
    }
}

impl Session {
    /// Whose jobs these credentials may read: a tenant's own (`Some`), or every tenant's for the
    /// operator and on a grid without auth (`None`).
    pub fn scope(&self) -> Option<String> {
        match &self.identity {
            Some(who) if who.role == grid_client::auth::Role::Tenant => Some(who.name.clone()),
            _ => None,
        }
    }

    /// Asks the broker `verb` (`grid.api.<tenant>.<verb>`) and decodes its reply.
    pub async fn ask<T: grid_proto::Message>(&self, verb: &str, request: &T) -> Result<ApiReply> {
        let reply = self
            .client
            .request(
                names::api_subject(&self.tenant, verb),
                encode(request).into(),
            )
            .await
            .map_err(|e| {
                anyhow!("no broker answered ({e}); is `grid up` or `grid-broker` running?")
            })?;
        decode::<ApiReply>(&reply.payload).map_err(|e| anyhow!("{e}"))
    }

    /// The tenant's object store, made by the broker on first use.
    async fn ensure_store(&self) -> Result<()> {
        match self.store(&self.tenant).await {
            Ok(_) => Ok(()),
            Err(e) if e.downcast_ref::<grid_client::NoStore>().is_some() => {
                match self.ask("storage", &grid_proto::StorageRequest {}).await? {
                    ApiReply::Err(why) => bail!("{why}"),
                    _ => self.store(&self.tenant).await.map(drop),
                }
            }
            Err(e) => Err(e),
        }
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A failure that is the job's or the input's, not a usage error: exit code 1.
#[derive(Debug)]
pub struct Refused(pub String);
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Refused {}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The job: a WASI preview 1 command module (.wasm), or a program for a runtime (job.py).
    pub module: PathBuf,
    /// Run N tasks with empty stdin.
    #[arg(long, conflicts_with_all = ["params", "input"])]
    pub tasks: Option<u64>,
    /// One task per non-blank line of this JSONL file (the line is the task's stdin).
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "input")]
    pub params: Option<PathBuf>,
    /// One task per file of DIR, in byte order of name; each sees its file at /in/<name>.
    #[arg(long, value_name = "DIR")]
    pub input: Option<PathBuf>,
    /// Files every task sees read-only at /in/shared/.
    #[arg(long, value_name = "DIR")]
    pub shared: Option<PathBuf>,
    /// Attempts after the first for a task that fails or is lost.
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    #[command(flatten)]
    pub task: TaskFlags,
    /// Run each task on K distinct nodes and compare their results (outcome and outputs).
    #[arg(long, value_name = "K")]
    pub replicas: Option<u32>,
    /// With --replicas: how many must agree for a result to count [default: a majority]
    #[arg(long, value_name = "Q")]
    pub quorum: Option<u32>,
    /// Run on nodes with a GPU: tasks get it through grid_gpu_v1 (the grid must have one).
    #[arg(long)]
    pub gpu: bool,
    /// Follow the job to its end (progress bar on a terminal), then print its status.
    #[arg(long)]
    pub wait: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
    /// Arguments for every task.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// Checks that every non-blank line of the params file at `path` is JSON, reading it a line at
/// a time.
fn check_params(path: &Path) -> Result<()> {
    use std::io::BufRead;
    let cannot = || format!("cannot read params file {}", path.display());
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).with_context(cannot)?);
    let mut line = Vec::new();
    for n in 1.. {
        line.clear();
        if reader.read_until(b'\n', &mut line).with_context(cannot)? == 0 {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&line) {
            bail!("{} line {n} is not valid JSON: {e}", path.display());
        }
    }
    Ok(())
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
    {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| anyhow!("file name {n:?} is not UTF-8"))?;
        let bytes = std::fs::read(entry.path())
            .with_context(|| format!("cannot read {}", entry.path().display()))?;
        files.push((name, bytes));
    }
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(files)
}

pub fn submit(args: SubmitArgs) -> Result<ExitCode> {
    let replicas = args.replicas.unwrap_or(1);
    let quorum = args.quorum.unwrap_or(replicas / 2 + 1);
    if !(1..=16).contains(&replicas) || !(1..=replicas).contains(&quorum) {
        bail!("--replicas must be 1..=16 and --quorum 1..=replicas (got {replicas} and {quorum})");
    }
    let program_runtime = args.task.runtime_for(&args.module)?;
    let module = std::fs::read(&args.module)
        .with_context(|| format!("cannot read {}", args.module.display()))?;
    // A program: the job's module is its runtime's, read from this machine and sent along.
    let runtime_files = match program_runtime {
        Some(runtime) => {
            let artifacts = grid_client::find_runtime(runtime)?;
            let read = |path: &Path, pin: &str| -> Result<Vec<u8>> {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let sha = grid_proto::Sha256Hex::of(&bytes);
                if sha.to_string() != pin {
                    bail!(
                        "{} has sha256 {sha}, not the pinned {pin}: reinstall the {} runtime (`cargo xtask setup`)",
                        path.display(),
                        runtime.name
                    );
                }
                Ok(bytes)
            };
            Some((
                runtime,
                read(&artifacts.module, runtime.module_sha256)?,
                read(&artifacts.stdlib, runtime.stdlib_sha256)?,
                crate::run::program_file_name(&args.module)?,
            ))
        }
        None => None,
    };
    let sandbox_limits = args.task.limits();
    let limits = JobLimits {
        memory_bytes: sandbox_limits.memory_bytes,
        timeout_ms: sandbox_limits.timeout.as_millis() as u64,
        max_output_bytes: sandbox_limits.max_output_bytes,
        gpu_memory_bytes: sandbox_limits.gpu.max_buffer_bytes,
        gpu_time_ms: sandbox_limits.gpu.gpu_time.as_millis() as u64,
    };
    if program_runtime.is_none()
        && let Err(why) = grid_sandbox::validate::check_module(
            &module,
            &sandbox_limits,
            &grid_sandbox::CompileCaps::default(),
        )
    {
        return Err(Refused(format!("module {} refused: {why}", args.module.display())).into());
    }
    // Checked line by line here, before anything is uploaded, and paged while uploading:
    // a params file is never read whole (it may hold a million tasks).
    if let Some(path) = &args.params {
        check_params(path)?;
    }
    let inputs = args.input.as_deref().map(read_dir_sorted).transpose()?;
    let shared = args.shared.as_deref().map(read_dir_sorted).transpose()?;
    if inputs.as_ref().is_some_and(Vec::is_empty) {
        bail!(
            "--input {} has no files",
            args.input.as_deref().unwrap_or(Path::new("")).display()
        );
    }

    let rt = runtime()?;
    rt.block_on(async {
        let grid = args.conn.open("submit").await?;
        grid.ensure_store().await?;
        let tenant = grid.tenant.as_str();
        let (module_sha, program) = match &runtime_files {
            None => {
                let (module_sha, sent) = grid.put_object(tenant, &module).await?;
                tracing::info!(module = %module_sha, uploaded = sent, "module stored");
                (module_sha, None)
            }
            Some((runtime, runtime_module, stdlib, file_name)) => {
                // Stored once per grid: the next job finds them there and sends nothing.
                let (module_sha, sent) = grid.put_object(tenant, runtime_module).await?;
                let (stdlib_sha, _) = grid.put_object(tenant, stdlib).await?;
                tracing::info!(runtime = runtime.name, uploaded = sent, "runtime stored");
                let (program_sha, _) = grid.put_object(tenant, &module).await?;
                let program = grid_proto::ProgramRef {
                    runtime: runtime.name.to_string(),
                    file: InputRef { name: file_name.clone(), sha256: program_sha, bytes: module.len() as u64 },
                    stdlib_sha256: stdlib_sha,
                };
                (module_sha, Some(program))
            }
        };
        let upload = |files: Vec<(String, Vec<u8>)>| {
            let grid = grid.grid.clone();
            async move {
                let mut refs = Vec::new();
                for (name, bytes) in files {
                    let (sha, _) = grid.put_object(tenant, &bytes).await?;
                    refs.push(InputRef { name, sha256: sha, bytes: bytes.len() as u64 });
                }
                anyhow::Ok(refs)
            }
        };
        let tasks = if let Some(path) = &args.params {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot read params file {}", path.display()))?;
            let (mut pages, mut lines) = (Vec::new(), 0);
            for page in grid_proto::ParamsPager::new(std::io::BufReader::new(file)) {
                let (bytes, count) =
                    page.with_context(|| format!("cannot read params file {}", path.display()))?;
                let (sha256, _) = grid.put_object(tenant, &bytes).await?;
                pages.push(grid_proto::ParamsPage { sha256, lines: count });
                lines += count;
            }
            TaskSource::Params { pages, lines }
        } else if let Some(files) = inputs {
            TaskSource::Inputs(upload(files).await?)
        } else {
            TaskSource::Count(args.tasks.unwrap_or(1))
        };
        if tasks.is_empty() {
            bail!("the job has no tasks");
        }
        let spec = JobSpec {
            tenant: tenant.into(),
            class: if args.gpu { names::GPU_CLASS } else { names::DEFAULT_CLASS }.into(),
            module_sha256: module_sha,
            module_name: args.module.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            args: args.args.clone(),
            env: args.task.env.clone(),
            limits,
            seed: args.task.seed,
            retries: args.retries,
            replicas,
            quorum,
            tasks: tasks.clone(),
            shared: upload(shared.unwrap_or_default()).await?,
            program,
        };
        let job_id = match grid.ask("submit", &SubmitRequest { spec }).await? {
            ApiReply::Ok { job_id }
            | ApiReply::Deleted { job_id, .. }
            | ApiReply::Retrying { job_id, .. } => job_id,
            ApiReply::Err(why) => return Err(Refused(format!("job refused: {why}")).into()),
        };
        if !args.wait {
            if args.json {
                println!("{}", json!({"job_id": job_id, "tasks": tasks.len(), "module_sha256": module_sha.to_string()}));
            } else {
                println!("{job_id}");
                eprintln!("grid: submitted job {job_id} ({} tasks); follow it with `grid status {job_id} --wait`", tasks.len());
            }
            return Ok(ExitCode::SUCCESS);
        }
        follow_to_end(&grid, &job_id, args.json).await
    })
}

/// The tenant's job `job`; when it has none of that id, the broker says why in one line
/// (another tenant's job, or none at all).
pub(crate) async fn job_record(grid: &Session, job: &str) -> Result<JobRecord> {
    let bytes = if names::valid_name(job) {
        grid.jobs()
            .await?
            .get(names::job_key(&grid.tenant, job))
            .await
            .map_err(|e| anyhow!("reading job {job}: {e}"))?
    } else {
        None
    };
    let Some(bytes) = bytes else {
        return match grid
            .ask("owner", &grid_proto::OwnerRequest { job_id: job.into() })
            .await?
        {
            ApiReply::Err(why) => Err(anyhow!("{why}")),
            _ => Err(anyhow!("unknown job {job}")),
        };
    };
    decode::<JobRecord>(&bytes).map_err(|e| anyhow!("job {job}: {e}"))
}

/// Waits for the job to end, with a progress bar on stderr when it is a terminal.
async fn follow(grid: &Session, job: &str) -> Result<JobRecord> {
    // Subscribed before the first read: no change between them goes unheard.
    let mut changes = grid
        .client
        .subscribe(names::job_events(&grid.tenant, job))
        .await
        .map_err(|e| anyhow!("following job {job}: {e}"))?;
    let mut record = job_record(grid, job).await?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(record.counts.total);
        bar.enable_steady_tick(Duration::from_millis(200));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut warned = false;
    let mut polls = 0u64;
    let mut told = std::collections::HashSet::new();
    loop {
        if let Some(bar) = &bar {
            let c = &record.counts;
            bar.set_position(c.succeeded + c.failed);
            bar.set_message(format!("failed {} running {}", c.failed, c.in_flight));
        }
        if record.state.is_final() {
            break;
        }
        // Told by the broker when the record changes (a KV watch would need leave to read
        // every job's record); read again at least every half second in case a word is lost.
        let started = tokio::time::Instant::now();
        let _ = tokio::time::timeout(Duration::from_millis(500), changes.next()).await;
        // A closed subscription answers at once: no busy loop. Short, so that a job's end is
        // seen when it is told (the broker tells of a running job's progress once a tick,
        // 100 ms, anyway): a floor of 100 ms here added up to 100 ms to every `--wait`.
        tokio::time::sleep_until(started + Duration::from_millis(20)).await;
        record = job_record(grid, job).await?;
        polls += 1;
        {
            if polls.is_multiple_of(4) {
                // A quiet job may be waiting for a node that prepares a runtime: say so, once.
                for node in grid.live_nodes().await.unwrap_or_default() {
                    if let Some(what) = &node.preparing
                        && !record.state.is_final()
                        && told.insert((node.id.clone(), what.clone()))
                    {
                        let note = format!(
                            "grid: node {} is {what} (once per node; about a minute)",
                            node.id
                        );
                        match &bar {
                            Some(bar) => bar.println(note),
                            None => eprintln!("{note}"),
                        }
                    }
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

/// `--wait`: follows the job to its end and prints its status; exit status 0 only if it is done.
async fn follow_to_end(grid: &Session, job: &str, json: bool) -> Result<ExitCode> {
    let record = follow(grid, job).await?;
    print_status(&record, json);
    Ok(if record.state == JobState::Done {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
    let finished = c.succeeded + c.failed + c.disputed;
    json!({
        "job_id": record.id,
        "state": record.state.as_str(),
        "reason": record.reason,
        "retried": record.retried,
        "tasks": {
            "total": c.total,
            "queued": c.total.saturating_sub(finished + c.in_flight),
            "running": c.in_flight,
            "succeeded": c.succeeded,
            "failed": c.failed,
            "disputed": c.disputed,
        }
    })
}

fn print_status(record: &JobRecord, as_json: bool) {
    if as_json {
        println!("{}", status_json(record));
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
        "job {}: {} — {} of {} succeeded, {} failed{disputed}, {} running{retried}{}",
        record.id,
        crate::style::state(record.state.as_str()),
        c.succeeded,
        c.total,
        c.failed,
        c.in_flight,
        record
            .reason
            .as_ref()
            .map(|r| format!(" ({r})"))
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
        let record = job_record(grid, job).await?;
        if terminal {
            // Home, clear, then the status and a line per node.
            print!("\x1b[H\x1b[2J");
            print_status(&record, false);
            for node in grid.live_nodes().await.unwrap_or_default() {
                anstream::println!(
                    "  {}  running {} of {} slots, {} held, {} done",
                    crate::style::dim(&node.id),
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
    pub job: String,
    /// Follow the job to its end.
    #[arg(long)]
    pub wait: bool,
    /// Show the status as it changes (redrawn in place on a terminal) until the job ends.
    #[arg(long, conflicts_with = "wait")]
    pub watch: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

pub fn status(args: StatusArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("status").await?;
        let record = if args.wait {
            follow(&grid, &args.job).await?
        } else if args.watch {
            watch(&grid, &args.job, args.json).await?
        } else {
            job_record(&grid, &args.job).await?
        };
        if !args.watch {
            print_status(&record, args.json);
        }
        if !record.state.is_final()
            && let Some(note) = no_nodes_note(&grid, &record).await
        {
            eprintln!("{note}");
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

pub fn jobs(args: ListArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("jobs").await?;
        for (_, bytes) in grid.entries(names::JOBS_BUCKET, Some(&grid.tenant)).await? {
            let Ok(record) = decode::<JobRecord>(&bytes) else {
                continue;
            };
            if args.json {
                let mut v = status_json(&record);
                v["module"] = json!(record.spec.module_name);
                println!("{v}");
            } else {
                print_status(&record, false);
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn nodes(args: ListArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("nodes").await?;
        for node in grid.live_nodes().await? {
            let tally = match grid.tally().await?.get(&node.id).await {
                Ok(Some(bytes)) => decode::<grid_proto::NodeTally>(&bytes).unwrap_or_default(),
                _ => grid_proto::NodeTally::default(),
            };
            if args.json {
                println!(
                    "{}",
                    json!({"id": node.id, "classes": node.classes, "gpu": node.gpu, "slots": node.slots, "busy": node.busy, "running": node.running, "memory_reserved_bytes": node.memory_reserved_bytes, "memory_budget_bytes": node.memory_budget_bytes, "tasks_done": node.tasks_done, "votes_agreed": tally.agreed, "votes_lost": tally.outvoted, "preparing": node.preparing, "accepts": {"memory_bytes": node.accepts.memory_bytes, "timeout_ms": node.accepts.timeout_ms, "max_output_bytes": node.accepts.max_output_bytes, "gpu_memory_bytes": node.accepts.gpu_memory_bytes, "gpu_time_ms": node.accepts.gpu_time_ms}})
                );
            } else {
                let gpu = node.gpu.as_deref().map(|g| format!("  gpu {g}")).unwrap_or_default();
                let preparing = node.preparing.as_deref().map(|p| format!("  ({p})")).unwrap_or_default();
                let votes = if tally.agreed + tally.outvoted > 0 {
                    format!("  votes agreed {} lost {}", tally.agreed, tally.outvoted)
                } else {
                    String::new()
                };
                println!(
                    "{}  {}  slots {}  busy {}  memory {} of {}  done {}{votes}{gpu}{preparing}",
                    node.id,
                    node.classes.join(","),
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

pub(crate) async fn task_record(
    grid: &Session,
    job: &str,
    index: u64,
) -> Result<Option<TaskRecord>> {
    let bytes = grid
        .tasks()
        .await?
        .get(names::task_key(&grid.tenant, job, index))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    bytes
        .map(|b| decode::<TaskRecord>(&b).map_err(|e| anyhow!("task {index}: {e}")))
        .transpose()
}

/// A path from a result manifest, checked to stay inside the results folder.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    ok.then(|| p.to_path_buf())
}

#[derive(Args, Debug)]
pub struct ResultsArgs {
    pub job: String,
    /// Folder to write DIR/<index>/ and DIR/manifest.jsonl into.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: PathBuf,
    /// Also join every task's output file NAME, in task order, into one table DIR/NAME (a CSV
    /// or TSV header shared by the tasks is kept once); repeatable.
    #[arg(long, value_name = "NAME")]
    pub concat: Vec<String>,
    #[command(flatten)]
    pub conn: Conn,
}

/// Appends one task's `bytes` of a joined file: a first line equal to the header already
/// written is dropped for CSV and TSV files.
fn concat_into(joined: &mut Vec<u8>, name: &str, bytes: &[u8]) {
    let tabular = name.ends_with(".csv") || name.ends_with(".tsv");
    let header = |b: &[u8]| {
        b.split_inclusive(|c| *c == b'\n')
            .next()
            .map(<[u8]>::to_vec)
    };
    let mut rest = bytes;
    if tabular && !joined.is_empty() && header(joined) == header(bytes) {
        rest = &bytes[header(bytes).map_or(0, |h| h.len())..];
    }
    if !joined.is_empty() && !joined.ends_with(b"\n") {
        joined.push(b'\n');
    }
    joined.extend_from_slice(rest);
}

pub fn results(args: ResultsArgs) -> Result<ExitCode> {
    if let Some(bad) = args.concat.iter().find(|n| safe_relative(n).is_none()) {
        bail!("--concat {bad:?}: not a relative path inside the output folder");
    }
    runtime()?.block_on(async {
        let grid = args.conn.open("results").await?;
        let record = job_record(&grid, &args.job).await?;
        let tenant = record.spec.tenant.clone();
        std::fs::create_dir_all(&args.output).with_context(|| format!("cannot create {}", args.output.display()))?;
        let mut manifest = String::new();
        let mut collected = 0u64;
        let mut joined: Vec<(String, Vec<u8>, u64)> = args.concat.iter().map(|n| (n.clone(), Vec::new(), 0)).collect();
        for index in 0..record.counts.total {
            let Some(task) = task_record(&grid, &record.id, index).await? else {
                manifest.push_str(&format!("{}\n", json!({"index": index, "state": "pending"})));
                continue;
            };
            let dir = args.output.join(index.to_string());
            std::fs::create_dir_all(&dir)?;
            let r = &task.result;
            for file in &r.files {
                let Some(rel) = safe_relative(&file.path) else {
                    tracing::warn!(path = %file.path, "skipping an output with an unsafe path");
                    continue;
                };
                let bytes = grid.get_object(&tenant, &file.sha256).await?;
                let path = dir.join(rel);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                for (name, all, tasks) in joined.iter_mut().filter(|(n, _, _)| *n == file.path) {
                    concat_into(all, name, &bytes);
                    *tasks += 1;
                }
                std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            }
            collected += 1;
            let line = json!({
                "index": index,
                "state": task.state.as_str(),
                "votes": task.votes.iter().map(|v| json!({"replica": v.replica, "node": v.node_id, "agreed": v.agreed})).collect::<Vec<_>>(),
                "exit_code": r.outcome.exit_code(),
                "reason": r.outcome.reason().map(|x| x.to_string()),
                "attempts": task.attempts,
                "failures": task.failures,
                "node": r.node_id,
                "cpu_seconds": r.usage.cpu_seconds,
                "wall_seconds": r.usage.wall_seconds,
                "gpu_seconds": r.usage.gpu_seconds,
                "files": r.files.iter().map(|f| json!({"path": f.path, "bytes": f.bytes, "sha256": f.sha256.to_string()})).collect::<Vec<_>>(),
            });
            manifest.push_str(&format!("{line}\n"));
        }
        std::fs::write(args.output.join("manifest.jsonl"), manifest)?;
        for (name, all, tasks) in &joined {
            let path = args.output.join(safe_relative(name).unwrap_or_default());
            std::fs::write(&path, all).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("grid: {} joins {name} of {tasks} tasks", path.display());
        }
        eprintln!(
            "grid: {collected} of {} tasks collected into {} ({})",
            record.counts.total,
            args.output.display(),
            record.state.as_str()
        );
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    pub job: String,
    /// Only this task.
    #[arg(long)]
    pub task: Option<u64>,
    /// Keep printing tasks' logs as they finish, until the job ends.
    #[arg(long, conflicts_with = "task")]
    pub follow: bool,
    #[command(flatten)]
    pub conn: Conn,
}

async fn print_logs(grid: &Grid, tenant: &str, task: &TaskRecord) -> Result<()> {
    use std::io::Write;
    for (blob, to_stderr) in [(&task.result.stdout, false), (&task.result.stderr, true)] {
        if let Some(sha) = blob {
            let bytes = grid.get_object(tenant, sha).await?;
            if to_stderr {
                std::io::stderr().write_all(&bytes)?;
            } else {
                std::io::stdout().write_all(&bytes)?;
            }
        }
    }
    Ok(())
}

/// Prints each task's logs as its record appears, until the job has ended and all are printed.
/// (Polled, like `status --wait`: a tenant may read its own records, not watch the bucket.)
async fn follow_logs(grid: &Session, record: JobRecord) -> Result<()> {
    // A task's record of each round: `grid retry` replaces a failed one with the new round's.
    let mut printed = std::collections::HashSet::new();
    let prefix = format!("{}.{}", grid.tenant, record.id);
    loop {
        let now = job_record(grid, &record.id).await?;
        let mut decided = 0;
        for (_, bytes) in grid.entries(names::TASKS_BUCKET, Some(&prefix)).await? {
            let Ok(task) = decode::<TaskRecord>(&bytes) else {
                continue;
            };
            if task.state == TaskState::Succeeded || task.round >= now.retried {
                decided += 1;
            }
            if printed.insert((task.result.index, task.round)) {
                match task.round {
                    0 => println!("== task {} ==", task.result.index),
                    round => println!("== task {} (retry {round}) ==", task.result.index),
                }
                print_logs(grid, &record.spec.tenant, &task).await?;
            }
        }
        let c = &now.counts;
        if now.state.is_final() && decided >= c.succeeded + c.failed + c.disputed {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub fn logs(args: LogsArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("logs").await?;
        let record = job_record(&grid, &args.job).await?;
        if args.follow {
            follow_logs(&grid, record).await?;
            return Ok(ExitCode::SUCCESS);
        }
        let indices: Vec<u64> = match args.task {
            Some(i) if i >= record.counts.total => {
                bail!(
                    "job {} has no task {i} (it has {})",
                    record.id,
                    record.counts.total
                )
            }
            Some(i) => vec![i],
            None => (0..record.counts.total).collect(),
        };
        for index in indices {
            let Some(task) = task_record(&grid, &record.id, index).await? else {
                continue;
            };
            if args.task.is_none() {
                println!("== task {index} ==");
            }
            print_logs(&grid, &record.spec.tenant, &task).await?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    pub job: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

pub fn cancel(args: CancelArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("cancel").await?;
        let request = CancelRequest {
            job_id: args.job.clone(),
        };
        match grid.ask("cancel", &request).await? {
            ApiReply::Ok { job_id }
            | ApiReply::Deleted { job_id, .. }
            | ApiReply::Retrying { job_id, .. } => {
                let record = job_record(&grid, &job_id).await?;
                print_status(&record, args.json);
                Ok(ExitCode::SUCCESS)
            }
            ApiReply::Err(why) => bail!("{why}"),
        }
    })
}

#[derive(Args, Debug)]
pub struct RetryArgs {
    pub job: String,
    /// Run the job's failed and disputed tasks again (required: the tasks to retry).
    #[arg(long, required = true)]
    pub failed: bool,
    /// Follow the job to its end (exit status 0 only if every task succeeds).
    #[arg(long)]
    pub wait: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `grid retry JOB --failed`: an ended job's failed and disputed tasks run again in the same
/// job, with its retries afresh; the tasks that succeeded keep their results, and `grid
/// results` then collects them all together.
pub fn retry(args: RetryArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("retry").await?;
        let request = grid_proto::RetryRequest {
            job_id: args.job.clone(),
        };
        let (job_id, tasks) = match grid.ask("retry", &request).await? {
            ApiReply::Retrying { job_id, tasks } => (job_id, tasks),
            ApiReply::Err(why) => bail!("{why}"),
            other => bail!("the broker did not retry job {}: {other:?}", args.job),
        };
        if !args.wait {
            if args.json {
                println!("{}", json!({"job_id": job_id, "tasks_retried": tasks}));
            } else {
                println!("{job_id}");
                eprintln!(
                    "grid: retrying {tasks} failed task(s) of job {job_id}; follow it with `grid status {job_id} --wait`"
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        follow_to_end(&grid, &job_id, args.json).await
    })
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    pub job: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `grid delete JOB`: the job's records, outputs and logs, and the inputs and module no other
/// job of the tenant's uses, are removed; the usage ledger keeps its entries (they are what the
/// tenant was billed).
pub fn delete(args: DeleteArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("delete").await?;
        let request = grid_proto::DeleteRequest {
            job_id: args.job.clone(),
        };
        match grid.ask("delete", &request).await? {
            ApiReply::Deleted {
                job_id,
                objects,
                bytes,
            } => {
                if args.json {
                    println!(
                        "{}",
                        json!({"job_id": job_id, "objects_deleted": objects, "bytes_freed": bytes})
                    );
                } else {
                    println!(
                        "deleted job {job_id}: {objects} stored object(s), {} freed",
                        bytesize::ByteSize(bytes)
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            ApiReply::Err(why) => bail!("{why}"),
            ApiReply::Ok { job_id } | ApiReply::Retrying { job_id, .. } => {
                bail!("the broker did not delete job {job_id}")
            }
        }
    })
}
