//! The broker: job intake, fair fan-out of tasks, exactly-once counting of results, retries.
//!
//! It keeps no state of its own: job records live in KV (`grid_jobs`), each task's final state
//! in KV (`grid_tasks`, created once — a second result for the same task finds the key taken),
//! tasks and results in streams. A job's counts follow the set of its `grid_tasks` entries:
//! the broker remembers which entries it has counted, so a second result is a duplicate, while
//! a result whose create reached the store but whose reply was lost (the server died
//! mid-request) is counted when it comes back, from the stored record. Killed and restarted, it
//! reloads unfinished jobs, recounts them from `grid_tasks` (in the background: it serves
//! requests meanwhile, and a job's results wait until its count is in), and goes on; a task it had
//! published but not yet recorded is published again under the same message id, and JetStream
//! drops the copy. A job's final record is written before the broker lets go of the job; until
//! that write succeeds the job stays in memory and the write is retried on every tick.
//!
//! Fairness: each job has at most `window` tasks in the work queue or running; the broker fills
//! windows round-robin across jobs, so a small job submitted behind a large one waits for at
//! most one window of the large job, not for all of it.
//!
//! The usage ledger (`grid_usage`): every attempt that ran on a node and sent a result is
//! billable to the tenant — a failed attempt that is retried, each replica, a task cancelled
//! while it ran (a replica whose result lost its task's vote is billed but not paid to its
//! provider: `grid usage` checks the entry's digest against the task's record) —
//! and is written once, keyed by tenant, job, task, attempt and replica (a create: the same
//! attempt delivered twice, or run by two nodes after a lapsed ack, is billed once, to the
//! first node whose result arrives). A task handed back by its node (shutdown, a GPU worker
//! restart, a node that died) sends no result and is not billed; neither is a `lost` report,
//! which ran nothing. The entry is written before the result is counted, so a broker killed in
//! between finds it on redelivery and does not bill it again.
//!
//! One broker at a time: job-state writes are not compare-and-set yet.

use anyhow::{Result, anyhow, bail};
use async_nats::jetstream::{self, AckKind};
use bit_set::BitSet;
use futures::StreamExt;
use grid_client::{Grid, now_unix_ms};
use grid_proto::{
    ApiReply, CancelRequest, JobRecord, JobState, Outcome, Reason, ResultMsg, SubmitRequest,
    TaskCounts, TaskMsg, TaskRecord, TaskSource, TaskState, UsageEntry, decode, encode, names,
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub nats_url: String,
    /// Tasks of one job queued or running at once.
    pub window: u64,
    /// Servers of the NATS cluster that keep each stream and bucket.
    pub stream_replicas: usize,
    /// NATS credentials (the operator's, on a grid with auth).
    pub creds: Option<std::path::PathBuf>,
    /// Bytes each tenant's object store may hold (0: no limit).
    pub tenant_quota_bytes: u64,
    /// Where to serve Prometheus metrics (see `grid_client::metrics`).
    pub metrics: Option<std::net::SocketAddr>,
}

struct ActiveJob {
    record: JobRecord,
    /// The pages of a params file, for jobs with one.
    params: Option<ParamsPages>,
    /// Failure reasons of tasks still being retried.
    failures: HashMap<u64, Vec<String>>,
    /// With replicas: the votes of undecided tasks (reloaded from `grid_votes` after a restart)
    /// and how many replicas each was given.
    votes: HashMap<u64, Vec<ResultMsg>>,
    /// The spec that travels in each task message: the job's, without its task list.
    task_spec: grid_proto::JobSpec,
    dispatched: HashMap<u64, u32>,
    /// Tasks whose final record in `grid_tasks` is in `record.counts`.
    counted: BitSet,
    /// A moving average of its tasks' wall time, from their results: how many to a message.
    task_seconds: Option<f64>,
    dirty: bool,
    /// Its stored task records are counted (see [`ActiveJob::load`]). Until then — after a
    /// restart, or a retry, while [`Broker::load_pending`] reads them — it gets no tasks and
    /// its results wait.
    loaded: bool,
}

/// A params job's task lines, read a page at a time: a fill reads forward, and retries and
/// extra replicas are of tasks in the window, so a few pages in memory serve them all however
/// long the file is.
struct ParamsPages {
    pages: Vec<grid_proto::ParamsPage>,
    /// The first task index of each page.
    starts: Vec<u64>,
    /// The pages read last, newest at the back.
    cache: std::collections::VecDeque<(usize, ParamsPageLines)>,
}

/// Params pages a job keeps in memory.
const PARAMS_PAGES_CACHED: usize = 3;

impl ParamsPages {
    fn new(pages: Vec<grid_proto::ParamsPage>) -> Self {
        let starts = pages
            .iter()
            .scan(0, |next, page| {
                let start = *next;
                *next += page.lines;
                Some(start)
            })
            .collect();
        Self {
            pages,
            starts,
            cache: Default::default(),
        }
    }

    /// Task `index`'s params line.
    async fn line(&mut self, grid: &Grid, tenant: &str, index: u64) -> Result<Vec<u8>> {
        let page = self.starts.partition_point(|&start| start <= index);
        let Some(page) = page.checked_sub(1) else {
            bail!("task {index} has no params line");
        };
        let offset = (index - self.starts[page]) as usize;
        if !self.cache.iter().any(|(p, _)| *p == page) {
            let lines = read_params_page(grid, tenant, &self.pages[page]).await?;
            if self.cache.len() == PARAMS_PAGES_CACHED {
                self.cache.pop_front();
            }
            self.cache.push_back((page, lines));
        }
        self.cache
            .iter()
            .find(|(p, _)| *p == page)
            .and_then(|(_, lines)| lines.get(offset))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| anyhow!("task {index} has no params line"))
    }
}

/// A params page and where each of its task lines lies in it (one allocation for the lines,
/// not one each: a page holds tens of thousands of short lines).
struct ParamsPageLines {
    bytes: Vec<u8>,
    lines: Vec<(u32, u32)>,
}

impl ParamsPageLines {
    fn get(&self, line: usize) -> Option<&[u8]> {
        let &(start, end) = self.lines.get(line)?;
        self.bytes.get(start as usize..end as usize)
    }
}

/// The task lines of a params page, checked against the count its job's spec gives.
async fn read_params_page(
    grid: &Grid,
    tenant: &str,
    page: &grid_proto::ParamsPage,
) -> Result<ParamsPageLines> {
    let bytes = grid.get_object(tenant, &page.sha256).await?;
    let Ok(size) = u32::try_from(bytes.len()) else {
        bail!(
            "params page {} is {} bytes: too large",
            page.sha256,
            bytes.len()
        );
    };
    let lines: Vec<(u32, u32)> = grid_proto::params_line_ranges(&bytes)
        .map(|range| (range.start as u32, range.end.min(size as usize) as u32))
        .collect();
    if lines.len() as u64 != page.lines {
        bail!(
            "params page {} has {} tasks, the job's spec says {}",
            page.sha256,
            lines.len(),
            page.lines
        );
    }
    Ok(ParamsPageLines { bytes, lines })
}

/// Work one task message should carry at most, in the job's average task time: a run of
/// short tasks shares one publish, delivery and ack, and a node holding one such message keeps
/// a slot busy for no longer than this.
const MESSAGE_SECONDS: f64 = 0.05;

/// A run of tasks for one message: its first index, how many, and their params lines (none for
/// a job without params).
type TaskRun = (u64, u32, Vec<Vec<u8>>);

impl ActiveJob {
    /// The tasks `indices` (consecutive) as one message's run, with their params.
    async fn run_of(&mut self, grid: &Grid, indices: &[u64]) -> Result<TaskRun> {
        let first = indices.first().copied().unwrap_or_default();
        let mut params = Vec::new();
        if let Some(pages) = &mut self.params {
            for &index in indices {
                params.push(pages.line(grid, &self.record.spec.tenant, index).await?);
            }
        }
        Ok((first, indices.len() as u32, params))
    }

    /// Tasks to a message for this job: several only for tasks known to be short (from the
    /// first results), never for replicas or input files, and at most an eighth of the window,
    /// so that several messages are in flight for the nodes' slots.
    fn per_message(&self, window: u64) -> u64 {
        let spec = &self.record.spec;
        if spec.replicas > 1 || matches!(spec.tasks, TaskSource::Inputs(_)) {
            return 1;
        }
        let Some(seconds) = self.task_seconds else {
            return 1;
        };
        let fit = (MESSAGE_SECONDS / seconds.max(1e-6)) as u64;
        fit.min(u64::from(grid_proto::MAX_TASKS_PER_MESSAGE))
            .min(window / 8)
            .max(1)
    }

