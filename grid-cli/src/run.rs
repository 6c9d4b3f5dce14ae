//! `grid run`: one task, locally, in the node's sandbox.

use crate::flags::TaskFlags;
use anyhow::{Context, Result, bail};
use clap::Args;
use grid_proto::TaskStatus;
use grid_proto::runtime::Runtime;
use grid_sandbox::{GpuWorker, GridTask, Limits, Sandbox, SandboxConfig, TaskSpec, WorkerCommand};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The job: a WASI preview 1 command module (.wasm), or a program for a runtime (job.py).
    /// With --from: a fixed module or program to run in place of the job's.
    #[arg(required_unless_present = "from")]
    pub module: Option<PathBuf>,
    /// Rerun task --task I of grid job JOB here, exactly as it ran there: its module or
    /// program, params line or input file, shared files, args, env, limits, seed and attempt.
    /// Limit flags (--memory, --timeout, …) raise its limits; a MODULE replaces its module.
    /// JOB is as `grid status JOB` takes it: an id, a prefix unique among your jobs, or a
    /// --name.
    #[arg(
        long,
        value_name = "JOB",
        conflicts_with_all = ["input", "args", "env", "seed", "runtime"],
        requires = "task_index"
    )]
    pub from: Option<String>,
    #[command(flatten)]
    pub conn: crate::conn::Conn,
    /// Shown read-only to the task at /in.
    #[arg(long, value_name = "DIR")]
    pub input: Option<PathBuf>,
    /// Where the task's /out goes (must be empty or new); default: a new directory, printed.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// A folder of this machine shown read-write to the task as GUEST (default: the same
    /// name), as other WASI runtimes' `--dir` does, for programs that expect their own
    /// folders; repeatable. Counted in the task's output limit. Local runs only: a grid job's
    /// tasks see /in and /out.
    #[arg(long = "dir", value_name = "HOST[::GUEST]", value_parser = parse_dir, conflicts_with = "from")]
    pub dirs: Vec<(PathBuf, String)>,
    #[command(flatten)]
    pub task: TaskFlags,
    /// The task's index (GRID_TASK_INDEX); with --from, which task of the job.
    #[arg(long = "task", value_name = "I", visible_alias = "task-index")]
    pub task_index: Option<u64>,
    /// Give the task this machine's GPU (through `grid_gpu_v1`); without it, GPU calls say "no GPU".
    #[arg(long)]
    pub gpu: bool,
    /// Print one JSON object: status, exit_code, reason, cpu_seconds, wall_seconds,
    /// bytes_out, output_dir, and the task's stdout and stderr (logs_truncated: whether they
    /// were cut short).
    #[arg(long)]
    pub json: bool,
    /// Print the task's stdout and stderr exactly as it wrote them, even on a terminal (where
    /// control characters are otherwise shown as `\x1b`, `\u{9b}`, …; a pipe or file always
    /// gets them as they are).
    #[arg(long)]
    pub raw: bool,
    /// Directory for compiled modules (default: $XDG_CACHE_HOME/grid or ~/.cache/grid).
    #[arg(long, value_name = "DIR", env = "GRID_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Arguments for the task.
    #[arg(last = true)]
    pub args: Vec<String>,
}

fn parse_dir(s: &str) -> Result<(PathBuf, String), String> {
    let (host, guest) = s.split_once("::").unwrap_or((s, s));
    let host = PathBuf::from(host);
    if !host.is_dir() {
        return Err(format!("{}: not a directory", host.display()));
    }
    if guest.is_empty() || ["/in", "/out"].contains(&guest.trim_end_matches('/')) {
        return Err(format!(
            "{guest:?}: a task's own folders are /in and /out; pick another name"
        ));
    }
    Ok((host, guest.to_string()))
}

fn grid_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("grid"))
}

/// Where `grid run` keeps compiled modules; the nodes `grid up` starts share it.
pub fn default_cache_dir() -> Option<PathBuf> {
    grid_cache_dir().map(|d| d.join("modules"))
}

/// A runtime's laid-out files for local runs (`~/.cache/grid/runtimes`), made on first use.
pub fn local_runtime_files(runtime: &Runtime) -> Result<grid_sandbox::runtime::RuntimeFiles> {
    let root = grid_cache_dir()
        .context("neither XDG_CACHE_HOME nor HOME is set")?
        .join("runtimes");
    if let Some(files) = grid_sandbox::runtime::RuntimeFiles::find(&root, runtime) {
        files.refresh_helper()?;
        return Ok(files);
    }
    let artifacts = grid_client::find_runtime(runtime)?;
    let stdlib = std::fs::read(&artifacts.stdlib)
        .with_context(|| format!("reading {}", artifacts.stdlib.display()))?;
    grid_sandbox::runtime::RuntimeFiles::install(&root, runtime, &stdlib)
}

