//! `grid run`: one task, locally, in the node's sandbox.

use anyhow::{Context, Result, bail};
use clap::Args;
pub use grid_node::limits::{parse_duration, parse_size};
use grid_node::{GpuWorker, Limits, Sandbox, SandboxConfig, TaskSpec, WorkerCommand};
use grid_proto::TaskStatus;
use grid_proto::runtime::Runtime;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The job: a WASI preview 1 command module (.wasm), or a program for a runtime (job.py).
    pub module: PathBuf,
    /// Shown read-only to the task at /in.
    #[arg(long, value_name = "DIR")]
    pub input: Option<PathBuf>,
    /// Where the task's /out goes (must be empty or new); default: a new directory, printed.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub task: TaskFlags,
    /// The task's index (GRID_TASK_INDEX).
    #[arg(long, default_value_t = 0)]
    pub task_index: u64,
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
pub fn local_runtime_files(runtime: &Runtime) -> Result<grid_node::runtime::RuntimeFiles> {
    let root = grid_cache_dir()
        .context("neither XDG_CACHE_HOME nor HOME is set")?
        .join("runtimes");
    if let Some(files) = grid_node::runtime::RuntimeFiles::find(&root, runtime) {
        files.refresh_helper()?;
        return Ok(files);
    }
    let artifacts = grid_client::find_runtime(runtime)?;
    let stdlib = std::fs::read(&artifacts.stdlib)
        .with_context(|| format!("reading {}", artifacts.stdlib.display()))?;
    grid_node::runtime::RuntimeFiles::install(&root, runtime, &stdlib)
}

/// Reads a runtime's module from this machine (checked against its pin by the sandbox).
pub async fn local_runtime_module(runtime: &Runtime) -> Result<Vec<u8>> {
    let artifacts = grid_client::find_runtime(runtime)?;
    tokio::fs::read(&artifacts.module)
        .await
        .with_context(|| format!("reading {}", artifacts.module.display()))
}

pub fn main(args: RunArgs) -> Result<ExitCode> {
    let bytes = std::fs::read(&args.module)
        .with_context(|| format!("cannot read module {}", args.module.display()))?;
    if let Some(input) = &args.input
        && !input.is_dir()
    {
        bail!("--input {} is not a directory", input.display());
    }
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
    let mut stdin = Vec::new();
    if !std::io::stdin().is_terminal() {
        std::io::stdin()
            .read_to_end(&mut stdin)
            .context("reading stdin")?;
    }

    let limits = args.task.limits();
    let mut spec = TaskSpec::new(&output_dir);
    spec.args = args.args.clone();
    spec.env = args.task.env.clone();
    spec.stdin = stdin;
    spec.input_dir = args.input.clone();
    spec.limits = limits.clone();
    spec.task_index = args.task_index;
    spec.task_count = args.task_index + 1;
    spec.seed = grid_proto::task_seed(args.task.seed, args.task_index);

    spec.gpu = args.gpu;
    let program_runtime = args.task.runtime_for(&args.module)?;
    // A program is shown alone at /job, as on a grid node.
    let program_dir = tempfile::Builder::new().prefix("grid-job-").tempdir()?;
    if let Some(runtime) = program_runtime {
        let file = program_file_name(&args.module)?;
        std::fs::write(program_dir.path().join(&file), &bytes)?;
        spec.program = Some(grid_node::Program {
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
        let gpu = if args.gpu {
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
            None => sandbox.load(&bytes, &limits).await,
        };
        let report = match loaded {
            Ok(module) => sandbox.run(&module, spec).await,
            Err(reason) => grid_node::TaskReport::refused(reason),
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
