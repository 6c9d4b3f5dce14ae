//! The broker's decisions, with no I/O: what it accepts, counts, retries, bills, sends out and
//! saves. [`Rules`] holds the jobs the broker is running; the shell (`crate::shell`) feeds it
//! what happened — a submit, a results message, a stored or refused create, a job's task
//! records read, a tick — and does what it answers: a [`Step`] (store this record, publish
//! this retry, vote), a [`Fill`] (publish these dispatches), a [`Billing`] (create this ledger
//! entry), records to save. Every rule is unit-tested here in memory (see `tests/`), the way
//! quinn-proto tests QUIC without sockets; the shell's own tests are the end-to-end ones.
//!
//! # The rules
//! - **Counted once.** A task is counted when its final record is *created* in `grid_tasks`; a
//!   second result for it — a redelivery, a republish, a late result of an old attempt — finds
//!   the key taken and is a duplicate. A create whose reply was lost is counted when its
//!   result comes back, from the stored record ([`results::reconcile`]).
//! - **Nothing forged.** A result must carry the broker's seal of the message that sent its
//!   attempt ([`seal`]), and name the node whose subject it came on and its job's tenant
//!   ([`Rules::admit`]); else it is dropped, counted in `grid_results_forged_total` and logged
//!   with the node's id.
//! - **Retries.** A failed attempt (not `invalid:` or `cancelled`) gets another, up to the
//!   job's retries in its round; a lost replica runs again instead of voting.
//! - **Votes.** See [`votes`]. **Ledger.** See [`ledger`]. **Rounds and cancel.** See
//!   [`rounds`]. **Intake.** See [`intake`].
//! - **Fairness.** Each job has at most `window` tasks queued or running, and each tenant's
//!   jobs together at most `tenant_window`; [`Rules::plan_fill`] tops windows up round-robin,
//!   a tenant's jobs of higher priority first, then in job-id order (ids grow with time), so a
//!   small job behind a large one waits one window, not the whole job. Between tenants, the
//!   dispatcher hands out queued tasks by weighted fair share (`shell::dispatch`); the tenant
//!   window keeps each tenant's queue short enough for it to see them all. Short tasks travel several to a message
//!   (see [`ActiveJob::per_message`]).
//! - **Restart.** A held job's results wait ([`Admission::Later`]) until its stored task
//!   records are counted ([`Rules::loaded`]), so nothing is counted on top of what they say.

mod fill;
pub mod intake;
mod job;
pub mod ledger;
pub mod results;
pub mod rounds;
pub mod seal;
pub mod votes;

#[cfg(test)]
mod tests;

pub use job::ActiveJob;
pub use ledger::Billing;
pub use results::Reconcile;
pub use seal::SealKey;

use grid_proto::{JobRecord, Reason, ResultMsg, ResultsMsg, TaskRecord, TaskState, names};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Consecutive tasks sent out in one message: `count` tasks from `index`, as attempt `attempt`
/// of replica `replica`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub job_id: String,
    pub index: u64,
    pub count: u32,
    pub attempt: u32,
    pub replica: u32,
}

impl Dispatch {
    /// Its message id, `job.task.attempt.replica` (`+count` for a run): a second publish of the
    /// same attempt is a duplicate JetStream drops. A run's id names its length, so that a
    /// restarted broker that cuts runs differently sends new work, not a duplicate.
    pub fn message_id(&self) -> String {
        let id = names::attempt_id(&self.job_id, self.index, self.attempt, self.replica);
        match self.count {
            1 => id,
            n => format!("{id}+{n}"),
        }
    }

    /// The task indices it carries.
    pub fn indices(&self) -> std::ops::Range<u64> {
        self.index..self.index + u64::from(self.count)
    }
}

/// One job's top-up of its window: the dispatches to publish and, once all are stored, where
/// the job stands ([`Rules::filled`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Fill {
    pub job_id: String,
    pub dispatches: Vec<Dispatch>,
    /// The job's `enqueued` once these are out.
    pub next: u64,
    /// Tasks newly in flight.
    pub tasks: u64,
}

