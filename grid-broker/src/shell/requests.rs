//! Tenants' requests on `grid.api.<tenant>.<verb>`: submit, owner, storage, cancel, retry,
//! delete. The tenant is the subject's (NATS lets a tenant publish only under its own name);
//! every answer is a [`grid_proto::Answer`] of the request's reply type, a refusal one line
//! for a user.

use super::{Broker, store};
use crate::faults::crash_point;
use crate::rules::{intake, rounds};
use anyhow::{Result, anyhow, bail};
use grid_client::{Grid, now_unix_ms};
use grid_proto::{
    Answer, CancelRequest, DeleteRequest, Deleted, JobRecord, JobRef, Message, OwnerRequest,
    Request, ResultMsg, RetryRequest, Retrying, StorageRequest, StoreReady, SubmitRequest,
    TaskRecord, decode, encode, names,
};

/// Submits and deletes of one tenant's being done off the loop at once; more are refused until
/// they are answered.
const BUSY_PER_TENANT: usize = 4;
/// Objects one submit checks or reads at once.
const OBJECTS_AT_ONCE: usize = 8;

/// A request answered off the loop, back with what the loop still has to do.
pub(super) enum Finished {
    /// A submit whose objects are checked and whose record is stored: the job to hold.
    Submitted {
        tenant: String,
        reply: Option<async_nats::Subject>,
        record: Result<Box<JobRecord>>,
    },
    /// A delete that is done: the job to let go of.
    Deleted {
        tenant: String,
        job_id: String,
        reply: Option<async_nats::Subject>,
        deleted: Result<Deleted>,
    },
}

impl Broker {
    /// Answers one request with an [`Answer`] of the request's reply type. A submit or a delete,
    /// whose reads grow with the job, is answered once its work off the loop is done
    /// ([`Broker::on_finished`]): one tenant's large job never holds up another's requests.
    pub(super) async fn on_request(&mut self, msg: async_nats::Message) {
        // `grid.api.<tenant>.<verb>`
        let mut parts = msg.subject.as_str().split('.').skip(2);
        let answer = match (parts.next(), parts.next(), parts.next()) {
            (Some(tenant), Some(SubmitRequest::VERB), None) => {
                match self.start_submit(tenant.to_string(), &msg.payload, msg.reply.clone()) {
                    Ok(()) => return,
                    Err(e) => answer::<JobRef>(Err(e)),
                }
            }
            (Some(tenant), Some(DeleteRequest::VERB), None) => {
                match self
                    .start_delete(tenant.to_string(), &msg.payload, msg.reply.clone())
                    .await
                {
                    Ok(()) => return,
                    Err(e) => answer::<Deleted>(Err(e)),
                }
            }
            (Some(tenant), Some(verb), None) => {
                self.answer(tenant.to_string(), verb, &msg.payload).await
            }
            _ => encode(&Answer::<JobRef>::Refused("bad subject".into())),
        };
        self.reply(msg.reply, answer).await;
    }

    async fn reply(&self, to: Option<async_nats::Subject>, answer: Vec<u8>) {
        if let Some(to) = to
            && let Err(e) = self.grid.client.publish(to, answer.into()).await
        {
            tracing::warn!("replying: {e}");
        }
    }

    /// Counts a submit or delete of `tenant`'s going off the loop, unless it has too many.
    fn start_busy(&mut self, tenant: &str) -> Result<()> {
        let busy = self.busy.entry(tenant.to_string()).or_default();
        if *busy >= BUSY_PER_TENANT {
            bail!(
                "tenant {tenant} has {BUSY_PER_TENANT} submits or deletes in progress: wait for their answers, then try again"
            );
        }
        *busy += 1;
        Ok(())
    }

