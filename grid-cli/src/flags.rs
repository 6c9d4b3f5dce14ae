//! The task flags `grid run` and `grid submit` share: limits, env, seed and runtime.

use anyhow::{Context, Result};
use clap::Args;
use grid_proto::JobLimits;
use grid_proto::runtime::Runtime;
use grid_proto::units::parse_size;
use std::path::Path;
use std::time::Duration;

/// Sizes and durations take a unit (see `grid_proto::units`): `64MiB`, `30s`.
#[derive(Args, Debug, Clone)]
pub struct TaskFlags {
    /// Linear memory limit, at least 1MiB, e.g. 64MiB [default: 512MiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_limit)]
    pub memory: Option<u64>,
    /// Wall-time limit (CPU is capped at the same value), e.g. 30s [default: 10min]
    #[arg(long, value_name = "DUR", value_parser = parse_time_limit)]
    pub timeout: Option<Duration>,
    /// Limit on bytes written under /out, e.g. 100MiB; 0 for none at all [default: 1GiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_output: Option<u64>,
    /// Environment for the task, K=V; repeatable. Host env is never passed.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// With --gpu: limit on the bytes of the task's GPU buffers together [default: 256MiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub gpu_memory: Option<u64>,
    /// With --gpu: limit on the time the task's GPU work may take in all [default: 60s]
    #[arg(long, value_name = "DUR", value_parser = parse_time_limit)]
    pub gpu_time: Option<Duration>,
    /// Job seed; each task's GRID_SEED is derived from it and the task index. Give it to
    /// draw the same numbers again [default: `grid run` 0; `grid submit` a fresh one per
    /// job, which it prints]
    #[arg(long)]
    pub seed: Option<u64>,
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

    /// The job's limits as asked for, the contract's defaults ([`JobLimits::default`]) for
    /// what is not. `grid run` runs a task with exactly these, as a node would.
    pub fn job_limits(&self) -> JobLimits {
        let defaults = JobLimits::default();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        JobLimits {
            memory_bytes: self.memory.unwrap_or(defaults.memory_bytes),
            timeout_ms: self.timeout.map_or(defaults.timeout_ms, ms),
            max_output_bytes: self.max_output.unwrap_or(defaults.max_output_bytes),
            gpu_memory_bytes: self.gpu_memory.unwrap_or(defaults.gpu_memory_bytes),
            gpu_time_ms: self.gpu_time.map_or(defaults.gpu_time_ms, ms),
        }
    }
}

/// A memory limit: a size of at least [`JobLimits::MIN_MEMORY_BYTES`].
pub fn parse_memory_limit(s: &str) -> Result<u64, String> {
    grid_proto::units::size_at_least(s, JobLimits::MIN_MEMORY_BYTES)
}

/// A time limit: a duration of at least [`JobLimits::MIN_TIME`].
pub fn parse_time_limit(s: &str) -> Result<Duration, String> {
    grid_proto::units::duration_at_least(s, JobLimits::MIN_TIME)
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not K=V")),
    }
}

/// The program's file name, as the guest sees it in /job.
pub fn program_file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .with_context(|| format!("{} has no usable file name", path.display()))
}
