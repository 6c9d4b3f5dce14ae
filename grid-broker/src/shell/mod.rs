//! The shell: the broker's one loop over NATS. It turns what arrives (tenants' requests,
//! results messages, task records read in the background, a 100 ms tick) into calls of
//! [`Rules`], and does what they answer against JetStream: stores, publishes, acks. Nothing
//! here decides; a decision found here belongs in [`crate::rules`].

mod dispatch;
mod providers;
mod requests;
mod results;
mod store;

use crate::args::BrokerConfig;
use crate::faults::crash_point;
use crate::rules::Rules;
use anyhow::{Result, anyhow};
use async_nats::jetstream;
use futures::StreamExt;
use grid_client::{Grid, now_unix_ms};
use grid_proto::{JobRecord, TaskRecord, decode, encode, names};
use std::collections::HashMap;
use std::time::Duration;
use store::ParamsPages;

/// Bytes of params lines a run of several tasks may carry in one message (with the spec, at
/// most `grid_proto::caps::SPEC_BYTES`, it stays within NATS's 1 MiB payload).
const RUN_PARAMS_BYTES: u64 = 512 * 1024;

/// A fill not published because its runs carry too many params bytes for one message; the
/// job's runs are shortened and the next fill sends them.
#[derive(Debug)]
struct Shortened;

impl std::fmt::Display for Shortened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("runs shortened to fit their params in a message")
    }
}

impl std::error::Error for Shortened {}

/// Results the broker takes at once (see `Broker::on_results`).
const RESULT_BATCH: usize = 256;

/// Jobs whose task records are read at once (see [`Broker::start_loads`]).
const LOADS_AT_ONCE: usize = 4;

/// Task records read in the background for a job: its id and the records (or why not).
type Loaded = (String, Result<Vec<TaskRecord>>);

/// A params page read in the background for a job: its id, the page's number and its lines.
type PageRead = (String, usize, Result<store::ParamsPageLines>);

pub(crate) struct Broker {
    config: BrokerConfig,
    grid: Grid,
    rules: Rules,
    /// The params pages of held params jobs, read as their tasks go out.
    params: HashMap<String, ParamsPages>,
    /// Where background reads of task records send them (see [`Broker::start_loads`]).
    loads: tokio::sync::mpsc::UnboundedSender<Loaded>,
    /// Where results messages go once their blobs are taken (see `results::take_blobs`).
    taken: tokio::sync::mpsc::UnboundedSender<results::Intake>,
    /// Turns at taking blobs ([`results::TAKING_AT_ONCE`]).
    taking: std::sync::Arc<tokio::sync::Semaphore>,
    /// Where requests answered off the loop come back (see [`Broker::on_request`]).
    finished: tokio::sync::mpsc::UnboundedSender<requests::Finished>,
    /// Submits and deletes of each tenant's being done off the loop.
    busy: HashMap<String, usize>,
    /// Jobs being deleted off the loop.
    deleting: std::collections::HashSet<String>,
    /// Where params pages read off the loop go (see [`Broker::read_pages`]).
    pages_read: tokio::sync::mpsc::UnboundedSender<PageRead>,
    /// Params pages being read, by job and page number.
    reading: std::collections::HashSet<(String, usize)>,
}

