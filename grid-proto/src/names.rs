//! Every NATS subject, stream, consumer, bucket and header name Grid uses, in one place.
//! With the `nats` CLI and this file, a person can read a grid's layout.
//!
//! | name | kind | holds |
//! |---|---|---|
//! | `GRID_TASKS` | work-queue stream, subjects `grid.tasks.<class>.<job>` | tasks waiting for a node |
//! | `nodes-<class>` | durable pull consumer on `GRID_TASKS` | pulled by the broker only, which hands messages to nodes (`grid.provider.<node>.take`) |
//! | `GRID_RESULTS` | stream, subjects `grid.results.<node id>.<job>` | results, deduplicated by `job.task.attempt`; a provider may publish only under its own node id |
//! | `broker` | durable pull consumer on `GRID_RESULTS` | the broker's intake |
//! | `grid_jobs` | KV, key `<tenant>.<job>` | the job record ([`crate::JobRecord`]) |
//! | `grid_tasks` | KV, key `<tenant>.<job>.<index>` | each task's final state ([`crate::TaskRecord`]) |
//! | `grid_nodes` | KV with a TTL, key `<node id>` | node heartbeats ([`crate::NodeInfo`]) |
//! | `grid_votes` | KV, key `<job>.<index>.<round>.<replica>` | each replica's result, stored once ([`crate::ResultMsg`]) |
//! | `grid_claims` | KV, key `<job>.<index>.<round>.<node id>` | which replica of a task a node took: never two on one node |
//! | `grid_tally` | KV, key `<node id>` | votes each node's results won and lost ([`crate::NodeTally`]) |
//! | `grid_secrets` | KV, key `seal` | the broker's key for sealing task messages ([`crate::Seal`]); the operator's alone |
//! | `grid_usage` | KV, key `<tenant>.<job>.<index>.<attempt>.<replica>` | the usage ledger: one entry per billable attempt ([`crate::UsageEntry`]) |
//! | `GRID_STAGE_<node id>` | stream, subject `grid.stage.<node id>`, one per provider | what a provider hands the broker: its tasks' outputs and logs, in chunks; no rollups, no purges, capped in bytes and age; the broker verifies each blob, copies it into the tenant's store and deletes the chunks |
//! | `grid.provider.<node id>.stage`, `.take`, `.report`, `.claim` | request/reply to the broker | a provider asks for its stage stream, for task messages, reports them done, handed back or still held, and claims a replica |
//! | `grid_store_<tenant>` | object store, one per tenant, name `<sha256>` | the tenant's modules, params files, inputs, outputs, logs |
//! | `grid.api.<tenant>.submit`, `.cancel`, `.retry`, `.delete`, `.storage`, `.owner` | request/reply to the broker | job intake, cancel, retry, delete; creating the tenant's store; who owns a job |
//! | `grid.cancel.<job>` | core NATS broadcast | tells nodes to stop a cancelled job's tasks sent before the cancel time it carries (decimal Unix ms) |
//! | `grid.events.<tenant>.<job>` | core NATS, empty (or `deleted`) | the job's record changed (`grid status --wait` re-reads it), or was deleted |
//! | `_INBOX_<user>.>` | reply subjects | each user's own inbox prefix, so that nobody reads another's replies |
//!
//! Keys and subjects lead with the tenant so that a NATS permission (a subject with a wildcard
//! after the tenant) can grant a tenant its own entries and nothing else; see
//! `grid_client::auth` for the permissions of each role.

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
/// The broker's secrets: read and written by the operator's credentials only.
pub const SECRETS_BUCKET: &str = "grid_secrets";
/// The key in [`SECRETS_BUCKET`] of the broker's sealing key.
pub const SEAL_KEY: &str = "seal";
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
pub fn results_subject(node: &str, job: &str) -> String {
    format!("grid.results.{node}.{job}")
}
/// The node id a result was published under (the subject a provider's permissions allow).
pub fn result_node(subject: &str) -> Option<&str> {
    subject.strip_prefix("grid.results.")?.split('.').next()
}
/// `grid.api.<tenant>.<verb>`: a request of `tenant`'s to the broker.
pub fn api_subject(tenant: &str, verb: &str) -> String {
    format!("grid.api.{tenant}.{verb}")
}
/// The payload of a job event that says the job was deleted (others are empty).
pub const JOB_DELETED: &[u8] = b"deleted";

