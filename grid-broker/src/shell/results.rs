//! Results in: each message screened ([`Rules::admit`]); the blobs its results name taken from
//! the node's stage — read, checked and copied into the tenant's store, off the loop
//! ([`take_blobs`]); then each result billed, and recorded or retried or voted as
//! [`Rules::step`] says, and the message acked once all of it is stored.

use super::{Broker, store};
use crate::faults::{REPLY_LOST, crash_point, reply_lost};
use crate::rules::{
    Admission, Billing, Reconcile, Step, Taken, VoteOutcome, VoteStep, results, votes,
};
use anyhow::{Result, anyhow};
use async_nats::jetstream::{self, AckKind};
use grid_client::Grid;
use grid_client::stage::Taken as Blob;
use grid_proto::{ResultMsg, TaskRecord, decode, encode, names};
use std::time::Duration;

/// A results message on its way through the broker: admitted, and its results' blobs taken.
pub(super) struct Intake {
    msg: jetstream::Message,
    node: String,
    results: Vec<ResultMsg>,
    /// The stage chunks its results named: deleted once it is recorded.
    chunks: Vec<u64>,
}

/// Results messages whose blobs are being taken at once; more wait for a turn.
pub(super) const TAKING_AT_ONCE: usize = 8;

impl Broker {
    /// Screens a batch of results messages. Those that name no blobs are recorded now; the
    /// others go to [`take_blobs`] in the background and come back through
    /// [`Broker::taken`] to be recorded.
    pub(super) async fn on_results(&mut self, batch: Vec<jetstream::Message>) {
        let mut ready = Vec::with_capacity(batch.len());
        for msg in batch {
            let node = names::result_node(msg.subject.as_str())
                .unwrap_or_default()
                .to_string();
            let admission = match decode::<grid_proto::ResultsMsg>(&msg.payload) {
                Ok(results) => self.rules.admit(&node, results),
                Err(e) => Admission::Reject(e.to_string()),
            };
            match admission {
                Admission::Accept(results) => {
                    let chunks = results
                        .iter()
                        .flat_map(|r| r.staged.iter().flat_map(|s| s.chunks.iter().copied()))
                        .collect();
                    let intake = Intake {
                        msg,
                        node,
                        results,
                        chunks,
                    };
                    if intake.results.iter().all(names_no_blobs) {
                        let mut intake = intake;
                        for result in &mut intake.results {
                            results::verify(result, None);
                        }
                        ready.push(intake);
                    } else {
                        let keep = intake
                            .results
                            .iter()
                            .map(|r| self.rules.keeps_blobs(r))
                            .collect();
                        let (grid, taken, turns) =
                            (self.grid.clone(), self.taken.clone(), self.taking.clone());
                        tokio::spawn(async move {
                            let Ok(_turn) = turns.acquire_owned().await else {
                                return;
                            };
                            if let Some(intake) = take_blobs(&grid, intake, keep).await {
                                let _ = taken.send(intake);
                            }
                        });
                    }
                }
                Admission::Reject(why) => {
                    tracing::warn!(subject = %msg.subject, "rejecting a results message: {why}");
                    let _ = msg.ack_with(AckKind::Term).await;
                }
                Admission::Later => {
                    // Its job's records are still being read (a restart, a retry): counted
                    // once they are, not on top of what they will say.
                    tracing::debug!(subject = %msg.subject, "result for a job still loading: later");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                        .await;
                }
            }
        }
        if !ready.is_empty() {
            self.record(ready).await;
        }
    }

    /// Results messages whose blobs were taken ([`take_blobs`]).
    pub(super) async fn taken(&mut self, intakes: Vec<Intake>) {
        self.record(intakes).await;
    }

