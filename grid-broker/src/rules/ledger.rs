//! The usage ledger (`grid_usage`): what each attempt cost.
//!
//! Every attempt that ran on a node and sent a result is billable to the tenant — a failed
//! attempt that is retried, each replica, a task cancelled while it ran (a replica whose result
//! lost its task's vote is billed but not paid to its provider: `grid usage` checks the entry's
//! digest against the task's record) — and is written once, keyed by tenant, job, task, attempt
//! and replica (a create: the same attempt delivered twice, or run by two nodes after a lapsed
//! ack, is billed once, to the first node whose result arrives). A task handed back by its node
//! sends no result and is not billed; neither is a `lost` report, which ran nothing. The entry
//! is written before the result is counted, so a broker killed in between finds it on
//! redelivery and does not bill it again. Usage comes from the provider, so it is billed only
//! within the job's limits ([`grid_proto::Usage::within`]).

use grid_proto::{JobRecord, Outcome, Reason, ResultMsg, UsageEntry, names};

/// What billing a result takes.
#[derive(Debug, PartialEq)]
pub enum Billing {
    /// Create this ledger entry under this key (an existing key: billed already).
    Bill(String, Box<UsageEntry>),
    /// Nothing to bill: nothing ran, or no such task.
    Nothing,
    /// The job is not held: bill it from its stored record ([`entry`]).
    ReadJob,
}

/// The ledger entry of `result`'s attempt of `job`, if it is billable: a task of the job, an
/// attempt and replica the broker may have sent out, and something ran.
pub fn entry(job: &JobRecord, result: &ResultMsg, now_ms: u64) -> Option<(String, UsageEntry)> {
    if result.outcome == Outcome::Failed(Reason::Lost) || result.index >= job.counts.total {
        return None;
    }
    if let Some(why) = super::results::forged_numbers(job, result) {
        tracing::warn!(job = %result.job_id, index = result.index, node = %result.node_id, "not billing a result: {why}");
        return None;
    }
    let spec = &job.spec;
    let key = names::usage_key(
        &spec.tenant,
        &result.job_id,
        result.index,
        result.attempt,
        result.replica,
    );
    let entry = UsageEntry {
        tenant: spec.tenant.clone(),
        job_id: result.job_id.clone(),
        index: result.index,
        attempt: result.attempt,
        replica: result.replica,
        node_id: result.node_id.clone(),
        // A provider bills no more than the limits it enforced.
        usage: result.usage.within(&spec.limits),
        recorded_unix_ms: now_ms,
        replicas: spec.replicas,
        digest: result.digest,
        round: grid_proto::round_of(result.attempt, spec.retries),
    };
    Some((key, entry))
}