/// Runs the broker until `shutdown` resolves.
pub async fn run(config: BrokerConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
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
    let seal = crate::rules::SealKey::new(grid.seal_key().await?);
    let dispatcher = dispatch::Dispatcher::new(
        grid.clone(),
        seal.clone(),
        config.take_back_grace,
        config.tenant_weights.clone(),
    )
    .await?;
    let dispatcher = std::sync::Arc::new(dispatcher);
    let provider_settings = providers::Settings {
        stage_quota_bytes: config.stage_quota_bytes,
        stream_replicas: config.stream_replicas,
        dispatcher: dispatcher.clone(),
    };
    let (loads, mut loaded) = tokio::sync::mpsc::unbounded_channel();
    let (taken, mut blobs_taken) = tokio::sync::mpsc::unbounded_channel();
    let (finished, mut requests_finished) = tokio::sync::mpsc::unbounded_channel();
    let (pages_read, mut page_read) = tokio::sync::mpsc::unbounded_channel();
    let mut broker = Broker {
        rules: Rules::new(config.window, now_unix_ms, seal)
            .with_tenant_window(config.tenant_window),
        config,
        grid,
        params: HashMap::new(),
        loads,
        taken,
        taking: std::sync::Arc::new(tokio::sync::Semaphore::new(results::TAKING_AT_ONCE)),
        finished,
        busy: HashMap::new(),
        deleting: Default::default(),
        pages_read,
        reading: Default::default(),
    };
    broker.resume().await?;
    let mut provider_requests =
        tokio::spawn(providers::serve(broker.grid.clone(), provider_settings));
    // Tenants' requests, in a queue group: one broker answers each.
    let mut requests = client
        .queue_subscribe(names::api_subject("*", "*"), "broker".into())
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
            served = &mut provider_requests => {
                return Err(match served {
                    Ok(Err(e)) => e.context("serving providers"),
                    Ok(Ok(())) => anyhow!("providers' requests stopped"),
                    Err(e) => anyhow!("serving providers: {e}"),
                });
            }
            Some(msg) = requests.next() => broker.on_request(msg).await,
            Some(read) = page_read.recv() => {
                broker.on_page(read);
                broker.fill().await;
            }
            Some(finished) = requests_finished.recv() => {
                broker.on_finished(finished).await;
                // A new job's first window now, not at the next tick.
                broker.fill().await;
            }
            Some((id, stored)) = loaded.recv() => {
                broker.on_loaded(&id, stored);
                broker.fill().await;
            }
            Some(intake) = blobs_taken.recv() => {
                let mut batch = vec![intake];
                while batch.len() < RESULT_BATCH {
                    match blobs_taken.try_recv() {
                        Ok(intake) => batch.push(intake),
                        Err(_) => break,
                    }
                }
                broker.taken(batch).await;
                if broker.rules.ended_unsaved() {
                    broker.persist().await;
                }
                broker.fill().await;
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
                if broker.rules.ended_unsaved() {
                    broker.persist().await;
                }
                // Tasks finished: top their windows up now rather than at the next tick.
                broker.fill().await;
            },
            _ = tick.tick() => {
                broker.start_loads();
                broker.rules.set_running(&dispatcher.running_by_job());
                broker.fill().await;
                broker.persist().await;
            }
        }
    }
    broker.persist().await;
    Ok(())
}