/// Reads a runtime's module from this machine (checked against its pin by the sandbox).
pub async fn local_runtime_module(runtime: &Runtime) -> Result<Vec<u8>> {
    let artifacts = grid_client::find_runtime(runtime)?;
    tokio::fs::read(&artifacts.module)
        .await
        .with_context(|| format!("reading {}", artifacts.module.display()))
}

/// The task `grid run` runs: a module or a program, and what it sees.
struct LocalTask {
    bytes: Vec<u8>,
    /// The module's or program's file name.
    name: PathBuf,
    runtime: Option<&'static Runtime>,
    /// What the task sees; its output folder is set once it is made.
    spec: TaskSpec,
    /// Its limits as a job states them (for the hint when it runs into one).
    job_limits: grid_proto::JobLimits,
    /// Holds a grid task's inputs while it runs.
    _inputs: Option<tempfile::TempDir>,
}

impl LocalTask {
    fn from_flags(args: &RunArgs, module: &Path) -> Result<Self> {
        let index = args.task_index.unwrap_or(0);
        let bytes = std::fs::read(module)
            .with_context(|| format!("cannot read module {}", module.display()))?;
        if let Some(input) = &args.input
            && !input.is_dir()
        {
            bail!("--input {} is not a directory", input.display());
        }
        let mut stdin = Vec::new();
        if !std::io::stdin().is_terminal() {
            std::io::stdin()
                .read_to_end(&mut stdin)
                .context("reading stdin")?;
        }
        let mut spec = TaskSpec::new(Path::new(""));
        spec.args = args.args.clone();
        spec.env = args.task.env.clone();
        spec.stdin = stdin;
        spec.input_dir = args.input.clone();
        spec.dirs = args.dirs.clone();
        spec.limits = Limits::of_job(&args.task.job_limits());
        spec.task_index = index;
        spec.task_count = index + 1;
        spec.seed = grid_proto::task_seed(args.task.seed.unwrap_or(0), index);
        spec.gpu = args.gpu;
        Ok(Self {
            bytes,
            name: module.to_path_buf(),
            runtime: args.task.runtime_for(module)?,
            spec,
            job_limits: args.task.job_limits(),
            _inputs: None,
        })
    }

    /// Task `index` of grid job `job`, fetched from the grid with the tenant's credentials and
    /// prepared as a node prepares it ([`GridTask`]).
    async fn from_grid(args: &RunArgs, job: &str, index: u64) -> Result<Self> {
        use grid_proto::TaskSource;
        let grid = args.conn.open("run --from").await?;
        let record = grid.job_record(&grid.resolve_job(job).await?).await?;
        let job = record.id.as_str();
        let mut spec = record.spec.clone();
        spec.limits = args.task.limits.over(&spec.limits);
        let spec = &spec;
        let total = spec.tasks.len();
        if index >= total {
            bail!("job {job} has {total} tasks: --task must be below {total}");
        }
        let tenant = spec.tenant.as_str();
        let (bytes, name, runtime) = match (&args.module, &spec.program) {
            (Some(file), _) => (
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?,
                file.display().to_string(),
                grid_proto::runtime::for_program(file),
            ),
            (None, None) => (
                grid.get_object(tenant, &spec.module_sha256, grid_proto::caps::MODULE_BYTES)
                    .await?,
                spec.module_name.clone(),
                None,
            ),
            (None, Some(program)) => (
                grid.get_object(tenant, &program.file.sha256, program.file.bytes)
                    .await?,
                program.file.name.clone(),
                Some(
                    grid_proto::runtime::by_name(&program.runtime).with_context(|| {
                        format!(
                            "job {job} runs on runtime {:?}, unknown to this grid command",
                            program.runtime
                        )
                    })?,
                ),
            ),
        };
        let (mut stdin, mut input) = (Vec::new(), None);
        match &spec.tasks {
            TaskSource::Count(_) => {}
            TaskSource::Params { pages, .. } => {
                let (page, line) = grid_proto::ParamsIndex::new(pages)
                    .locate(index)
                    .with_context(|| {
                        format!("job {job}'s params pages hold no line of task {index}")
                    })?;
                let bytes = grid
                    .get_object(
                        tenant,
                        &pages[page].sha256,
                        grid_proto::caps::PARAMS_PAGE_BYTES,
                    )
                    .await?;
                stdin = grid_proto::params_lines(&bytes)
                    .nth(line)
                    .context("the job's params page has fewer lines than it says")?
                    .to_vec();
            }
            TaskSource::Inputs(files) => {
                input = Some(
                    usize::try_from(index)
                        .ok()
                        .and_then(|i| files.get(i))
                        .with_context(|| format!("job {job} lists no input for task {index}"))?,
                );
            }
        }
        // The attempt that decided the task, when it has ended.
        let attempt = grid
            .task_record(job, index)
            .await?
            .map_or(0, |t| t.result.attempt);
        let task = GridTask {
            job_id: &record.id,
            spec,
            count: total,
            index,
            attempt,
            stdin: &stdin,
            input,
        };
        let inputs = tempfile::Builder::new().prefix("grid-in-").tempdir()?;
        let files = task
            .inputs()
            .map_err(|why| anyhow::anyhow!("job {job}'s task {index}: {why}"))?;
        for (path, file) in files {
            let path = inputs.path().join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(
                path,
                grid.get_object(tenant, &file.sha256, file.bytes).await?,
            )?;
        }
        let mut run = task.task_spec(inputs.path().to_path_buf(), Path::new(""), None);
        run.gpu |= args.gpu;
        let changed = match (&args.module, args.task.limits.any()) {
            (Some(file), _) => format!("; {} in place of its module", file.display()),
            (None, true) => "; with the limits given".to_string(),
            (None, false) => String::new(),
        };
        eprintln!(
            "grid: task {index} of job {job} ({}, attempt {attempt}), here{changed}",
            spec.module_name
        );
        Ok(Self {
            bytes,
            name: PathBuf::from(name),
            runtime,
            spec: run,
            job_limits: spec.limits.clone(),
            _inputs: Some(inputs),
        })
    }
}