/// Published by the broker each time it saves a job's record: a tenant may subscribe to its
/// own (`grid.events.<tenant>.>`), where it may not watch the bucket.
pub fn job_events(tenant: &str, job: &str) -> String {
    format!("grid.events.{tenant}.{job}")
}
pub fn cancel_broadcast(job: &str) -> String {
    format!("grid.cancel.{job}")
}
/// The JetStream message id of one attempt of one replica of one task (`Nats-Msg-Id`): a retry or
/// another replica is a new id, a redelivery or a republish of the same attempt is not.
pub fn attempt_id(job: &str, index: u64, attempt: u32, replica: u32) -> String {
    format!("{job}.{index}.{attempt}.{replica}")
}
/// A replica's vote, in the task's round (see `JobRecord::retried`): each round votes afresh.
pub fn vote_key(job: &str, index: u64, round: u32, replica: u32) -> String {
    format!("{job}.{index}.{round}.{replica}")
}
/// A node's claim on a replica of a task, in the task's round: a claim of an earlier round
/// never keeps a node from a replica of a later one.
pub fn claim_key(job: &str, index: u64, round: u32, node: &str) -> String {
    format!("{job}.{index}.{round}.{node}")
}
/// A ledger entry's key: one per attempt of one replica of a task, whichever node ran it, so
/// that an attempt delivered twice is billed once. The tenant leads, so that a tenant's entries
/// are one subject filter (`$KV.grid_usage.<tenant>.>`).
pub fn usage_key(tenant: &str, job: &str, index: u64, attempt: u32, replica: u32) -> String {
    format!("{tenant}.{job}.{index}.{attempt}.{replica}")
}
pub fn job_key(tenant: &str, job: &str) -> String {
    format!("{tenant}.{job}")
}
pub fn task_key(tenant: &str, job: &str, index: u64) -> String {
    format!("{tenant}.{job}.{index}")
}
/// The stream where provider `node` stages outputs and logs for the broker.
pub fn stage_stream(node: &str) -> String {
    format!("GRID_STAGE_{node}")
}
/// The one subject of [`stage_stream`]: a provider may publish there and nowhere else in
/// JetStream's stores.
pub fn stage_subject(node: &str) -> String {
    format!("grid.stage.{node}")
}
/// The bytes of each staged chunk but a blob's last.
pub const STAGE_CHUNK_BYTES: u64 = 256 * 1024;

/// The largest blob a result may carry in itself instead of staging it (see
/// [`crate::Staged`]).
pub const INLINE_BLOB_BYTES: u64 = 16 * 1024;

/// What a node carries inline in one results message at most, all blobs together: the message
/// stays far below NATS's 1 MiB payload with every other field of its results.
pub const INLINE_MESSAGE_BYTES: u64 = 256 * 1024;
/// `grid.provider.<node>.<verb>`: a request of provider `node`'s to the broker.
pub fn provider_subject(node: &str, verb: &str) -> String {
    format!("grid.provider.{node}.{verb}")
}
/// The node id of a provider request's subject.
pub fn provider_of(subject: &str) -> Option<(&str, &str)> {
    let mut tokens = subject.strip_prefix("grid.provider.")?.split('.');
    match (tokens.next(), tokens.next(), tokens.next()) {
        (Some(node), Some(verb), None) => Some((node, verb)),
        _ => None,
    }
}

/// The object store holding everything of one tenant's: modules, params, inputs, outputs, logs.
/// One bucket per tenant, because NATS grants object-store access per bucket.
pub fn tenant_store(tenant: &str) -> String {
    format!("grid_store_{tenant}")
}
pub fn object_name(sha256: &crate::Sha256Hex) -> String {
    sha256.to_string()
}

/// Whether `name` can name a tenant or a provider (node id): it becomes one token of subjects,
/// keys and bucket names, so 1 to 32 ASCII letters, digits, `-` and `_`.
pub fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
