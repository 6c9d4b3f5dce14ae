//! What the broker accepts of a result, and the final record it makes of one.
//!
//! A provider may publish results only under its own node id (NATS enforces the subject), but
//! it writes every field of them: a result that names another node, a tenant that is not its
//! job's, or an attempt or replica number the broker never sent out is a forgery, and so is
//! the message that carries it.

use grid_proto::{JobRecord, Outcome, Reason, ResultMsg, TaskRecord, TaskState};

/// Why `result`'s attempt or replica number cannot be one the broker sent out for `job`, if
/// so.
pub fn forged_numbers(job: &JobRecord, result: &ResultMsg) -> Option<String> {
    if !job.attempt_sent(result.attempt) {
        return Some(format!(
            "it names attempt {}, past the job's last",
            result.attempt
        ));
    }
    let most = super::votes::max_replicas(job.spec.replicas);
    if result.replica >= most {
        return Some(format!(
            "it names replica {} of a job of {} replicas",
            result.replica, job.spec.replicas
        ));
    }
    None
}

/// Whether a failed attempt with this outcome is worth another (a refused module or a
/// cancelled task fails the same way every time).
pub fn retryable(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Failed(r) if !matches!(r, Reason::Invalid(_) | Reason::Cancelled))
}

/// The final record of a task of `job` (without replicas) that `result` ends, given the
/// reasons its earlier attempts of the round failed.
pub fn final_record(job: &JobRecord, result: &ResultMsg, mut failures: Vec<String>) -> TaskRecord {
    let state = if result.outcome == Outcome::Succeeded {
        TaskState::Succeeded
    } else {
        TaskState::Failed
    };
    if let Some(reason) = result.outcome.reason() {
        failures.push(reason.to_string());
    }
    TaskRecord {
        state,
        // This round's; an earlier round's record adds its own when this one replaces it.
        attempts: result.attempt.saturating_sub(job.first_attempt()) + 1,
        failures,
        result: result.clone(),
        votes: Vec::new(),
        round: job.retried,
        earlier: Vec::new(),
    }
}

/// What to count when a task's final record could not be created because `stored` holds its
/// key.
#[derive(Debug, PartialEq)]
pub enum Reconcile {
    /// Stored by an earlier create whose reply never came (or decided already): count what is
    /// stored.
    Count(TaskRecord),
    /// An earlier round's failure, retried: this round's record takes its place
    /// (compare-and-set on the stored revision), telling of it; count it once stored.
    Replace(TaskRecord),
}

/// See [`Reconcile`].
pub fn reconcile(record: &TaskRecord, stored: TaskRecord) -> Reconcile {
    if stored.round >= record.round || stored.state == TaskState::Succeeded {
        Reconcile::Count(stored)
    } else {
        Reconcile::Replace(record.after(&stored))
    }
}
