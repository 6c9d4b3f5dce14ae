//! `grid run`: one task, locally, in the node's sandbox.

use anyhow::{Context, Result, bail};
use clap::Args;
use grid_proto::TaskStatus;
use grid_proto::runtime::Runtime;
pub use grid_sandbox::limits::{parse_duration, parse_size};
use grid_sandbox::{GpuWorker, Limits, Sandbox, SandboxConfig, TaskSpec, WorkerCommand};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The job: a WASI preview 1 command module (.wasm), or a program for a runtime (job.py).
    #[arg(required_unless_present = "from")]
    pub module: Option<PathBuf>,
    /// Rerun task --task I of grid job JOB here, exactly as it ran there: its module or
    /// program, params line or input file, shared files, args, env, limits, seed and attempt.
    #[arg(
        long,
        value_name = "JOB",
        conflicts_with_all = ["module", "input", "args", "memory", "timeout", "max_output", "env", "seed", "runtime", "gpu_memory", "gpu_time"],
        requires = "task_index"
    )]
    pub from: Option<String>,
    #[command(flatten)]
    pub conn: crate::jobs::Conn,
    /// Shown read-only to the task at /in.
    #[arg(long, value_name = "DIR")]
    pub input: Option<PathBuf>,
    /// Where the task's /out goes (must be empty or new); default: a new directory, printed.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub task: TaskFlags,
    /// The task's index (GRID_TASK_INDEX); with --from, which task of the job.
    #[arg(long, visible_alias = "task")]
    pub task_index: Option<u64>,
    /// Give the task this machine's GPU (through `grid_gpu_v1`); without it, GPU calls say "no GPU".
    #[arg(long)]
    pub gpu: bool,
    /// Print one JSON object with the result (and the guest's output inside it).
    #[arg(long)]
    pub json: bool,
    /// Directory for compiled modules (default: $XDG_CACHE_HOME/grid or ~/.cache/grid).
    #[arg(long, value_name = "DIR", env = "GRID_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Arguments for the task.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// The flags `grid run` and `grid submit` share: limits, env and seed of a task.
#[derive(Args, Debug, Clone)]
pub struct TaskFlags {
    /// Linear memory limit, e.g. 64MiB [default: 512MiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Wall-time limit (CPU is capped at the same value), e.g. 30s [default: 10min]
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Limit on bytes written under /out, e.g. 100MiB [default: 1GiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_output: Option<u64>,
    /// Environment for the task, K=V; repeatable. Host env is never passed.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// With --gpu: limit on the bytes of the task's GPU buffers together [default: 256MiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub gpu_memory: Option<u64>,
    /// With --gpu: limit on the time the task's GPU work may take in all [default: 60s]
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub gpu_time: Option<Duration>,
    /// Job seed; each task's GRID_SEED is derived from it and the task index.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run the file as a program of this runtime (`python`) [default: by its extension: .py]
    #[arg(long, value_name = "NAME")]
    pub runtime: Option<String>,
}

impl TaskFlags {
    /// The runtime that runs `file`, if it is a program rather than a module.
    pub fn runtime_for(&self, file: &Path) -> Result<Option<&'static Runtime>> {
        match &self.runtime {
            Some(name) => grid_proto::runtime::by_name(name).map(Some).ok_or_else(|| {
                let known: Vec<&str> = grid_proto::runtime::RUNTIMES
                    .iter()
                    .map(|r| r.name)
                    .collect();
                anyhow::anyhow!("unknown runtime {name:?}; known: {}", known.join(", "))
            }),
            None => Ok(grid_proto::runtime::for_program(file)),
        }
    }

    /// The limits asked for, defaults filled in.
    pub fn limits(&self) -> Limits {
        let defaults = Limits::default();
        Limits {
            memory_bytes: self.memory.unwrap_or(defaults.memory_bytes),
            timeout: self.timeout.unwrap_or(defaults.timeout),
            max_output_bytes: self.max_output.unwrap_or(defaults.max_output_bytes),
            gpu: grid_gpu::GpuLimits {
                max_buffer_bytes: self.gpu_memory.unwrap_or(defaults.gpu.max_buffer_bytes),
                gpu_time: self.gpu_time.unwrap_or(defaults.gpu.gpu_time),
                ..defaults.gpu.clone()
            },
            ..defaults
        }
    }
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not K=V")),
    }
}

