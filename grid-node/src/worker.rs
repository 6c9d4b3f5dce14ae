//! The node's task loop: take tasks from the broker, run them in the sandbox, report results.
//!
//! A node asks the broker for task messages of its classes (see [`crate::deliveries`]: only the
//! broker touches the work queue) and runs up to `slots` tasks at once. For each task it fetches
//! the module (by hash: object store, then a local file cache, then the compiled cache) and the
//! task's inputs; runs it, telling the broker every few seconds that it still holds it; stages
//! the outputs and logs (`grid_client::stage`); publishes the result with message id
//! `job.task.attempt.replica`; and only then reports the task done. A node killed at any point
//! loses nothing: a task no longer reported as held goes back to the queue after its ack wait,
//! and a result published twice is deduplicated by JetStream and counted once by the broker.
//!
//! # Life cycle
//! On SIGTERM or Ctrl-C a node *drains*: it takes no new tasks (any it already fetched go back
//! at once), lets running tasks finish for up to `--grace` (default 10 s), then hands the rest
//! back (nak with a short delay: redelivered elsewhere, same attempt, no retry used), removes its
//! heartbeat so `grid nodes` stops listing it, and exits. A second signal skips the wait.
//!
//! # Memory budget
//! A provider gives its tasks `--memory-budget` in all (default: the machine's RAM). Each task
//! holds its memory limit (its job's, capped by the node) out of that budget while it runs, so
//! the limits of running tasks never add up to more: a task that does not fit waits, keeping
//! its message alive with progress acks, and a drain hands it back. No task's limit exceeds the
//! budget (it caps `--max-memory`). The heartbeat reports `running` and the memory reserved.
//!
//! # Timeouts
//! | what | value | why |
//! |---|---|---|
//! | ack wait ([`grid_client::TASK_ACK_WAIT`]) | 10 s | a dead node's tasks come back this long after its last sign of life |
//! | held report ([`grid_client::TASK_PROGRESS_EVERY`]) | 3 s | the broker keeps a slow but alive task's message (progress acks) while its node lists it; two reports may be lost before it goes back |
//! | take-back grace (broker, `--take-back-grace`) | 5 min | a task held past its time limit and this goes back to the queue whatever its node says |
//! | heartbeat, bucket TTL | 2 s, 10 s | `grid nodes` and the GPU-class check drop a dead node within 10 s |
//! | hand-back delay ([`HAND_BACK_DELAY`]) | 1 s | a task this node cannot run (draining, module missing, GPU worker restarted) is offered to others at once, without a hot loop |
//! | deliveries ([`grid_client::MAX_TASK_DELIVERIES`]) | 5 | a task that no node can run ends `lost` instead of circling forever |
//! | retries (broker) | at once | a failed attempt is published again immediately: its cause is in the task or the node, not in time; a node that cannot run a task hands it back after 1 s instead |

use crate::deliveries::{Delivery, Dispatch};
use crate::settings::NodeConfig;
use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream;
use futures::StreamExt;
use grid_client::{Grid, now_unix_ms};
use grid_proto::{
    JobRecord, JobState, Limit, NodeInfo, Outcome, Reason, ResultMsg, Sha256Hex, StageRequest,
    Staged, TaskMsg, Usage, decode, encode, names,
};
use grid_sandbox::limits::MIB;
use grid_sandbox::runtime::RuntimeFiles;
use grid_sandbox::task::is_plain_file_name;
use grid_sandbox::{GpuWorker, GridTask, Limits, Sandbox, SandboxConfig, WorkerCommand};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, Semaphore, watch};

/// How long a task this node cannot run waits before JetStream offers it again.
pub const HAND_BACK_DELAY: Duration = Duration::from_secs(1);
/// Tasks a node holds per slot: one runs, the others are being fetched or reported (the
/// broker hands out no more, see [`grid_proto::HELD_PER_SLOT`]).
pub const HELD_PER_SLOT: usize = grid_proto::HELD_PER_SLOT as usize;
/// Tasks at least this long (on average, lately) are held one per slot ([`Node::held_per_slot`]).
const LONG_TASK_SECONDS: f64 = 2.0;
/// Tasks shorter than this are held [`HELD_PER_SLOT`] per slot; between the two, two per slot.
const SHORT_TASK_SECONDS: f64 = 0.2;

/// Where a node is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// No new tasks; running ones may finish.
    Draining,
    /// Running tasks stop and go back to the grid.
    HandingBack,
}

struct Node {
    config: NodeConfig,
    grid: Grid,
    sandbox: Sandbox,
    /// The classes served: the node's own, and `gpu` when it has a GPU.
    classes: Vec<String>,
    gpu: Option<String>,
    jobs: Mutex<HashMap<String, Arc<JobHere>>>,
    /// When each job the node heard of was last cancelled, by the broker's clock: a task message
    /// the broker sent before then is cancelled ([`cancels_task`]); one of a later round (`grid
    /// retry` of a cancelled job) is not.
    cancelled_at: Mutex<HashMap<String, u64>>,
    /// One sender per job with running tasks: its cancel time (0 for none).
    cancels: Mutex<HashMap<String, watch::Sender<u64>>>,
    busy: AtomicU32,
    done: AtomicU64,
    /// The memory budget in MiB permits: a task holds its memory limit's worth while it runs.
    memory: Arc<Semaphore>,
    memory_permits: u32,
    running: AtomicU32,
    /// Wakes the disk loop when a module was added to the caches.
    evict_soon: tokio::sync::Notify,
    /// A moving average of this node's recent tasks' wall time (f64 bits; NaN before any):
    /// how many task messages it holds ahead of its slots ([`Node::held_per_slot`]).
    task_seconds: AtomicU64,
    /// Told when a delivery is let go of: room to hold another.
    delivery_done: tokio::sync::Notify,
    phase: watch::Sender<Phase>,
    /// What delays tasks now (compiling a runtime), for the heartbeat.
    preparing: std::sync::Mutex<Option<grid_proto::Preparing>>,
    /// One runtime layout at a time (a 50 MB stdlib fetched and unpacked once).
    runtime_files: Mutex<()>,
    /// Task folders, reused.
    work: crate::workdirs::WorkDirs,
    /// Task messages taken from the broker and held.
    dispatch: Arc<Dispatch>,
}