/// What becomes of a results message.
#[derive(Debug, PartialEq)]
pub enum Admission {
    /// Its results, to bill and count.
    Accept(Vec<ResultMsg>),
    /// Forged or malformed: terminated, never redelivered; the line says why.
    Reject(String),
    /// A job of its results is still loading its task records: ask for it again shortly.
    Later,
}

/// What one accepted result leads to (besides its bill).
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Nothing: no such task, or an earlier round's result (billed only).
    Ignore,
    /// The task is counted already.
    Duplicate,
    /// Create this final record in `grid_tasks` (see [`Rules::create_refused`] when the key is
    /// taken, [`Rules::count_once`] when it is stored).
    Record(Box<TaskRecord>),
    /// The attempt failed and gets another: publish it, then [`Rules::retried`].
    Retry(Dispatch),
    /// A replica's result: see [`Rules::vote_step`].
    Vote,
    /// The job is not held (ended, cancelled, unknown): a late replica's vote may still change
    /// its node's tally ([`votes::late_vote`]).
    Ended,
}

/// The first step of a replica's result.
#[derive(Debug, PartialEq)]
pub enum VoteStep {
    /// Nothing to do (a cancelled replica).
    Ignore,
    /// A lost replica (its node died) runs again instead of voting: publish this.
    RunAgain(Dispatch),
    /// A vote of round `round`: if the task's stored record decided it in that round, count
    /// it ([`Rules::count_once`]) and treat the result as a late vote; else store the vote and
    /// [`Rules::add_vote`].
    Check { round: u32 },
}

/// What a stored vote does to its task.
#[derive(Debug, PartialEq)]
pub enum VoteOutcome {
    /// A vote this broker holds already.
    Duplicate,
    /// A second replica's vote from one node: ignored.
    Ignored,
    /// More votes are coming.
    Waiting,
    /// Replicas disagree: publish one more.
    OneMore(Dispatch),
    /// Decided: create this final record (then tally its votes once it is counted).
    Decided(Box<TaskRecord>),
}

/// What a refused create of a final record (its key taken) leads to.
#[derive(Debug, PartialEq)]
pub enum Taken {
    /// The task is counted already (or its job is no longer held).
    Duplicate,
    /// Read the stored record and [`results::reconcile`] with it.
    ReadStored,
}

/// Cancelled jobs kept at once for billing their last attempts ([`Rules::settle`]).
const SETTLING_MOST: usize = 4096;

/// The jobs a broker holds and every decision about them.
pub struct Rules {
    /// Tasks of one job queued or running at once.
    window: u64,
    /// Tasks of one tenant's jobs queued or running at once.
    tenant_window: u64,
    /// Ordered by job id (ids grow with time): round-robin fill visits older jobs first.
    jobs: BTreeMap<String, ActiveJob>,
    /// Results dropped as duplicates since start (logged when a job finishes).
    duplicates: u64,
    /// Jobs whose task records are being read.
    loading: HashSet<String>,
    /// Cancelled jobs' records, kept a while to bill the attempts their nodes stop
    /// ([`Rules::settle`]).
    settling: HashMap<String, JobRecord>,
    /// The clock, in Unix milliseconds.
    now: fn() -> u64,
    /// Seals task messages and checks results' seals.
    seal: SealKey,
}

impl Rules {
    pub fn new(window: u64, now: fn() -> u64, seal: SealKey) -> Self {
        Self {
            window,
            tenant_window: u64::MAX,
            jobs: BTreeMap::new(),
            duplicates: 0,
            loading: HashSet::new(),
            settling: HashMap::new(),
            now,
            seal,
        }
    }

    /// Caps the tasks of one tenant's jobs queued or running at once (no cap by default).
    pub fn with_tenant_window(mut self, tenant_window: u64) -> Self {
        self.tenant_window = tenant_window.max(1);
        self
    }

    /// The job `id`, if held.
    pub fn job(&self, id: &str) -> Option<&ActiveJob> {
        self.jobs.get(id)
    }

    /// Results dropped as duplicates since start.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Holds a job: a new one (`loaded`: it has no task records), or one resumed or retried
    /// (its results wait until [`Rules::loaded`]).
    pub fn hold(&mut self, record: JobRecord, loaded: bool) {
        self.jobs
            .insert(record.id.clone(), ActiveJob::new(record, loaded));
    }

