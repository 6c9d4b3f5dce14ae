//! The rules, driven in memory: a [`World`] plays the shell's part (its stores are maps, its
//! work queue a list that drops duplicate message ids) so that each acceptance rule is checked
//! in sequence, in milliseconds, without a server. The shell itself is tested end to end
//! (`tests/all`).

use super::*;

mod counting;
mod intake_and_fill;
mod outputs;
mod replicas;
mod retry_and_cancel;
use grid_proto::{
    InputRef, JobLimits, JobSpec, JobState, Limit, NodeInfo, Outcome, Reason, ResultsMsg,
    Sha256Hex, TaskSource, Usage, UsageEntry,
};
use std::collections::{BTreeMap, HashMap};

pub(super) const TENANT: &str = "alice";

/// The rules' clock in these tests: results come in 1,000 s after their tasks were sent.
pub(super) fn now() -> u64 {
    1_000_000
}

/// The key the rules seal with in these tests.
pub(super) fn seal_key() -> SealKey {
    SealKey::new([7; 32])
}

/// `result` as a node returns it: under the seal of a message of its one task, sent at 0.
pub(super) fn sealed(result: ResultMsg) -> ResultMsg {
    sealed_at(result, 0)
}

/// `result` under the seal of a message of its one task, sent at `sent_unix_ms`.
pub(super) fn sealed_at(mut result: ResultMsg, sent_unix_ms: u64) -> ResultMsg {
    let dispatch = Dispatch {
        job_id: result.job_id.clone(),
        index: result.index,
        count: 1,
        attempt: result.attempt,
        replica: result.replica,
    };
    result.seal = sealed_for(&dispatch, &result.node_id, sent_unix_ms);
    result
}

/// The seal of `dispatch`'s message, sent at `sent_unix_ms` and handed to `node` then.
pub(super) fn sealed_for(dispatch: &Dispatch, node: &str, sent_unix_ms: u64) -> grid_proto::Seal {
    let key = seal_key();
    key.bind(
        &key.seal(TENANT, dispatch, sent_unix_ms),
        node,
        sent_unix_ms,
    )
}

pub(super) fn spec(tasks: u64) -> JobSpec {
    JobSpec {
        tenant: TENANT.into(),
        class: "cpu".into(),
        module_sha256: Sha256Hex::of(b"module"),
        module_name: "job.wasm".into(),
        args: Vec::new(),
        env: Vec::new(),
        limits: JobLimits::default(),
        seed: 0,
        retries: 2,
        replicas: 1,
        quorum: 1,
        tasks: TaskSource::Count(tasks),
        shared: Vec::new(),
        program: None,
        priority: 0,
        name: String::new(),
    }
}

pub(super) fn replicated(tasks: u64, replicas: u32, quorum: u32) -> JobSpec {
    JobSpec {
        replicas,
        quorum,
        ..spec(tasks)
    }
}

pub(super) fn node(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        classes: vec!["cpu".into()],
        gpu: None,
        slots: 2,
        gpu_slots: 0,
        busy: 0,
        running: 0,
        memory_reserved_bytes: 0,
        memory_budget_bytes: 8 << 30,
        tasks_done: 0,
        started_unix_ms: 0,
        preparing: None,
        runtimes_ready: Vec::new(),
        accepts: JobLimits {
            memory_bytes: 8 << 30,
            timeout_ms: 86_400_000,
            max_output_bytes: 10 << 30,
            gpu_memory_bytes: 2 << 30,
            gpu_time_ms: 3_600_000,
        },
    }
}

pub(super) fn nodes(n: usize) -> Vec<NodeInfo> {
    (0..n).map(|i| node(&format!("n{i}"))).collect()
}

