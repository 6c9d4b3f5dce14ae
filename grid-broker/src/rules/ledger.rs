//! The usage ledger (`grid_usage`): what each attempt cost.
//!
//! Every attempt that ran on a node and sent a result is billable to the tenant — a failed
//! attempt that is retried, each replica (a replica whose result lost its task's vote is billed
//! but not paid to its provider: `grid usage` checks the entry's digest against the task's
//! record) — and is written once, keyed by tenant, job, task, attempt and replica (a create: the
//! same attempt delivered twice, or run by two nodes after a lapsed ack, is billed once, to the
//! first node whose result arrives). A task handed back by its node sends no result and is not
//! billed; neither is a `lost` report, which ran nothing. The entry is written before the
//! result is counted, so a broker killed in between finds it on redelivery and does not bill it
//! again.
//!
//! What a provider reports is bounded by what the broker knows: an attempt is billed only under
//! the broker's seal of the message that sent it ([`super::seal`]); only while its job's round
//! runs (nothing for a job that ended or went on to a later round; for a cancelled job, the
//! attempts sent out before the cancel, for no more time than until [`SETTLE_MS`] after it); no more time
//! than the job's limits allow ([`grid_proto::Usage::within`]); and no more time than passed
//! between sending the message and taking in the result, by the broker's clock
//! ([`bound_by_elapsed`] — for a run of short tasks, which a node runs one after another, that
//! time bounds their sum). The time a message waited in the queue before a node pulled it is
//! inside that bound: the broker does not see the pull.

use grid_proto::{JobRecord, JobState, Outcome, Reason, ResultMsg, UsageEntry, names};

/// What billing a result takes.
#[derive(Debug, PartialEq)]
pub enum Billing {
    /// Create this ledger entry under this key (an existing key: billed already).
    Bill(String, Box<UsageEntry>),
    /// Nothing to bill: nothing ran, no such task, or its round has ended.
    Nothing,
}

/// The ledger entry of `result`'s attempt of `job` (a held job), if it is billable: a task of
/// the job, an attempt and replica of the job's running round, and something ran.
pub fn entry(job: &JobRecord, result: &ResultMsg, now_ms: u64) -> Option<(String, UsageEntry)> {
    let stopped = stopped_by_cancel(job, result);
    if result.outcome == Outcome::Failed(Reason::Lost)
        || result.index >= job.counts.total
        || (job.state.is_final() && stopped.is_none())
        || result.attempt < job.first_attempt()
    {
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
        // A provider bills no more than the limits it enforced, nor past a cancel.
        usage: match stopped {
            Some(most) => bound_seconds(result.usage.within(&spec.limits), most),
            None => result.usage.within(&spec.limits),
        },
        recorded_unix_ms: now_ms,
        replicas: spec.replicas,
        digest: result.digest,
        round: grid_proto::round_of(result.attempt, spec.retries),
    };
    Some((key, entry))
}

/// How long after a cancel the broker keeps its job's record to bill the attempts its nodes
/// stop, and the most time past the cancel it bills them for (a node stops a task within an
/// epoch tick of hearing the cancel; this covers a slow report).
pub const SETTLE_MS: u64 = 10_000;

/// For an attempt of a cancelled job sent out before the cancel: the most seconds it may be
/// billed, from when its message went out to the cancel plus [`SETTLE_MS`]. `None` for any
/// other attempt.
fn stopped_by_cancel(job: &JobRecord, result: &ResultMsg) -> Option<f64> {
    let cancelled_at = job
        .finished_unix_ms
        .filter(|_| job.state == JobState::Cancelled)?;
    let out = out_since(&result.seal);
    (out <= cancelled_at).then(|| (cancelled_at + SETTLE_MS).saturating_sub(out) as f64 / 1000.0)
}

/// `usage` with its CPU, wall and GPU seconds at most `most`.
fn bound_seconds(mut usage: grid_proto::Usage, most: f64) -> grid_proto::Usage {
    for seconds in [
        &mut usage.cpu_seconds,
        &mut usage.wall_seconds,
        &mut usage.gpu_seconds,
    ] {
        *seconds = seconds.clamp(0.0, most);
    }
    usage
}

/// When a sealed message went out to its node: when it was handed over (its send time, for a
/// seal never handed, as in the rules' own tests).
fn out_since(seal: &grid_proto::Seal) -> u64 {
    if seal.handed_unix_ms > 0 {
        seal.handed_unix_ms
    } else {
        seal.sent_unix_ms
    }
}

/// Bounds the times of `results` (one results message) by how long their task message was
/// out: from when it was handed to its node (its seal's) to `now_ms`. Each result's CPU, wall and GPU seconds are at
/// most that; so are their sums over the results of one message (a run's tasks run one after
/// another), scaled down together when over.
pub fn bound_by_elapsed(results: &mut [ResultMsg], now_ms: u64) {
    let elapsed = |r: &ResultMsg| now_ms.saturating_sub(out_since(&r.seal)) as f64 / 1000.0;
    for result in results.iter_mut() {
        let most = elapsed(result);
        let usage = &mut result.usage;
        for seconds in [
            &mut usage.cpu_seconds,
            &mut usage.wall_seconds,
            &mut usage.gpu_seconds,
        ] {
            *seconds = if seconds.is_finite() {
                seconds.clamp(0.0, most)
            } else {
                0.0
            };
        }
    }
    let mut seals: Vec<grid_proto::Seal> = results.iter().map(|r| r.seal).collect();
    seals.dedup();
    for seal in seals {
        let most = now_ms.saturating_sub(out_since(&seal)) as f64 / 1000.0;
        let of_seal = |r: &&mut ResultMsg| r.seal == seal;
        let sum = |pick: fn(&grid_proto::Usage) -> f64, results: &mut [ResultMsg]| {
            results
                .iter_mut()
                .filter(of_seal)
                .map(|r| pick(&r.usage))
                .sum::<f64>()
        };
        let scale = [
            sum(|u| u.cpu_seconds, results),
            sum(|u| u.wall_seconds, results),
            sum(|u| u.gpu_seconds, results),
        ]
        .into_iter()
        .filter(|&total| total > most)
        .map(|total| most / total)
        .fold(1.0, f64::min);
        if scale < 1.0 {
            for result in results.iter_mut().filter(of_seal) {
                result.usage.cpu_seconds *= scale;
                result.usage.wall_seconds *= scale;
                result.usage.gpu_seconds *= scale;
            }
        }
    }
}