    /// Lets go of a job (cancelled, deleted).
    pub fn release(&mut self, id: &str) -> Option<ActiveJob> {
        self.loading.remove(id);
        self.jobs.remove(id)
    }

    /// Keeps a cancelled job's `record` (released already) for [`ledger::SETTLE_MS`], so that
    /// the attempts its nodes stop are billed as they ran, within the cancel's bound (see
    /// [`ledger`]). A broker restarted meanwhile does not bill them.
    pub fn settle(&mut self, mut record: JobRecord) {
        // Billing needs the spec's limits and numbers, not its list of input files.
        record.spec.tasks = grid_proto::TaskSource::Count(record.spec.tasks.len());
        let now = (self.now)();
        self.settling.retain(|_, r| {
            r.finished_unix_ms
                .is_some_and(|at| now.saturating_sub(at) < ledger::SETTLE_MS)
        });
        if self.settling.len() < SETTLING_MOST {
            self.settling.insert(record.id.clone(), record);
        }
    }

    /// The record of job `id`: held, or cancelled and settling.
    fn record_of(&self, id: &str) -> Option<&JobRecord> {
        self.jobs
            .get(id)
            .map(|job| &job.record)
            .or_else(|| self.settling.get(id))
    }

    /// Jobs whose task records should be read now, at most `at_once` reads at a time: their
    /// ids and tenants. Each is marked as loading until [`Rules::loaded`].
    pub fn loads_to_start(&mut self, at_once: usize) -> Vec<(String, String)> {
        let mut start = Vec::new();
        for job in self.jobs.values().filter(|job| !job.loaded) {
            if self.loading.len() >= at_once {
                break; // the others on a later tick
            }
            if self.loading.insert(job.record.id.clone()) {
                start.push((job.record.id.clone(), job.record.spec.tenant.clone()));
            }
        }
        start
    }

    /// A job's task records, read (`None`: the read failed, and is tried again later).
    /// True when they were counted into the job.
    pub fn loaded(&mut self, id: &str, stored: Option<&[TaskRecord]>) -> bool {
        self.loading.remove(id);
        let now = (self.now)();
        match (self.jobs.get_mut(id), stored) {
            (Some(job), Some(stored)) if !job.loaded => {
                job.load(stored, now);
                true
            }
            _ => false,
        }
    }

    /// Screens a results message that came on `node`'s subject: every result must carry a seal
    /// of the broker's and name that node and its job's tenant, or the message is a forgery.
    /// The times of accepted results are bounded by the time their message was out
    /// ([`ledger::bound_by_elapsed`]).
    pub fn admit(&mut self, node: &str, msg: ResultsMsg) -> Admission {
        let mut results = msg.results;
        let most = grid_proto::MAX_TASKS_PER_MESSAGE as usize;
        if !(1..=most).contains(&results.len()) {
            return Admission::Reject(format!("a results message of {} results", results.len()));
        }
        for result in &results {
            let forged = if node != result.node_id {
                Some(format!(
                    "it names node {} but came from node {node}",
                    result.node_id
                ))
            } else if let Err(why) = self.seal.check(result) {
                Some(why)
            } else {
                match self.record_of(&result.job_id) {
                    Some(record) if record.spec.tenant != result.tenant => Some(format!(
                        "it names tenant {} for a job of tenant {}",
                        result.tenant, record.spec.tenant
                    )),
                    Some(record) => results::forged_numbers(record, result),
                    None => None,
                }
            };
            if let Some(why) = forged {
                metrics::counter!("grid_results_forged_total", "node" => node.to_string())
                    .increment(1);
                return Admission::Reject(format!(
                    "a result for task {} of job {} from node {node}: {why}",
                    result.index, result.job_id
                ));
            }
        }
        if results
            .iter()
            .any(|r| self.jobs.get(&r.job_id).is_some_and(|job| !job.loaded))
        {
            return Admission::Later;
        }
        ledger::bound_by_elapsed(&mut results, (self.now)());
        for result in &mut results {
            // The provider's word, shown to the tenant: one bounded line, of a failure only.
            result.detail = match result.outcome {
                grid_proto::Outcome::Failed(_) => {
                    result.detail.as_deref().and_then(grid_proto::detail_line)
                }
                grid_proto::Outcome::Succeeded => None,
            };
            if let Some(job) = self.jobs.get_mut(&result.job_id) {
                result.usage = result.usage.within(&job.record.spec.limits);
                job.observe(result);
            }
        }
        Admission::Accept(results)
    }