    /// Records a batch of admitted results messages. The JetStream writes of different results
    /// do not depend on each other — each ledger entry and each task record is a create under
    /// its own key — so they go out together; what they change in the rules (counts, retries,
    /// votes) is done one result at a time, in order. A message is acked once all its results
    /// are stored, and asked for again if any is not (the others then come back as
    /// duplicates).
    async fn record(&mut self, intakes: Vec<Intake>) {
        // Each result with the index of its message in `intakes`.
        let mut ready = Vec::new();
        let mut messages = Vec::with_capacity(intakes.len());
        for intake in intakes {
            ready.extend(intake.results.into_iter().map(|r| (messages.len(), r)));
            messages.push((intake.msg, intake.node, intake.chunks));
        }
        let mut recorded: Vec<Result<()>> = messages.iter().map(|_| Ok(())).collect();
        let mut fail = |m: usize, e: anyhow::Error| {
            if recorded[m].is_ok() {
                recorded[m] = Err(e);
            }
        };
        let billed = futures::future::join_all(ready.iter().map(|(_, r)| self.bill(r))).await;
        // A final result of a job without replicas (most results) is one task-record create.
        let mut finals = Vec::new();
        let mut others = Vec::new();
        for ((m, result), billed) in ready.into_iter().zip(billed) {
            if let Err(e) = billed {
                fail(m, e);
                continue;
            }
            match self.rules.final_record(&result) {
                Some(record) => finals.push((m, record)),
                None => others.push((m, result)),
            }
        }
        let created = match self.grid.tasks().await {
            Ok(tasks) => {
                futures::future::join_all(finals.iter().map(|(_, record)| {
                    let key = task_key(record);
                    let value = encode(record).into();
                    async move { tasks.create(&key, value).await }
                }))
                .await
            }
            Err(e) => {
                for (m, _) in &finals {
                    fail(*m, anyhow!("{e:#}"));
                }
                Vec::new()
            }
        };
        for ((m, record), created) in finals.into_iter().zip(created) {
            if let Err(e) = self.after_create(record, created).await {
                fail(m, e);
            }
        }
        for (m, result) in others {
            if let Err(e) = self.count(result).await {
                fail(m, e);
            }
        }
        // A job that just ended is saved (and its waiters told) before the acks go out.
        if self.rules.ended_unsaved() {
            self.persist().await;
        }
        let mut freed = Vec::new();
        for ((msg, node, chunks), recorded) in messages.into_iter().zip(recorded) {
            if settle(&msg, recorded).await && !chunks.is_empty() {
                freed.push((node, chunks));
            }
        }
        if !freed.is_empty() {
            // Copied into the tenant's store and recorded: the stages let them go. (Should an
            // ack be lost, the message comes back to find its chunks gone and is taken as lost
            // — harmless for a task counted already.)
            let grid = self.grid.clone();
            tokio::spawn(async move {
                for (node, chunks) in freed {
                    grid.free_staged(&node, &chunks).await;
                }
            });
        }
    }

    /// Bills `result`'s attempt in the usage ledger, once (see [`crate::rules::ledger`]).
    async fn bill(&self, result: &ResultMsg) -> Result<()> {
        let Billing::Bill(key, entry) = self.rules.billing(result) else {
            return Ok(());
        };
        match self
            .grid
            .usage()
            .await?
            .create(&key, encode(entry.as_ref()).into())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(anyhow!("billing {key}: {e}")),
        }
    }

    /// Counts one result, exactly once per task.
    async fn count(&mut self, result: ResultMsg) -> Result<()> {
        match self.rules.step(&result) {
            Step::Ignore | Step::Duplicate => Ok(()),
            Step::Record(record) => self.record_task(*record).await.map(drop),
            Step::Retry(dispatch) => {
                // Published before the failed result is acked (see `Rules::retried`).
                self.publish(std::slice::from_ref(&dispatch)).await?;
                crash_point("after-retry");
                self.rules.retried(&result);
                Ok(())
            }
            Step::Vote => self.vote(result).await,
            Step::Ended => {
                // Nothing to count, but a late replica's vote in the round that decided its
                // task.
                let Some(record) = store::decided(&self.grid, &result).await? else {
                    return Ok(());
                };
                if record.votes.is_empty() {
                    return Ok(());
                }
                let round = store::job_of_result(&self.grid, &result)
                    .await?
                    .map(|job| grid_proto::round_of(result.attempt, job.spec.retries));
                if round == Some(record.round) {
                    self.late_vote(&result, &record).await?;
                }
                Ok(())
            }
        }
    }

    /// A replica's result (see [`crate::rules::votes`]).
    async fn vote(&mut self, result: ResultMsg) -> Result<()> {
        let round = match self.rules.vote_step(&result) {
            VoteStep::Ignore => return Ok(()),
            VoteStep::RunAgain(dispatch) => {
                return self.publish(std::slice::from_ref(&dispatch)).await;
            }
            VoteStep::Check { round } => round,
        };
        if let Some(record) = store::decided(&self.grid, &result)
            .await?
            .filter(|record| record.round == round)
        {
            // Decided by a store whose reply was lost: counted now, when a replica comes back.
            if self.rules.count_once(&record) {
                store::tally_votes(&self.grid, &record).await;
            }
            return self.late_vote(&result, &record).await;
        }
        let fresh = store::store_vote(&self.grid, &result, round).await?;
        let stored = match self.rules.job(&result.job_id) {
            Some(job) if self.rules.needs_stored_votes(&result) => {
                let most = votes::max_replicas(job.record.spec.replicas);
                store::stored_votes(&self.grid, &result, round, most).await
            }
            _ => Vec::new(),
        };
        let voter = result.replica;
        match self.rules.add_vote(result, fresh, stored) {
            VoteOutcome::Duplicate | VoteOutcome::Ignored | VoteOutcome::Waiting => Ok(()),
            VoteOutcome::OneMore(dispatch) => {
                let published = self.publish(std::slice::from_ref(&dispatch)).await;
                if published.is_err() {
                    self.rules.one_more_failed(&dispatch, voter);
                }
                published
            }
            VoteOutcome::Decided(record) => {
                if let Some(record) = self.record_task(*record).await? {
                    store::tally_votes(&self.grid, &record).await;
                }
                Ok(())
            }
        }
    }

    /// A replica's result for a task already decided in the result's round (its job may have
    /// finished): it changes nothing but its node's tally, once.
    async fn late_vote(&mut self, result: &ResultMsg, record: &TaskRecord) -> Result<()> {
        let Some(agreed) = votes::late_vote(record, result) else {
            return Ok(());
        };
        if store::store_vote(&self.grid, result, record.round).await? {
            store::tally(&self.grid, &result.node_id, agreed).await;
        } else {
            self.rules.duplicate();
        }
        Ok(())
    }

    /// Stores a task's final record once and counts it once. Returns the stored record when
    /// this call counted it, `None` for a duplicate.
    async fn record_task(&mut self, record: TaskRecord) -> Result<Option<TaskRecord>> {
        let created = self
            .grid
            .tasks()
            .await?
            .create(&task_key(&record), encode(&record).into())
            .await;
        self.after_create(record, created).await
    }

    /// What [`Broker::record_task`] does once its create has answered (the batch path sends
    /// many creates together, then comes here for each, in order).
    async fn after_create(
        &mut self,
        record: TaskRecord,
        created: Result<u64, jetstream::kv::CreateError>,
    ) -> Result<Option<TaskRecord>> {
        let key = task_key(&record);
        let stored = match created {
            Ok(_) if reply_lost(&key) => return Err(anyhow!("storing task {key}: {REPLY_LOST}")),
            Ok(_) => {
                crash_point("after-store");
                record
            }
            Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
                if self.rules.create_refused(&record) == Taken::Duplicate {
                    return Ok(None);
                }
                let tasks = self.grid.tasks().await?;
                let entry = tasks
                    .entry(&key)
                    .await
                    .map_err(|e| anyhow!("reading task {key}: {e}"))?
                    .ok_or_else(|| anyhow!("task {key} vanished"))?;
                let stored =
                    decode::<TaskRecord>(&entry.value).map_err(|e| anyhow!("task {key}: {e}"))?;
                match results::reconcile(&record, stored) {
                    Reconcile::Count(stored) => stored,
                    Reconcile::Replace(replaced) => {
                        // Compare-and-set: a second result of the task finds the key changed
                        // and comes back to count what won.
                        match tasks
                            .update(&key, encode(&replaced).into(), entry.revision)
                            .await
                        {
                            Ok(_) if reply_lost(&key) => {
                                return Err(anyhow!("storing task {key}: {REPLY_LOST}"));
                            }
                            Ok(_) => crash_point("after-replace"),
                            Err(e) => return Err(anyhow!("storing task {key}: {e}")),
                        }
                        replaced
                    }
                }
            }
            Err(e) => return Err(anyhow!("storing task {key}: {e}")),
        };
        Ok(self.rules.count_once(&stored).then_some(stored))
    }
}