fn grid_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("grid"))
}

fn default_cache_dir() -> Option<PathBuf> {
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

/// What a task is, wherever it came from: this machine's files and flags, or a grid's job.
struct LocalTask {
    bytes: Vec<u8>,
    /// The module's or program's file name.
    name: PathBuf,
    runtime: Option<&'static Runtime>,
    stdin: Vec<u8>,
    input_dir: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    limits: Limits,
    seed: u64,
    index: u64,
    count: u64,
    attempt: u32,
    gpu: bool,
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
        Ok(Self {
            bytes,
            name: module.to_path_buf(),
            runtime: args.task.runtime_for(module)?,
            stdin,
            input_dir: args.input.clone(),
            args: args.args.clone(),
            env: args.task.env.clone(),
            limits: args.task.limits(),
            seed: grid_proto::task_seed(args.task.seed, index),
            index,
            count: index + 1,
            attempt: 0,
            gpu: args.gpu,
            _inputs: None,
        })
    }

    /// Task `index` of grid job `job`, fetched from the grid with the tenant's credentials.
    async fn from_grid(args: &RunArgs, job: &str, index: u64) -> Result<Self> {
        use grid_proto::TaskSource;
        let grid = args.conn.open("run --from").await?;
        let record = crate::jobs::job_record(&grid, job).await?;
        let spec = &record.spec;
        let total = spec.tasks.len();
        if index >= total {
            bail!("job {job} has {total} tasks: --task must be below {total}");
        }
        let tenant = spec.tenant.as_str();
        let (bytes, name, runtime) = match &spec.program {
            None => (
                grid.get_object(tenant, &spec.module_sha256).await?,
                spec.module_name.clone(),
                None,
            ),
            Some(program) => (
                grid.get_object(tenant, &program.file.sha256).await?,
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
        let inputs = tempfile::Builder::new().prefix("grid-in-").tempdir()?;
        let mut stdin = Vec::new();
        match &spec.tasks {
            TaskSource::Count(_) => {}
            TaskSource::Params { pages, .. } => {
                let (mut first, mut found) = (0, false);
                for page in pages {
                    if index < first + page.lines {
                        let bytes = grid.get_object(tenant, &page.sha256).await?;
                        let line = grid_proto::params_lines(&bytes)
                            .nth((index - first) as usize)
                            .context("the job's params page has fewer lines than it says")?;
                        stdin = line.to_vec();
                        found = true;
                        break;
                    }
                    first += page.lines;
                }
                if !found {
                    bail!("job {job}'s params pages hold {first} lines, not task {index}'s");
                }
            }
            TaskSource::Inputs(files) => {
                let file = usize::try_from(index)
                    .ok()
                    .and_then(|i| files.get(i))
                    .with_context(|| format!("job {job} lists no input for task {index}"))?;
                let bytes = grid.get_object(tenant, &file.sha256).await?;
                std::fs::write(inputs.path().join(plain(&file.name)?), bytes)?;
            }
        }
        if !spec.shared.is_empty() {
            std::fs::create_dir_all(inputs.path().join("shared"))?;
            for file in &spec.shared {
                plain(&file.name)?;
                let bytes = grid.get_object(tenant, &file.sha256).await?;
                std::fs::write(inputs.path().join("shared").join(&file.name), bytes)?;
            }
        }
        // The attempt that decided the task, when it has ended.
        let attempt = crate::jobs::task_record(&grid, job, index)
            .await?
            .map_or(0, |t| t.result.attempt);
        let limits = Limits::of_job(&spec.limits);
        eprintln!(
            "grid: task {index} of job {job} ({}, attempt {attempt}), here",
            spec.module_name
        );
        Ok(Self {
            bytes,
            name: PathBuf::from(name),
            runtime,
            stdin,
            input_dir: Some(inputs.path().to_path_buf()),
            args: spec.args.clone(),
            env: spec.env.clone(),
            limits,
            seed: grid_proto::task_seed(spec.seed, index),
            index,
            count: total,
            attempt,
            gpu: args.gpu || spec.class == grid_proto::names::GPU_CLASS,
            _inputs: Some(inputs),
        })
    }
}

/// An input's name from a job spec, checked to be a plain file name (as a node checks it).
fn plain(name: &str) -> Result<&str> {
    if grid_node::worker::is_plain_file_name(name) {
        Ok(name)
    } else {
        bail!("the job's input name {name:?} is not a plain file name")
    }
}

pub fn main(args: RunArgs) -> Result<ExitCode> {
    let task = match (&args.from, &args.module) {
        (Some(job), _) => crate::jobs::runtime()?.block_on(LocalTask::from_grid(
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
    let limits = task.limits.clone();
    let mut spec = TaskSpec::new(&output_dir);
    spec.args = task.args.clone();
    spec.env = task.env.clone();
    spec.stdin = task.stdin.clone();
    spec.input_dir = task.input_dir.clone();
    spec.limits = limits.clone();
    spec.task_index = task.index;
    spec.task_count = task.count;
    spec.seed = task.seed;
    spec.attempt = task.attempt;
    spec.gpu = task.gpu;
    let program_runtime = task.runtime;
    let bytes = &task.bytes;
    // A program is shown alone at /job, as on a grid node.
    let program_dir = tempfile::Builder::new().prefix("grid-job-").tempdir()?;
    if let Some(runtime) = program_runtime {
        let file = program_file_name(&task.name)?;
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
        let gpu = if task.gpu {
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
            ..SandboxConfig::default()
        };
        let sandbox = Sandbox::new(config)?;
        let loaded = match program_runtime {
            Some(runtime) => {
                sandbox
                    .load_runtime(runtime, local_runtime_module(runtime))
                    .await
            }
            None => sandbox.load(bytes, &limits).await,
        };
        let report = match loaded {
            Ok(module) => sandbox.run(&module, spec).await,
            Err(reason) => grid_sandbox::TaskReport::refused(reason),
        };
        anyhow::Ok(report)
    })?;

    let status = report.outcome.status();
    if args.json {
        let line = serde_json::json!({
            "status": status,
            "exit_code": report.outcome.exit_code(),
            "reason": report.outcome.reason().map(|r| r.to_string()),
            "cpu_seconds": report.cpu_seconds,
            "wall_seconds": report.wall_seconds,
            "bytes_out": report.bytes_out,
            "output_dir": output_dir.display().to_string(),
            "stdout": String::from_utf8_lossy(&report.stdout),
            "stderr": String::from_utf8_lossy(&report.stderr),
            "logs_truncated": report.logs_truncated,
        });
        write_ignoring_closed_pipe(&mut std::io::stdout(), format!("{line}\n").as_bytes())?;
    } else {
        write_ignoring_closed_pipe(&mut std::io::stdout(), &report.stdout)?;
        write_ignoring_closed_pipe(&mut std::io::stderr(), &report.stderr)?;
        if report.logs_truncated {
            eprintln!(
                "grid: logs truncated at {} per stream",
                bytesize::ByteSize(limits.max_log_bytes)
            );
        }
        if let Some(reason) = report.outcome.reason() {
            eprintln!(
                "grid: task {}: {reason}",
                if status == TaskStatus::Refused {
                    "refused"
                } else {
                    "failed"
                }
            );
        }
        eprintln!("grid: output in {}", output_dir.display());
    }
    Ok(if status == TaskStatus::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The program's file name, as the guest sees it in /job.
pub fn program_file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .with_context(|| format!("{} has no usable file name", path.display()))
}

fn write_ignoring_closed_pipe(w: &mut impl Write, bytes: &[u8]) -> Result<()> {
    match w.write_all(bytes).and_then(|()| w.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