/// What a node sends for one attempt. Equal `digest_of` means equal outputs.
pub(super) fn result(
    job: &str,
    index: u64,
    attempt: u32,
    replica: u32,
    node: &str,
    outcome: Outcome,
) -> ResultMsg {
    ResultMsg {
        tenant: TENANT.into(),
        job_id: job.into(),
        index,
        attempt,
        replica,
        node_id: node.into(),
        digest: Sha256Hex::of(format!("{outcome:?}").as_bytes()),
        outcome,
        usage: Usage {
            cpu_seconds: 0.01,
            wall_seconds: 0.01,
            ..Usage::default()
        },
        files: Vec::new(),
        stdout: None,
        stderr: None,
        logs_truncated: false,
        detail: None,
        seal: grid_proto::Seal::default(),
        staged: Vec::new(),
    }
}

pub(super) fn ok(job: &str, index: u64, attempt: u32, node: &str) -> ResultMsg {
    result(job, index, attempt, 0, node, Outcome::Succeeded)
}

/// A failure that can change on another try (the task ran past its time limit): retried.
pub(super) fn failed(job: &str, index: u64, attempt: u32, node: &str) -> ResultMsg {
    result(
        job,
        index,
        attempt,
        0,
        node,
        Outcome::Failed(Reason::Limit(Limit::Time)),
    )
}

pub(super) fn vote(job: &str, index: u64, replica: u32, node: &str, digest: &str) -> ResultMsg {
    let mut r = result(job, index, 0, replica, node, Outcome::Succeeded);
    r.digest = Sha256Hex::of(digest.as_bytes());
    r
}

/// The shell, in memory: what the broker's stores and work queue would hold.
pub(super) struct World {
    pub(super) rules: Rules,
    pub(super) window: u64,
    /// `grid_tasks`: key → (record, revision).
    pub(super) tasks: BTreeMap<String, (TaskRecord, u64)>,
    /// `grid_votes`: key → vote.
    pub(super) votes: BTreeMap<String, ResultMsg>,
    /// `grid_usage`.
    pub(super) ledger: BTreeMap<String, UsageEntry>,
    /// `grid_jobs`, as last saved.
    pub(super) saved: BTreeMap<String, JobRecord>,
    /// The work queue: every dispatch published, in order; a message id seen before is
    /// dropped as JetStream's duplicate window would.
    pub(super) queue: Vec<Dispatch>,
    pub(super) message_ids: HashSet<String>,
    /// `grid_tally`: node → (agreed, outvoted).
    pub(super) tally: HashMap<String, (u64, u64)>,
    /// Task keys whose next create is stored but answered with an error (a lost reply).
    pub(super) lose_reply: HashSet<String>,
    pub(super) next_id: u32,
    /// Publishes fail (the work queue is unreachable).
    pub(super) publishes_fail: bool,
}

/// What became of one results message.
#[derive(Debug, PartialEq)]
pub(super) enum Settled {
    Acked,
    Nakked,
    Terminated,
    Later,
}

impl World {
    pub(super) fn new(window: u64) -> Self {
        Self {
            rules: Rules::new(window, now, seal_key()),
            window,
            tasks: BTreeMap::new(),
            votes: BTreeMap::new(),
            ledger: BTreeMap::new(),
            saved: BTreeMap::new(),
            queue: Vec::new(),
            message_ids: Default::default(),
            tally: HashMap::new(),
            lose_reply: Default::default(),
            next_id: 0,
            publishes_fail: false,
        }
    }

    pub(super) fn submit(&mut self, spec: JobSpec) -> String {
        self.submit_to(spec, &nodes(3)).expect("a valid job")
    }

    pub(super) fn submit_to(
        &mut self,
        spec: JobSpec,
        nodes: &[NodeInfo],
    ) -> anyhow::Result<String> {
        let spec = intake::check(TENANT, spec, nodes)?;
        self.next_id += 1;
        let id = format!("job{:03}", self.next_id);
        let record = intake::new_record(id.clone(), spec, now());
        self.saved.insert(id.clone(), record.clone());
        self.rules.hold(record, true);
        Ok(id)
    }

    pub(super) fn publish(&mut self, dispatch: Dispatch) {
        if self.message_ids.insert(dispatch.message_id()) {
            self.queue.push(dispatch);
        }
    }

