//! The task flags `grid run` and `grid submit` share: limits, env, seed and runtime. The limit
//! flags alone ([`LimitFlags`]) also raise a job's limits where it is run again: `grid retry`
//! and `grid run --from`.

use anyhow::{Context, Result};
use clap::Args;
use grid_proto::runtime::Runtime;
use grid_proto::units::parse_size;
use grid_proto::{JobLimits, Limit};
use std::path::Path;
use std::time::Duration;

/// Sizes and durations take a unit (see `grid_proto::units`): `64MiB`, `30s`.
#[derive(Args, Debug, Clone)]
pub struct TaskFlags {
    #[command(flatten)]
    pub limits: LimitFlags,
    /// Environment for the task, K=V; repeatable. Host env is never passed.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Job seed; each task's GRID_SEED is derived from it and the task index. Give it to
    /// draw the same numbers again [default: `grid run` 0; `grid submit` a fresh one per
    /// job, which it prints]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run the file as a program of this runtime (`python`) [default: by its extension: .py]
    #[arg(long, value_name = "NAME")]
    pub runtime: Option<String>,
}

/// A task's limits, each as given or not.
#[derive(Args, Debug, Clone, Default)]
pub struct LimitFlags {
    /// Linear memory limit, at least 1MiB, e.g. 64MiB [default: 512MiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_limit)]
    pub memory: Option<u64>,
    /// Wall-time limit (CPU is capped at the same value), e.g. 30s [default: 10min]
    #[arg(long, value_name = "DUR", value_parser = parse_time_limit)]
    pub timeout: Option<Duration>,
    /// Limit on bytes written under /out, e.g. 100MiB; 0 for none at all [default: 1GiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_output: Option<u64>,
    /// With --gpu: limit on the bytes of the task's GPU buffers together [default: 256MiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub gpu_memory: Option<u64>,
    /// With --gpu: limit on the time the task's GPU work may take in all [default: 60s]
    #[arg(long, value_name = "DUR", value_parser = parse_time_limit)]
    pub gpu_time: Option<Duration>,
}

impl LimitFlags {
    /// `base` with the limits given here in place of its own.
    pub fn over(&self, base: &JobLimits) -> JobLimits {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        JobLimits {
            memory_bytes: self.memory.unwrap_or(base.memory_bytes),
            timeout_ms: self.timeout.map_or(base.timeout_ms, ms),
            max_output_bytes: self.max_output.unwrap_or(base.max_output_bytes),
            gpu_memory_bytes: self.gpu_memory.unwrap_or(base.gpu_memory_bytes),
            gpu_time_ms: self.gpu_time.map_or(base.gpu_time_ms, ms),
        }
    }

    /// Whether any limit is given.
    pub fn any(&self) -> bool {
        self.memory.is_some()
            || self.timeout.is_some()
            || self.max_output.is_some()
            || self.gpu_memory.is_some()
            || self.gpu_time.is_some()
    }
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
        self.limits.over(&JobLimits::default())
    }
}

/// How to give a task more room after it ran into `limit` under `limits`: the limit's value,
/// and the flag that raises it with twice that (`None` for a limit no flag sets), e.g.
/// (`its memory limit was 64 MiB`, `--memory 128MiB`).
pub fn raise_hint(limit: Limit, limits: &JobLimits) -> Option<(String, String)> {
    use grid_proto::units::{millis_text, size_text};
    let size = |bytes: u64| (size_text(bytes), size_flag(bytes.saturating_mul(2)));
    let time = |ms: u64| (millis_text(ms), time_flag(ms.saturating_mul(2)));
    let (flag, (value, more)) = match limit {
        Limit::Memory => ("--memory", size(limits.memory_bytes)),
        Limit::Time => ("--timeout", time(limits.timeout_ms)),
        Limit::Output => ("--max-output", size(limits.max_output_bytes)),
        Limit::GpuMemory => ("--gpu-memory", size(limits.gpu_memory_bytes)),
        Limit::GpuTime => ("--gpu-time", time(limits.gpu_time_ms)),
        _ => return None,
    };
    Some((
        format!("its {limit} limit was {value}"),
        format!("{flag} {more}"),
    ))
}

/// `bytes` as a size flag takes it, in whole MiB or GiB (rounded up).
fn size_flag(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    let mib = bytes.div_ceil(MIB);
    if mib.is_multiple_of(1024) {
        format!("{}GiB", mib / 1024)
    } else {
        format!("{mib}MiB")
    }
}

/// `ms` as a duration flag takes it, in whole minutes or seconds (rounded up).
fn time_flag(ms: u64) -> String {
    let s = ms.div_ceil(1000);
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}min", s / 60)
    } else {
        format!("{s}s")
    }
}

/// The limit a job's failure reason (`task 3 failed: limit: memory (…)`) names, if any.
pub fn limit_named(reason: &str) -> Option<Limit> {
    const ALL: [Limit; 10] = [
        Limit::Memory,
        Limit::Table,
        Limit::Time,
        Limit::Output,
        Limit::Files,
        Limit::OpenFiles,
        Limit::GpuMemory,
        Limit::GpuObjects,
        Limit::GpuDispatch,
        Limit::GpuTime,
    ];
    ALL.into_iter()
        .filter_map(|limit| {
            let at = reason.find(&format!("limit: {limit}"))?;
            let end = at + "limit: ".len() + limit.as_str().len();
            // `limit: gpu-time` is not `limit: gpu`: the name must end there.
            let whole = reason[end..]
                .chars()
                .next()
                .is_none_or(|c| !c.is_alphanumeric() && c != '-');
            whole.then_some((at, limit))
        })
        .min_by_key(|(at, _)| *at)
        .map(|(_, limit)| limit)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_flag_that_raises_its_limit() {
        let limits = JobLimits::default();
        assert_eq!(
            limit_named("task 3 failed: limit: memory"),
            Some(Limit::Memory)
        );
        assert_eq!(
            limit_named("task 0 failed: limit: gpu-memory (out of limit: time)"),
            Some(Limit::GpuMemory)
        );
        assert_eq!(limit_named("task 1 failed: exit: 3"), None);
        let hint = |limit| {
            raise_hint(limit, &limits).map(|(was, flag)| {
                // What the hint suggests parses as the flag does.
                let value = flag.split_once(' ').unwrap().1;
                assert!(
                    parse_size(value).is_ok() || parse_time_limit(value).is_ok(),
                    "{flag}"
                );
                format!("{was}: {flag}")
            })
        };
        assert_eq!(
            hint(Limit::Memory).as_deref(),
            Some("its memory limit was 512 MiB: --memory 1GiB")
        );
        assert_eq!(
            hint(Limit::Time).as_deref(),
            Some("its time limit was 10m: --timeout 20min")
        );
        assert_eq!(raise_hint(Limit::OpenFiles, &limits), None);
    }
}