    fn done_busy(&mut self, tenant: &str) {
        if let Some(busy) = self.busy.get_mut(tenant) {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                self.busy.remove(tenant);
            }
        }
    }

    /// Takes in what a request answered off the loop left to do, and answers it.
    pub(super) async fn on_finished(&mut self, finished: Finished) {
        match finished {
            Finished::Submitted {
                tenant,
                reply,
                record,
            } => {
                self.done_busy(&tenant);
                let answer = answer(record.map(|record| {
                    let job_id = record.id.clone();
                    tracing::info!(job = %job_id, tenant, total = record.counts.total, "submitted");
                    // A new job has no task records to read.
                    self.rules.hold(*record, true);
                    JobRef { job_id }
                }));
                self.reply(reply, answer).await;
            }
            Finished::Deleted {
                tenant,
                job_id,
                reply,
                deleted,
            } => {
                self.done_busy(&tenant);
                self.deleting.remove(&job_id);
                if deleted.is_ok() {
                    self.release(&job_id);
                }
                self.reply(reply, answer(deleted)).await;
            }
        }
    }

    async fn answer(&mut self, tenant: String, verb: &str, payload: &[u8]) -> Vec<u8> {
        match verb {
            OwnerRequest::VERB => answer(
                async {
                    let req = decode::<OwnerRequest>(payload)?;
                    self.check_owner(&tenant, &req.job_id, "read").await?;
                    Ok(JobRef { job_id: req.job_id })
                }
                .await,
            ),
            StorageRequest::VERB => answer(self.storage(&tenant).await),
            CancelRequest::VERB => answer(
                async {
                    let req = decode::<CancelRequest>(payload)?;
                    let job_id = self.cancel(&tenant, req.job_id).await?;
                    Ok(JobRef { job_id })
                }
                .await,
            ),
            RetryRequest::VERB => answer(
                async {
                    let req = decode::<RetryRequest>(payload)?;
                    self.retry(&tenant, req.job_id, req.limits).await
                }
                .await,
            ),
            verb => encode(&Answer::<JobRef>::Refused(format!(
                "unknown request {verb:?}: this broker may be of another version"
            ))),
        }
    }

    /// Starts checking a submit off the loop: its objects uploaded, its params pages read once
    /// each (so that a wrong count is refused now rather than found mid-job), its record
    /// stored. [`Broker::on_finished`] holds the job and answers.
    fn start_submit(
        &mut self,
        tenant: String,
        payload: &[u8],
        reply: Option<async_nats::Subject>,
    ) -> Result<()> {
        let spec = intake::own(&tenant, decode::<SubmitRequest>(payload)?.spec)?;
        self.start_busy(&tenant)?;
        let (grid, finished) = (self.grid.clone(), self.finished.clone());
        tokio::spawn(async move {
            let record = async {
                intake::placeable(&spec, &grid.live_nodes().await?)?;
                check_objects(&grid, &spec).await?;
                let record = intake::new_record(new_job_id(), spec, now_unix_ms());
                store::save_job(&grid, &record)
                    .await
                    .map_err(|e| anyhow!("storing the job: {e:#}"))?;
                Ok(Box::new(record))
            }
            .await;
            let _ = finished.send(Finished::Submitted {
                tenant,
                reply,
                record,
            });
        });
        Ok(())
    }

    /// Fails unless `job_id` is a job of `tenant`'s, with the line a user sees.
    async fn check_owner(&self, tenant: &str, job_id: &str, verb: &str) -> Result<()> {
        if self.deleting.contains(job_id) {
            bail!("job {job_id} is being deleted");
        }
        let owner = match self.rules.job(job_id) {
            Some(job) => Some(job.record.spec.tenant.clone()),
            None => store::stored_owner(&self.grid, job_id).await?,
        };
        match owner {
            Some(owner) if owner == tenant => Ok(()),
            Some(owner) => bail!(
                "permission denied: tenant {tenant} cannot {verb} job {job_id} of tenant {owner}"
            ),
            None => bail!("unknown job {job_id}"),
        }
    }

    /// Makes the asking tenant's object store, with the grid's quota, unless it exists.
    async fn storage(&mut self, tenant: &str) -> Result<StoreReady> {
        if !names::valid_name(tenant) {
            bail!("bad tenant name");
        }
        self.grid
            .create_store(
                tenant,
                self.config.tenant_quota_bytes,
                self.config.stream_replicas,
            )
            .await?;
        Ok(StoreReady {})
    }

    /// Cancels a job: saved before the broker lets go of it (a failed write leaves it
    /// running), then its queued tasks are dropped and its running ones told to stop.
    async fn cancel(&mut self, tenant: &str, job_id: String) -> Result<String> {
        self.check_owner(tenant, &job_id, "cancel").await?;
        let record = match self.rules.job(&job_id) {
            Some(job) => job.record.clone(),
            // Not held: ended, or a retry's round whose save reply was lost (see `retry`).
            None => store::job_record(&self.grid, tenant, &job_id)
                .await?
                .ok_or_else(|| anyhow!("unknown job {job_id}"))?,
        };
        let record = rounds::cancel(record, now_unix_ms())?;
        store::save_job(&self.grid, &record)
            .await
            .map_err(|e| anyhow!("saving the cancellation: {e:#}; try again"))?;
        self.release(&job_id);
        self.rules.settle(record.clone());
        store::drop_queued(&self.grid, &record).await?;
        self.grid
            .client
            .publish(
                names::cancel_broadcast(&record.id),
                // The cancel time: a node stops the tasks sent before it, not a retry's.
                record
                    .finished_unix_ms
                    .unwrap_or(u64::MAX)
                    .to_string()
                    .into(),
            )
            .await
            .map_err(|e| anyhow!("{e}"))?;
        tracing::info!(job = %record.id, "cancelled");
        Ok(record.id)
    }

    /// Runs an ended job's failed and disputed tasks again, in the same job (see
    /// [`crate::rules::rounds`]).
    async fn retry(
        &mut self,
        tenant: &str,
        job_id: String,
        limits: Option<grid_proto::JobLimits>,
    ) -> Result<Retrying> {
        self.check_owner(tenant, &job_id, "retry").await?;
        if let Some(job) = self.rules.job(&job_id) {
            let state = job.record.state.as_str();
            bail!(
                "job {job_id} is still {state}: retry its failed tasks once it has ended (`grid status {job_id} --wait`)"
            );
        }
        let read = || async {
            store::job_record(&self.grid, tenant, &job_id)
                .await?
                .ok_or_else(|| anyhow!("unknown job {job_id}"))
        };
        let new_limits = limits.is_some();
        let record = match rounds::retry(read().await?, limits)? {
            rounds::Retry::TakeUp(record) => return Ok(self.start_round(record)),
            rounds::Retry::Save(record) => record,
        };
        if new_limits {
            // As at submit: limits no live node takes are refused rather than left to wait.
            intake::placeable(&record.spec, &self.grid.live_nodes().await?)?;
        }
        // Messages of the ended round still queued (a replica not needed once its task was
        // decided) would only run for nothing now.
        store::drop_queued(&self.grid, &record)
            .await
            .map_err(|e| anyhow!("{e:#}; try again"))?;
        if let Err(e) = store::save_job(&self.grid, &record).await {
            // The server may have stored it and lost only the reply.
            if !read()
                .await
                .is_ok_and(|stored| stored.retried == record.retried)
            {
                bail!("saving the retry of job {job_id}: {e:#}; try again");
            }
        }
        crash_point("retry-saved");
        Ok(self.start_round(record))
    }

    /// Takes up a job whose new round is saved: it gets its tasks once its records are read.
    fn start_round(&mut self, record: JobRecord) -> Retrying {
        let (job_id, round) = (record.id.clone(), record.retried);
        let tasks = record.counts.total - record.counts.succeeded;
        metrics::counter!("grid_task_retries_total").increment(tasks);
        tracing::info!(job = %job_id, tenant = %record.spec.tenant, tasks, round, "retrying failed tasks");
        self.rules.hold(record, false);
        self.start_loads();
        Retrying { job_id, tasks }
    }

    /// Deletes an ended job of the asking tenant's: its stored objects that no other job of
    /// the tenant's names, then its task records, votes, claims and job record. The ledger
    /// keeps the job's entries: they are what was billed.
    ///
    /// Objects are shared by content (the same module, input or log in two jobs is one
    /// object), so what the tenant's other jobs name is kept: their specs, task records and
    /// votes are read for that, once per delete. A job still running keeps its objects safe by
    /// the refusal below; a job submitted *during* a delete that names an object being deleted
    /// finds it missing (its tasks fail to fetch it and are reported `lost`) — submit again.
    async fn start_delete(
        &mut self,
        tenant: String,
        payload: &[u8],
        reply: Option<async_nats::Subject>,
    ) -> Result<()> {
        let job_id = decode::<DeleteRequest>(payload)?.job_id;
        self.check_owner(&tenant, &job_id, "delete").await?;
        if let Some(job) = self.rules.job(&job_id)
            && !job.record.state.is_final()
        {
            bail!(
                "job {job_id} is still {}: cancel it first (`grid cancel {job_id}`), or let it end",
                job.record.state.as_str()
            );
        }
        if self.deleting.contains(&job_id) {
            bail!("job {job_id} is being deleted already");
        }
        self.start_busy(&tenant)?;
        self.deleting.insert(job_id.clone());
        let (grid, finished) = (self.grid.clone(), self.finished.clone());
        tokio::spawn(async move {
            let deleted = delete(&grid, &tenant, &job_id).await;
            let _ = finished.send(Finished::Deleted {
                tenant,
                job_id,
                reply,
                deleted,
            });
        });
        Ok(())
    }
}

