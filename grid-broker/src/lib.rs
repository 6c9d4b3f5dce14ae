//! The broker: job intake, fair fan-out of tasks, exactly-once counting of results, retries.
//!
//! It keeps no state of its own: job records live in KV (`grid_jobs`), each task's final state
//! in KV (`grid_tasks`, created once — a second result for the same task finds the key taken
//! and is counted as a duplicate), tasks and results in streams. Killed and restarted, it
//! reloads unfinished jobs, recounts them from `grid_tasks`, and goes on; a task it had
//! published but not yet recorded is published again under the same message id, and JetStream
//! drops the copy.
//!
//! Fairness: each job has at most `window` tasks in the work queue or running; the broker fills
//! windows round-robin across jobs, so a small job submitted behind a large one waits for at
//! most one window of the large job, not for all of it.
//!
//! One broker at a time: job-state writes are not compare-and-set yet.

use anyhow::{Result, anyhow};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use grid_client::{Grid, now_unix_ms};
use grid_proto::{
    ApiReply, CancelRequest, JobRecord, JobState, Outcome, Reason, ResultMsg, SubmitRequest,
    TaskCounts, TaskMsg, TaskRecord, TaskSource, TaskState, decode, encode, names,
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub nats_url: String,
    /// Tasks of one job queued or running at once.
    pub window: u64,
}

struct ActiveJob {
    record: JobRecord,
    /// Params lines, for jobs with a params file.
    params: Option<Vec<Vec<u8>>>,
    /// Failure reasons of tasks still being retried.
    failures: HashMap<u64, Vec<String>>,
    dirty: bool,
}

struct Broker {
    config: BrokerConfig,
    grid: Grid,
    /// Ordered by job id (ids grow with time): round-robin fill visits older jobs first.
    active: BTreeMap<String, ActiveJob>,
    /// Results dropped as duplicates since start (logged when a job finishes).
    duplicates: u64,
}