/// A task record's key in `grid_tasks`.
fn task_key(record: &TaskRecord) -> String {
    let result = &record.result;
    names::task_key(&result.tenant, &result.job_id, result.index)
}

/// Acks a result once it is recorded (true), or asks for it again shortly.
async fn settle(msg: &jetstream::Message, recorded: Result<()>) -> bool {
    match recorded {
        Ok(()) => match msg.ack().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("acking a result: {e}");
                false
            }
        },
        Err(e) => {
            tracing::warn!("recording a result: {e:#}; it will be redelivered");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            false
        }
    }
}

/// Whether `result` names no stored blob: nothing to take from a stage.
fn names_no_blobs(result: &ResultMsg) -> bool {
    result.staged.is_empty() && result.objects().next().is_none()
}

/// Takes the blobs of `intake`'s results from its node's stage: each result's are checked
/// ([`results::staged_check`]), read and hashed, and copied into the tenant's store when
/// `keep` says so (`Some` of the job's output limit); then [`results::verify`] checks its
/// digest against its files and takes a result that fails as lost. `None` when JetStream could not be read: the message is asked for
/// again.
async fn take_blobs(grid: &Grid, mut intake: Intake, keep: Vec<Option<u64>>) -> Option<Intake> {
    let started = std::time::Instant::now();
    let bytes: u64 = intake
        .results
        .iter()
        .flat_map(|r| r.staged.iter().map(|s| s.bytes))
        .sum();
    for (result, keep) in intake.results.iter_mut().zip(keep) {
        let mut forged = results::staged_check(result, keep);
        if forged.is_none() {
            for staged in &result.staged {
                match grid
                    .take_staged(&intake.node, &result.tenant, staged, keep.is_some())
                    .await
                {
                    Ok(Blob::Verified) => {}
                    Ok(Blob::Forged(why)) => {
                        forged = Some(why);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(node = %intake.node, "taking a staged blob: {e:#}; the result will be redelivered");
                        let _ = intake
                            .msg
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        return None;
                    }
                }
            }
        }
        results::verify(result, forged);
    }
    tracing::debug!(node = %intake.node, bytes, seconds = started.elapsed().as_secs_f64(), "blobs taken");
    Some(intake)
}
