//! How a job's record changes when a tenant retries or cancels it.
//!
//! **Retry** (`grid retry JOB --failed`): a failed job starts a new *round*
//! (`JobRecord::retried`), which owns `retries + 1` attempt numbers of its own (see
//! `JobRecord::first_attempt`), and goes back to queued; once its task records are read, the
//! fill sends out the tasks without a record of the round or a success. Earlier rounds' records
//! stay until the new round's result of the task replaces them (see `Rules::reconcile`). The
//! saved record is the commitment: a broker that dies before saving it changed nothing; one
//! that dies after resumes the job in its new round; a save whose reply was lost leaves a
//! queued job no broker holds, which the next `grid retry` takes up.
//!
//! **Cancel** ends a job at once: its record is saved `cancelled`, its queued tasks are dropped
//! and its nodes told to stop its running ones, which end `cancelled` with what they used. The
//! broker keeps the record a while ([`crate::rules::Rules::settle`]) to bill those last
//! attempts, no later than the cancel allowed. A cancelled job can be retried: its round runs
//! every task that has not succeeded.

use anyhow::{Result, bail};
use grid_proto::{JobLimits, JobRecord, JobState, TaskCounts};

/// What a retry request does to an ended job's record.
#[derive(Debug, PartialEq)]
pub enum Retry {
    /// Save this record (the new round), then hold the job.
    Save(JobRecord),
    /// A round saved by a retry whose reply was lost: hold the job as it is.
    TakeUp(JobRecord),
}

/// The retry of the job whose stored record is `record` (a job the broker does not hold), with
/// new `limits` for its round if given (checked as a submit's are: see
/// [`grid_proto::JobSpec::validate`]; whether a live node takes them is the caller's to check).
pub fn retry(mut record: JobRecord, limits: Option<JobLimits>) -> Result<Retry> {
    let job_id = record.id.clone();
    let counts = &record.counts;
    let tasks = counts.failed + counts.disputed + counts.cancelled;
    match record.state {
        JobState::Failed | JobState::Cancelled if tasks > 0 => {}
        state if state.is_final() => {
            bail!("job {job_id} has no failed tasks ({})", state.as_str())
        }
        _ => return Ok(Retry::TakeUp(record)),
    }
    // Each round has `retries + 1` attempt numbers of its own, in a u32.
    let retried = record.retried + 1;
    let attempts = u64::from(record.spec.retries) + 1;
    if u64::from(retried) * attempts + attempts > u64::from(u32::MAX) {
        bail!(
            "job {job_id} has been retried {} times: submit it again",
            record.retried
        );
    }
    if let Some(limits) = limits {
        record.spec.limits = limits;
        record.spec.validate().map_err(anyhow::Error::msg)?;
    }
    record.retried = retried;
    record.state = JobState::Queued;
    record.reason = None;
    record.finished_unix_ms = None;
    record.enqueued = 0;
    record.counts = TaskCounts {
        total: record.counts.total,
        succeeded: record.counts.succeeded,
        ..TaskCounts::default()
    };
    Ok(Retry::Save(record))
}

/// The record of a job cancelled at `now_ms`, or why it cannot be. Its tasks that had not ended
/// end `cancelled`: none is running once its node hears of the cancel, and none is queued.
pub fn cancel(mut record: JobRecord, now_ms: u64) -> Result<JobRecord> {
    if record.state.is_final() {
        bail!(
            "job {} already ended ({})",
            record.id,
            record.state.as_str()
        );
    }
    let counts = &mut record.counts;
    counts.cancelled = counts
        .total
        .saturating_sub(counts.succeeded + counts.failed + counts.disputed);
    counts.in_flight = 0;
    counts.running = 0;
    record.state = JobState::Cancelled;
    record.reason = Some("cancelled".into());
    record.finished_unix_ms = Some(now_ms);
    Ok(record)
}
