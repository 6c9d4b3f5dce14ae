//! `grid submit`: a module or program, its params, inputs and shared files uploaded, and the
//! job asked of the broker.

use crate::conn::{Conn, Refused, runtime};
use crate::flags::TaskFlags;
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use grid_proto::{Answer, InputRef, JobSpec, SubmitRequest, TaskSource, names};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The job: a WASI preview 1 command module (.wasm), or a program for a runtime (job.py).
    pub module: PathBuf,
    /// Run N tasks with empty stdin.
    #[arg(long, value_name = "N", conflicts_with_all = ["params", "input"])]
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
    /// Attempts after the first for a task that is lost or runs past its time limit (other
    /// failures would be the same again: see `grid retry`).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub retries: u32,
    /// Among your own jobs, higher runs first (may be negative). Other tenants are unaffected:
    /// tenants share the grid by the weights the operator gives them.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_hyphen_values = true
    )]
    pub priority: i32,
    /// A name to find the job by: `grid status NAME` means your newest job of that name.
    /// Letters, digits, -, _ and ., starting with a letter.
    #[arg(long, value_name = "NAME", value_parser = parse_job_name)]
    pub name: Option<String>,
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
    /// Print one JSON object: {job_id, tasks, seed, module_sha256}; with --wait, the job's
    /// status at its end instead, as `grid status --json` prints it.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
    /// Arguments for every task.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// Checks that every non-blank line of the params file at `path` is JSON, reading it a line at
/// a time; returns how many lines were blank (they are no tasks).
fn check_params(path: &Path) -> Result<u64> {
    use std::io::BufRead;
    let cannot = || format!("cannot read params file {}", path.display());
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).with_context(cannot)?);
    let (mut line, mut blank) = (Vec::new(), 0);
    for n in 1.. {
        line.clear();
        if reader.read_until(b'\n', &mut line).with_context(cannot)? == 0 {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            blank += 1;
            continue;
        }
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&line) {
            bail!("{} line {n} is not valid JSON: {e}", path.display());
        }
    }
    Ok(blank)
}

/// A job seed nobody chose: each job draws its own numbers unless `--seed` says otherwise.
/// Below 2^53, so that it survives JSON readers that hold numbers as doubles (JavaScript's).
fn fresh_seed() -> Result<u64> {
    use rand::TryRng;
    let seed = rand::rngs::SysRng
        .try_next_u64()
        .map_err(|e| anyhow!("drawing a job seed: {e}"))?;
    Ok(seed >> 11)
}

/// `N tasks`, `1 task`.
fn tasks_text(n: u64) -> String {
    if n == 1 {
        "1 task".into()
    } else {
        format!("{n} tasks")
    }
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
    // Before anything is uploaded; the whole spec is checked again below, as the broker does.
    grid_proto::check_replicas(replicas, quorum).map_err(anyhow::Error::msg)?;
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
                crate::flags::program_file_name(&args.module)?,
            ))
        }
        None => None,
    };
    let limits = args.task.job_limits();
    let sandbox_limits = grid_sandbox::Limits::of_job(&limits);
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
    let blank_lines = args.params.as_deref().map(check_params).transpose()?;
    let seed = match args.task.seed {
        Some(seed) => seed,
        None => fresh_seed()?,
    };
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
        let spec = JobSpec {
            tenant: tenant.into(),
            class: if args.gpu { names::GPU_CLASS } else { names::DEFAULT_CLASS }.into(),
            module_sha256: module_sha,
            module_name: args.module.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            args: args.args.clone(),
            env: args.task.env.clone(),
            limits,
            seed,
            retries: args.retries,
            replicas,
            quorum,
            tasks: tasks.clone(),
            shared: upload(shared.unwrap_or_default()).await?,
            program,
            priority: args.priority,
            name: args.name.clone().unwrap_or_default(),
        };
        spec.validate().map_err(anyhow::Error::msg)?;
        let job_id = match grid.ask(&SubmitRequest { spec }).await? {
            Answer::Granted(job) => job.job_id,
            Answer::Refused(why) => return Err(Refused(format!("job refused: {why}")).into()),
        };
        // Said once the job is in: a refused submit prints its one line and nothing else.
        if let (Some(blank), Some(path)) = (blank_lines.filter(|n| *n > 0), &args.params) {
            let lines = if blank == 1 { "line" } else { "lines" };
            eprintln!("grid: skipped {blank} blank {lines} of {} (blank lines are no tasks)", path.display());
        }
        if matches!(tasks, TaskSource::Count(_)) && args.tasks.is_none() {
            eprintln!("grid: submitted one task (give --tasks N or --params FILE for more)");
        }
        if !args.wait {
            if args.json {
                println!("{}", json!({"job_id": job_id, "tasks": tasks.len(), "seed": seed, "module_sha256": module_sha.to_string()}));
            } else {
                println!("{job_id}");
                eprintln!("grid: submitted job {job_id} ({}, seed {seed}); follow it with `grid status {job_id} --wait`", tasks_text(tasks.len()));
            }
            return Ok(ExitCode::SUCCESS);
        }
        if !args.json && args.task.seed.is_none() {
            eprintln!("grid: job {job_id} has seed {seed} (`--seed {seed}` draws the same numbers again)");
        }
        crate::status::follow_to_end(&grid, &job_id, args.json).await
    })
}

/// A job's `--name`, checked as the broker checks it.
fn parse_job_name(name: &str) -> Result<String, String> {
    grid_proto::check_job_name(name).map(|()| name.to_string())
}