    /// One fill, every publish stored.
    pub(super) fn fill(&mut self) {
        for fill in self.rules.plan_fill() {
            for dispatch in fill.dispatches.clone() {
                self.publish(dispatch);
            }
            self.rules.filled(&fill);
        }
    }

    /// Takes every queued dispatch of `job` (what nodes would pull).
    pub(super) fn take(&mut self, job: &str) -> Vec<Dispatch> {
        let (mine, rest) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|d| d.job_id == job);
        self.queue = rest;
        mine
    }

    pub(super) fn persist(&mut self) {
        let unsaved: Vec<JobRecord> = self.rules.unsaved().cloned().collect();
        for record in unsaved {
            self.saved.insert(record.id.clone(), record.clone());
            self.rules.saved(&record.id);
        }
    }

    pub(super) fn state(&self, job: &str) -> JobRecord {
        self.rules
            .job(job)
            .map(|j| j.record.clone())
            .or_else(|| self.saved.get(job).cloned())
            .expect("a job")
    }

    /// A results message on `node`'s subject, carried through as the shell does; each result
    /// under the seal of its task's message, unless it has one.
    pub(super) fn deliver(&mut self, node: &str, results: Vec<ResultMsg>) -> Settled {
        let results = results
            .into_iter()
            .map(|r| {
                if r.seal == grid_proto::Seal::default() {
                    sealed(r)
                } else {
                    r
                }
            })
            .collect();
        self.deliver_as_is(node, results)
    }

    /// A results message on `node`'s subject, as it is (a forger's).
    pub(super) fn deliver_as_is(&mut self, node: &str, results: Vec<ResultMsg>) -> Settled {
        let results = match self.rules.admit(node, ResultsMsg { results }) {
            Admission::Accept(results) => results,
            Admission::Reject(_) => return Settled::Terminated,
            Admission::Later => return Settled::Later,
        };
        let mut ok = true;
        for result in results {
            self.bill(&result);
            ok &= match self.rules.final_record(&result) {
                Some(record) => self.record_task(record).is_some(),
                None => self.count(result),
            };
        }
        if ok { Settled::Acked } else { Settled::Nakked }
    }

    pub(super) fn bill(&mut self, result: &ResultMsg) {
        if let Billing::Bill(key, entry) = self.rules.billing(result) {
            self.ledger.entry(key).or_insert(*entry);
        }
    }

    /// `Some(counted)` once stored; `None` when the store failed (the message is nak'd).
    pub(super) fn record_task(&mut self, record: TaskRecord) -> Option<bool> {
        let r = &record.result;
        let key = names::task_key(&r.tenant, &r.job_id, r.index);
        let stored = match self.tasks.get(&key).cloned() {
            None => {
                self.tasks.insert(key.clone(), (record.clone(), 1));
                if self.lose_reply.remove(&key) {
                    return None;
                }
                record
            }
            Some((stored, revision)) => {
                if self.rules.create_refused(&record) == Taken::Duplicate {
                    return Some(false);
                }
                match results::reconcile(&record, stored) {
                    Reconcile::Count(stored) => stored,
                    Reconcile::Replace(replaced) => {
                        self.tasks.insert(key, (replaced.clone(), revision + 1));
                        replaced
                    }
                }
            }
        };
        let counted = self.rules.count_once(&stored);
        if counted {
            for v in &stored.votes {
                self.tally_one(&v.node_id, v.agreed);
            }
        }
        Some(counted)
    }

    pub(super) fn tally_one(&mut self, node: &str, agreed: bool) {
        let t = self.tally.entry(node.into()).or_default();
        if agreed { t.0 += 1 } else { t.1 += 1 }
    }

    pub(super) fn count(&mut self, result: ResultMsg) -> bool {
        match self.rules.step(&result) {
            Step::Ignore | Step::Duplicate => true,
            Step::Record(record) => self.record_task(*record).is_some(),
            Step::Retry(dispatch) => {
                self.publish(dispatch);
                self.rules.retried(&result);
                true
            }
            Step::Vote => self.vote(result),
            Step::Ended => {
                let key = names::task_key(&result.tenant, &result.job_id, result.index);
                if let Some((record, _)) = self.tasks.get(&key).cloned()
                    && !record.votes.is_empty()
                    && self
                        .saved
                        .get(&result.job_id)
                        .map(|j| grid_proto::round_of(result.attempt, j.spec.retries))
                        == Some(record.round)
                {
                    self.late_vote(&result, &record);
                }
                true
            }
        }
    }

    pub(super) fn vote(&mut self, result: ResultMsg) -> bool {
        let round = match self.rules.vote_step(&result) {
            VoteStep::Ignore => return true,
            VoteStep::RunAgain(dispatch) => {
                self.publish(dispatch);
                return true;
            }
            VoteStep::Check { round } => round,
        };
        let key = names::task_key(&result.tenant, &result.job_id, result.index);
        if let Some((record, _)) = self.tasks.get(&key).cloned()
            && record.round == round
        {
            if self.rules.count_once(&record) {
                for v in &record.votes {
                    self.tally_one(&v.node_id, v.agreed);
                }
            }
            self.late_vote(&result, &record);
            return true;
        }
        let vote_key = names::vote_key(&result.job_id, result.index, round, result.replica);
        let fresh = !self.votes.contains_key(&vote_key);
        self.votes.entry(vote_key).or_insert_with(|| result.clone());
        let stored = if self.rules.needs_stored_votes(&result) {
            let most =
                votes::max_replicas(self.rules.job(&result.job_id).unwrap().record.spec.replicas);
            (0..most)
                .filter_map(|r| {
                    self.votes
                        .get(&names::vote_key(&result.job_id, result.index, round, r))
                        .cloned()
                })
                .collect()
        } else {
            Vec::new()
        };
        let voter = result.replica;
        match self.rules.add_vote(result, fresh, stored) {
            VoteOutcome::Duplicate | VoteOutcome::Ignored | VoteOutcome::Waiting => true,
            VoteOutcome::OneMore(dispatch) if self.publishes_fail => {
                self.rules.one_more_failed(&dispatch, voter);
                false
            }
            VoteOutcome::OneMore(dispatch) => {
                self.publish(dispatch);
                true
            }
            VoteOutcome::Decided(record) => self.record_task(*record).is_some(),
        }
    }

    pub(super) fn late_vote(&mut self, result: &ResultMsg, record: &TaskRecord) {
        let Some(agreed) = votes::late_vote(record, result) else {
            return;
        };
        let key = names::vote_key(&result.job_id, result.index, record.round, result.replica);
        match self.votes.entry(key) {
            std::collections::btree_map::Entry::Occupied(_) => self.rules.duplicate(),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(result.clone());
                self.tally_one(&result.node_id, agreed);
            }
        }
    }

    /// The broker killed and started again: only what was saved survives.
    pub(super) fn restart(&mut self) {
        self.rules = Rules::new(self.window, now, seal_key());
        for record in self.saved.values().filter(|r| !r.state.is_final()) {
            self.rules.hold(record.clone(), false);
        }
        self.load();
    }

    /// Reads the task records of every job that waits for them.
    pub(super) fn load(&mut self) {
        for (id, tenant) in self.rules.loads_to_start(usize::MAX) {
            let prefix = format!("{tenant}.{id}.");
            let stored: Vec<TaskRecord> = self
                .tasks
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, (r, _))| r.clone())
                .collect();
            assert!(self.rules.loaded(&id, Some(&stored)));
        }
    }

    /// `grid retry JOB --failed`, as the shell does it.
    pub(super) fn retry(&mut self, job: &str) -> anyhow::Result<u64> {
        if self.rules.job(job).is_some() {
            anyhow::bail!("still running");
        }
        let record = match rounds::retry(self.saved[job].clone(), None)? {
            rounds::Retry::Save(record) => {
                self.saved.insert(job.into(), record.clone());
                record
            }
            rounds::Retry::TakeUp(record) => record,
        };
        let tasks = record.counts.total - record.counts.succeeded;
        self.rules.hold(record, false);
        self.load();
        Ok(tasks)
    }
}