    /// Whether `result`'s blobs go into its tenant's store once checked — a result its held job
    /// may still count: `Some` of the job's output limit — or are only checked (`None`): a late
    /// result, which can change no more than its node's tally.
    pub fn keeps_blobs(&self, result: &ResultMsg) -> Option<u64> {
        let job = self.jobs.get(&result.job_id)?;
        let record = &job.record;
        (!record.state.is_final()
            && result.index < record.counts.total
            && result.attempt >= record.first_attempt())
        .then_some(record.spec.limits.max_output_bytes)
    }

    /// How to bill `result`'s attempt (see [`ledger`]): only while its job's round runs, or
    /// until its cancel.
    pub fn billing(&self, result: &ResultMsg) -> Billing {
        let entry = self
            .record_of(&result.job_id)
            .and_then(|record| ledger::entry(record, result, (self.now)()));
        match entry {
            Some((key, entry)) => Billing::Bill(key, Box::new(entry)),
            None => Billing::Nothing,
        }
    }

    /// The final record of `result`'s task when it is the common case — a held job without
    /// replicas, a task that exists, an outcome that is not retried — or `None` for
    /// [`Rules::step`] to handle. Takes the task's earlier failures into the record.
    pub fn final_record(&mut self, result: &ResultMsg) -> Option<TaskRecord> {
        let job = self.jobs.get_mut(&result.job_id)?;
        let record = &job.record;
        if result.index >= record.counts.total
            || record.spec.replicas > 1
            || result.attempt < record.first_attempt()
            || (results::retryable(&result.outcome) && record.retries_left(result.attempt))
        {
            return None;
        }
        let failures = job
            .failures
            .remove(&result.index)
            .map(|f| f.into_values().collect())
            .unwrap_or_default();
        Some(results::final_record(&job.record, result, failures))
    }

    /// What an accepted result leads to, once billed.
    pub fn step(&mut self, result: &ResultMsg) -> Step {
        let Some(job) = self.jobs.get(&result.job_id) else {
            return Step::Ended;
        };
        if result.index >= job.record.counts.total {
            tracing::warn!(job = %result.job_id, index = result.index, "result for a task that does not exist");
            return Step::Ignore;
        }
        if result.attempt < job.record.first_attempt() {
            // Before `grid retry`: its task's new round counts, this one is billed only.
            tracing::debug!(job = %result.job_id, index = result.index, attempt = result.attempt, "result of an earlier round ignored");
            return Step::Ignore;
        }
        if job.record.spec.replicas > 1 {
            return Step::Vote;
        }
        if job.has_counted(result.index) {
            // Counted already (another node's run of the same attempt, after a lapsed ack):
            // this result changes nothing, and a failure is not retried.
            self.duplicate();
            return Step::Duplicate;
        }
        if let Some(record) = self.final_record(result) {
            return Step::Record(Box::new(record));
        }
        let reason = result.outcome.reason();
        tracing::info!(job = %result.job_id, index = result.index, attempt = result.attempt, reason = %reason.map(|r| r.to_string()).unwrap_or_default(), "retrying");
        if let Some(why) = reason {
            metrics::counter!("grid_attempts_failed_total", "reason" => why.kind()).increment(1);
        }
        metrics::counter!("grid_task_retries_total").increment(1);
        Step::Retry(Dispatch {
            job_id: result.job_id.clone(),
            index: result.index,
            count: 1,
            attempt: result.attempt + 1,
            replica: 0,
        })
    }

