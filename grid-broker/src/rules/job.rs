//! One job the broker holds: its record as it will be saved, which of its tasks are counted,
//! and what its undecided tasks are waiting for (retried failures, replicas' votes).

use bit_set::BitSet;
use grid_proto::{
    JobRecord, JobSpec, JobState, Outcome, Reason, ResultMsg, TaskCounts, TaskRecord, TaskSource,
    TaskState,
};
use std::collections::{BTreeMap, HashMap};

/// Work one task message should carry at most, in the job's average task time: a run of
/// short tasks shares one publish, delivery and ack, and a node holding one such message keeps
/// a slot busy for no longer than this.
const MESSAGE_SECONDS: f64 = 0.05;

/// A job that is queued or running (or ended, until its final record is saved).
pub struct ActiveJob {
    /// The record as the next save writes it.
    pub record: JobRecord,
    /// Failure reasons of tasks still being retried, by attempt (a redelivered failure is
    /// one line, not two).
    pub(super) failures: HashMap<u64, BTreeMap<u32, String>>,
    /// With replicas: the votes of undecided tasks (reloaded from `grid_votes` after a restart).
    pub(super) votes: HashMap<u64, Vec<ResultMsg>>,
    /// With replicas: how many replicas each undecided task was given.
    pub(super) dispatched: HashMap<u64, u32>,
    /// The spec that travels in each task message: the job's, without its task list.
    pub(super) task_spec: JobSpec,
    /// Tasks whose final record in `grid_tasks` is in `record.counts`.
    counted: BitSet,
    /// A moving average of its tasks' wall time, from their results: how many to a message.
    task_seconds: Option<f64>,
    /// The most tasks to a message, as the size of its params lines allows
    /// ([`super::Rules::shorten_runs`]).
    pub(super) most_per_message: u64,
    /// The record changed since it was last saved.
    pub(super) dirty: bool,
    /// Its stored task records are counted (see [`ActiveJob::load`]). Until then — after a
    /// restart, or a retry, while the shell reads them — it gets no tasks and its results wait.
    pub(super) loaded: bool,
}

impl ActiveJob {
    /// A job as its saved `record` says; `loaded` when it has no task records to count (a new
    /// job).
    pub fn new(record: JobRecord, loaded: bool) -> Self {
        let task_spec = JobSpec {
            tasks: TaskSource::Count(record.spec.tasks.len()),
            ..record.spec.clone()
        };
        Self {
            record,
            task_spec,
            failures: HashMap::new(),
            votes: HashMap::new(),
            dispatched: HashMap::new(),
            counted: BitSet::new(),
            task_seconds: None,
            most_per_message: u64::from(grid_proto::MAX_TASKS_PER_MESSAGE),
            // Its record is as saved; `load` and the fill mark what changes it.
            dirty: false,
            loaded,
        }
    }

    /// Whether its stored task records are counted (see the `loaded` field).
    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    /// Tasks to a message for this job: several only for tasks known to be short (from the
    /// first results), never for replicas or input files, and at most an eighth of the window,
    /// so that several messages are in flight for the nodes' slots.
    pub fn per_message(&self, window: u64) -> u64 {
        let spec = &self.record.spec;
        if spec.replicas > 1 || matches!(spec.tasks, TaskSource::Inputs(_)) {
            return 1;
        }
        let Some(seconds) = self.task_seconds else {
            return 1;
        };
        let fit = (MESSAGE_SECONDS / seconds.max(1e-6)) as u64;
        fit.min(self.most_per_message).min(window / 8).max(1)
    }

    /// Takes a result's wall time into the job's average.
    pub fn observe(&mut self, result: &ResultMsg) {
        let seconds = result.usage.wall_seconds;
        if result.outcome == Outcome::Failed(Reason::Lost) || !seconds.is_finite() {
            return;
        }
        self.task_seconds = Some(match self.task_seconds {
            Some(average) => 0.9 * average + 0.1 * seconds,
            None => seconds,
        });
    }

    /// Counts a task's stored final record, once: false if it was counted already.
    pub fn count(&mut self, record: &TaskRecord) -> bool {
        let Ok(index) = usize::try_from(record.result.index) else {
            return false;
        };
        if record.result.index >= self.record.counts.total || !self.counted.insert(index) {
            return false;
        }
        let counts = &mut self.record.counts;
        match record.state {
            TaskState::Succeeded => counts.succeeded += 1,
            TaskState::Failed => {
                counts.failed += 1;
                if self.record.reason.is_none() {
                    let why = record.failures.last().cloned().unwrap_or_default();
                    self.record.reason = Some(format!("task {index} failed: {why}"));
                }
            }
            TaskState::Disputed => {
                counts.disputed += 1;
                if self.record.reason.is_none() {
                    self.record.reason = Some(format!("task {index} disputed"));
                }
            }
        }
        // Only a task below `enqueued` was counted in flight (see `Rules::plan_fill`).
        if record.result.index < self.record.enqueued {
            counts.in_flight = counts.in_flight.saturating_sub(1);
            counts.running = counts.running.min(counts.in_flight);
        }
        self.dirty = true;
        true
    }

    /// Counts the job's stored task records into it, from scratch: at a restart, and when a
    /// retry starts. A failed or disputed record of an earlier round is not counted: its task
    /// runs again, and the new round's record takes its place (see `Rules::reconcile`).
    pub fn load(&mut self, stored: &[TaskRecord], now_ms: u64) {
        self.counted = BitSet::new();
        self.record.counts = TaskCounts {
            total: self.record.counts.total,
            in_flight: self.record.enqueued,
            ..TaskCounts::default()
        };
        let round = self.record.retried;
        for record in stored {
            if record.state == TaskState::Succeeded || record.round >= round {
                self.count(record);
            }
        }
        self.loaded = true;
        self.dirty = true;
        // Every task was recorded, but the broker died before it saved the final record.
        self.finish_if_complete(now_ms);
    }

    /// Whether this task's final record is counted.
    pub fn has_counted(&self, index: u64) -> bool {
        usize::try_from(index).is_ok_and(|i| self.counted.contains(i))
    }

    /// Ends the job once every task is counted: its final state, saved by the next save.
    /// True when this call ended it.
    pub fn finish_if_complete(&mut self, now_ms: u64) -> bool {
        let counts = &self.record.counts;
        if self.record.state.is_final()
            || counts.succeeded + counts.failed + counts.disputed < counts.total
        {
            return false;
        }
        self.record.state = if counts.failed + counts.disputed == 0 {
            self.record.reason = None;
            JobState::Done
        } else {
            JobState::Failed
        };
        self.record.finished_unix_ms = Some(now_ms);
        self.record.counts.running = 0;
        self.dirty = true;
        true
    }
}
