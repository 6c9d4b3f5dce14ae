//! What the broker accepts of a result, and the final record it makes of one.
//!
//! A provider may publish results only under its own node id (NATS enforces the subject), but
//! it writes every field of them: a result that names another node, a tenant that is not its
//! job's, or an attempt or replica number the broker never sent out is a forgery, and so is
//! the message that carries it.

use grid_proto::{JobRecord, Limit, Outcome, Reason, ResultMsg, Sha256Hex, TaskRecord, TaskState};

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

/// Whether a failed attempt with this outcome is worth another: only a failure that can end
/// differently on another try — lost (its node died or gave up), or over a time limit (a node
/// slower or busier than another). A task runs deterministically (fixed clocks, seeded
/// randomness, the same inputs), so an exit code, a trap (a panic), a memory, output or GPU
/// buffer limit, a refused module and a cancel fail the same way every time.
pub fn retryable(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Failed(Reason::Lost | Reason::Limit(Limit::Time | Limit::GpuTime))
    )
}

/// The final record of a task of `job` (without replicas) that `result` ends, given the
/// reasons its earlier attempts of the round failed.
pub fn final_record(job: &JobRecord, result: &ResultMsg, mut failures: Vec<String>) -> TaskRecord {
    let state = if result.outcome == Outcome::Succeeded {
        TaskState::Succeeded
    } else {
        TaskState::Failed
    };
    failures.extend(result.failure());
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

/// The most bytes a log may have: the sandbox keeps 4 MiB of each stream (more is dropped and
/// marked `logs_truncated`); a staged log past this is not what a node sends.
pub const MOST_LOG_BYTES: u64 = grid_proto::caps::LOG_BYTES;

/// Why `result`'s staged blobs cannot be what it says, before reading any of them, if so: its
/// file paths must be ones a walk of `/out` gives ([`grid_proto::files_clash`]), each file and
/// log it names must be staged with that hash and size, and its files together may not hold
/// more than `max_output_bytes` (the job's limit, when its job is held).
pub fn staged_check(result: &ResultMsg, max_output_bytes: Option<u64>) -> Option<String> {
    if let Some(why) = grid_proto::files_clash(&result.files) {
        return Some(why);
    }
    let staged = |sha: &Sha256Hex| result.staged.iter().find(|s| s.sha256 == *sha);
    // What is stored: each blob once, however many names it has (hard links, equal files).
    let mut total = 0u64;
    let mut counted = std::collections::HashSet::new();
    for file in &result.files {
        match staged(&file.sha256) {
            Some(s) if s.bytes == file.bytes => {
                if counted.insert(file.sha256) {
                    total = total.saturating_add(file.bytes);
                }
            }
            Some(s) => {
                return Some(format!(
                    "file {:?} is {} bytes but its blob {} is {}",
                    file.path, file.bytes, file.sha256, s.bytes
                ));
            }
            None => return Some(format!("file {:?} was not staged", file.path)),
        }
    }
    if let Some(most) = max_output_bytes
        && total > most
    {
        return Some(format!(
            "its files hold {total} bytes, more than the job's {most}"
        ));
    }
    for log in [result.stdout, result.stderr].iter().flatten() {
        match staged(log) {
            Some(s) if s.bytes <= MOST_LOG_BYTES => {}
            Some(s) => return Some(format!("a log of {} bytes", s.bytes)),
            None => return Some(format!("log {log} was not staged")),
        }
    }
    let mut shas: Vec<Sha256Hex> = result.staged.iter().map(|s| s.sha256).collect();
    shas.sort();
    shas.dedup();
    if shas.len() != result.staged.len() {
        return Some("a blob staged twice".into());
    }
    if result.staged.len() > result.files.len() + 2 {
        return Some(format!(
            "{} blobs staged for {} files",
            result.staged.len(),
            result.files.len()
        ));
    }
    None
}

/// Why `result`'s digest is not the one its outcome and (checked) files give, if so: the
/// broker never takes a node's word for what replicas compare.
pub fn digest_check(result: &ResultMsg) -> Option<String> {
    let digest = grid_proto::result_digest(&result.outcome, &result.files);
    (digest != result.digest).then(|| {
        format!(
            "it reports digest {} for outputs whose digest is {digest}",
            result.digest
        )
    })
}

/// `result` as the broker takes it once its blobs are checked (`blobs`: what was wrong with
/// them, if anything), with nothing staged left to name. A result whose blobs or digest
/// ([`digest_check`]) are not what it says is taken as a lost attempt — no files, no logs,
/// nothing billed — so that its task runs again like any lost one.
pub fn verify(result: &mut ResultMsg, blobs: Option<String>) {
    result.staged = Vec::new();
    if let Some(why) = blobs.or_else(|| digest_check(result)) {
        tracing::warn!(job = %result.job_id, index = result.index, node = %result.node_id, "a result whose outputs are not what it says: {why}; taken as lost");
        metrics::counter!("grid_results_forged_total", "node" => result.node_id.clone())
            .increment(1);
        result.outcome = Outcome::Failed(Reason::Lost);
        result.files = Vec::new();
        result.stdout = None;
        result.stderr = None;
        result.digest = grid_proto::result_digest(&result.outcome, &[]);
    }
}