/// Checks that a submitted job's objects are uploaded, and reads each distinct params page
/// once to check its task count; at most [`OBJECTS_AT_ONCE`] at a time.
async fn check_objects(grid: &Grid, spec: &grid_proto::JobSpec) -> Result<()> {
    use futures::{StreamExt, TryStreamExt};
    let tenant = spec.tenant.as_str();
    if !grid.has_object(tenant, &spec.module_sha256).await {
        bail!("module {} was not uploaded", spec.module_sha256);
    }
    let mut blobs: Vec<&grid_proto::Sha256Hex> = spec.shared.iter().map(|i| &i.sha256).collect();
    match &spec.tasks {
        grid_proto::TaskSource::Params { pages, lines } => {
            let counted: u64 = pages.iter().map(|p| p.lines).sum();
            if counted != *lines {
                bail!("params file has {counted} tasks, the request says {lines}");
            }
            let mut distinct: Vec<&grid_proto::ParamsPage> = pages.iter().collect();
            distinct.sort_by_key(|p| (p.sha256, p.lines));
            distinct.dedup();
            let reads: Vec<_> = distinct
                .into_iter()
                .map(|page| store::read_params_page(grid, tenant, page))
                .collect();
            futures::stream::iter(reads)
                .buffer_unordered(OBJECTS_AT_ONCE)
                .try_for_each(|_| async { Ok(()) })
                .await?;
        }
        grid_proto::TaskSource::Inputs(files) => blobs.extend(files.iter().map(|i| &i.sha256)),
        grid_proto::TaskSource::Count(_) => {}
    }
    blobs.sort();
    blobs.dedup();
    let checks: Vec<_> = blobs
        .into_iter()
        .map(|blob| uploaded(grid, tenant, blob))
        .collect();
    futures::stream::iter(checks)
        .buffer_unordered(OBJECTS_AT_ONCE)
        .try_for_each(|()| async { Ok(()) })
        .await
}