    /// Takes a result's wall time into the job's average.
    fn observe(&mut self, result: &ResultMsg) {
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
    fn count(&mut self, record: &TaskRecord) -> bool {
        let Ok(index) = usize::try_from(record.result.index) else {
            return false;
        };
        if !self.counted.insert(index) {
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
        // Only a task below `enqueued` was counted in flight (see `Broker::fill`).
        if record.result.index < self.record.enqueued {
            counts.in_flight = counts.in_flight.saturating_sub(1);
        }
        self.dirty = true;
        true
    }

    /// Counts the job's stored task records into it, from scratch: at a restart, and when a
    /// retry starts. A failed or disputed record of an earlier round is not counted: its task
    /// runs again, and the new round's record takes its place (see `Broker::after_create`).
    fn load(&mut self, stored: &[TaskRecord], duplicates: u64) {
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
        self.finish_if_complete(duplicates);
    }

    /// Whether this task's final record is counted.
    fn has_counted(&self, index: u64) -> bool {
        usize::try_from(index).is_ok_and(|i| self.counted.contains(i))
    }

    /// Ends the job once every task is counted: its final state, saved by the next `persist`.
    fn finish_if_complete(&mut self, duplicates: u64) {
        let counts = &self.record.counts;
        if self.record.state.is_final()
            || counts.succeeded + counts.failed + counts.disputed < counts.total
        {
            return;
        }
        self.record.state = if counts.failed + counts.disputed == 0 {
            self.record.reason = None;
            JobState::Done
        } else {
            JobState::Failed
        };
        self.record.finished_unix_ms = Some(now_unix_ms());
        self.dirty = true;
        tracing::info!(job = %self.record.id, state = self.record.state.as_str(), duplicates_dropped = duplicates, "finished");
    }
}

struct Broker {
    config: BrokerConfig,
    grid: Grid,
    /// Ordered by job id (ids grow with time): round-robin fill visits older jobs first.
    active: BTreeMap<String, ActiveJob>,
    /// Results dropped as duplicates since start (logged when a job finishes).
    duplicates: u64,
    /// Jobs whose task records are being read, and where the reads send them (see
    /// [`Broker::load_pending`]).
    loading: std::collections::HashSet<String>,
    loads: tokio::sync::mpsc::UnboundedSender<(String, Result<Vec<TaskRecord>>)>,
}

/// Runs the broker until `shutdown` resolves.
pub async fn run(
    config: BrokerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if let Some(addr) = config.metrics {
        grid_client::metrics::serve(addr)?;
    }
    let client = grid_client::connect_with(&config.nats_url, true, config.creds.as_deref()).await?;
    // A NATS cluster may still be electing its JetStream leader: wait for it.
    let grid = loop {
        match Grid::setup(client.clone(), config.stream_replicas).await {
            Ok(grid) => break grid,
            Err(e) => {
                tracing::info!("waiting for JetStream: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let (loads, mut loaded) = tokio::sync::mpsc::unbounded_channel();
    let mut broker = Broker {
        config,
        grid,
        active: BTreeMap::new(),
        duplicates: 0,
        loading: Default::default(),
        loads,
    };
    broker.resume().await?;
    // Tenants' requests, in a queue group: one broker answers each.
    let api = |verb: &str| client.queue_subscribe(names::api_subject("*", verb), "broker".into());
    let mut submits = api("submit").await.map_err(|e| anyhow!("{e}"))?;
    let mut cancels = api("cancel").await.map_err(|e| anyhow!("{e}"))?;
    let mut queries = api("owner").await.map_err(|e| anyhow!("{e}"))?;
    let mut storage = api("storage").await.map_err(|e| anyhow!("{e}"))?;
    let mut deletes = api("delete").await.map_err(|e| anyhow!("{e}"))?;
    let mut retries = api("retry").await.map_err(|e| anyhow!("{e}"))?;
    let results: jetstream::consumer::PullConsumer = broker
        .grid
        .js
        .get_stream(names::RESULTS_STREAM)
        .await
        .map_err(|e| anyhow!("{e}"))?
        .get_consumer(names::RESULTS_CONSUMER)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut results = results.messages().await.map_err(|e| anyhow!("{e}"))?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tracing::info!("broker ready");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(msg) = submits.next() => {
                broker.on_submit(msg).await;
                // Its first window now, not at the next tick.
                if let Err(e) = broker.fill().await {
                    tracing::warn!("enqueueing tasks: {e:#}");
                }
            }
            Some(msg) = cancels.next() => broker.on_cancel(msg).await,
            Some(msg) = queries.next() => broker.on_owner(msg).await,
            Some(msg) = storage.next() => broker.on_storage(msg).await,
            Some(msg) = deletes.next() => broker.on_delete(msg).await,
            Some(msg) = retries.next() => broker.on_retry(msg).await,
            Some((id, stored)) = loaded.recv() => {
                broker.on_loaded(id, stored);
                if let Err(e) = broker.fill().await {
                    tracing::warn!("enqueueing tasks: {e:#}");
                }
            }
            Some(msg) = results.next() => {
                // What else has arrived, up to a batch: its ledger entries and task records are
                // written concurrently, then counted in order.
                let mut batch = vec![msg];
                while batch.len() < RESULT_BATCH {
                    match futures::FutureExt::now_or_never(results.next()) {
                        Some(Some(msg)) => batch.push(msg),
                        _ => break,
                    }
                }
                let batch = batch
                    .into_iter()
                    .filter_map(|m| m.map_err(|e| tracing::warn!("receiving results: {e}")).ok())
                    .collect();
                broker.on_results(batch).await;
                // A job that just ended is saved (and its waiters told) now, not at the tick.
                if broker.active.values().any(|j| j.dirty && j.record.state.is_final()) {
                    broker.persist().await;
                }
                // Tasks finished: top their windows up now rather than at the next tick.
                if let Err(e) = broker.fill().await {
                    tracing::warn!("enqueueing tasks: {e:#}");
                }
            },
            _ = tick.tick() => {
                broker.load_pending();
                if let Err(e) = broker.fill().await {
                    tracing::warn!("enqueueing tasks: {e:#}");
                }
                broker.persist().await;
            }
        }
    }
    broker.persist().await;
    Ok(())
}

/// A task counted in its job, for the metrics (see `grid_client::metrics`).
fn record_counted(record: &TaskRecord) {
    let state = match record.state {
        TaskState::Succeeded => "succeeded",
        TaskState::Failed => "failed",
        TaskState::Disputed => "disputed",
    };
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

/// The final records of `job`'s tasks in `grid_tasks` — all of them: a record missed here
/// belongs to a result that is already acked and never comes back.
async fn stored_records(grid: &Grid, tenant: &str, job: &str) -> Result<Vec<TaskRecord>> {
    let entries = grid
        .entries(names::TASKS_BUCKET, Some(&format!("{tenant}.{job}")))
        .await?;
    Ok(entries
        .iter()
        .filter_map(|(_, bytes)| decode::<TaskRecord>(bytes).ok())
        .collect())
}

fn tenant_of(subject: &str) -> Option<&str> {
    subject.strip_prefix("grid.api.")?.split('.').next()
}

fn new_job_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let salt = grid_proto::Sha256Hex::of(format!("{nanos}-{}-{n}", std::process::id()).as_bytes())
        .to_string();
    // Time first, so that ids sort by submission; a random tail, so that they never collide.
    format!("{:012x}{}", now_unix_ms(), &salt[..6])
}

impl Broker {
    async fn reply(&self, msg: &async_nats::Message, reply: ApiReply) {
        if let Some(to) = &msg.reply
            && let Err(e) = self
                .grid
                .client
                .publish(to.clone(), encode(&reply).into())
                .await
        {
            tracing::warn!("replying: {e}");
        }
    }

    /// Reloads unfinished jobs after a restart and recounts them from `grid_tasks`.
    async fn resume(&mut self) -> Result<()> {
        // One pass over the job records, keeping only the unfinished (ended jobs' specs, with
        // their input lists, are not held all at once).
        let mut reader = self
            .grid
            .kv_follow(
                names::JOBS_BUCKET,
                None,
                jetstream::consumer::DeliverPolicy::LastPerSubject,
            )
            .await?;
        while let Some(entry) = reader.next_until_caught_up().await {
            let entry = entry?;
            let Some(value) = entry.value else {
                continue;
            };
            let record = match decode::<JobRecord>(&value) {
                Ok(r) if r.state.is_final() => continue,
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(key = %entry.key, "unreadable job record: {e}");
                    continue;
                }
            };
            // Its task records are read in the background; until then its results wait.
            tracing::info!(job = %record.id, round = record.retried, "resuming");
            self.active.insert(record.id.clone(), self.activate(record));
        }
        self.load_pending();
        Ok(())
    }

    /// Removes every entry of `bucket` whose key matches `keys` (NATS wildcards), with its
    /// history: what is purged leaves no tombstone, and a create under its key succeeds.
    async fn purge(&self, bucket: &str, keys: &str) -> Result<()> {
        self.grid
            .js
            .get_stream(format!("KV_{bucket}"))
            .await
            .map_err(|e| anyhow!("{e}"))?
            .purge()
            .filter(format!("$KV.{bucket}.{keys}"))
            .await
            .map_err(|e| anyhow!("removing {bucket} {keys}: {e}"))?;
        Ok(())
    }

    /// Starts reading the task records of each job that waits for them (see
    /// [`ActiveJob::loaded`]), in the background: a job of a million tasks is a million records,
    /// and the broker serves every other job meanwhile. [`Broker::on_loaded`] takes them in.
    fn load_pending(&mut self) {
        for job in self.active.values().filter(|job| !job.loaded) {
            if self.loading.len() >= LOADS_AT_ONCE {
                break; // the others on a later tick
            }
            let id = job.record.id.clone();
            if !self.loading.insert(id.clone()) {
                continue;
            }
            let (grid, tenant, loads) = (
                self.grid.clone(),
                job.record.spec.tenant.clone(),
                self.loads.clone(),
            );
            tokio::spawn(async move {
                let stored = stored_records(&grid, &tenant, &id).await;
                if stored.is_err() {
                    // Tried again on a tick after this: not a read a tick.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let _ = loads.send((id, stored));
            });
        }
    }

    /// A job's task records, read by [`Broker::load_pending`]: counted into the job, which then
    /// gets its tasks. A failed read is tried again on the next tick.
    fn on_loaded(&mut self, id: String, stored: Result<Vec<TaskRecord>>) {
        self.loading.remove(&id);
        let duplicates = self.duplicates;
        match (self.active.get_mut(&id), stored) {
            (Some(job), Ok(stored)) if !job.loaded => {
                job.load(&stored, duplicates);
                let counts = &job.record.counts;
                tracing::info!(job = %id, succeeded = counts.succeeded, failed = counts.failed, round = job.record.retried, "loaded");
            }
            (_, Err(e)) => tracing::warn!(job = %id, "reading the job's task records: {e:#}"),
            _ => {}
        }
    }

    fn activate(&self, record: JobRecord) -> ActiveJob {
        let params = match &record.spec.tasks {
            TaskSource::Params { pages, .. } => Some(ParamsPages::new(pages.clone())),
            _ => None,
        };
        let task_spec = grid_proto::JobSpec {
            tasks: TaskSource::Count(record.spec.tasks.len()),
            ..record.spec.clone()
        };
        ActiveJob {
            record,
            task_spec,
            params,
            failures: HashMap::new(),
            votes: HashMap::new(),
            dispatched: HashMap::new(),
            counted: BitSet::new(),
            task_seconds: None,
            // Its record is as saved; `load` and `fill` mark what changes it.
            dirty: false,
            loaded: false,
        }
    }

    async fn on_submit(&mut self, msg: async_nats::Message) {
        let reply = match self.submit(&msg).await {
            Ok(job_id) => ApiReply::Ok { job_id },
            Err(e) => ApiReply::Err(format!("{e:#}")),
        };
        self.reply(&msg, reply).await;
    }

    async fn submit(&mut self, msg: &async_nats::Message) -> Result<String> {
        let tenant = tenant_of(msg.subject.as_str())
            .ok_or_else(|| anyhow!("bad subject"))?
            .to_string();
        let mut spec = decode::<SubmitRequest>(&msg.payload)
            .map_err(|e| anyhow!("{e}"))?
            .spec;
        // The subject is the tenant's own (NATS lets a tenant publish only there).
        if spec.tenant != tenant && spec.tenant != names::DEFAULT_TENANT {
            anyhow::bail!(
                "permission denied: tenant {tenant} cannot submit as tenant {}",
                spec.tenant
            );
        }
        spec.tenant = tenant.clone();
        if !names::CLASSES.contains(&spec.class.as_str()) {
            anyhow::bail!(
                "unknown class {:?}: a job runs on class {}",
                spec.class,
                names::CLASSES.join(" or ")
            );
        }
        if spec.class != names::DEFAULT_CLASS {
            // A CPU job may wait for nodes to join; a GPU job on a grid without GPUs would wait
            // forever, so it is refused while no node offers the class. Checked at submit only:
            // if the class's nodes leave later, `grid status` says so.
            let nodes = self.grid.live_nodes().await?;
            if !nodes.iter().any(|n| n.classes.contains(&spec.class)) {
                anyhow::bail!(
                    "no node of this grid has a GPU: start grid-node on a machine with one (a CPU-only \
                     machine can serve GPU jobs with lavapipe: apt-get install mesa-vulkan-drivers)"
                );
            }
        }
        // Providers take no job over their caps: refuse one that no live node of its class
        // takes, rather than let it wait. (With no node online, a job waits for one to join.)
        let nodes = self.grid.live_nodes().await?;
        let of_class: Vec<_> = nodes
            .iter()
            .filter(|n| n.classes.contains(&spec.class))
            .collect();
        if !of_class.is_empty()
            && of_class
                .iter()
                .all(|n| spec.limits.over(&n.accepts).is_some())
        {
            let why: Vec<String> = of_class
                .iter()
                .take(3)
                .map(|n| {
                    format!(
                        "node {}: {}",
                        n.id,
                        spec.limits.over(&n.accepts).unwrap_or_default()
                    )
                })
                .collect();
            anyhow::bail!(
                "no live node of class {} takes a job this large ({}): ask for less, or wait for a provider that offers more",
                spec.class,
                why.join("; ")
            );
        }
        let total = spec.tasks.len();
        if total == 0 {
            anyhow::bail!("the job has no tasks");
        }
        if spec.replicas == 0 || spec.quorum == 0 || spec.quorum > spec.replicas {
            anyhow::bail!(
                "--quorum must be between 1 and --replicas ({}), got {}",
                spec.replicas,
                spec.quorum
            );
        }
        if spec.replicas > 1 {
            // Replicas run on distinct nodes: fewer nodes than replicas could never finish.
            let nodes = self.grid.live_nodes().await?;
            let online = nodes
                .iter()
                .filter(|n| n.classes.contains(&spec.class))
                .count();
            if (online as u32) < spec.replicas {
                anyhow::bail!(
                    "--replicas {} needs {} nodes of class {}; {online} online",
                    spec.replicas,
                    spec.replicas,
                    spec.class
                );
            }
        }
        if !self.grid.has_object(&tenant, &spec.module_sha256).await {
            anyhow::bail!("module {} was not uploaded", spec.module_sha256);
        }
        let mut blobs: Vec<&grid_proto::Sha256Hex> =
            spec.shared.iter().map(|i| &i.sha256).collect();
        match &spec.tasks {
            TaskSource::Params { pages, lines } => {
                // Each page is read (and dropped) once here, so that a wrong count is refused
                // now rather than found mid-job.
                for page in pages {
                    read_params_page(&self.grid, &tenant, page).await?;
                }
                let counted: u64 = pages.iter().map(|p| p.lines).sum();
                if counted != *lines {
                    anyhow::bail!("params file has {counted} tasks, the request says {lines}");
                }
            }
            TaskSource::Inputs(files) => blobs.extend(files.iter().map(|i| &i.sha256)),
            TaskSource::Count(_) => {}
        }
        for blob in blobs {
            if !self.grid.has_object(&tenant, blob).await {
                anyhow::bail!("input {blob} was not uploaded");
            }
        }
        let id = new_job_id();
        let record = JobRecord {
            id: id.clone(),
            spec,
            state: JobState::Queued,
            reason: None,
            created_unix_ms: now_unix_ms(),
            finished_unix_ms: None,
            counts: TaskCounts {
                total,
                ..TaskCounts::default()
            },
            enqueued: 0,
            retried: 0,
        };
        self.grid
            .jobs()
            .await?
            .put(names::job_key(&tenant, &id), encode(&record).into())
            .await
            .map_err(|e| anyhow!("storing the job: {e}"))?;
        let mut job = self.activate(record);
        job.loaded = true; // a new job has no task records
        tracing::info!(job = %id, tenant, total, "submitted");
        self.active.insert(id.clone(), job);
        Ok(id)
    }

    /// The tenant whose job `job_id` is, if the job exists: from memory for an active job, else
    /// from the keys of `grid_jobs` (`<tenant>.<job>`, found with a subject filter).
    async fn owner_of(&self, job_id: &str) -> Result<Option<String>> {
        if let Some(job) = self.active.get(job_id) {
            return Ok(Some(job.record.spec.tenant.clone()));
        }
        if !names::valid_name(job_id) {
            return Ok(None);
        }
        let stream = self
            .grid
            .js
            .get_stream(format!("KV_{}", names::JOBS_BUCKET))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let filter = format!("$KV.{}.*.{job_id}", names::JOBS_BUCKET);
        let info = stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let mut subjects = info;
        let found = subjects
            .next()
            .await
            .transpose()
            .map_err(|e| anyhow!("{e}"))?;
        Ok(found.and_then(|(subject, _)| {
            subject
                .strip_prefix(&format!("$KV.{}.", names::JOBS_BUCKET))
                .and_then(|key| key.split('.').next())
                .map(str::to_string)
        }))
    }

    /// Fails unless `job_id` is a job of `tenant`'s, with the line a user sees.
    async fn check_owner(&self, tenant: &str, job_id: &str, verb: &str) -> Result<()> {
        match self.owner_of(job_id).await? {
            Some(owner) if owner == tenant => Ok(()),
            Some(owner) => anyhow::bail!(
                "permission denied: tenant {tenant} cannot {verb} job {job_id} of tenant {owner}"
            ),
            None => anyhow::bail!("unknown job {job_id}"),
        }
    }

    async fn on_owner(&mut self, msg: async_nats::Message) {
        let reply = async {
            let tenant = tenant_of(msg.subject.as_str()).ok_or_else(|| anyhow!("bad subject"))?;
            let req =
                decode::<grid_proto::OwnerRequest>(&msg.payload).map_err(|e| anyhow!("{e}"))?;
            self.check_owner(tenant, &req.job_id, "read").await?;
            Ok::<_, anyhow::Error>(req.job_id)
        }
        .await;
        let reply = match reply {
            Ok(job_id) => ApiReply::Ok { job_id },
            Err(e) => ApiReply::Err(format!("{e:#}")),
        };
        self.reply(&msg, reply).await;
    }

    /// Makes the asking tenant's object store, with the grid's quota, unless it exists.
    async fn on_storage(&mut self, msg: async_nats::Message) {
        let reply = match tenant_of(msg.subject.as_str()) {
            Some(tenant) if names::valid_name(tenant) => match self
                .grid
                .create_store(
                    tenant,
                    self.config.tenant_quota_bytes,
                    self.config.stream_replicas,
                )
                .await
            {
                Ok(()) => ApiReply::Ok {
                    job_id: String::new(),
                },
                Err(e) => ApiReply::Err(format!("{e:#}")),
            },
            _ => ApiReply::Err("bad tenant name".into()),
        };
        self.reply(&msg, reply).await;
    }

    async fn on_delete(&mut self, msg: async_nats::Message) {
        let reply = match self.delete(&msg).await {
            Ok(reply) => reply,
            Err(e) => ApiReply::Err(format!("{e:#}")),
        };
        self.reply(&msg, reply).await;
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
    async fn delete(&mut self, msg: &async_nats::Message) -> Result<ApiReply> {
        let tenant = tenant_of(msg.subject.as_str())
            .ok_or_else(|| anyhow!("bad subject"))?
            .to_string();
        let req = decode::<grid_proto::DeleteRequest>(&msg.payload).map_err(|e| anyhow!("{e}"))?;
        let job_id = req.job_id;
        self.check_owner(&tenant, &job_id, "delete").await?;
        if let Some(job) = self.active.get(&job_id)
            && !job.record.state.is_final()
        {
            anyhow::bail!(
                "job {job_id} is still {}: cancel it first (`grid cancel {job_id}`), or let it end",
                job.record.state.as_str()
            );
        }
        let jobs = self.grid.jobs().await?;
        let record = match jobs.get(names::job_key(&tenant, &job_id)).await {
            Ok(Some(bytes)) => decode::<JobRecord>(&bytes).map_err(|e| anyhow!("{e}"))?,
            Ok(None) => anyhow::bail!("unknown job {job_id}"),
            Err(e) => anyhow::bail!("reading job {job_id}: {e}"),
        };
        let mut mine: std::collections::BTreeSet<grid_proto::Sha256Hex> =
            record.spec.objects().into_iter().collect();
        let mut kept = std::collections::BTreeSet::new();
        let own_tasks = format!("{tenant}.{job_id}.");
        for (key, bytes) in self
            .grid
            .entries(names::TASKS_BUCKET, Some(&tenant))
            .await?
        {
            let Ok(task) = decode::<TaskRecord>(&bytes) else {
                continue;
            };
            if key.starts_with(&own_tasks) {
                mine.extend(task.objects());
            } else {
                kept.extend(task.objects());
            }
        }
        for (_, bytes) in self.grid.entries(names::JOBS_BUCKET, Some(&tenant)).await? {
            let Ok(other) = decode::<JobRecord>(&bytes) else {
                continue;
            };
            if other.id == job_id {
                continue;
            }
            kept.extend(other.spec.objects());
            if other.spec.replicas > 1 {
                for (_, vote) in self
                    .grid
                    .entries(names::VOTES_BUCKET, Some(&other.id))
                    .await?
                {
                    if let Ok(vote) = decode::<ResultMsg>(&vote) {
                        kept.extend(vote.objects());
                    }
                }
            }
        }
        if record.spec.replicas > 1 {
            for (_, vote) in self
                .grid
                .entries(names::VOTES_BUCKET, Some(&job_id))
                .await?
            {
                if let Ok(vote) = decode::<ResultMsg>(&vote) {
                    mine.extend(vote.objects());
                }
            }
        }
        let store = self.grid.store(&tenant).await?;
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
            (names::JOBS_BUCKET, names::job_key(&tenant, &job_id)),
        ] {
            self.purge(bucket, &keys)
                .await
                .map_err(|e| anyhow!("deleting job {job_id}'s records: {e:#}"))?;
        }
        self.active.remove(&job_id);
        // Followers of the job table (the dashboard) see no purge: tell them.
        let _ = self
            .grid
            .client
            .publish(
                names::job_events(&tenant, &job_id),
                bytes::Bytes::from_static(names::JOB_DELETED),
            )
            .await;
        tracing::info!(job = %job_id, tenant, objects, bytes, "deleted");
        Ok(ApiReply::Deleted {
            job_id,
            objects,
            bytes,
        })
    }

    async fn on_retry(&mut self, msg: async_nats::Message) {
        let reply = match self.retry(&msg).await {
            Ok(reply) => reply,
            Err(e) => ApiReply::Err(format!("{e:#}")),
        };
        self.reply(&msg, reply).await;
    }

    /// Runs an ended job's failed and disputed tasks again, in the same job: the job starts a
    /// new round (`JobRecord::retried`, which owns attempt numbers of its own, see
    /// [`JobRecord::first_attempt`]) and goes back to queued; once its task records are read
    /// (in the background), the fill sends out the tasks without a record of the round or a
    /// success, passing over the ones that succeeded. Earlier rounds' records stay until the
    /// new round's result of the task replaces them (see [`Broker::after_create`]).
    ///
    /// Crash-safe at every step: the saved record is the commitment, and nothing is deleted.
    /// A broker that dies before saving it changed nothing; one that dies after resumes the job
    /// in its new round. A save whose reply was lost leaves a queued job no broker holds: a
    /// second `grid retry` takes it up.
    async fn retry(&mut self, msg: &async_nats::Message) -> Result<ApiReply> {
        let tenant = tenant_of(msg.subject.as_str())
            .ok_or_else(|| anyhow!("bad subject"))?
            .to_string();
        let req = decode::<grid_proto::RetryRequest>(&msg.payload).map_err(|e| anyhow!("{e}"))?;
        let job_id = req.job_id;
        self.check_owner(&tenant, &job_id, "retry").await?;
        if let Some(job) = self.active.get(&job_id) {
            let state = job.record.state.as_str();
            anyhow::bail!(
                "job {job_id} is still {state}: retry its failed tasks once it has ended (`grid status {job_id} --wait`)"
            );
        }
        let key = names::job_key(&tenant, &job_id);
        let jobs = self.grid.jobs().await?;
        let read = || async {
            match jobs.get(&key).await {
                Ok(Some(bytes)) => decode::<JobRecord>(&bytes).map_err(|e| anyhow!("{e}")),
                Ok(None) => Err(anyhow!("unknown job {job_id}")),
                Err(e) => Err(anyhow!("reading job {job_id}: {e}")),
            }
        };
        let mut record = read().await?;
        let counts = &record.counts;
        let tasks = counts.failed + counts.disputed;
        match record.state {
            JobState::Failed if tasks > 0 => {}
            JobState::Cancelled => anyhow::bail!(
                "job {job_id} was cancelled: only an ended job's failed tasks can be retried; submit it again"
            ),
            state if state.is_final() => {
                anyhow::bail!("job {job_id} has no failed tasks ({})", state.as_str())
            }
            // A round saved by a retry whose reply was lost (see above): take it up.
            _ => return Ok(self.start_round(record)),
        }
        // Each round has `retries + 1` attempt numbers of its own, in a u32.
        let retried = record.retried + 1;
        let attempts = u64::from(record.spec.retries) + 1;
        if u64::from(retried) * attempts + attempts > u64::from(u32::MAX) {
            anyhow::bail!(
                "job {job_id} has been retried {} times: submit it again",
                record.retried
            );
        }
        // Messages of the ended round still queued (a replica not needed once its task was
        // decided) would only run for nothing now.
        self.drop_queued(&record)
            .await
            .map_err(|e| anyhow!("{e:#}; try again"))?;
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
        if let Err(e) = jobs.put(&key, encode(&record).into()).await {
            // The server may have stored it and lost only the reply.
            if !read().await.is_ok_and(|stored| stored.retried == retried) {
                anyhow::bail!("saving the retry of job {job_id}: {e}; try again");
            }
        }
        crash_point("retry-saved");
        Ok(self.start_round(record))
    }

    /// Takes up a job whose new round is saved: it gets its tasks once its records are read.
    fn start_round(&mut self, record: JobRecord) -> ApiReply {
        let (job_id, tenant, round) = (
            record.id.clone(),
            record.spec.tenant.clone(),
            record.retried,
        );
        let tasks = record.counts.total - record.counts.succeeded;
        metrics::counter!("grid_task_retries_total").increment(tasks);
        tracing::info!(job = %job_id, tenant, tasks, round, "retrying failed tasks");
        let job = self.activate(record);
        self.active.insert(job_id.clone(), job);
        self.load_pending();
        ApiReply::Retrying { job_id, tasks }
    }

    /// Removes the job's task messages still in the work queue.
    async fn drop_queued(&self, job: &JobRecord) -> Result<()> {
        self.grid
            .js
            .get_stream(names::TASKS_STREAM)
            .await
            .map_err(|e| anyhow!("{e}"))?
            .purge()
            .filter(names::tasks_subject(&job.spec.class, &job.id))
            .await
            .map_err(|e| anyhow!("dropping job {}'s queued tasks: {e}", job.id))?;
        Ok(())
    }

    async fn on_cancel(&mut self, msg: async_nats::Message) {
        let reply = match self.cancel(&msg).await {
            Ok(job_id) => ApiReply::Ok { job_id },
            Err(e) => ApiReply::Err(format!("{e:#}")),
        };
        self.reply(&msg, reply).await;
    }

    async fn cancel(&mut self, msg: &async_nats::Message) -> Result<String> {
        let tenant = tenant_of(msg.subject.as_str()).ok_or_else(|| anyhow!("bad subject"))?;
        let req = decode::<CancelRequest>(&msg.payload).map_err(|e| anyhow!("{e}"))?;
        self.check_owner(tenant, &req.job_id, "cancel").await?;
        let mut record = match self.active.get(&req.job_id) {
            Some(job) => job.record.clone(),
            // Not held: ended, or a retry's round whose save reply was lost (see `retry`).
            None => match self
                .grid
                .jobs()
                .await?
                .get(names::job_key(tenant, &req.job_id))
                .await
                .map_err(|e| anyhow!("{e}"))?
            {
                Some(b) => decode::<JobRecord>(&b).map_err(|e| anyhow!("{e}"))?,
                None => anyhow::bail!("unknown job {}", req.job_id),
            },
        };
        if record.state.is_final() {
            anyhow::bail!(
                "job {} already ended ({})",
                req.job_id,
                record.state.as_str()
            );
        }
        record.state = JobState::Cancelled;
        record.reason = Some("cancelled".into());
        record.finished_unix_ms = Some(now_unix_ms());
        // Saved before the broker lets go of the job: a failed write leaves it running.
        self.grid
            .jobs()
            .await?
            .put(names::job_key(tenant, &record.id), encode(&record).into())
            .await
            .map_err(|e| anyhow!("saving the cancellation: {e}; try again"))?;
        self.active.remove(&req.job_id);
        self.drop_queued(&record).await?;
        self.grid
            .client
            .publish(names::cancel_broadcast(&record.id), bytes::Bytes::new())
            .await
            .map_err(|e| anyhow!("{e}"))?;
        tracing::info!(job = %record.id, "cancelled");
        Ok(record.id)
    }

    /// A results message decoded and checked, or terminated (unreadable or forged).
    async fn screen(&self, msg: &jetstream::Message) -> Option<Vec<ResultMsg>> {
        let most = grid_proto::MAX_TASKS_PER_MESSAGE as usize;
        let results = match decode::<grid_proto::ResultsMsg>(&msg.payload) {
            Ok(r) if (1..=most).contains(&r.results.len()) => r.results,
            Ok(r) => {
                tracing::error!(subject = %msg.subject, "rejecting a results message of {} results", r.results.len());
                let _ = msg.ack_with(AckKind::Term).await;
                return None;
            }
            Err(e) => {
                tracing::error!(subject = %msg.subject, "rejecting a results message: {e}");
                let _ = msg.ack_with(AckKind::Term).await;
                return None;
            }
        };
        // NATS lets a provider publish results only under its own node id: a result that
        // names another node, or a tenant that is not its job's, is a forgery (and so is the
        // message that carries it).
        let node = names::result_node(msg.subject.as_str()).unwrap_or_default();
        for result in &results {
            let forged = if node != result.node_id {
                Some(format!(
                    "it names node {} but came from node {node}",
                    result.node_id
                ))
            } else {
                match self.active.get(&result.job_id) {
                    Some(job) if job.record.spec.tenant != result.tenant => Some(format!(
                        "it names tenant {} for a job of tenant {}",
                        result.tenant, job.record.spec.tenant
                    )),
                    Some(job) => forged_numbers(&job.record, result),
                    _ => None,
                }
            };
            if let Some(why) = forged {
                tracing::warn!(job = %result.job_id, index = result.index, "rejecting a result: {why}");
                let _ = msg.ack_with(AckKind::Term).await;
                return None;
            }
        }
        Some(results)
    }

    /// Records a batch of results messages. The JetStream writes of different results do not
    /// depend on each other — each ledger entry and each task record is a create under its own
    /// key — so they go out together; what they change in memory (counts, retries, votes) is
    /// done one result at a time, in order. A message is acked once all its results are
    /// stored, and asked for again if any is not (the others then come back as duplicates).
    async fn on_results(&mut self, batch: Vec<jetstream::Message>) {
        // Each result with the index of its message in `messages`.
        let mut ready = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        for msg in batch {
            if let Some(results) = self.screen(&msg).await {
                if results
                    .iter()
                    .any(|r| self.active.get(&r.job_id).is_some_and(|job| !job.loaded))
                {
                    // Its job's records are still being read (a restart, a retry): counted
                    // once they are, not on top of what they will say.
                    tracing::debug!(subject = %msg.subject, "result for a job still loading: later");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                        .await;
                    continue;
                }
                for result in results {
                    if let Some(job) = self.active.get_mut(&result.job_id) {
                        job.observe(&result);
                    }
                    ready.push((messages.len(), result));
                }
                messages.push(msg);
            }
        }
        let mut recorded: Vec<Result<()>> = messages.iter().map(|_| Ok(())).collect();
        let mut fail = |m: usize, e: anyhow::Error| {
            if recorded[m].is_ok() {
                recorded[m] = Err(e);
            }
        };
        let billed =
            futures::future::join_all(ready.iter().map(|(_, r)| self.record_usage(r))).await;
        // A final result of a job without replicas (most results) is one task-record create.
        let mut finals = Vec::new();
        let mut others = Vec::new();
        for ((m, result), billed) in ready.into_iter().zip(billed) {
            if let Err(e) = billed {
                fail(m, e);
                continue;
            }
            match self.final_record(&result) {
                Some(record) => finals.push((m, record)),
                None => others.push((m, result)),
            }
        }
        let created = match self.grid.tasks().await {
            Ok(tasks) => {
                futures::future::join_all(finals.iter().map(|(_, record)| {
                    let key = names::task_key(
                        &record.result.tenant,
                        &record.result.job_id,
                        record.result.index,
                    );
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
        for (msg, recorded) in messages.iter().zip(recorded) {
            settle(msg, recorded).await;
        }
    }

    /// The final record of `result`'s task when it is the common case — an active job
    /// without replicas, a task that exists, an outcome that is not retried — or `None` for
    /// [`Broker::count`] to handle. Takes the task's earlier failures into the record.
    fn final_record(&mut self, result: &ResultMsg) -> Option<TaskRecord> {
        let job = self.active.get_mut(&result.job_id)?;
        if result.index >= job.record.counts.total
            || job.record.spec.replicas > 1
            || result.attempt < job.record.first_attempt()
        {
            return None;
        }
        let retry = matches!(result.outcome, Outcome::Failed(ref r) if !matches!(r, Reason::Invalid(_) | Reason::Cancelled))
            && job.record.retries_left(result.attempt);
        if retry {
            return None;
        }
        let state = if result.outcome == Outcome::Succeeded {
            TaskState::Succeeded
        } else {
            TaskState::Failed
        };
        let mut failures = job.failures.remove(&result.index).unwrap_or_default();
        if let Some(reason) = result.outcome.reason() {
            failures.push(reason.to_string());
        }
        Some(TaskRecord {
            state,
            // This round's; an earlier round's record adds its own when this one replaces it.
            attempts: result.attempt.saturating_sub(job.record.first_attempt()) + 1,
            failures,
            result: result.clone(),
            votes: Vec::new(),
            round: job.record.retried,
            earlier: Vec::new(),
        })
    }

    /// Bills `result`'s attempt in the usage ledger, once (see the module docs).
    async fn record_usage(&self, result: &ResultMsg) -> Result<()> {
        if result.outcome == Outcome::Failed(Reason::Lost) {
            return Ok(()); // nothing ran
        }
        // What billing needs of the spec (not all of it: a job's inputs list can be long).
        let billing = |spec: &grid_proto::JobSpec| {
            (
                spec.tenant.clone(),
                spec.limits.clone(),
                spec.replicas,
                spec.retries,
            )
        };
        let (tenant, limits, replicas, retries) = match self.active.get(&result.job_id) {
            Some(job) if result.index >= job.record.counts.total => return Ok(()),
            Some(job) => billing(&job.record.spec),
            None => match self
                .grid
                .jobs()
                .await?
                .get(names::job_key(&result.tenant, &result.job_id))
                .await
            {
                Ok(Some(bytes)) => match decode::<JobRecord>(&bytes) {
                    Ok(record) if result.index < record.counts.total => {
                        if let Some(why) = forged_numbers(&record, result) {
                            tracing::warn!(job = %result.job_id, index = result.index, node = %result.node_id, "not billing a result: {why}");
                            return Ok(());
                        }
                        billing(&record.spec)
                    }
                    _ => return Ok(()),
                },
                Ok(None) => return Ok(()),
                Err(e) if e.kind() == jetstream::kv::EntryErrorKind::InvalidKey => return Ok(()),
                Err(e) => return Err(anyhow!("reading job {}: {e}", result.job_id)),
            },
        };
        let key = names::usage_key(
            &tenant,
            &result.job_id,
            result.index,
            result.attempt,
            result.replica,
        );
        let entry = UsageEntry {
            tenant,
            job_id: result.job_id.clone(),
            index: result.index,
            attempt: result.attempt,
            replica: result.replica,
            node_id: result.node_id.clone(),
            // A provider bills no more than the limits it enforced.
            usage: result.usage.within(&limits),
            recorded_unix_ms: now_unix_ms(),
            replicas,
            digest: result.digest,
            round: grid_proto::round_of(result.attempt, retries),
        };
        match self
            .grid
            .usage()
            .await?
            .create(&key, encode(&entry).into())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(anyhow!("billing {key}: {e}")),
        }
    }

    /// Counts one result, exactly once per task.
    async fn count(&mut self, result: ResultMsg) -> Result<()> {
        let Some(job) = self.active.get_mut(&result.job_id) else {
            // Finished, cancelled or unknown: nothing to count, but a late replica's vote in
            // the round that decided its task.
            if let Some(record) = self.decided(&result).await?
                && !record.votes.is_empty()
                && self.round_of_ended(&result).await? == Some(record.round)
            {
                self.late_vote(&result, &record).await?;
            }
            return Ok(());
        };
        if result.index >= job.record.counts.total {
            tracing::warn!(job = %result.job_id, index = result.index, "result for a task that does not exist");
            return Ok(());
        }
        if result.attempt < job.record.first_attempt() {
            // Before `grid retry`: its task's new round counts, this one is billed only.
            tracing::debug!(job = %result.job_id, index = result.index, attempt = result.attempt, "result of an earlier round ignored");
            return Ok(());
        }
        if job.record.spec.replicas > 1 {
            return self.vote(result).await;
        }
        if job.has_counted(result.index) {
            // Counted already (another node's run of the same attempt, after a lapsed ack):
            // this result changes nothing, and a failure is not retried.
            self.duplicates += 1;
            metrics::counter!("grid_duplicate_results_total").increment(1);
            return Ok(());
        }
        if let Some(record) = self.final_record(&result) {
            return self.record_task(record).await.map(drop);
        }
        // Otherwise the attempt failed and is retried.
        let Some(job) = self.active.get_mut(&result.job_id) else {
            return Ok(());
        };
        {
            let reason = result
                .outcome
                .reason()
                .map(|r| r.to_string())
                .unwrap_or_default();
            tracing::info!(job = %result.job_id, index = result.index, attempt = result.attempt, %reason, "retrying");
            if let Some(why) = result.outcome.reason() {
                metrics::counter!("grid_attempts_failed_total", "reason" => why.kind())
                    .increment(1);
            }
            metrics::counter!("grid_task_retries_total").increment(1);
            // Published before the failed result is acked: a broker killed in between gets the
            // result again and republishes the retry under the same message id, which JetStream
            // drops; a retry kept only in memory would be lost with the broker.
            let task = job.run_of(&self.grid, &[result.index]).await?;
            publish_task(&self.grid.js, job, task, result.attempt + 1, 0).await?;
            crash_point("after-retry");
            job.failures.entry(result.index).or_default().push(reason);
        }
        Ok(())
    }

    /// A replica's result: stored once as a vote; the task is decided when `quorum` votes agree,
    /// given another replica when all are in and none agree enough, and disputed when the extra
    /// replicas run out. A lost replica (its node died, say) is not a vote: it runs again.
    async fn vote(&mut self, result: ResultMsg) -> Result<()> {
        let Some(job) = self.active.get_mut(&result.job_id) else {
            return Ok(());
        };
        let spec = &job.record.spec;
        let (index, replicas, quorum) = (result.index, spec.replicas, spec.quorum);
        let most = max_replicas(replicas);
        if matches!(result.outcome, Outcome::Failed(Reason::Cancelled)) {
            return Ok(());
        }
        if result.outcome == Outcome::Failed(Reason::Lost)
            && job.record.retries_left(result.attempt)
            && !job.has_counted(index)
        {
            tracing::info!(job = %result.job_id, index, replica = result.replica, "replica lost; running it again");
            let task = job.run_of(&self.grid, &[index]).await?;
            return publish_task(&self.grid.js, job, task, result.attempt + 1, result.replica)
                .await;
        }
        let round = job.record.retried;
        if let Some(record) = self
            .decided(&result)
            .await?
            .filter(|record| record.round == round)
        {
            // Decided by a store whose reply was lost: counted now, when a replica comes back.
            if self.count_once(&record) {
                tally_votes(&self.grid, &record).await;
            }
            return self.late_vote(&result, &record).await;
        }
        let fresh = self.store_vote(&result, round).await?;
        let Some(job) = self.active.get_mut(&result.job_id) else {
            return Ok(());
        };
        // Stored already: a duplicate if this broker holds the vote, else a vote whose store
        // reached the server but whose reply was lost, or one from before a restart.
        let held = job
            .votes
            .get(&index)
            .is_some_and(|votes| votes.iter().any(|v| v.replica == result.replica));
        if !fresh && held {
            self.duplicates += 1;
            metrics::counter!("grid_duplicate_results_total").increment(1);
            return Ok(());
        }
        // One vote per node in a round: a node's claim keeps it to one replica of a task, so a
        // second is forged (it would let one node reach a quorum alone).
        let one_per_node = |votes: &[ResultMsg], vote: &ResultMsg| {
            !votes
                .iter()
                .any(|v| v.node_id == vote.node_id && v.replica != vote.replica)
        };
        let votes = match job.votes.get_mut(&index) {
            Some(votes) if !one_per_node(votes, &result) => {
                tracing::warn!(job = %result.job_id, index, node = %result.node_id, "ignoring a second replica's vote from one node");
                return Ok(());
            }
            Some(votes) => {
                votes.push(result);
                votes.clone()
            }
            None => {
                // The first vote this broker sees for the task: any earlier ones are stored.
                let mut votes: Vec<ResultMsg> = Vec::new();
                for replica in 0..most {
                    let key = names::vote_key(&job.record.id, index, round, replica);
                    if let Ok(bucket) = self.grid.votes().await
                        && let Ok(Some(bytes)) = bucket.get(&key).await
                        && let Ok(vote) = decode::<ResultMsg>(&bytes)
                        && one_per_node(&votes, &vote)
                    {
                        votes.push(vote);
                    }
                }
                job.votes.insert(index, votes.clone());
                votes
            }
        };
        let mut groups: HashMap<&grid_proto::Sha256Hex, Vec<&ResultMsg>> = HashMap::new();
        for vote in &votes {
            groups.entry(&vote.digest).or_default().push(vote);
        }
        let best = groups
            .values()
            .max_by_key(|g| g.len())
            .cloned()
            .unwrap_or_default();
        let given = votes
            .iter()
            .map(|v| v.replica + 1)
            .max()
            .unwrap_or(0)
            .max(replicas);
        let dispatched = *job.dispatched.entry(index).or_insert(given);
        let winner = if best.len() as u32 >= quorum {
            best.iter().min_by_key(|v| v.replica).map(|v| (*v).clone())
        } else if (votes.len() as u32) < dispatched {
            return Ok(()); // more votes are coming
        } else if dispatched < most {
            tracing::info!(job = %job.record.id, index, votes = votes.len(), "replicas disagree; one more");
            let task = job.run_of(&self.grid, &[index]).await?;
            let attempt = job.record.first_attempt();
            publish_task(&self.grid.js, job, task, attempt, dispatched).await?;
            job.dispatched.insert(index, dispatched + 1);
            return Ok(());
        } else {
            None
        };
        job.votes.remove(&index);
        job.dispatched.remove(&index);
        let (state, result) = match &winner {
            Some(w) if w.outcome == Outcome::Succeeded => (TaskState::Succeeded, w.clone()),
            Some(w) => (TaskState::Failed, w.clone()),
            None => (TaskState::Disputed, votes[0].clone()),
        };
        let record = TaskRecord {
            state,
            attempts: result.attempt.saturating_sub(job.record.first_attempt()) + 1,
            round,
            earlier: Vec::new(),
            failures: result
                .outcome
                .reason()
                .map(|r| r.to_string())
                .into_iter()
                .collect(),
            votes: votes
                .iter()
                .map(|v| grid_proto::Vote {
                    replica: v.replica,
                    node_id: v.node_id.clone(),
                    digest: v.digest,
                    agreed: winner.as_ref().is_some_and(|w| w.digest == v.digest),
                })
                .collect(),
            result,
        };
        if let Some(record) = self.record_task(record).await? {
            tally_votes(&self.grid, &record).await;
        }
        Ok(())
    }

    /// The retry round of `result`'s attempt, for a job no longer active (from its record;
    /// `None` for a job that is gone).
    async fn round_of_ended(&self, result: &ResultMsg) -> Result<Option<u32>> {
        let key = names::job_key(&result.tenant, &result.job_id);
        match self.grid.jobs().await?.get(&key).await {
            Ok(Some(bytes)) => Ok(decode::<JobRecord>(&bytes)
                .ok()
                .map(|job| grid_proto::round_of(result.attempt, job.spec.retries))),
            Ok(None) => Ok(None),
            Err(e) if e.kind() == jetstream::kv::EntryErrorKind::InvalidKey => Ok(None),
            Err(e) => Err(anyhow!("reading job {}: {e}", result.job_id)),
        }
    }

    /// The final record of `result`'s task, if the task is decided (in any round).
    async fn decided(&self, result: &ResultMsg) -> Result<Option<TaskRecord>> {
        let key = names::task_key(&result.tenant, &result.job_id, result.index);
        let bytes = self
            .grid
            .tasks()
            .await?
            .get(&key)
            .await
            .map_err(|e| anyhow!("reading task {key}: {e}"))?;
        Ok(bytes.and_then(|b| decode::<TaskRecord>(&b).ok()))
    }

    /// Stores a replica's result in `grid_votes` as a vote of round `round`, once: false if it
    /// was stored already.
    async fn store_vote(&self, result: &ResultMsg, round: u32) -> Result<bool> {
        let key = names::vote_key(&result.job_id, result.index, round, result.replica);
        match self
            .grid
            .votes()
            .await?
            .create(&key, encode(result).into())
            .await
        {
            Ok(_) if reply_lost(&key) => Err(anyhow!("storing vote {key}: {REPLY_LOST}")),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(anyhow!("storing vote {key}: {e}")),
        }
    }

    /// A replica's result for a task already decided in the result's round (its job may have
    /// finished): it changes nothing but its node's tally, once.
    async fn late_vote(&mut self, result: &ResultMsg, record: &TaskRecord) -> Result<()> {
        if record.votes.is_empty() || record.votes.iter().any(|v| v.replica == result.replica) {
            return Ok(()); // no replicas, or a vote the decision counted
        }
        if self.store_vote(result, record.round).await? {
            let agreed =
                record.state != TaskState::Disputed && record.result.digest == result.digest;
            tally(&self.grid, &result.node_id, agreed).await;
        } else {
            self.duplicates += 1;
            metrics::counter!("grid_duplicate_results_total").increment(1);
        }
        Ok(())
    }

    /// Stores a task's final record once and counts it once. Returns the stored record when
    /// this call counted it, `None` for a duplicate.
    async fn record_task(&mut self, record: TaskRecord) -> Result<Option<TaskRecord>> {
        let (job_id, index) = (record.result.job_id.clone(), record.result.index);
        let key = names::task_key(&record.result.tenant, &job_id, index);
        let tasks = self.grid.tasks().await?;
        let created = tasks.create(&key, encode(&record).into()).await;
        self.after_create(record, created).await
    }

    /// What [`Broker::record_task`] does once its create has answered (the batch path sends
    /// many creates together, then comes here for each, in order).
    async fn after_create(
        &mut self,
        record: TaskRecord,
        created: Result<u64, jetstream::kv::CreateError>,
    ) -> Result<Option<TaskRecord>> {
        let (job_id, index) = (record.result.job_id.clone(), record.result.index);
        let key = names::task_key(&record.result.tenant, &job_id, index);
        let stored = match created {
            Ok(_) if reply_lost(&key) => return Err(anyhow!("storing task {key}: {REPLY_LOST}")),
            Ok(_) => {
                crash_point("after-store");
                record
            }
            Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
                if self
                    .active
                    .get(&job_id)
                    .is_none_or(|j| j.has_counted(index))
                {
                    self.duplicates += 1;
                    metrics::counter!("grid_duplicate_results_total").increment(1);
                    tracing::debug!(task = %key, "duplicate result ignored");
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
                if stored.round >= record.round || stored.state == TaskState::Succeeded {
                    // Stored by an earlier create whose reply never came: count what was
                    // stored.
                    stored
                } else {
                    // An earlier round's failure, retried (`grid retry`): this round's record
                    // takes its place and tells of it. Compare-and-set: a second result of the
                    // task finds the key changed and comes back to count what won.
                    let replaced = record.after(&stored);
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
            Err(e) => return Err(anyhow!("storing task {key}: {e}")),
        };
        Ok(self.count_once(&stored).then_some(stored))
    }

    /// Counts a stored final record in its job, unless it is counted already (or the job is
    /// no longer active); true when this call counted it.
    fn count_once(&mut self, stored: &TaskRecord) -> bool {
        let duplicates = self.duplicates;
        let Some(job) = self.active.get_mut(&stored.result.job_id) else {
            return false;
        };
        let counted = job.count(stored);
        if counted {
            // Here, not in `ActiveJob::count`: a restarted broker recounts stored records.
            record_counted(stored);
        }
        job.finish_if_complete(duplicates);
        counted
    }

    /// Tops up every job's window, round-robin. A job whose publishes fail goes back to where
    /// it was and is published again on the next tick (the same message ids: no duplicates).
    async fn fill(&mut self) -> Result<()> {
        let window = self.config.window;
        let mut failed = None;
        for job in self.active.values_mut().filter(|job| job.loaded) {
            // The saved `enqueued` may lag what a broker before a restart had enqueued, so a
            // task past it may be counted already: it is passed over, not put in flight again
            // (a window of tasks that never report would stall the job).
            let (total, room) = (
                job.record.counts.total,
                window.saturating_sub(job.record.counts.in_flight),
            );
            // Room for a whole message of short tasks first, unless fewer are left.
            let per_message = job.per_message(window);
            if room < per_message && total - job.record.enqueued > room {
                continue;
            }
            let mut last = job.record.enqueued;
            let mut indices = Vec::new();
            while last < total && (indices.len() as u64) < room {
                if !job.has_counted(last) {
                    indices.push(last);
                }
                last += 1;
            }
            if last == job.record.enqueued {
                continue;
            }
            // Consecutive tasks, several to a message when they are short.
            let mut runs: Vec<&[u64]> = Vec::new();
            let mut rest = &indices[..];
            while !rest.is_empty() {
                let mut len = 1;
                while len < rest.len().min(per_message as usize) && rest[len] == rest[len - 1] + 1 {
                    len += 1;
                }
                runs.push(&rest[..len]);
                rest = &rest[len..];
            }
            let mut tasks = Vec::with_capacity(runs.len());
            for run in runs {
                match job.run_of(&self.grid, run).await {
                    Ok(task) => tasks.push(task),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if tasks.iter().map(|t| t.1 as usize).sum::<usize>() < indices.len() {
                continue;
            }
            let (replicas, attempt) = (job.record.spec.replicas.max(1), job.record.first_attempt());
            let acks = tasks
                .into_iter()
                .flat_map(|task| (0..replicas).map(move |replica| (task.clone(), replica)));
            let acks = acks
                .map(|(task, replica)| publish_task(&self.grid.js, job, task, attempt, replica));
            if let Some(Err(e)) = futures::future::join_all(acks)
                .await
                .into_iter()
                .find(Result::is_err)
            {
                failed = Some(e);
                continue;
            }
            job.record.enqueued = last;
            job.record.counts.in_flight += indices.len() as u64;
            job.dirty = true;
            if job.record.state == JobState::Queued {
                job.record.state = JobState::Running;
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Writes the records of jobs that changed (their counts feed `grid status` and progress),
    /// and lets go of a job that ended once its final record is saved.
    async fn persist(&mut self) {
        let (mut queued, mut in_flight) = (0, 0);
        for job in self.active.values() {
            queued += job.record.counts.total.saturating_sub(job.record.enqueued);
            in_flight += job.record.counts.in_flight;
        }
        metrics::gauge!("grid_tasks", "state" => "queued").set(queued as f64);
        metrics::gauge!("grid_tasks", "state" => "in_flight").set(in_flight as f64);
        metrics::gauge!("grid_jobs_running").set(self.active.len() as f64);
        let mut saved_final = Vec::new();
        for job in self.active.values_mut().filter(|j| j.dirty) {
            if job.record.state.is_final() {
                crash_point("before-finish");
            }
            let key = names::job_key(&job.record.spec.tenant, &job.record.id);
            let saved = match self.grid.jobs().await {
                Ok(jobs) => jobs
                    .put(key, encode(&job.record).into())
                    .await
                    .map_err(|e| anyhow!("{e}")),
                Err(e) => Err(e),
            };
            match saved {
                Ok(_) => {
                    let _ = self
                        .grid
                        .client
                        .publish(
                            names::job_events(&job.record.spec.tenant, &job.record.id),
                            bytes::Bytes::new(),
                        )
                        .await;
                    job.dirty = false;
                    if job.record.state.is_final() {
                        saved_final.push(job.record.id.clone());
                    }
                }
                Err(e) => tracing::warn!(job = %job.record.id, "saving the job record: {e}"),
            }
        }
        for id in saved_final {
            self.active.remove(&id);
        }
    }
}

/// Results the broker takes at once (see `Broker::on_results`).
const RESULT_BATCH: usize = 256;

/// Jobs whose task records are read at once (see `Broker::load_pending`).
const LOADS_AT_ONCE: usize = 4;

/// Acks a result once it is recorded, or asks for it again shortly.
async fn settle(msg: &jetstream::Message, recorded: Result<()>) {
    match recorded {
        Ok(()) => {
            if let Err(e) = msg.ack().await {
                tracing::warn!("acking a result: {e}");
            }
        }
        Err(e) => {
            tracing::warn!("recording a result: {e:#}; it will be redelivered");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

/// Replicas a task may get in all: two more than asked, to break a disagreement (none more
/// without replicas).
fn max_replicas(replicas: u32) -> u32 {
    if replicas > 1 { replicas + 2 } else { 1 }
}

/// Why `result`'s attempt or replica number cannot be one the broker sent out for `job`, if
/// so: a forgery (a provider may publish only its own results, but it writes their numbers).
fn forged_numbers(job: &JobRecord, result: &ResultMsg) -> Option<String> {
    if !job.attempt_sent(result.attempt) {
        return Some(format!(
            "it names attempt {}, past the job's last",
            result.attempt
        ));
    }
    if result.replica >= max_replicas(job.spec.replicas) {
        return Some(format!(
            "it names replica {} of a job of {} replicas",
            result.replica, job.spec.replicas
        ));
    }
    None
}

/// Counts the votes of a decided task in their nodes' tallies.
async fn tally_votes(grid: &Grid, record: &TaskRecord) {
    for vote in &record.votes {
        tally(grid, &vote.node_id, vote.agreed).await;
    }
}

/// Counts one vote of `node` in its tally (only the broker writes tallies).
async fn tally(grid: &Grid, node: &str, agreed: bool) {
    let bucket = match grid.tally().await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(node, "updating the vote tally: {e:#}");
            return;
        }
    };
    let mut tally = match bucket.get(node).await {
        Ok(Some(bytes)) => decode::<grid_proto::NodeTally>(&bytes).unwrap_or_default(),
        _ => grid_proto::NodeTally::default(),
    };
    if agreed {
        tally.agreed += 1;
    } else {
        tally.outvoted += 1;
    }
    if let Err(e) = bucket.put(node, encode(&tally).into()).await {
        tracing::warn!(node, "updating the vote tally: {e}");
    }
}

/// Test-only fault injection: with `GRID_TEST_CRASH_AT=<point>` in its environment, the broker
/// aborts the first time it reaches that point — the way fault tests kill it at an exact moment
/// (`after-store`: a task's record is stored, its result not yet acked; `after-retry`: a retry is
/// published, the failed result not yet acked; `before-finish`: every task of a job is counted,
/// its final record not yet saved; `retry-saved`: a retried job's new round is saved, its tasks
/// not yet sent; `after-replace`: a retried task's record took its earlier round's place, its
/// result not yet acked).
fn crash_point(point: &str) {
    if std::env::var("GRID_TEST_CRASH_AT").is_ok_and(|p| p == point) {
        tracing::warn!("GRID_TEST_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}

const REPLY_LOST: &str = "reply lost (GRID_TEST_LOSE_REPLIES)";

/// Test-only fault injection: with `GRID_TEST_LOSE_REPLIES=1` in its environment, the broker
/// takes the first successful store of each task record and each vote for a failure — as if
/// the server had died between storing and replying — so every result goes back to JetStream
/// and returns to find its key taken.
fn reply_lost(key: &str) -> bool {
    static LOST: std::sync::OnceLock<Option<std::sync::Mutex<std::collections::HashSet<String>>>> =
        std::sync::OnceLock::new();
    let lost = LOST.get_or_init(|| {
        std::env::var("GRID_TEST_LOSE_REPLIES")
            .is_ok_and(|v| v == "1")
            .then(Default::default)
    });
    lost.as_ref().is_some_and(|keys| {
        keys.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.to_string())
    })
}

/// Publishes attempt `attempt` of a run of `job`'s tasks to the work queue and waits for
/// JetStream's ack. The message id (`job.task.attempt.replica`, `+count` for a run) makes a
/// second publish of the same attempt a no-op.
fn publish_task(
    js: &jetstream::Context,
    job: &ActiveJob,
    (index, count, params): TaskRun,
    attempt: u32,
    replica: u32,
) -> impl std::future::Future<Output = Result<()>> + use<> {
    let spec = &job.record.spec;
    let input = match &spec.tasks {
        TaskSource::Inputs(files) => files.get(index as usize).cloned(),
        _ => None,
    };
    let task = TaskMsg {
        job_id: job.record.id.clone(),
        index,
        count,
        attempt,
        replica,
        params,
        input,
        spec: job.task_spec.clone(),
    };
    let msg = jetstream::message::PublishMessage::build()
        .payload(encode(&task).into())
        // A run's id names its length too: after a restart the broker may cut runs
        // differently, and a longer run from the same task is new work, not a duplicate.
        .message_id(match count {
            1 => names::attempt_id(&job.record.id, index, attempt, replica),
            n => format!(
                "{}+{n}",
                names::attempt_id(&job.record.id, index, attempt, replica)
            ),
        });
    let (js, subject) = (
        js.clone(),
        names::tasks_subject(&spec.class, &job.record.id),
    );
    async move {
        js.send_publish(subject, msg)
            .await
            .map_err(|e| anyhow!("{e}"))?
            .await
            .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }
}

/// Command-line flags of the broker (`grid-broker` and `grid broker`).
#[derive(clap::Args, Debug, Clone)]
pub struct BrokerArgs {
    /// NATS server(s) of the grid [default: GRID_NATS_URL or nats://127.0.0.1:4222]
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// Tasks of one job queued or running at once.
    #[arg(long, default_value_t = 256)]
    pub window: u64,
    /// Copies of every stream, bucket and object store in a NATS cluster (3 on a 3-server
    /// cluster: any one server may die).
    #[arg(long, default_value_t = 1)]
    pub stream_replicas: usize,
    /// NATS credentials file: the operator's on a grid with auth [default: GRID_CREDS]
    #[arg(long, value_name = "FILE")]
    pub creds: Option<std::path::PathBuf>,
    /// What each tenant may keep in its object store (modules, inputs, outputs, logs); 0 for
    /// no limit. Applies when a tenant's store is made.
    #[arg(long, value_name = "SIZE", default_value = "10GiB", value_parser = parse_size)]
    pub tenant_quota: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9101)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?}: {e} (e.g. 10GiB)"))
}

/// Runs a broker from its flags until Ctrl-C or SIGTERM.
pub fn main(args: BrokerArgs) -> std::process::ExitCode {
    let config = BrokerConfig {
        nats_url: grid_client::nats_url(args.nats.as_deref()),
        window: args.window,
        stream_replicas: args.stream_replicas,
        creds: args.creds,
        tenant_quota_bytes: args.tenant_quota,
        metrics: args.metrics,
    };
    grid_client::run_service("grid-broker", |shutdown| run(config, shutdown))
}