impl Broker {
    /// Reloads unfinished jobs after a restart; their task records are read in the background
    /// and counted from scratch, and until then their results wait.
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
            tracing::info!(job = %record.id, round = record.retried, "resuming");
            self.rules.hold(record, false);
        }
        self.start_loads();
        Ok(())
    }

    /// Starts reading the task records of each job that waits for them, in the background: a
    /// job of a million tasks is a million records, and the broker serves every other job
    /// meanwhile. [`Broker::on_loaded`] takes them in.
    fn start_loads(&mut self) {
        for (id, tenant) in self.rules.loads_to_start(LOADS_AT_ONCE) {
            let (grid, loads) = (self.grid.clone(), self.loads.clone());
            tokio::spawn(async move {
                let stored = store::stored_records(&grid, &tenant, &id).await;
                if stored.is_err() {
                    // Tried again on a tick after this: not a read a tick.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let _ = loads.send((id, stored));
            });
        }
    }

    /// A job's task records, read by [`Broker::start_loads`].
    fn on_loaded(&mut self, id: &str, stored: Result<Vec<TaskRecord>>) {
        match stored {
            Ok(stored) => {
                if self.rules.loaded(id, Some(&stored))
                    && let Some(job) = self.rules.job(id)
                {
                    let counts = &job.record.counts;
                    tracing::info!(job = %id, succeeded = counts.succeeded, failed = counts.failed, round = job.record.retried, "loaded");
                }
            }
            Err(e) => {
                self.rules.loaded(id, None);
                tracing::warn!(job = %id, "reading the job's task records: {e:#}");
            }
        }
    }

    /// Publishes the task messages of `dispatches` (of one job), with their params lines, and
    /// waits until JetStream has stored them all.
    async fn publish(&mut self, dispatches: &[crate::rules::Dispatch]) -> Result<()> {
        let mut publishes = Vec::with_capacity(dispatches.len());
        // Replicas of a run share its params lines.
        let mut last: Option<(u64, u32, Vec<Vec<u8>>)> = None;
        for dispatch in dispatches {
            let params = match &last {
                Some((index, count, params))
                    if *index == dispatch.index && *count == dispatch.count =>
                {
                    params.clone()
                }
                _ => {
                    let params = self.params_of(dispatch).await?;
                    let bytes: u64 = params.iter().map(|line| line.len() as u64).sum();
                    if dispatch.count > 1 && bytes > RUN_PARAMS_BYTES {
                        // Too large for one message: planned again in shorter runs.
                        self.rules.shorten_runs(
                            &dispatch.job_id,
                            dispatch.count,
                            bytes,
                            RUN_PARAMS_BYTES,
                        );
                        return Err(Shortened.into());
                    }
                    last = Some((dispatch.index, dispatch.count, params.clone()));
                    params
                }
            };
            let Some((subject, task)) = self.rules.task_msg(dispatch, params) else {
                continue; // its job is no longer held
            };
            publishes.push(store::publish_task(
                &self.grid,
                subject,
                dispatch.message_id(),
                &task,
            ));
        }
        futures::future::try_join_all(publishes).await?;
        Ok(())
    }

    /// Lets go of a job (cancelled, deleted), and of its params pages.
    fn release(&mut self, id: &str) {
        self.rules.release(id);
        self.params.remove(id);
    }

    /// The params lines of `dispatch`'s tasks (none for a job without a params file).
    async fn params_of(&mut self, dispatch: &crate::rules::Dispatch) -> Result<Vec<Vec<u8>>> {
        let Some(job) = self.rules.job(&dispatch.job_id) else {
            return Ok(Vec::new());
        };
        if !self.params.contains_key(&dispatch.job_id) {
            match ParamsPages::of(&job.record.spec) {
                Some(pages) => self.params.insert(dispatch.job_id.clone(), pages),
                None => return Ok(Vec::new()),
            };
        }
        let Some(pages) = self.params.get_mut(&dispatch.job_id) else {
            return Ok(Vec::new());
        };
        let mut lines = Vec::with_capacity(dispatch.count as usize);
        for index in dispatch.indices() {
            lines.push(pages.line(&self.grid, index).await?);
        }
        Ok(lines)
    }

    /// Tops up every job's window (see [`Rules::plan_fill`]). A job whose publishes fail stays
    /// where it was and is published again on the next tick (the same message ids: no
    /// duplicates). A params job's fill goes out as far as its pages are in memory; the pages
    /// it lacks are read off the loop ([`Broker::read_pages`]) and the rest follows once they
    /// are in.
    async fn fill(&mut self) {
        for mut fill in self.rules.plan_fill() {
            if let Some(pages) = self.pages_for(&fill.job_id) {
                let ready = fill
                    .dispatches
                    .iter()
                    .position(|d| !d.indices().all(|i| pages.has(i)))
                    .unwrap_or(fill.dispatches.len());
                if ready < fill.dispatches.len() {
                    let missing =
                        pages.missing(fill.dispatches[ready..].iter().flat_map(|d| d.indices()));
                    self.read_pages(&fill.job_id, missing);
                    if ready == 0 {
                        continue;
                    }
                    fill.dispatches.truncate(ready);
                    let last = &fill.dispatches[ready - 1];
                    fill.next = last.index + u64::from(last.count);
                    fill.tasks = fill
                        .dispatches
                        .iter()
                        .filter(|d| d.replica == 0)
                        .map(|d| u64::from(d.count))
                        .sum();
                }
            }
            if let Err(e) = self.publish(&fill.dispatches).await {
                if e.is::<Shortened>() {
                    tracing::debug!(job = %fill.job_id, "runs shortened to fit their params");
                } else {
                    tracing::warn!(job = %fill.job_id, "enqueueing tasks: {e:#}");
                }
                continue;
            }
            self.rules.filled(&fill);
        }
    }

    /// The params pages of held job `id`, if it has a params file.
    fn pages_for(&mut self, id: &str) -> Option<&mut ParamsPages> {
        if !self.params.contains_key(id) {
            let pages = ParamsPages::of(&self.rules.job(id)?.record.spec)?;
            self.params.insert(id.to_string(), pages);
        }
        self.params.get_mut(id)
    }

    /// Reads job `id`'s params pages `missing` in the background, unless being read already;
    /// [`Broker::on_page`] keeps them.
    fn read_pages(&mut self, id: &str, missing: Vec<(usize, grid_proto::ParamsPage)>) {
        let Some(tenant) = self.rules.job(id).map(|j| j.record.spec.tenant.clone()) else {
            return;
        };
        for (number, page) in missing {
            if !self.reading.insert((id.to_string(), number)) {
                continue;
            }
            let (grid, pages_read, id, tenant) = (
                self.grid.clone(),
                self.pages_read.clone(),
                id.to_string(),
                tenant.clone(),
            );
            tokio::spawn(async move {
                let read = store::read_params_page(&grid, &tenant, &page).await;
                if read.is_err() {
                    // Tried again by a later fill: not a read a tick.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let _ = pages_read.send((id, number, read));
            });
        }
    }

    /// A params page read by [`Broker::read_pages`].
    fn on_page(&mut self, (id, number, read): PageRead) {
        self.reading.remove(&(id.clone(), number));
        match read {
            Ok(lines) => {
                if let Some(pages) = self.params.get_mut(&id) {
                    pages.insert(number, std::sync::Arc::new(lines));
                }
            }
            Err(e) => tracing::warn!(job = %id, page = number, "reading a params page: {e:#}"),
        }
    }

    /// Writes the records of jobs that changed, and lets go of a job that ended once its final
    /// record is saved.
    async fn persist(&mut self) {
        let (queued, in_flight, jobs) = self.rules.load();
        metrics::gauge!("grid_tasks", "state" => "queued").set(queued as f64);
        metrics::gauge!("grid_tasks", "state" => "in_flight").set(in_flight as f64);
        metrics::gauge!("grid_jobs_running").set(jobs as f64);
        let unsaved: Vec<(String, String, bool, Vec<u8>)> = self
            .rules
            .unsaved()
            .map(|r| {
                (
                    r.id.clone(),
                    r.spec.tenant.clone(),
                    r.state.is_final(),
                    encode(r),
                )
            })
            .collect();
        for (id, tenant, ended, bytes) in unsaved {
            if ended {
                crash_point("before-finish");
            }
            let saved = match self.grid.jobs().await {
                Ok(jobs) => jobs
                    .put(names::job_key(&tenant, &id), bytes.into())
                    .await
                    .map_err(|e| anyhow!("{e}")),
                Err(e) => Err(e),
            };
            match saved {
                Ok(_) => {
                    let _ = self
                        .grid
                        .client
                        .publish(names::job_events(&tenant, &id), bytes::Bytes::new())
                        .await;
                    if self.rules.saved(&id) {
                        self.params.remove(&id);
                    }
                }
                Err(e) => tracing::warn!(job = %id, "saving the job record: {e}"),
            }
        }
    }
}