/// Runs the broker until `shutdown` resolves.
pub async fn run(
    config: BrokerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let client = grid_client::connect(&config.nats_url, true).await?;
    let grid = Grid::setup(client.clone()).await?;
    let mut broker = Broker {
        config,
        grid,
        active: BTreeMap::new(),
        duplicates: 0,
    };
    broker.resume().await?;
    let mut submits = client
        .queue_subscribe("grid.api.*.submit", "broker".into())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut cancels = client
        .queue_subscribe("grid.api.*.cancel", "broker".into())
        .await
        .map_err(|e| anyhow!("{e}"))?;
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
            Some(msg) = submits.next() => broker.on_submit(msg).await,
            Some(msg) = cancels.next() => broker.on_cancel(msg).await,
            Some(msg) = results.next() => match msg {
                Ok(msg) => broker.on_result(msg).await,
                Err(e) => tracing::warn!("receiving results: {e}"),
            },
            _ = tick.tick() => {
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
        let mut keys = self.grid.jobs.keys().await.map_err(|e| anyhow!("{e}"))?;
        let mut ids = Vec::new();
        while let Some(key) = keys.next().await {
            ids.push(key.map_err(|e| anyhow!("{e}"))?);
        }
        for id in ids {
            let Some(bytes) = self.grid.jobs.get(&id).await.map_err(|e| anyhow!("{e}"))? else {
                continue;
            };
            let record = match decode::<JobRecord>(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(job = %id, "unreadable job record: {e}");
                    continue;
                }
            };
            if record.state.is_final() {
                continue;
            }
            let mut job = self.activate(record).await?;
            let (succeeded, failed) = self.recount(&job.record.id).await?;
            let counts = &mut job.record.counts;
            counts.succeeded = succeeded;
            counts.failed = failed;
            counts.in_flight = job.record.enqueued.saturating_sub(succeeded + failed);
            job.dirty = true;
            tracing::info!(job = %id, succeeded, failed, "resumed");
            self.active.insert(id, job);
        }
        Ok(())
    }

    async fn recount(&self, job: &str) -> Result<(u64, u64)> {
        let mut watch = self
            .grid
            .tasks
            .watch_with_history(format!("{job}.>"))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let (mut succeeded, mut failed) = (0, 0);
        // An empty history sends nothing: stop after a short quiet period.
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), watch.next()).await;
            let Ok(Some(entry)) = next else { break };
            let entry = entry.map_err(|e| anyhow!("{e}"))?;
            if let Ok(record) = decode::<TaskRecord>(&entry.value) {
                match record.state {
                    TaskState::Succeeded => succeeded += 1,
                    TaskState::Failed => failed += 1,
                }
            }
            if entry.delta == 0 {
                break;
            }
        }
        Ok((succeeded, failed))
    }

    async fn activate(&self, record: JobRecord) -> Result<ActiveJob> {
        let params = match &record.spec.tasks {
            TaskSource::Params { blob, .. } => {
                let bytes = self
                    .grid
                    .get_object(names::BLOBS_BUCKET, &record.spec.tenant, blob)
                    .await?;
                Some(
                    grid_proto::params_lines(&bytes)
                        .map(<[u8]>::to_vec)
                        .collect(),
                )
            }
            _ => None,
        };
        Ok(ActiveJob {
            record,
            params,
            failures: HashMap::new(),
            dirty: true,
        })
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
        let total = spec.tasks.len();
        if total == 0 {
            anyhow::bail!("the job has no tasks");
        }
        if !Grid::has_object(&self.grid.modules, &tenant, &spec.module_sha256).await {
            anyhow::bail!("module {} was not uploaded", spec.module_sha256);
        }
        let mut blobs: Vec<&grid_proto::Sha256Hex> =
            spec.shared.iter().map(|i| &i.sha256).collect();
        match &spec.tasks {
            TaskSource::Params { blob, lines } => {
                blobs.push(blob);
                let bytes = self
                    .grid
                    .get_object(names::BLOBS_BUCKET, &tenant, blob)
                    .await?;
                let counted = grid_proto::params_lines(&bytes).count() as u64;
                if counted != *lines {
                    anyhow::bail!("params file has {counted} tasks, the request says {lines}");
                }
            }
            TaskSource::Inputs(files) => blobs.extend(files.iter().map(|i| &i.sha256)),
            TaskSource::Count(_) => {}
        }
        for blob in blobs {
            if !Grid::has_object(&self.grid.blobs, &tenant, blob).await {
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
        };
        self.grid
            .jobs
            .put(&id, encode(&record).into())
            .await
            .map_err(|e| anyhow!("storing the job: {e}"))?;
        let job = self.activate(record).await?;
        tracing::info!(job = %id, tenant, total, "submitted");
        self.active.insert(id.clone(), job);
        Ok(id)
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
        let Some(job) = self.active.get_mut(&req.job_id) else {
            let state = match self
                .grid
                .jobs
                .get(&req.job_id)
                .await
                .map_err(|e| anyhow!("{e}"))?
            {
                Some(b) => decode::<JobRecord>(&b)
                    .map(|r| r.state.as_str())
                    .unwrap_or("unreadable"),
                None => anyhow::bail!("unknown job {}", req.job_id),
            };
            anyhow::bail!("job {} already ended ({state})", req.job_id);
        };
        if job.record.spec.tenant != tenant {
            anyhow::bail!("unknown job {}", req.job_id);
        }
        job.record.state = JobState::Cancelled;
        job.record.reason = Some("cancelled".into());
        job.record.finished_unix_ms = Some(now_unix_ms());
        let record = job.record.clone();
        self.active.remove(&req.job_id);
        self.grid
            .jobs
            .put(&record.id, encode(&record).into())
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let stream = self
            .grid
            .js
            .get_stream(names::TASKS_STREAM)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        stream
            .purge()
            .filter(names::tasks_subject(&record.spec.class, &record.id))
            .await
            .map_err(|e| anyhow!("dropping queued tasks: {e}"))?;
        self.grid
            .client
            .publish(names::cancel_broadcast(&record.id), bytes::Bytes::new())
            .await
            .map_err(|e| anyhow!("{e}"))?;
        tracing::info!(job = %record.id, "cancelled");
        Ok(record.id)
    }

    async fn on_result(&mut self, msg: jetstream::Message) {
        let result = match decode::<ResultMsg>(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(subject = %msg.subject, "rejecting a result message: {e}");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        match self.count(result).await {
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

    /// Counts one result, exactly once per task.
    async fn count(&mut self, result: ResultMsg) -> Result<()> {
        let Some(job) = self.active.get_mut(&result.job_id) else {
            return Ok(()); // finished, cancelled or unknown: nothing to count
        };
        if result.index >= job.record.counts.total {
            tracing::warn!(job = %result.job_id, index = result.index, "result for a task that does not exist");
            return Ok(());
        }
        let retry = matches!(result.outcome, Outcome::Failed(ref r) if !matches!(r, Reason::Invalid(_) | Reason::Cancelled))
            && result.attempt < job.record.spec.retries;
        if retry {
            let reason = result
                .outcome
                .reason()
                .map(|r| r.to_string())
                .unwrap_or_default();
            tracing::info!(job = %result.job_id, index = result.index, attempt = result.attempt, %reason, "retrying");
            // Published before the failed result is acked: a broker killed in between gets the
            // result again and republishes the retry under the same message id, which JetStream
            // drops; a retry kept only in memory would be lost with the broker.
            publish_task(&self.grid.js, job, result.index, result.attempt + 1).await?;
            crash_point("after-retry");
            job.failures.entry(result.index).or_default().push(reason);
            return Ok(());
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
        let record = TaskRecord {
            state,
            attempts: result.attempt + 1,
            failures,
            result,
        };
        let key = names::task_key(&record.result.job_id, record.result.index);
        match self.grid.tasks.create(&key, encode(&record).into()).await {
            Ok(_) => crash_point("after-store"),
            Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
                self.duplicates += 1;
                tracing::debug!(task = %key, "duplicate result ignored");
                return Ok(());
            }
            Err(e) => return Err(anyhow!("storing task {key}: {e}")),
        }
        let counts = &mut job.record.counts;
        match state {
            TaskState::Succeeded => counts.succeeded += 1,
            TaskState::Failed => {
                counts.failed += 1;
                if job.record.reason.is_none() {
                    let why = record.failures.last().cloned().unwrap_or_default();
                    job.record.reason = Some(format!("task {} failed: {why}", record.result.index));
                }
            }
        }
        counts.in_flight = counts.in_flight.saturating_sub(1);
        job.dirty = true;
        if counts.succeeded + counts.failed == counts.total {
            job.record.state = if counts.failed == 0 {
                JobState::Done
            } else {
                JobState::Failed
            };
            if job.record.state == JobState::Done {
                job.record.reason = None;
            }
            job.record.finished_unix_ms = Some(now_unix_ms());
            let record = job.record.clone();
            self.active.remove(&record.id);
            self.grid
                .jobs
                .put(&record.id, encode(&record).into())
                .await
                .map_err(|e| anyhow!("{e}"))?;
            tracing::info!(job = %record.id, state = record.state.as_str(), duplicates_dropped = self.duplicates, "finished");
        }
        Ok(())
    }

    /// Tops up every job's window, round-robin. A job whose publishes fail goes back to where
    /// it was and is published again on the next tick (the same message ids: no duplicates).
    async fn fill(&mut self) -> Result<()> {
        let window = self.config.window;
        let mut failed = None;
        for job in self.active.values_mut() {
            let first = job.record.enqueued;
            let room = window.saturating_sub(job.record.counts.in_flight);
            let last = (first + room).min(job.record.counts.total);
            if last == first {
                continue;
            }
            let acks = (first..last).map(|index| publish_task(&self.grid.js, job, index, 0));
            if let Some(Err(e)) = futures::future::join_all(acks)
                .await
                .into_iter()
                .find(Result::is_err)
            {
                failed = Some(e);
                continue;
            }
            job.record.enqueued = last;
            job.record.counts.in_flight += last - first;
            job.dirty = true;
            if job.record.state == JobState::Queued {
                job.record.state = JobState::Running;
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Writes the records of jobs that changed (their counts feed `grid status` and progress).
    async fn persist(&mut self) {
        for job in self.active.values_mut().filter(|j| j.dirty) {
            match self
                .grid
                .jobs
                .put(&job.record.id, encode(&job.record).into())
                .await
            {
                Ok(_) => job.dirty = false,
                Err(e) => tracing::warn!(job = %job.record.id, "saving the job record: {e}"),
            }
        }
    }
}

/// Test-only fault injection: with `GRID_TEST_CRASH_AT=<point>` in its environment, the broker
/// aborts the first time it reaches that point — the way fault tests kill it at an exact moment
/// (`after-store`: a task's record is stored, its result not yet acked; `after-retry`: a retry is
/// published, the failed result not yet acked).
fn crash_point(point: &str) {
    if std::env::var("GRID_TEST_CRASH_AT").is_ok_and(|p| p == point) {
        tracing::warn!("GRID_TEST_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}

/// Publishes attempt `attempt` of task `index` of `job` to the work queue and waits for
/// JetStream's ack. The message id (`job.task.attempt`) makes a second publish of the same
/// attempt a no-op.
fn publish_task(
    js: &jetstream::Context,
    job: &ActiveJob,
    index: u64,
    attempt: u32,
) -> impl std::future::Future<Output = Result<()>> + use<> {
    let spec = &job.record.spec;
    let params = job
        .params
        .as_ref()
        .and_then(|p| p.get(index as usize))
        .cloned()
        .unwrap_or_default();
    let input = match &spec.tasks {
        TaskSource::Inputs(files) => files.get(index as usize).cloned(),
        _ => None,
    };
    let task = TaskMsg {
        job_id: job.record.id.clone(),
        index,
        attempt,
        params,
        input,
    };
    let msg = jetstream::message::PublishMessage::build()
        .payload(encode(&task).into())
        .message_id(names::attempt_id(&job.record.id, index, attempt));
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
}

/// Runs a broker from its flags until Ctrl-C or SIGTERM.
pub fn main(args: BrokerArgs) -> std::process::ExitCode {
    let config = BrokerConfig {
        nats_url: grid_client::nats_url(args.nats.as_deref()),
        window: args.window,
    };
    grid_client::run_service("grid-broker", |shutdown| run(config, shutdown))
}