async fn uploaded(grid: &Grid, tenant: &str, blob: &grid_proto::Sha256Hex) -> Result<()> {
    match grid.has_object(tenant, blob).await {
        true => Ok(()),
        false => Err(anyhow!("input {blob} was not uploaded")),
    }
}

/// Deletes an ended job of `tenant`'s (checked on the loop, see [`Broker::start_delete`]): its
/// stored objects that no other job of the tenant's names, then its task records, votes, claims
/// and job record. The ledger keeps the job's entries: they are what was billed.
///
/// Objects are shared by content (the same module, input or log in two jobs is one
/// object), so what the tenant's other jobs name is kept: their specs, task records and
/// votes are read for that, once per delete. A job still running keeps its objects safe by
/// the refusal in `start_delete`; a job submitted *during* a delete that names an object being
/// deleted finds it missing (its tasks fail to fetch it and are reported `lost`) — submit again.
async fn delete(grid: &Grid, tenant: &str, job_id: &str) -> Result<Deleted> {
    let record = store::job_record(grid, tenant, job_id)
        .await?
        .ok_or_else(|| anyhow!("unknown job {job_id}"))?;
    let mut mine: std::collections::BTreeSet<grid_proto::Sha256Hex> =
        record.spec.objects().into_iter().collect();
    let mut kept = std::collections::BTreeSet::new();
    let own_tasks = format!("{tenant}.{job_id}.");
    for (key, bytes) in grid.entries(names::TASKS_BUCKET, Some(tenant)).await? {
        let Ok(task) = decode::<TaskRecord>(&bytes) else {
            continue;
        };
        if key.starts_with(&own_tasks) {
            mine.extend(task.objects());
        } else {
            kept.extend(task.objects());
        }
    }
    for (_, bytes) in grid.entries(names::JOBS_BUCKET, Some(tenant)).await? {
        let Ok(other) = decode::<JobRecord>(&bytes) else {
            continue;
        };
        if other.id == job_id {
            continue;
        }
        kept.extend(other.spec.objects());
        if other.spec.replicas > 1 {
            kept.extend(vote_objects(grid, &other.id).await?);
        }
    }
    if record.spec.replicas > 1 {
        mine.extend(vote_objects(grid, job_id).await?);
    }
    let store = grid.store(tenant).await?;
    let (mut objects, mut bytes) = (0u64, 0u64);
    for sha in mine.difference(&kept) {
        let name = names::object_name(sha);
        let Ok(info) = store.info(&name).await else {
            continue;
        };
        if info.deleted {
            continue;
        }
        store
            .delete(&name)
            .await
            .map_err(|e| anyhow!("deleting {name}: {e}"))?;
        objects += 1;
        bytes += info.size as u64;
    }
    for (bucket, keys) in [
        (names::TASKS_BUCKET, format!("{tenant}.{job_id}.>")),
        (names::VOTES_BUCKET, format!("{job_id}.>")),
        (names::CLAIMS_BUCKET, format!("{job_id}.>")),
        (names::JOBS_BUCKET, names::job_key(tenant, job_id)),
    ] {
        store::purge(grid, bucket, &keys)
            .await
            .map_err(|e| anyhow!("deleting job {job_id}'s records: {e:#}"))?;
    }
    // Followers of the job table (the dashboard) see no purge: tell them.
    let _ = grid
        .client
        .publish(
            names::job_events(tenant, job_id),
            bytes::Bytes::from_static(names::JOB_DELETED),
        )
        .await;
    tracing::info!(job = %job_id, tenant, objects, bytes, "deleted");
    Ok(Deleted {
        job_id: job_id.to_string(),
        objects,
        bytes,
    })
}

/// The stored objects that job `job_id`'s votes name.
async fn vote_objects(grid: &Grid, job_id: &str) -> Result<Vec<grid_proto::Sha256Hex>> {
    let mut objects = Vec::new();
    for (_, vote) in grid.entries(names::VOTES_BUCKET, Some(job_id)).await? {
        if let Ok(vote) = decode::<ResultMsg>(&vote) {
            objects.extend(vote.objects());
        }
    }
    Ok(objects)
}

/// An answer to a request, encoded: granted, or refused with the error's chain on one line.
pub(super) fn answer<T: Message>(result: Result<T>) -> Vec<u8> {
    encode(&match result {
        Ok(reply) => Answer::Granted(reply),
        Err(e) => Answer::Refused(format!("{e:#}")),
    })
}

/// A new job id: time first, so that ids sort by submission; a random tail, so that they
/// never collide.
fn new_job_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let salt = grid_proto::Sha256Hex::of(format!("{nanos}-{}-{n}", std::process::id()).as_bytes())
        .to_string();
    format!("{:012x}{}", now_unix_ms(), &salt[..6])
}
