//! Hard limits for one task, and the caps a node puts on them.
//!
//! A job asks for [`Limits`]; the node applies its [`NodeCaps`] with [`Limits::capped_by`] — the one
//! place where a request meets a provider's ceiling. Every limit ends only the task that hits it,
//! with a `limit: …` reason; the node and its engine go on serving.
//!
//! What the limits do **not** cover: host memory spent on a task's behalf outside linear memory and
//! tables (WASI's bookkeeping, captured logs up to their cap, the compiled code) is bounded by the
//! other limits rather than counted; the wasm stack is a per-node engine setting
//! ([`crate::SandboxConfig::max_wasm_stack_bytes`]), not a per-task one.
//!
//! # Example: a task that hits its memory limit
//! ```
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! use grid_sandbox::{Limits, Sandbox, SandboxConfig, TaskSpec};
//! // Grows memory 1 MiB at a time until `memory.grow` fails, then gives up.
//! let bomb = wat::parse_str(r#"(module (memory 1)
//!     (func (export "_start")
//!       (loop (br_if 0 (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
//!       unreachable))"#)?;
//! let sandbox = Sandbox::new(SandboxConfig::default())?;
//! let limits = Limits { memory_bytes: 16 << 20, ..Limits::default() };
//! let module = sandbox.load(&bomb, &limits).await.map_err(|r| anyhow::anyhow!("{r}"))?;
//! let out = tempfile::tempdir()?;
//! let mut task = TaskSpec::new(out.path());
//! task.limits = limits;
//! let report = sandbox.run(&module, task).await;
//! assert_eq!(report.outcome.reason().unwrap().to_string(), "limit: memory");
//! # Ok(()) }
//! ```

use std::time::Duration;

/// Per-task limits. `Default` gives the defaults of the sandbox contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory, summed over the task's memories. Default 512 MiB. `memory.grow` past it
    /// fails inside the guest (returns -1); if the task then fails, its reason is `limit: memory`.
    pub memory_bytes: u64,
    /// Elements over all tables. Default 100,000.
    pub table_elements: u64,
    /// Wall time from the first guest instruction to exit; CPU time is capped by the same
    /// value (a single-threaded guest cannot use more CPU than wall time). Default 10 min.
    /// Compiling the module is not charged.
    pub timeout: Duration,
    /// Apparent size of everything under `/out` (a sparse file counts at its full length).
    /// Default 1 GiB.
    pub max_output_bytes: u64,
    /// Entries (files, directories, links) created under `/out`. Default 10,000.
    pub max_output_files: u64,
    /// WASI handles open at once (files, directories, streams). Default 256.
    pub max_open_files: u64,
    /// Captured bytes of stdout, and separately of stderr; more is dropped and marked
    /// `logs_truncated`, and the task goes on. Default 4 MiB.
    pub max_log_bytes: u64,
    /// GPU buffer bytes, objects, dispatch size and count, shader size and GPU time, for a task
    /// that may use the GPU. See [`grid_gpu::GpuLimits`].
    pub gpu: grid_gpu::GpuLimits,
}

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// The contract's defaults: what a job asks for by default ([`grid_proto::JobLimits`], the one
/// place they are written), and the sandbox's own for what a job cannot set.
impl Default for Limits {
    fn default() -> Self {
        Limits::of_job(&grid_proto::JobLimits::default())
    }
}

/// A provider's ceilings: no task on this node gets more, whatever it asks for.
/// `Default` is the same as [`Limits::default`], i.e. a node accepts the defaults.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeCaps(pub Limits);

impl NodeCaps {
    /// The largest job limits a node with these caps takes (what its heartbeat advertises, and
    /// what a job's limits are checked against before the node runs its task).
    pub fn accepts(&self) -> grid_proto::JobLimits {
        let c = &self.0;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        grid_proto::JobLimits {
            memory_bytes: c.memory_bytes,
            timeout_ms: ms(c.timeout),
            max_output_bytes: c.max_output_bytes,
            gpu_memory_bytes: c.gpu.max_buffer_bytes,
            gpu_time_ms: ms(c.gpu.gpu_time),
        }
    }
}

impl Limits {
    /// A job's limits as its tasks run with them: what the job sets ([`grid_proto::JobLimits`]),
    /// and the sandbox's defaults for the rest. The one conversion from the wire's limits;
    /// [`NodeCaps::accepts`] is the one back.
    pub fn of_job(job: &grid_proto::JobLimits) -> Limits {
        Limits {
            memory_bytes: job.memory_bytes,
            table_elements: 100_000,
            timeout: Duration::from_millis(job.timeout_ms),
            max_output_bytes: job.max_output_bytes,
            max_output_files: 10_000,
            max_open_files: 256,
            max_log_bytes: 4 * MIB,
            gpu: grid_gpu::GpuLimits {
                max_buffer_bytes: job.gpu_memory_bytes,
                gpu_time: Duration::from_millis(job.gpu_time_ms),
                ..grid_gpu::GpuLimits::default()
            },
        }
    }

    /// Each limit lowered to the node's cap where it asks for more.
    pub fn capped_by(&self, caps: &NodeCaps) -> Limits {
        let c = &caps.0;
        Limits {
            memory_bytes: self.memory_bytes.min(c.memory_bytes),
            table_elements: self.table_elements.min(c.table_elements),
            timeout: self.timeout.min(c.timeout),
            max_output_bytes: self.max_output_bytes.min(c.max_output_bytes),
            max_output_files: self.max_output_files.min(c.max_output_files),
            max_open_files: self.max_open_files.min(c.max_open_files),
            max_log_bytes: self.max_log_bytes.min(c.max_log_bytes),
            gpu: self.gpu.capped_by(&c.gpu),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_caps_lower_what_a_task_asks_for_and_nothing_else() {
        let caps = NodeCaps(Limits {
            memory_bytes: 64 * MIB,
            ..Limits::default()
        });
        let asked = Limits {
            memory_bytes: GIB,
            timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        let got = asked.capped_by(&caps);
        assert_eq!(got.memory_bytes, 64 * MIB);
        assert_eq!(got.timeout, Duration::from_secs(5));
    }

    #[test]
    fn node_caps_lower_gpu_limits_too() {
        let mut caps = Limits::default();
        caps.gpu.max_buffer_bytes = MIB;
        caps.gpu.gpu_time = Duration::from_secs(2);
        let mut asked = Limits::default();
        asked.gpu.max_buffer_bytes = GIB;
        asked.gpu.max_objects = 8;
        let got = asked.capped_by(&NodeCaps(caps));
        assert_eq!(got.gpu.max_buffer_bytes, MIB);
        assert_eq!(got.gpu.gpu_time, Duration::from_secs(2));
        assert_eq!(got.gpu.max_objects, 8);
    }
}