pub fn main(args: RunArgs) -> Result<ExitCode> {
    let task = match (&args.from, &args.module) {
        (Some(job), _) => crate::conn::runtime()?.block_on(LocalTask::from_grid(
            &args,
            job,
            args.task_index.unwrap_or(0),
        ))?,
        (None, Some(module)) => LocalTask::from_flags(&args, module)?,
        (None, None) => bail!("name a module to run, or --from JOB --task I"),
    };
    let output_dir = match &args.output {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            if std::fs::read_dir(dir)?.next().is_some() {
                bail!(
                    "output directory {} is not empty; pass an empty or new directory",
                    dir.display()
                );
            }
            dir.canonicalize()?
        }
        None => tempfile::Builder::new()
            .prefix("grid-run-")
            .tempdir()
            .context("cannot create an output directory")?
            .keep(),
    };
    let mut spec = task.spec.clone();
    spec.output_dir = output_dir.clone();
    let limits = spec.limits.clone();
    let program_runtime = task.runtime;
    let bytes = &task.bytes;
    // A program is shown alone at /job, as on a grid node.
    let program_dir = tempfile::Builder::new().prefix("grid-job-").tempdir()?;
    if let Some(runtime) = program_runtime {
        let file = crate::flags::program_file_name(&task.name)?;
        std::fs::write(program_dir.path().join(&file), bytes)?;
        spec.program = Some(grid_sandbox::Program {
            runtime,
            files: local_runtime_files(runtime)?,
            dir: program_dir.path().to_path_buf(),
            file,
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let gpu = if spec.gpu {
            let worker = WorkerCommand::current_exe()?;
            Some(
                GpuWorker::start(worker)
                    .await
                    .map_err(|e| anyhow::anyhow!("--gpu: {e}"))?,
            )
        } else {
            None
        };
        let config = SandboxConfig {
            gpu,
            cache_dir: args.cache_dir.clone().or_else(default_cache_dir),
            // This machine is the user's own: the task's limits are the only ceiling (a node's
            // default caps would quietly lower a limit raised past the defaults).
            caps: grid_sandbox::NodeCaps(limits.clone()),
            ..SandboxConfig::default()
        };
        let sandbox = Sandbox::new(config)?;
        let shown = tokio::spawn(show_compiles(sandbox.compiling()));
        let loaded = match program_runtime {
            Some(runtime) => {
                sandbox
                    .load_runtime(runtime, local_runtime_module(runtime))
                    .await
            }
            None => sandbox.load(bytes, &limits).await,
        };
        shown.abort();
        let _ = shown.await;
        let report = match loaded {
            Ok(module) => sandbox.run(&module, spec).await,
            Err(reason) => grid_sandbox::TaskReport::refused(reason),
        };
        anyhow::Ok(report)
    })?;

    // A folder this run made and the task left empty (a refused or silent task) goes: only
    // one that holds outputs is kept and named.
    let output_dir = match &args.output {
        None if std::fs::read_dir(&output_dir).is_ok_and(|mut d| d.next().is_none()) => {
            let _ = std::fs::remove_dir(&output_dir);
            None
        }
        _ => Some(output_dir),
    };
    let status = report.outcome.status();
    if args.json {
        let line = serde_json::json!({
            "status": status,
            "exit_code": report.outcome.exit_code(),
            "reason": report.outcome.reason().map(|r| r.to_string()),
            "cpu_seconds": report.cpu_seconds,
            "wall_seconds": report.wall_seconds,
            "bytes_out": report.bytes_out,
            "output_dir": output_dir.as_ref().map(|d| d.display().to_string()),
            "stdout": String::from_utf8_lossy(&report.stdout),
            "stderr": String::from_utf8_lossy(&report.stderr),
            "logs_truncated": report.logs_truncated,
        });
        let line = crate::terminal::json_line(&line);
        write_ignoring_closed_pipe(&mut std::io::stdout(), format!("{line}\n").as_bytes())?;
    } else {
        use crate::terminal::{escape_for, shown_bytes};
        // The guest's bytes: shown, not obeyed, on a terminal (see `crate::terminal`).
        let escape_out = escape_for(std::io::stdout().is_terminal(), args.raw);
        let escape_err = escape_for(std::io::stderr().is_terminal(), args.raw);
        write_ignoring_closed_pipe(
            &mut std::io::stdout(),
            &shown_bytes(&report.stdout, escape_out),
        )?;
        write_ignoring_closed_pipe(
            &mut std::io::stderr(),
            &shown_bytes(&report.stderr, escape_err),
        )?;
        if report.logs_truncated {
            eprintln!(
                "grid: logs truncated at {} per stream",
                bytesize::ByteSize(limits.max_log_bytes)
            );
        }
        if let Some(reason) = report.outcome.reason() {
            eprintln!(
                "grid: task {}: {}",
                if status == TaskStatus::Refused {
                    "refused"
                } else {
                    "failed"
                },
                crate::terminal::for_stderr(&reason.to_string())
            );
            if let grid_proto::Reason::Limit(limit) = reason
                && let Some((was, flag)) = crate::flags::raise_hint(*limit, &task.job_limits)
            {
                eprintln!("grid: {was}: run it again with {flag}");
            }
        }
        match &output_dir {
            Some(dir) => eprintln!("grid: output in {}", dir.display()),
            None => eprintln!("grid: the task wrote no output"),
        }
    }
    Ok(if status == TaskStatus::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Shows each compile while it runs, on stderr: a bar with the time it has taken and about how
/// long it takes on a terminal, one line otherwise. The first run of a Python program compiles
/// the runtime, minutes on a small machine; after that it comes from the cache.
async fn show_compiles(
    mut compiling: tokio::sync::watch::Receiver<Option<grid_sandbox::Compiling>>,
) {
    let terminal = std::io::stderr().is_terminal();
    loop {
        let Some(c) = compiling.borrow_and_update().clone() else {
            if compiling.changed().await.is_err() {
                return;
            }
            continue;
        };
        let about = grid_proto::units::duration_text(std::time::Duration::from_secs(
            c.estimate.as_secs().max(1),
        ));
        let what = format!("grid: compiling {} once for this machine", c.label);
        // Dropped (and cleared) when the compile ends or the load is over.
        let bar = match terminal {
            true => {
                let bar = indicatif::ProgressBar::new(c.estimate.as_millis().max(1) as u64);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:25}] {elapsed} of about {prefix}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_prefix(about);
                bar.set_message(what);
                Some(ClearedBar(bar))
            }
            false => {
                eprintln!("{what} (about {about})");
                None
            }
        };
        loop {
            tokio::select! {
                changed = compiling.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                () = tokio::time::sleep(std::time::Duration::from_millis(250)) => {
                    if let Some(bar) = &bar {
                        let elapsed = c.started.elapsed().unwrap_or_default().as_millis() as u64;
                        bar.0.set_position(elapsed.min(bar.0.length().unwrap_or(1).saturating_sub(1)));
                    }
                }
            }
        }
    }
}

/// A progress bar cleared from the terminal when dropped (a compile that ends, or a load that
/// is over and aborts its display).
struct ClearedBar(indicatif::ProgressBar);

impl Drop for ClearedBar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn write_ignoring_closed_pipe(w: &mut impl Write, bytes: &[u8]) -> Result<()> {
    match w.write_all(bytes).and_then(|()| w.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