/// Runs a node until `shutdown` resolves; running tasks are then abandoned unacked (JetStream
/// redelivers them elsewhere).
pub async fn run(
    config: NodeConfig,
    creds: Option<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    if let Some(addr) = config.metrics {
        grid_client::metrics::serve(addr)?;
    }
    metrics::gauge!("grid_node_slots").set(f64::from(config.slots));
    // `main` took the credentials' text out of the config (and `GRID_CREDS` is in it).
    let client = grid_client::connect_with_text(&config.nats_url, true, creds.as_deref()).await?;
    let grid = loop {
        match Grid::open(client.clone()).await {
            Ok(grid) => break grid,
            Err(e) => {
                tracing::info!("waiting for the broker to set up the grid: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let dispatch = Dispatch::new(client.clone(), config.node_id.clone());
    // Its stage, where it hands outputs and logs to the broker, is made by the broker.
    loop {
        match dispatch.ask(&StageRequest {}).await.map(drop) {
            Ok(()) => break,
            Err(e) => {
                tracing::info!("waiting for the broker to make this node's stage: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    // Tenants' code and task folders: the node's user's alone.
    crate::workdirs::private_dir(&config.cache_dir.join("modules"))?;
    let work = crate::workdirs::WorkDirs::new(
        &config.cache_dir.join("work"),
        (config.slots + config.gpu_slots) as usize * HELD_PER_SLOT,
    )?;
    let gpu = if config.use_gpu {
        match GpuWorker::start(WorkerCommand::current_exe()?).await {
            Ok(worker) => {
                tracing::info!(gpu = %worker.info(), "serving GPU tasks");
                Some(worker)
            }
            Err(e) if config.class == names::GPU_CLASS => bail!("--class gpu: {e}"),
            Err(e) => {
                tracing::info!("no GPU, serving class {} only: {e}", config.class);
                None
            }
        }
    } else {
        None
    };
    if config.class == names::GPU_CLASS && gpu.is_none() {
        bail!("--class gpu needs the GPU: drop --no-gpu");
    }
    let mut classes = vec![config.class.clone()];
    if gpu.is_some() && config.class != names::GPU_CLASS {
        classes.push(names::GPU_CLASS.to_string());
    }
    let gpu_name = gpu.as_ref().map(|w| w.info().to_string());
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: Some(config.compiled_dir.clone()),
        caps: config.caps.clone(),
        // Every class's slots: the most tasks that run here at once.
        pooled_tasks: Some(config.slots.saturating_add(if gpu.is_some() {
            config.gpu_slots
        } else {
            0
        })),
        gpu,
        ..Default::default()
    })?;
    tracing::info!(id = %config.node_id, classes = %classes.join(","), slots = config.slots, "node ready");
    // Semaphore permits are MiB of the budget (a u32 of MiB reaches 4 PiB).
    let memory_permits = u32::try_from(config.memory_budget_bytes / MIB)
        .unwrap_or(u32::MAX)
        .min(Semaphore::MAX_PERMITS as u32)
        .max(1);
    let node = Arc::new(Node {
        config,
        grid,
        sandbox,
        classes,
        gpu: gpu_name,
        jobs: Mutex::new(HashMap::new()),
        cancelled_at: Mutex::new(HashMap::new()),
        cancels: Mutex::new(HashMap::new()),
        busy: AtomicU32::new(0),
        done: AtomicU64::new(0),
        memory: Arc::new(Semaphore::new(memory_permits as usize)),
        memory_permits,
        running: AtomicU32::new(0),
        evict_soon: tokio::sync::Notify::new(),
        task_seconds: AtomicU64::new(f64::NAN.to_bits()),
        delivery_done: tokio::sync::Notify::new(),
        phase: watch::channel(Phase::Serving).0,
        preparing: std::sync::Mutex::new(None),
        runtime_files: Mutex::new(()),
        work,
        dispatch,
    });
    let started = now_unix_ms();
    let mut services = tokio::task::JoinSet::new();
    for class in node.classes.clone() {
        let slots = if class == names::GPU_CLASS && node.config.class != names::GPU_CLASS {
            node.config.gpu_slots
        } else {
            node.config.slots
        };
        services.spawn(
            node.clone()
                .pull_loop(class, Arc::new(Semaphore::new(slots as usize))),
        );
    }
    services.spawn(node.clone().heartbeat_loop(started));
    services.spawn(node.dispatch.clone().hold_loop());
    services.spawn(node.clone().disk_loop());
    services.spawn(node.clone().cancel_loop());
    if node.config.warm_runtimes {
        // Not a service: it ends once the runtimes are ready.
        tokio::spawn(node.clone().warm_runtimes());
    }
    tokio::select! {
        Some(r) = services.join_next() => return r.map_err(|e| anyhow!("{e}"))?,
        () = shutdown => {}
    }
    node.drain().await;
    services.abort_all();
    // A delete, not a purge: the heartbeat bucket allows no rollups.
    let removed = match node.grid.nodes().await {
        Ok(nodes) => nodes
            .delete(&node.config.node_id)
            .await
            .map_err(|e| anyhow!("{e}")),
        Err(e) => Err(e),
    };
    if let Err(e) = removed {
        tracing::warn!("removing the heartbeat: {e}");
    }
    tracing::info!("node stopped");
    Ok(())
}

impl Node {
    /// Stops taking tasks, waits up to the grace period (or a second signal) for running ones,
    /// then hands the rest back and waits until they are gone.
    async fn drain(&self) {
        let _ = self.phase.send(Phase::Draining);
        tracing::info!(running = self.busy.load(Ordering::Relaxed), grace = ?self.config.grace, "draining");
        tokio::select! {
            () = self.idle() => return,
            () = tokio::time::sleep(self.config.grace) => {}
            () = grid_client::shutdown_signal() => {}
        }
        tracing::info!(
            running = self.busy.load(Ordering::Relaxed),
            "handing running tasks back"
        );
        let _ = self.phase.send(Phase::HandingBack);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.idle()).await;
    }

    /// Task messages held per slot: several for short tasks (fetching and reporting them
    /// overlap with running), one for long ones or before any has run — else a node that asks
    /// first would hold a small job's long tasks while another node idles.
    fn held_per_slot(&self) -> usize {
        let seconds = f64::from_bits(self.task_seconds.load(Ordering::Relaxed));
        if !seconds.is_finite() || seconds >= LONG_TASK_SECONDS {
            1
        } else if seconds >= SHORT_TASK_SECONDS {
            2
        } else {
            HELD_PER_SLOT
        }
    }

    /// Takes a task's wall time into the moving average [`Node::held_per_slot`] reads.
    fn observe_task_seconds(&self, seconds: f64) {
        if !seconds.is_finite() {
            return;
        }
        let _ = self
            .task_seconds
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let average = f64::from_bits(bits);
                let next = if average.is_finite() {
                    0.8 * average + 0.2 * seconds
                } else {
                    seconds
                };
                Some(next.to_bits())
            });
    }

    /// Resolves when no task is running.
    async fn idle(&self) {
        while self.busy.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes tasks of `class`: runs at most `slots` at once, and holds a few times more, so
    /// that fetching the next tasks and reporting finished ones (outputs stored, result
    /// published, task acked — round trips to NATS) overlap with running.
    async fn pull_loop(self: Arc<Self>, class: String, slots: Arc<Semaphore>) -> Result<()> {
        let total = slots.available_permits();
        let capacity = total * HELD_PER_SLOT;
        let held = Arc::new(Semaphore::new(capacity));
        let mut phase = self.phase.subscribe();
        loop {
            // Wait for room, then ask the broker for as many tasks as there is room for.
            let first = tokio::select! {
                permit = held.clone().acquire_owned() => permit?,
                _ = phase.wait_for(|p| *p != Phase::Serving) => return Ok(()),
            };
            // Held besides this permit's, against what the tasks' length allows.
            let holding = capacity - held.available_permits() - 1;
            let allowed = total * self.held_per_slot();
            if holding >= allowed {
                drop(first);
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), self.delivery_done.notified())
                        .await;
                continue;
            }
            let free = (held.available_permits() + 1).min(allowed - holding);
            let batch = match self.dispatch.take(&class, free).await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::info!("taking tasks: {e:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut permit = Some(first);
            for delivery in batch {
                if *phase.borrow() != Phase::Serving {
                    // Taken as the node began to drain: straight back.
                    delivery.back(HAND_BACK_DELAY).await;
                    continue;
                }
                let p = match permit.take() {
                    Some(p) => p,
                    None => held.clone().acquire_owned().await?,
                };
                let node = self.clone();
                let slots = slots.clone();
                // Counted from here, so that a drain waits for it.
                node.busy.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(async move {
                    node.clone().handle(delivery, slots).await;
                    node.busy.fetch_sub(1, Ordering::AcqRel);
                    drop(p);
                    node.delivery_done.notify_waiters();
                });
            }
        }
    }

    /// Keeps the caches within the disk budget: soon after a module is added (once its task
    /// has had time to compile it, so that its code counts too) and every minute.
    async fn disk_loop(self: Arc<Self>) -> Result<()> {
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(60), self.evict_soon.notified()).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let modules = self.config.cache_dir.join("modules");
            let (compiled, budget) = (
                self.config.compiled_dir.clone(),
                self.config.disk_budget_bytes,
            );
            let evicted = tokio::task::spawn_blocking(move || {
                crate::disk::evict_to(&modules, &compiled, budget)
            })
            .await?;
            if evicted.modules > 0 {
                tracing::info!(
                    modules = evicted.modules,
                    bytes = evicted.bytes,
                    kept = evicted.kept_bytes,
                    "evicted least recently used modules to stay within the disk budget"
                );
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, started_unix_ms: u64) -> Result<()> {
        loop {
            let info = NodeInfo {
                id: self.config.node_id.clone(),
                classes: self.classes.clone(),
                gpu: self.gpu.clone(),
                slots: self.config.slots,
                gpu_slots: if self.gpu.is_some() {
                    self.config.gpu_slots
                } else {
                    0
                },
                busy: self.busy.load(Ordering::Relaxed),
                running: self.running.load(Ordering::Relaxed),
                memory_reserved_bytes: u64::from(
                    self.memory_permits - self.memory.available_permits() as u32,
                ) * MIB,
                memory_budget_bytes: self.config.memory_budget_bytes,
                tasks_done: self.done.load(Ordering::Relaxed),
                started_unix_ms,
                preparing: self.preparing(),
                runtimes_ready: grid_proto::runtime::RUNTIMES
                    .iter()
                    .filter(|r| {
                        r.module_sha256
                            .parse()
                            .is_ok_and(|sha| self.sandbox.is_loaded(&sha))
                    })
                    .map(|r| r.name.to_string())
                    .collect(),
                accepts: self.config.caps.accepts(),
            };
            let sent = match self.grid.nodes().await {
                Ok(nodes) => nodes
                    .put(&self.config.node_id, encode(&info).into())
                    .await
                    .map(drop)
                    .map_err(|e| anyhow!("{e}")),
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                tracing::warn!("heartbeat: {e:#}");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    async fn cancel_loop(self: Arc<Self>) -> Result<()> {
        let mut sub = self
            .grid
            .client
            .subscribe("grid.cancel.>")
            .await
            .map_err(|e| anyhow!("{e}"))?;
        while let Some(msg) = sub.next().await {
            let Some(job) = msg.subject.as_str().strip_prefix("grid.cancel.") else {
                continue;
            };
            // The broker's cancel time; a cancel that names none stops everything sent so far.
            let at = std::str::from_utf8(&msg.payload)
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            tracing::info!(job, "cancelled");
            // The time first, then the signal: a task that subscribes to the signal and then
            // finds no cancel is sure to get the signal (see `run_task`).
            {
                let mut cancelled = self.cancelled_at.lock().await;
                if cancelled.len() >= 4096 {
                    cancelled.clear(); // long past: their tasks are done or redelivered
                }
                let last = cancelled.entry(job.to_string()).or_default();
                *last = (*last).max(at);
            }
            if let Some(tx) = self.cancels.lock().await.get(job) {
                tx.send_modify(|last| *last = (*last).max(at));
            }
        }
        Ok(())
    }

    /// Whether the node heard that `task`'s job was cancelled after its message was sent.
    async fn is_cancelled(&self, task: &TaskMsg) -> bool {
        self.cancelled_at
            .lock()
            .await
            .get(&task.job_id)
            .is_some_and(|at| cancels_task(*at, task))
    }

    /// The task's job, from the node's cache or the spec the task carries (a node reads no
    /// job records: its NATS permissions do not allow it).
    async fn job(&self, task: &TaskMsg) -> Arc<JobHere> {
        let mut jobs = self.jobs.lock().await;
        // A retried round may run with new limits (`grid retry --memory`): the spec its task
        // carries is the job's now.
        if let Some(j) = jobs.get(&task.job_id)
            && j.spec == task.spec
        {
            return j.clone();
        }
        if jobs.len() > 1000 {
            // Forgotten jobs come back with their next task.
            jobs.clear();
        }
        let spec = task.spec.clone();
        let total = spec.tasks.len();
        let record = Arc::new(JobHere::new(JobRecord {
            id: task.job_id.clone(),
            spec,
            state: JobState::Running,
            reason: None,
            created_unix_ms: 0,
            finished_unix_ms: None,
            counts: grid_proto::TaskCounts {
                total,
                ..Default::default()
            },
            enqueued: 0,
            retried: 0,
        }));
        jobs.insert(task.job_id.clone(), record.clone());
        record
    }

    async fn handle(self: Arc<Self>, msg: Delivery, slots: Arc<Semaphore>) {
        let task = match decode::<TaskMsg>(&msg.task).and_then(check_task_msg) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("dropping a task message: {e}");
                msg.done().await;
                return;
            }
        };
        let job = self.job(&task).await;
        if self.is_cancelled(&task).await {
            msg.done().await;
            return;
        }
        // A job asking for more than the provider's caps is not taken: another node may. (Not a
        // delivery that counts toward `lost`: the broker refuses a job no live node accepts.)
        if let Some(why) = job.spec.limits.over(&self.config.caps.accepts()) {
            tracing::debug!(job = %task.job_id, index = task.index, "not taking the task: {why}");
            msg.back(HAND_BACK_DELAY).await;
            return;
        }
        let delivered = i64::try_from(msg.delivered).unwrap_or(i64::MAX);
        if delivered > 1 {
            tracing::debug!(job = %task.job_id, index = task.index, delivered, "redelivered task");
            metrics::counter!("grid_task_redeliveries_total").increment(1);
        }
        // A first delivery's wait (a redelivery's would include the earlier attempt's run).
        let published = (msg.delivered == 1).then_some(msg.published_unix_ms);
        // (The broker places replicas: a node is never handed one it cannot run.)
        if delivered > grid_client::MAX_TASK_DELIVERIES {
            tracing::warn!(job = %task.job_id, index = task.index, count = task.count, delivered, "task delivered too often; reporting it lost");
            let lost = task
                .split()
                .iter()
                .map(|task| self.failed_result(&job, task, Reason::Lost))
                .collect();
            if self.publish(&job, lost).await.is_ok() {
                msg.done().await;
            }
            return;
        }
        // Held (the dispatch reports it to the broker every few seconds) until settled.
        // The task's memory limit, out of the node's budget, before it runs: the limits of the
        // running tasks never add up to more than the provider gave. Waiting keeps the task
        // (progress acks); a drain hands it back.
        let wanted = Limits::of_job(&job.spec.limits)
            .capped_by(&self.config.caps)
            .memory_bytes;
        let permits = u32::try_from(wanted.div_ceil(MIB))
            .unwrap_or(u32::MAX)
            .clamp(1, self.memory_permits);
        // The message's tasks one after another, each in a slot held only while it runs. Their
        // results go out together, and then the message is acked (a redelivery after a crash
        // runs them again, and their results are dropped as duplicates). A task message handed
        // back midway still reports what it ran.
        let mut results = Vec::with_capacity(task.count as usize);
        // Small outputs and logs travel in the results message itself, up to a budget for it.
        let mut inline = grid_client::stage::InlineBudget::default();
        for task in task.split() {
            let mut phase = self.phase.subscribe();
            let run = async {
                let slot = slots.clone().acquire_owned().await.ok()?;
                let memory = self.memory.clone().acquire_many_owned(permits).await.ok()?;
                Some((slot, memory))
            };
            let held = tokio::select! {
                permits = run => permits,
                _ = phase.wait_for(|p| *p != Phase::Serving) => None,
            };
            let Some((slot, memory)) = held else {
                let _ = self.publish(&job, results).await;
                msg.back(HAND_BACK_DELAY).await;
                return;
            };
            // Cancelled while it waited for its slot: it never starts, nor do the rest.
            if self.is_cancelled(&task).await {
                if self.publish(&job, results).await.is_ok() {
                    msg.done().await;
                }
                return;
            }
            if let Some(published) = published {
                let waited = now_unix_ms().saturating_sub(published) as f64 / 1e3;
                metrics::histogram!("grid_task_queue_wait_seconds").record(waited);
            }
            let running = Running::new(&self.running, slot, memory);
            msg.running(true);
            let ran = self
                .run_task(&job, &task, running, msg.id, &mut inline)
                .await;
            msg.running(false);
            match ran {
                Ok(result) => results.push(result),
                Err(e) => {
                    tracing::warn!(job = %task.job_id, index = task.index, "could not run the task here: {e:#}; handing it back");
                    let _ = self.publish(&job, results).await;
                    msg.back(HAND_BACK_DELAY).await;
                    return;
                }
            }
        }
        let ran = results.len();
        if let Err(e) = self.publish(&job, results).await {
            tracing::warn!("publishing results: {e:#}; the tasks will be redelivered");
            return;
        }
        self.done.fetch_add(ran as u64, Ordering::Relaxed);
        // If the report is lost, the tasks come back after the ack wait and run again, and
        // their results — the same message id — are dropped by JetStream or found already
        // counted by the broker.
        msg.done().await;
    }

    /// Publishes the results of a task message's tasks (all of them, or those run before the
    /// node had to stop) as one message. Nothing to publish is not an error.
    async fn publish(&self, job: &JobRecord, results: Vec<ResultMsg>) -> Result<()> {
        let Some(first) = results.first() else {
            return Ok(());
        };
        let id = names::attempt_id(&job.id, first.index, first.attempt, first.replica);
        // A run's id names its length: a shorter run's results (published before a hand-back)
        // are not the whole run's.
        let id = match results.len() {
            1 => id,
            n => format!("{id}+{n}"),
        };
        let index = first.index;
        let publish = jetstream::message::PublishMessage::build()
            .payload(encode(&grid_proto::ResultsMsg { results }).into())
            .message_id(id);
        let ack = self
            .grid
            .js
            .send_publish(
                names::results_subject(&self.config.node_id, &job.id),
                publish,
            )
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let ack = ack.await.map_err(|e| anyhow!("{e}"))?;
        if ack.duplicate {
            // Another run of the same attempt published first (this one was redelivered).
            tracing::debug!(job = %job.id, index, "duplicate result dropped by JetStream");
        }
        Ok(())
    }

    /// The result of an attempt that ended before the guest ran.
    fn failed_result(&self, job: &JobRecord, task: &TaskMsg, reason: Reason) -> ResultMsg {
        let outcome = Outcome::Failed(reason);
        ResultMsg {
            tenant: job.spec.tenant.clone(),
            job_id: job.id.clone(),
            index: task.index,
            attempt: task.attempt,
            replica: task.replica,
            node_id: self.config.node_id.clone(),
            digest: grid_proto::result_digest(&outcome, &[]),
            outcome,
            usage: Usage::default(),
            files: Vec::new(),
            stdout: None,
            stderr: None,
            logs_truncated: false,
            detail: None,
            seal: task.seal,
            staged: Vec::new(),
        }
    }

    async fn module_bytes(&self, job: &JobRecord, delivery: u64) -> Result<Vec<u8>> {
        let sha = &job.spec.module_sha256;
        let path = self
            .config
            .cache_dir
            .join("modules")
            .join(format!("{sha}.wasm"));
        if let Ok(bytes) = tokio::fs::read(&path).await
            && Sha256Hex::of(&bytes) == *sha
        {
            crate::disk::touch(&path);
            return Ok(bytes);
        }
        let bytes = self
            .dispatch
            .fetch(delivery, sha, grid_proto::caps::MODULE_BYTES)
            .await?;
        // Several tasks may fetch the same module at once: each writes its own temp file.
        let mut tmp = tempfile::NamedTempFile::new_in(self.config.cache_dir.join("modules"))?;
        std::io::Write::write_all(&mut tmp, &bytes)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        // A new module (and soon its compiled code) on disk: keep the caches in budget.
        self.evict_soon.notify_one();
        Ok(bytes)
    }

    /// The runtime's interpreter, compiled once per machine (the cache is shared); the
    /// heartbeat says so meanwhile.
    async fn load_runtime(
        &self,
        job: &JobRecord,
        runtime: &'static grid_proto::runtime::Runtime,
        delivery: u64,
    ) -> Result<grid_sandbox::LoadedModule, Reason> {
        let fetch = async {
            self.set_preparing(Some(format!("fetching the {} runtime", runtime.name)));
            let bytes = self.module_bytes(job, delivery).await;
            self.set_preparing(None);
            bytes
        };
        self.sandbox.load_runtime(runtime, fetch).await
    }

    /// Lays out and compiles, in the background, each runtime whose files this machine has
    /// (`GRID_RUNTIME_DIR`, or the package `cargo xtask setup` installs): the first task of a
    /// runtime then finds it ready, and the heartbeat says what the node does meanwhile. The
    /// files are checked against the pins as fetched ones are; with a compiled cache shared by
    /// the machine's nodes, one of them compiles and the others wait for its artifact.
    async fn warm_runtimes(self: Arc<Self>) {
        for runtime in grid_proto::runtime::RUNTIMES {
            let Ok(artifacts) = grid_client::find_runtime(runtime) else {
                tracing::debug!(
                    runtime = runtime.name,
                    "no local files of this runtime to compile at start"
                );
                continue;
            };
            let root = self.config.cache_dir.join("runtimes");
            {
                let _one = self.runtime_files.lock().await;
                if RuntimeFiles::find(&root, runtime).is_none() {
                    let stdlib = artifacts.stdlib.clone();
                    let laid_out = tokio::task::spawn_blocking(move || {
                        let bytes = std::fs::read(&stdlib)?;
                        RuntimeFiles::install(&root, runtime, &bytes)
                    })
                    .await
                    .map_err(|e| anyhow!("{e}"))
                    .and_then(|r| r);
                    if let Err(e) = laid_out {
                        tracing::warn!(
                            runtime = runtime.name,
                            "laying out the runtime at start: {e:#}"
                        );
                        continue;
                    }
                }
            }
            let module = artifacts.module.clone();
            let read = async move {
                tokio::fs::read(&module)
                    .await
                    .with_context(|| format!("reading {}", module.display()))
            };
            tracing::info!(
                runtime = runtime.name,
                "compiling the runtime at start, in the background"
            );
            match self.sandbox.load_runtime(runtime, read).await {
                Ok(_) => tracing::info!(runtime = runtime.name, "runtime ready"),
                Err(e) => tracing::warn!(
                    runtime = runtime.name,
                    "compiling the runtime at start: {e}"
                ),
            }
        }
    }

    /// Says in the heartbeat what delays the node's tasks (`None`: nothing now).
    fn set_preparing(&self, what: Option<String>) {
        *self.preparing.lock().unwrap_or_else(|p| p.into_inner()) =
            what.map(|what| grid_proto::Preparing {
                what,
                started_unix_ms: now_unix_ms(),
                estimate_ms: 0,
            });
    }

    /// What delays the node's tasks now: a compile the sandbox tells of, with its estimate,
    /// or what the node said it does.
    fn preparing(&self) -> Option<grid_proto::Preparing> {
        if let Some(c) = self.sandbox.compiling().borrow().as_ref() {
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            return Some(grid_proto::Preparing {
                what: format!("compiling {}", c.label),
                started_unix_ms: c
                    .started
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, ms),
                estimate_ms: ms(c.estimate),
            });
        }
        self.preparing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A job's program, ready to run: its runtime (checked against the pins), the runtime's files
    /// laid out on this node, and the program in a folder of its own. `Ok(Err)`: the job is bad.
    async fn program(
        &self,
        job: &JobRecord,
        program: &grid_proto::ProgramRef,
        delivery: u64,
    ) -> Result<Result<grid_sandbox::Program, Reason>> {
        let spec = &job.spec;
        let Some(runtime) = grid_proto::runtime::by_name(&program.runtime) else {
            return Ok(Err(Reason::Invalid(format!(
                "runtime {:?} is unknown to this node",
                program.runtime
            ))));
        };
        if spec.module_sha256.to_string() != runtime.module_sha256
            || program.stdlib_sha256.to_string() != runtime.stdlib_sha256
        {
            return Ok(Err(Reason::Invalid(format!(
                "the job's {} runtime is not the one this node pins ({} {})",
                runtime.name, runtime.package, runtime.version
            ))));
        }
        if !is_plain_file_name(&program.file.name) {
            return Ok(Err(Reason::Invalid(format!(
                "program name {:?} is not a plain file name",
                program.file.name
            ))));
        }
        let root = self.config.cache_dir.join("runtimes");
        let files = {
            let _one = self.runtime_files.lock().await;
            match RuntimeFiles::find(&root, runtime) {
                // A layout from an older Grid may lack a helper the prelude imports.
                Some(files) => {
                    files.refresh_helper()?;
                    files
                }
                None => {
                    self.set_preparing(Some(format!("fetching the {} runtime", runtime.name)));
                    let stdlib = self
                        .dispatch
                        .fetch(
                            delivery,
                            &program.stdlib_sha256,
                            grid_proto::caps::MODULE_BYTES,
                        )
                        .await
                        .context("fetching the runtime's stdlib");
                    let installed = match stdlib {
                        Ok(bytes) => tokio::task::spawn_blocking({
                            let root = root.clone();
                            move || RuntimeFiles::install(&root, runtime, &bytes)
                        })
                        .await
                        .map_err(|e| anyhow!("{e}"))
                        .and_then(|r| r),
                        Err(e) => Err(e),
                    };
                    self.set_preparing(None);
                    installed?
                }
            }
        };
        // The program, once per node, in a folder named by its hash and shown alone at /job.
        let dir = self
            .config
            .cache_dir
            .join("programs")
            .join(program.file.sha256.to_string());
        let path = dir.join(&program.file.name);
        if !path.is_file() {
            let bytes = self
                .dispatch
                .fetch(delivery, &program.file.sha256, program.file.bytes)
                .await
                .context("fetching the program")?;
            crate::workdirs::private_dir(&dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
            std::io::Write::write_all(&mut tmp, &bytes)?;
            tmp.persist(&path).map_err(|e| e.error)?;
        }
        Ok(Ok(grid_sandbox::Program {
            runtime,
            files,
            dir,
            file: program.file.name.clone(),
        }))
    }

    /// `job`'s module (and program) ready to run: loaded by its first task here, then kept for
    /// the rest (no read, hash or check of the module per task). `Ok(Err)`: the job is bad;
    /// `Err`: this node could not fetch what it needs. Neither is kept: the next task tries
    /// again.
    async fn ready<'a>(
        &self,
        job: &'a JobHere,
        delivery: u64,
    ) -> Result<Result<&'a Ready, Reason>> {
        let limits = Limits::of_job(&job.spec.limits);
        let loaded = job
            .ready
            .get_or_try_init(|| async {
                let (loaded, program) = match &job.spec.program {
                    None => {
                        let bytes = self
                            .module_bytes(job, delivery)
                            .await
                            .context("fetching the module")
                            .map_err(NotReady::Fetch)?;
                        (self.sandbox.load(&bytes, &limits).await, None)
                    }
                    Some(program) => match self
                        .program(job, program, delivery)
                        .await
                        .map_err(NotReady::Fetch)?
                    {
                        Ok(p) => (self.load_runtime(job, p.runtime, delivery).await, Some(p)),
                        Err(reason) => (Err(reason), None),
                    },
                };
                let module = loaded.map_err(NotReady::Bad)?;
                Ok(Ready { module, program })
            })
            .await;
        match loaded {
            Ok(ready) => Ok(Ok(ready)),
            Err(NotReady::Bad(reason)) => Ok(Err(reason)),
            Err(NotReady::Fetch(e)) => Err(e),
        }
    }

    /// Runs one task; `Err` means this node could not run it (another may), not that it failed.
    /// Runs `task`: fetches what it needs, runs it while `running` holds its slot and memory,
    /// lets them go, then stores its outputs and logs.
    async fn run_task(
        &self,
        job: &JobHere,
        task: &TaskMsg,
        running: Running<'_>,
        delivery: u64,
        inline: &mut grid_client::stage::InlineBudget,
    ) -> Result<ResultMsg> {
        let spec = &job.spec;
        let failed = |reason: Reason| self.failed_result(job, task, reason);
        // Listening for a cancel from the start (a cancel may come while the module compiles),
        // then checking that none came before.
        let mut cancelled = {
            let mut cancels = self.cancels.lock().await;
            cancels
                .entry(job.id.clone())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe()
        };
        if self.is_cancelled(task).await {
            return Ok(failed(Reason::Cancelled));
        }
        // A cancel stops a task waiting for its module's compile too (its slot goes to the next
        // job at once); the compile goes on, and its code lands in the cache.
        let ready = tokio::select! {
            ready = self.ready(job, delivery) => ready?,
            Ok(_) = cancelled.wait_for(|at| cancels_task(*at, task)) => return Ok(failed(Reason::Cancelled)),
        };
        let Ready { module, program } = match ready {
            Ok(ready) => ready.clone(),
            Err(reason) => return Ok(failed(reason)),
        };
        let grid_task = GridTask {
            job_id: &job.id,
            spec,
            count: job.counts.total,
            index: task.index,
            attempt: task.attempt,
            stdin: task.stdin(),
            input: task.input.as_ref(),
        };
        let inputs = match grid_task.inputs() {
            Ok(inputs) => inputs,
            Err(reason) => return Ok(failed(reason)),
        };
        let work = self.work.take()?;
        let (in_dir, out_dir) = (work.path().join("in"), work.path().join("out"));
        let wrote_inputs = !inputs.is_empty();
        for (path, input) in inputs {
            let path = in_dir.join(path);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            let data = self
                .dispatch
                .fetch(delivery, &input.sha256, input.bytes)
                .await?;
            tokio::fs::write(path, data).await?;
        }
        let task_spec = grid_task.task_spec(in_dir, &out_dir, program);

        let mut phase = self.phase.subscribe();
        // A cancel ends the task as `cancelled`, with the time it ran and the outputs and logs
        // it left, billed as any failed attempt.
        let stop = async {
            if cancelled
                .wait_for(|at| cancels_task(*at, task))
                .await
                .is_err()
            {
                std::future::pending::<()>().await;
            }
        };
        let report = tokio::select! {
            report = self.sandbox.run_until(&module, task_spec, stop) => Ok(report),
            _ = phase.wait_for(|p| *p == Phase::HandingBack) => Err(Reason::Lost),
        };
        drop(cancelled);
        // The slot and memory go to the next task while this one's outputs are stored.
        drop(running);
        {
            // The last running task of a job takes its cancel channel with it.
            let mut cancels = self.cancels.lock().await;
            if cancels
                .get(&job.id)
                .is_some_and(|tx| tx.receiver_count() == 0)
            {
                cancels.remove(&job.id);
            }
        }
        let report = match report {
            Ok(report) => report,
            Err(Reason::Lost) => bail!("the node is shutting down"),
            Err(reason) => return Ok(failed(reason)),
        };
        record_ran(&report);
        self.observe_task_seconds(report.wall_seconds);
        if report.outcome == Outcome::Failed(Reason::Lost) {
            // Another task's GPU overrun restarted the GPU worker under this one: not its fault.
            bail!("the GPU worker restarted under it");
        }
        if self.config.test_corrupt_outputs {
            // TEST ONLY: a provider that lies, differently from any other.
            std::fs::write(
                out_dir.join(format!("corrupted-by-{}", self.config.node_id)),
                b"not what the task wrote",
            )?;
        }
        // Outputs and logs go to this node's stage, or inline in the result when small; the
        // broker checks them and copies them into the tenant's store (see
        // `grid_client::stage`). Each blob once. A task over its
        // output limit has none; one whose `/out` no result could hold was ended as over it by
        // the sandbox, so a failure to list or read what is left is this node's trouble.
        let node_id = &self.config.node_id;
        let files = if report.out_empty
            || matches!(
                report.outcome,
                Outcome::Failed(Reason::Limit(Limit::Output | Limit::Files))
            ) {
            Vec::new()
        } else {
            grid_sandbox::outputs::manifest(&out_dir).context("listing the task's outputs")?
        };
        if report.out_empty && !wrote_inputs {
            work.give_back_unused();
        }
        let mut staged: Vec<Staged> = Vec::new();
        for file in &files {
            if staged.iter().any(|s| s.sha256 == file.sha256) {
                continue;
            }
            let opened = grid_sandbox::outputs::open(&out_dir, &file.path)
                .with_context(|| format!("opening output {}", file.path))?;
            staged.push(
                self.grid
                    .stage_file(node_id, file.sha256, file.bytes, opened, inline)
                    .await?,
            );
        }
        let mut logs = Vec::new();
        for log in [&report.stdout, &report.stderr] {
            logs.push(if log.is_empty() {
                None
            } else {
                let sha = Sha256Hex::of(log);
                if !staged.iter().any(|s| s.sha256 == sha) {
                    staged.push(self.grid.stage_bytes(node_id, log, inline).await?);
                }
                Some(sha)
            });
        }
        let detail = match report.outcome {
            Outcome::Failed(_) => grid_proto::last_words(&report.stderr),
            Outcome::Succeeded => None,
        };
        Ok(ResultMsg {
            tenant: spec.tenant.clone(),
            job_id: job.id.clone(),
            index: task.index,
            attempt: task.attempt,
            replica: task.replica,
            node_id: self.config.node_id.clone(),
            digest: grid_proto::result_digest(&report.outcome, &files),
            outcome: report.outcome,
            usage: Usage {
                cpu_seconds: report.cpu_seconds,
                wall_seconds: report.wall_seconds,
                gpu_seconds: report.gpu_seconds,
                peak_memory_bytes: report.peak_memory_bytes,
                bytes_in: grid_task.bytes_in(),
                bytes_out: report.bytes_out,
            },
            files,
            stdout: logs[0],
            stderr: logs[1],
            logs_truncated: report.logs_truncated,
            detail,
            seal: task.seal,
            staged,
        })
    }
}

/// A job as this node knows it: its record (built from the spec its tasks carry) and, once
/// one of its tasks here has loaded them, its module and program.
struct JobHere {
    record: JobRecord,
    ready: tokio::sync::OnceCell<Ready>,
}

impl JobHere {
    fn new(record: JobRecord) -> Self {
        Self {
            record,
            ready: tokio::sync::OnceCell::new(),
        }
    }
}

impl std::ops::Deref for JobHere {
    type Target = JobRecord;
    fn deref(&self) -> &JobRecord {
        &self.record
    }
}

/// What a job's tasks run: its module (or runtime) compiled, and its program laid out.
#[derive(Clone)]
struct Ready {
    module: grid_sandbox::LoadedModule,
    program: Option<grid_sandbox::Program>,
}

/// Why a job is not ready here: a bad job, or what it needs could not be fetched.
enum NotReady {
    Bad(Reason),
    Fetch(anyhow::Error),
}

/// A task that ran in the sandbox, for the metrics (see `grid_client::metrics`).
fn record_ran(report: &grid_sandbox::TaskReport) {
    let outcome = match report.outcome.reason() {
        None => "succeeded".into(),
        Some(why) => why.kind(),
    };
    if let Outcome::Failed(Reason::Limit(limit)) = &report.outcome {
        metrics::counter!("grid_limit_hits_total", "limit" => limit.as_str()).increment(1);
    }
    metrics::counter!("grid_node_tasks_total", "outcome" => outcome).increment(1);
    metrics::histogram!("grid_node_task_seconds").record(report.wall_seconds);
    if report.gpu_seconds > 0.0 {
        metrics::histogram!("grid_task_gpu_seconds").record(report.gpu_seconds);
    }
}

/// A task that holds a run slot and its memory: counted in `running` until dropped.
struct Running<'a> {
    count: &'a AtomicU32,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _memory: tokio::sync::OwnedSemaphorePermit,
}

impl<'a> Running<'a> {
    fn new(
        count: &'a AtomicU32,
        slot: tokio::sync::OwnedSemaphorePermit,
        memory: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!("grid_node_slots_busy").increment(1.0);
        Self {
            count,
            _slot: slot,
            _memory: memory,
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("grid_node_slots_busy").decrement(1.0);
    }
}

/// A task message's shape: a run of 1 to [`grid_proto::MAX_TASKS_PER_MESSAGE`] tasks, with no
/// params or one line each, and an input file only when alone.
fn check_task_msg(task: TaskMsg) -> Result<TaskMsg, grid_proto::WireError> {
    let count = task.count;
    let params = task.params.len();
    if count == 0
        || count > grid_proto::MAX_TASKS_PER_MESSAGE
        || (params != 0 && params != count as usize)
        || (count > 1 && (task.input.is_some() || task.replica > 0))
    {
        return Err(grid_proto::WireError::Garbled(format!(
            "a message of {count} tasks with {params} params lines"
        )));
    }
    Ok(task)
}

/// Runs a node from its flags (and config file) until Ctrl-C or SIGTERM.
pub fn main(args: crate::settings::NodeArgs) -> std::process::ExitCode {
    let mut config = match args.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("grid-node: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Read while the node may still read them: the credentials may be root's alone.
    let creds = match config
        .creds
        .take()
        .map(|path| grid_client::auth::read_creds(&path).map_err(|e| format!("{e:#}")))
    {
        None => None,
        Some(Ok(text)) => Some(text),
        Some(Err(e)) => {
            eprintln!("grid-node: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Before any thread starts (see `privileges`).
    match crate::privileges::drop_privileges(config.user.as_deref(), &config.cache_dir) {
        Ok(dropped) => {
            tracing::info!(user = ?dropped.user, denied_syscalls = dropped.denied_syscalls, "privileges dropped")
        }
        Err(e) => {
            eprintln!("grid-node: {e}");
            return std::process::ExitCode::from(2);
        }
    }
    grid_client::run_service("grid-node", |shutdown| run(config, creds, shutdown))
}

/// Whether a cancel at `cancelled_at` (the broker's clock) stops `task`: the broker sent its
/// message before the cancel.
fn cancels_task(cancelled_at: u64, task: &TaskMsg) -> bool {
    cancelled_at > 0 && task.seal.sent_unix_ms <= cancelled_at
}
