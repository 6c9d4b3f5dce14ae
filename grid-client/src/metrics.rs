//! Prometheus metrics of a broker or a node: text at `http://ADDR/metrics` (any path answers)
//! when it runs with `--metrics ADDR`. Without it the `metrics` macros record nothing.
//!
//! The names are a contract (dashboards and alerts rely on them):
//!
//! | metric | kind | labels | from |
//! |---|---|---|---|
//! | `grid_tasks_counted_total` | counter | `state` (`succeeded`, `failed`, `disputed`), `reason` | broker: each task counted once, final |
//! | `grid_attempts_failed_total` | counter | `reason` (`exit`, `trap`, `limit: memory`, …) | broker: every failed attempt, retried or not |
//! | `grid_task_retries_total` | counter | | broker |
//! | `grid_duplicate_results_total` | counter | | broker: results dropped as already counted |
//! | `grid_tasks` | gauge | `state` (`queued`: not yet sent; `in_flight`: in the queue or running) | broker, over running jobs |
//! | `grid_jobs_running` | gauge | | broker |
//! | `grid_task_seconds` | histogram | | broker: wall time of each counted task |
//! | `grid_node_slots`, `grid_node_slots_busy` | gauge | | node |
//! | `grid_node_tasks_total` | counter | `outcome` (`succeeded`, or the reason's kind) | node: each task it ran |
//! | `grid_limit_hits_total` | counter | `limit` | node |
//! | `grid_node_task_seconds` | histogram | | node: wall time in the sandbox |
//! | `grid_task_queue_wait_seconds` | histogram | | node: from the task's publication to its start |
//! | `grid_module_loads_total` | counter | `from` (`memory`, `disk`, `compiled`) | node: compiled-module cache |
//! | `grid_task_gpu_seconds` | histogram | | node: GPU time of each task that used the GPU (its `_sum` is the total) |
//! | `grid_task_redeliveries_total` | counter | | node: task messages delivered more than once |

use anyhow::{Result, anyhow};
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use std::net::SocketAddr;

/// Histogram buckets, in seconds: from a trivial task to a long one.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    1800.0,
];

/// Starts the exporter: this process's metrics at `http://addr/metrics`. Call once, inside a
/// tokio runtime.
pub fn serve(addr: SocketAddr) -> Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(SECONDS_BUCKETS)
        .map_err(|e| anyhow!("metrics: {e}"))?
        .install()
        .map_err(|e| anyhow!("--metrics {addr}: {e}"))?;
    describe();
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}

fn describe() {
    describe_counter!(
        "grid_tasks_counted_total",
        "Tasks counted in their job, once each, by final state"
    );
    describe_counter!(
        "grid_attempts_failed_total",
        "Failed attempts, retried or not, by reason"
    );
    describe_counter!(
        "grid_task_retries_total",
        "Attempts sent again after a failure"
    );
    describe_counter!(
        "grid_duplicate_results_total",
        "Results dropped because their task was already counted"
    );
    describe_gauge!(
        "grid_tasks",
        "Tasks of running jobs: queued (not yet sent to nodes) or in flight (in the queue or running)"
    );
    describe_gauge!("grid_jobs_running", "Jobs that have not ended");
    describe_histogram!(
        "grid_task_seconds",
        Unit::Seconds,
        "Wall time of each counted task"
    );
    describe_gauge!("grid_node_slots", "Task slots of this node");
    describe_gauge!("grid_node_slots_busy", "Slots running a task now");
    describe_counter!("grid_node_tasks_total", "Tasks this node ran, by outcome");
    describe_counter!(
        "grid_limit_hits_total",
        "Tasks ended by a hard limit, by limit"
    );
    describe_histogram!(
        "grid_node_task_seconds",
        Unit::Seconds,
        "Wall time of each task in the sandbox"
    );
    describe_histogram!(
        "grid_task_queue_wait_seconds",
        Unit::Seconds,
        "From a task's publication to its start on this node"
    );
    describe_counter!(
        "grid_module_loads_total",
        "Modules made ready to run, by where the compiled code came from"
    );
    describe_histogram!(
        "grid_task_gpu_seconds",
        Unit::Seconds,
        "GPU time of each task that used the GPU"
    );
    describe_counter!(
        "grid_task_redeliveries_total",
        "Task messages delivered to this node more than once"
    );
}