    /// A failed attempt's retry is published: its reason joins the task's failures. (Published
    /// before the failed result is acked: a broker killed in between gets the result again and
    /// republishes the retry under the same message id, which JetStream drops.)
    pub fn retried(&mut self, result: &ResultMsg) {
        if let Some(job) = self.jobs.get_mut(&result.job_id) {
            let reason = result.failure();
            job.failures
                .entry(result.index)
                .or_default()
                .insert(result.attempt, reason.unwrap_or_default());
        }
    }

    /// A result dropped as a duplicate.
    pub fn duplicate(&mut self) {
        self.duplicates += 1;
        metrics::counter!("grid_duplicate_results_total").increment(1);
    }

    /// Counts a stored final record in its job, unless it is counted already (or the job is
    /// not held); true when this call counted it. Ends the job when it was its last task.
    pub fn count_once(&mut self, stored: &TaskRecord) -> bool {
        let now = (self.now)();
        let Some(job) = self.jobs.get_mut(&stored.result.job_id) else {
            return false;
        };
        let counted = job.count(stored);
        if counted {
            // Here, not in `ActiveJob::count`: a restarted broker recounts stored records.
            record_counted(stored);
        }
        if job.finish_if_complete(now) {
            tracing::info!(job = %job.record.id, state = job.record.state.as_str(), duplicates_dropped = self.duplicates, "finished");
        }
        counted
    }

    /// The create of `record` found its key taken.
    pub fn create_refused(&mut self, record: &TaskRecord) -> Taken {
        let result = &record.result;
        if self
            .jobs
            .get(&result.job_id)
            .is_none_or(|j| j.has_counted(result.index))
        {
            self.duplicate();
            tracing::debug!(job = %result.job_id, index = result.index, "duplicate result ignored");
            return Taken::Duplicate;
        }
        Taken::ReadStored
    }

    /// The records of jobs that changed since they were last saved (their counts feed `grid
    /// status` and progress bars).
    pub fn unsaved(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs
            .values()
            .filter(|j| j.dirty)
            .map(|job| &job.record)
    }

    /// Whether a job ended and its final record is not saved yet (saved at once, not at the
    /// next tick, so that its waiters hear of it).
    pub fn ended_unsaved(&self) -> bool {
        self.jobs
            .values()
            .any(|j| j.dirty && j.record.state.is_final())
    }

    /// Job `id`'s record, as it was when [`Rules::unsaved`] gave it, is saved. A job that ended
    /// is let go of: only now, so that a failed save is tried again on the next tick. True when
    /// it was let go of.
    pub fn saved(&mut self, id: &str) -> bool {
        let Some(job) = self.jobs.get_mut(id) else {
            return false;
        };
        job.dirty = false;
        job.record.state.is_final() && self.jobs.remove(id).is_some()
    }

    /// How many tasks of each held job run now (from nodes' reports): a job whose count
    /// changed is saved with it.
    pub fn set_running(&mut self, running: &HashMap<String, u64>) {
        for job in self.jobs.values_mut() {
            let counts = &mut job.record.counts;
            let now = running
                .get(&job.record.id)
                .copied()
                .unwrap_or(0)
                .min(counts.in_flight);
            if counts.running != now && !job.record.state.is_final() {
                counts.running = now;
                job.dirty = true;
            }
        }
    }

    /// Tasks not yet sent out, tasks in flight, and jobs held: for the metrics.
    pub fn load(&self) -> (u64, u64, usize) {
        let (mut queued, mut in_flight) = (0, 0);
        for job in self.jobs.values() {
            queued += job.record.counts.total.saturating_sub(job.record.enqueued);
            in_flight += job.record.counts.in_flight;
        }
        (queued, in_flight, self.jobs.len())
    }
}

/// A task counted in its job, for the metrics (see `grid_client::metrics`).
fn record_counted(record: &TaskRecord) {
    let state = record.state.as_str();
    let reason = record.result.outcome.reason().map(Reason::kind);
    if record.state == TaskState::Failed
        && let Some(why) = &reason
    {
        metrics::counter!("grid_attempts_failed_total", "reason" => why.clone()).increment(1);
    }
    metrics::counter!("grid_tasks_counted_total", "state" => state, "reason" => reason.unwrap_or_default())
        .increment(1);
    metrics::histogram!("grid_task_seconds").record(record.result.usage.wall_seconds);
}
