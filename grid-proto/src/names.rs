//! Every NATS subject, stream, consumer, bucket and header name Grid uses, in one place.
//! With the `nats` CLI and this file, a person can read a grid's layout.
//!
//! | name | kind | holds |
//! |---|---|---|
//! | `GRID_TASKS` | work-queue stream, subjects `grid.tasks.<class>.<job>` | tasks waiting for a node |
//! | `nodes-<class>` | durable pull consumer on `GRID_TASKS` | shared by every node of a class |
//! | `GRID_RESULTS` | stream, subjects `grid.results.<job>` | results, deduplicated by `job.task.attempt` |
//! | `broker` | durable pull consumer on `GRID_RESULTS` | the broker's intake |
//! | `grid_jobs` | KV, key `<job>` | the job record ([`crate::JobRecord`]) |
//! | `grid_tasks` | KV, key `<job>.<index>` | each task's final state ([`crate::TaskRecord`]) |
//! | `grid_nodes` | KV with a TTL, key `<node id>` | node heartbeats ([`crate::NodeInfo`]) |
//! | `grid_votes` | KV, key `<job>.<index>.<replica>` | each replica's result, stored once ([`crate::ResultMsg`]) |
//! | `grid_claims` | KV, key `<job>.<index>.<node id>` | which replica of a task a node took: never two on one node |
//! | `grid_tally` | KV, key `<node id>` | votes each node's results won and lost ([`crate::NodeTally`]) |
//! | `grid_usage` | KV, key `<tenant>.<job>.<index>.<attempt>.<replica>` | the usage ledger: one entry per billable attempt ([`crate::UsageEntry`]) |
//! | `grid_modules` | object store, name `<tenant>/<sha256>` | job modules |
//! | `grid_blobs` | object store, name `<tenant>/<sha256>` | params files, inputs, outputs, logs |
//! | `grid.api.<tenant>.submit`, `.cancel` | request/reply to the broker | job intake and cancel |
//! | `grid.cancel.<job>` | core NATS broadcast | tells nodes to stop a cancelled job's tasks |

pub const TASKS_STREAM: &str = "GRID_TASKS";
pub const RESULTS_STREAM: &str = "GRID_RESULTS";
pub const RESULTS_CONSUMER: &str = "broker";
pub const JOBS_BUCKET: &str = "grid_jobs";
pub const TASKS_BUCKET: &str = "grid_tasks";
pub const NODES_BUCKET: &str = "grid_nodes";
pub const VOTES_BUCKET: &str = "grid_votes";
pub const CLAIMS_BUCKET: &str = "grid_claims";
pub const TALLY_BUCKET: &str = "grid_tally";
pub const USAGE_BUCKET: &str = "grid_usage";
pub const MODULES_BUCKET: &str = "grid_modules";
pub const BLOBS_BUCKET: &str = "grid_blobs";
pub const DEFAULT_TENANT: &str = "default";
pub const DEFAULT_CLASS: &str = "cpu";
/// The class of nodes with a GPU; its tasks get the node's GPU through `grid_gpu_v1`.
pub const GPU_CLASS: &str = "gpu";
/// Every class a grid has a task consumer for.
pub const CLASSES: &[&str] = &[DEFAULT_CLASS, GPU_CLASS];

pub fn tasks_subject(class: &str, job: &str) -> String {
    format!("grid.tasks.{class}.{job}")
}
pub fn tasks_filter(class: &str) -> String {
    format!("grid.tasks.{class}.>")
}
pub fn tasks_consumer(class: &str) -> String {
    format!("nodes-{class}")
}
pub fn results_subject(job: &str) -> String {
    format!("grid.results.{job}")
}
pub fn submit_subject(tenant: &str) -> String {
    format!("grid.api.{tenant}.submit")
}
pub fn cancel_subject(tenant: &str) -> String {
    format!("grid.api.{tenant}.cancel")
}
pub fn cancel_broadcast(job: &str) -> String {
    format!("grid.cancel.{job}")
}
/// The JetStream message id of one attempt of one replica of one task (`Nats-Msg-Id`): a retry or
/// another replica is a new id, a redelivery or a republish of the same attempt is not.
pub fn attempt_id(job: &str, index: u64, attempt: u32, replica: u32) -> String {
    format!("{job}.{index}.{attempt}.{replica}")
}
pub fn vote_key(job: &str, index: u64, replica: u32) -> String {
    format!("{job}.{index}.{replica}")
}
pub fn claim_key(job: &str, index: u64, node: &str) -> String {
    format!("{job}.{index}.{node}")
}
/// A ledger entry's key: one per attempt of one replica of a task, whichever node ran it, so
/// that an attempt delivered twice is billed once. The tenant leads, so that a tenant's entries
/// are one subject filter (`$KV.grid_usage.<tenant>.>`).
pub fn usage_key(tenant: &str, job: &str, index: u64, attempt: u32, replica: u32) -> String {
    format!("{tenant}.{job}.{index}.{attempt}.{replica}")
}
pub fn task_key(job: &str, index: u64) -> String {
    format!("{job}.{index}")
}
pub fn object_name(tenant: &str, sha256: &crate::Sha256Hex) -> String {
    format!("{tenant}/{sha256}")
}
