//! Deliveries: the broker hands task messages to nodes; nodes never touch the work queue.
//!
//! A shared JetStream consumer cannot tell its clients apart: any client allowed to ack may ack,
//! nak or extend *any* outstanding delivery (the server checks only the stream sequence in an
//! ack subject), and any client allowed to pull may pull as much as the consumer holds. So only
//! the broker pulls from the `nodes-<class>` consumers, and nodes ask it for work on
//! `grid.provider.<node>.take`. The broker keeps each message it handed out — which node holds
//! it, until when — and settles it with JetStream when the node reports it done or handed back
//! (`grid.provider.<node>.report`). Hence:
//!
//! - **No one settles another's delivery.** Providers have no JetStream ack permissions; a report
//!   settles only deliveries held by the reporting node.
//! - **No hoarding.** A node holds at most [`HELD_PER_SLOT`] messages per slot it advertises in
//!   its heartbeat (no heartbeat, no tasks).
//! - **Nothing held forever.** The broker keeps a held message alive (progress acks) only while
//!   its node lists it in a report every few seconds and until its time limit plus
//!   `--take-back-grace` have passed (the time limit of all its tasks, for a run); then it stops,
//!   and JetStream offers the message again after its ack wait, whatever the node says.
//! - **Replicas of a task go to distinct nodes.** Before handing out a replica, the broker
//!   claims it for the node (`grid_claims` key `<job>.<index>.<round>.<node>`, a create); a
//!   node that holds another replica of the task does not get it, and the broker keeps the
//!   message (alive, in hand) for the next node that asks rather than sending it round the
//!   queue again — so placing a replica never counts as a failed delivery.
//! - **Tenants share the slots by weight.** The broker pulls each class's queue ahead into a pool
//!   in hand (at most [`POOL_MOST`] messages, kept alive like held ones) and hands a node the
//!   message of the tenant that holds the fewest deliveries of the class for its weight
//!   (`--tenant-weight NAME=W`, default 1); within a tenant, the job of highest priority
//!   (`grid submit --priority`), then the oldest. So a tenant with 100,000 tasks queued delays
//!   a newcomer's job by at most the deliveries nodes already hold, not by its queue: the
//!   rules keep each tenant's queue short enough for the pool to see every tenant's
//!   (`--tenant-window`, see `crate::rules`).
//! - **A runtime's tasks go first to nodes that have it loaded.** A node lists the runtimes it
//!   has compiled and loaded in its heartbeat (`NodeInfo::runtimes_ready`); a task of a runtime
//!   goes to another node only once it has waited [`UNREADY_WAIT`] in hand, so that a node
//!   that would first spend a minute compiling the Python runtime does not sit on tasks that a
//!   ready node could start now. (A node that lies about it gets tasks sooner, which it could
//!   get anyway by asking first.)
//! - **A result comes from the node the message was handed to.** The seal is bound to the node
//!   on the way out ([`SealKey::bind`]).
//! - **A provider reads only what its tasks need.** Nodes read tenants' stores through the
//!   broker ([`Dispatcher::fetch`]): an object named by a task message the node holds now (its
//!   module or runtime, program, input, shared files), nothing else.
//!
//! A broker that restarts forgets what it handed out: those messages come back after their ack
//! wait and are handed out again; what their first nodes still report is counted once, as any
//! duplicate is.

use crate::rules::SealKey;
use anyhow::{Result, anyhow, bail};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use grid_client::{Grid, TASK_ACK_WAIT, TASK_PROGRESS_EVERY};
use grid_proto::{
    Deliveries, Delivery, DeliveryReport, FetchRequest, Fetched, HELD_PER_SLOT, NodeInfo, Reported,
    Sha256Hex, TakeRequest, TaskMsg, decode, encode, names,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most messages one take hands out, and one node holds, whatever it advertises.
const MOST_HELD: usize = 4096;
/// How long a take waits for messages when there are none.
const TAKE_WAIT: Duration = Duration::from_secs(1);
/// Bytes of task messages one take hands out (at least one message), so that its reply stays
/// within NATS's largest payload (1 MiB by default).
const TAKE_BYTES: usize = 768 * 1024;
/// Bytes of an object one fetch returns (NATS's largest payload is 1 MiB).
const FETCH_BYTES: usize = 512 * 1024;
/// Messages of one class pulled ahead and kept in hand, to choose from by fair share.
pub const POOL_MOST: usize = 8192;

/// How long a task of a runtime (`python`) waits in hand for a node that has the runtime
/// loaded before a node that would first compile it (a minute or more) may take it. A ready
/// node with room asks again well within this; one without room leaves the task to the others.
const UNREADY_WAIT: Duration = Duration::from_secs(3);

/// A message pulled from the queue and not handed out yet.
struct InHand {
    msg: jetstream::Message,
    task: TaskMsg,
    /// Nodes that hold another replica of its task (asked again after the next keep-alive).
    refused: HashSet<String>,
    /// When it was pulled from the queue.
    since: Instant,
}

impl InHand {
    /// Whether `node`, which has the runtimes `ready` loaded, may take it now.
    fn offered_to(&self, node: &str, ready: &[&str]) -> bool {
        !self.refused.contains(node)
            && self.task.spec.program.as_ref().is_none_or(|p| {
                ready.contains(&p.runtime.as_str()) || self.since.elapsed() >= UNREADY_WAIT
            })
    }
}

/// A message handed to a node.
struct Held {
    msg: jetstream::Message,
    node: String,
    class: String,
    /// The replica claim made for this handover (`grid_claims` key), if a replica.
    claim: Option<String>,
    tenant: String,
    /// The objects its task needs (one set per job, shared).
    objects: Arc<HashSet<Sha256Hex>>,
    /// Its time limit and the grace, from when it was handed out.
    deadline: Instant,
    /// When its node last listed it as held.
    reported: Instant,
    /// Its job, and whether its node last said its task runs (else it waits for a slot).
    job: String,
    running: bool,
}

/// The broker's side of deliveries (see the module docs).
pub(super) struct Dispatcher {
    grid: Grid,
    seal: SealKey,
    grace: Duration,
    consumers: HashMap<String, jetstream::consumer::PullConsumer>,
    held: Mutex<HashMap<u64, Held>>,
    next_id: std::sync::atomic::AtomicU64,
    /// The objects each job's tasks need, by job, while any of its messages is held.
    objects: Mutex<HashMap<String, Arc<HashSet<Sha256Hex>>>>,
    /// Messages pulled ahead, waiting for a node (see the module docs).
    pool: Mutex<Vec<InHand>>,
    /// Tenants' weights; 1 for a tenant not named.
    weights: HashMap<String, u32>,
}

impl Dispatcher {
    pub(super) async fn new(
        grid: Grid,
        seal: SealKey,
        grace: Duration,
        weights: HashMap<String, u32>,
    ) -> Result<Self> {
        let mut consumers = HashMap::new();
        for class in names::CLASSES {
            let consumer = grid
                .js
                .get_consumer_from_stream(names::tasks_consumer(class), names::TASKS_STREAM)
                .await
                .map_err(|e| anyhow!("opening the task consumer of class {class}: {e}"))?;
            consumers.insert(class.to_string(), consumer);
        }
        // Ids need not be secret (a report names only its own node's), only not reused soon.
        let first = grid_client::now_unix_ms() << 16;
        Ok(Self {
            grid,
            seal,
            grace,
            consumers,
            held: Mutex::new(HashMap::new()),
            next_id: first.into(),
            objects: Mutex::new(HashMap::new()),
            pool: Mutex::new(Vec::new()),
            weights,
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `node` up to `req.max` messages of `req.class`, within what its slots justify.
    pub(super) async fn take(&self, node: &str, req: &TakeRequest) -> Result<Deliveries> {
        let consumer = self
            .consumers
            .get(&req.class)
            .ok_or_else(|| anyhow!("no class {}", req.class))?;
        let info = self.node_info(node).await?;
        if !info.classes.contains(&req.class) {
            bail!("node {node} does not serve class {}", req.class);
        }
        let slots = if req.class == names::GPU_CLASS && info.classes.len() > 1 {
            info.gpu_slots
        } else {
            info.slots
        };
        let most = (slots.max(1) as usize)
            .saturating_mul(HELD_PER_SLOT as usize)
            .min(MOST_HELD);
        let holding = self.held().values().filter(|h| h.node == node).count();
        let mut room = most.saturating_sub(holding).min(req.max as usize);
        let mut deliveries = Vec::new();
        if room == 0 {
            return Ok(Deliveries { deliveries });
        }
        // Only names of runtimes this grid knows, at most one each: the list is the provider's
        // word, and it is checked against every message in the pool on every take.
        let ready: Vec<&'static str> = grid_proto::runtime::RUNTIMES
            .iter()
            .filter(|r| info.runtimes_ready.iter().any(|n| n == r.name))
            .map(|r| r.name)
            .collect();
        self.top_up(consumer, node, &req.class, &ready).await?;
        // Deliveries of the class each tenant holds, counting those handed out here.
        let mut holds: HashMap<String, usize> = HashMap::new();
        for h in self.held().values().filter(|h| h.class == req.class) {
            *holds.entry(h.tenant.clone()).or_default() += 1;
        }
        let mut bytes = 0;
        while room > 0 {
            let Some(InHand {
                msg,
                task,
                mut refused,
                since,
            }) = self.pick(node, &req.class, &holds, &ready)
            else {
                break;
            };
            // One reply carries the messages: it stays within NATS's largest payload.
            bytes += msg.payload.len();
            if bytes > TAKE_BYTES && !deliveries.is_empty() {
                self.lock_pool().push(InHand {
                    msg,
                    task,
                    refused,
                    since,
                });
                break;
            }
            if task.spec.replicas > 1 {
                match self.place(node, &task).await {
                    Ok(true) => {}
                    placed => {
                        refused.insert(node.to_string());
                        self.lock_pool().push(InHand {
                            msg,
                            task,
                            refused,
                            since,
                        });
                        placed?;
                        continue;
                    }
                }
            }
            *holds.entry(task.spec.tenant.clone()).or_default() += 1;
            deliveries.push(self.hand_out(node, msg, task));
            room -= 1;
        }
        if !deliveries.is_empty() {
            metrics::counter!("grid_deliveries_total").increment(deliveries.len() as u64);
        }
        Ok(Deliveries { deliveries })
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Vec<InHand>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pulls `class`'s queued messages into the pool, up to [`POOL_MOST`]; waits up to
    /// [`TAKE_WAIT`] for some when the pool has none `node` may take.
    async fn top_up(
        &self,
        consumer: &jetstream::consumer::PullConsumer,
        node: &str,
        class: &str,
        ready: &[&str],
    ) -> Result<()> {
        let (of_class, for_node) = {
            let pool = self.lock_pool();
            let of_class: Vec<&InHand> =
                pool.iter().filter(|h| h.task.spec.class == class).collect();
            let for_node = of_class.iter().any(|h| h.offered_to(node, ready));
            (of_class.len(), for_node)
        };
        let want = POOL_MOST.saturating_sub(of_class);
        if want == 0 {
            return Ok(());
        }
        let mut batch = consumer
            .fetch()
            .max_messages(want)
            .expires(if for_node {
                Duration::from_millis(1)
            } else {
                TAKE_WAIT
            })
            .messages()
            .await
            .map_err(|e| anyhow!("fetching tasks: {e}"))?;
        let mut pulled = Vec::new();
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| anyhow!("fetching tasks: {e}"))?;
            match decode::<TaskMsg>(&msg.payload) {
                Ok(task) => pulled.push(InHand {
                    msg,
                    task,
                    refused: HashSet::new(),
                    since: Instant::now(),
                }),
                Err(e) => {
                    tracing::error!(subject = %msg.subject, "dropping a task message: {e}");
                    let _ = msg.ack_with(AckKind::Term).await;
                }
            }
        }
        self.lock_pool().extend(pulled);
        Ok(())
    }

    /// Takes from the pool the message of `class` that `node` should get next: of those it may
    /// take now ([`InHand::offered_to`]), of the tenant holding the fewest deliveries for its
    /// weight (`holds`), then of its job of highest priority, then the oldest job's, lowest
    /// task first.
    fn pick(
        &self,
        node: &str,
        class: &str,
        holds: &HashMap<String, usize>,
        ready: &[&str],
    ) -> Option<InHand> {
        let mut pool = self.lock_pool();
        let share = |tenant: &str| {
            let weight = self.weights.get(tenant).copied().unwrap_or(1).max(1);
            holds.get(tenant).copied().unwrap_or(0) as f64 / f64::from(weight)
        };
        let at = pool
            .iter()
            .enumerate()
            .filter(|(_, h)| h.task.spec.class == class && h.offered_to(node, ready))
            .min_by(|(_, a), (_, b)| {
                let (a, b) = (&a.task, &b.task);
                share(&a.spec.tenant)
                    .total_cmp(&share(&b.spec.tenant))
                    .then(b.spec.priority.cmp(&a.spec.priority))
                    .then(a.job_id.cmp(&b.job_id))
                    .then(a.index.cmp(&b.index))
                    .then(a.replica.cmp(&b.replica))
            })
            .map(|(at, _)| at)?;
        Some(pool.swap_remove(at))
    }

    /// Claims `task`'s replica for `node`: false when the node holds another replica of the
    /// same task in its round (true for its own replica, delivered again).
    async fn place(&self, node: &str, task: &TaskMsg) -> Result<bool> {
        let round = grid_proto::round_of(task.attempt, task.spec.retries);
        let key = names::claim_key(&task.job_id, task.index, round, node);
        let mine = task.replica.to_le_bytes();
        let claims = self.grid.claims().await?;
        match claims.create(&key, mine.to_vec().into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
                match claims.get(&key).await {
                    Ok(Some(v)) => Ok(v.as_ref() == mine),
                    Ok(None) => Ok(false),
                    Err(e) => Err(anyhow!("reading claim {key}: {e}")),
                }
            }
            Err(e) => Err(anyhow!("claiming {key}: {e}")),
        }
    }

    /// Drops a replica claim made for a handover that came to nothing (handed back, or its node
    /// went silent), so that the replica can go to that node or another again.
    async fn release(&self, claim: Option<String>) {
        let Some(key) = claim else {
            return;
        };
        match self.grid.claims().await {
            Ok(claims) => {
                if let Err(e) = claims.purge(&key).await {
                    tracing::warn!("releasing claim {key}: {e}");
                }
            }
            Err(e) => tracing::warn!("releasing claim {key}: {e:#}"),
        }
    }

    /// Binds `task`'s seal to `node` and keeps its message as held.
    fn hand_out(&self, node: &str, msg: jetstream::Message, mut task: TaskMsg) -> Delivery {
        task.seal = self.seal.bind(&task.seal, node, grid_client::now_unix_ms());
        let objects = {
            let mut jobs = self.objects.lock().unwrap_or_else(|p| p.into_inner());
            let job = jobs
                .entry(task.job_id.clone())
                .or_insert_with(|| Arc::new(task.spec.objects().into_iter().collect()));
            match &task.input {
                // A task's own input joins its job's set only for this delivery.
                Some(input) if !job.contains(&input.sha256) => {
                    let mut own = HashSet::clone(job);
                    own.insert(input.sha256);
                    Arc::new(own)
                }
                _ => job.clone(),
            }
        };
        let limit =
            Duration::from_millis(task.spec.limits.timeout_ms).saturating_mul(task.count.max(1));
        let (delivered, published_unix_ms) = msg.info().map_or((1, 0), |i| {
            (
                u64::try_from(i.delivered).unwrap_or(1),
                u64::try_from(i.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            )
        });
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        self.held().insert(
            id,
            Held {
                msg,
                node: node.to_string(),
                class: task.spec.class.clone(),
                tenant: task.spec.tenant.clone(),
                objects,
                claim: (task.spec.replicas > 1).then(|| {
                    let round = grid_proto::round_of(task.attempt, task.spec.retries);
                    names::claim_key(&task.job_id, task.index, round, node)
                }),
                deadline: now + limit + self.grace,
                reported: now,
                job: task.job_id.clone(),
                running: false,
            },
        );
        Delivery {
            id,
            delivered,
            published_unix_ms,
            task: encode(&task),
        }
    }

    /// Settles what `node` reports done or handed back, and marks what it still holds.
    pub(super) async fn report(&self, node: &str, report: &DeliveryReport) -> Reported {
        let mut unknown = Vec::new();
        let (mut done, mut back) = (Vec::new(), Vec::new());
        {
            let mut held = self.held();
            let now = Instant::now();
            let running: HashSet<u64> = report.running.iter().copied().collect();
            for id in &report.holding {
                match held.get_mut(id) {
                    Some(h) if h.node == node => {
                        h.reported = now;
                        h.running = running.contains(id);
                    }
                    _ => unknown.push(*id),
                }
            }
            for id in &report.done {
                match held.get(id) {
                    Some(h) if h.node == node => {
                        if let Some(h) = held.remove(id) {
                            done.push(h.msg);
                        }
                    }
                    _ => unknown.push(*id),
                }
            }
            for id in &report.back {
                match held.get(id) {
                    Some(h) if h.node == node => {
                        if let Some(h) = held.remove(id) {
                            back.push((h.msg, h.claim));
                        }
                    }
                    _ => unknown.push(*id),
                }
            }
        }
        let delay = Duration::from_millis(u64::from(report.back_delay_ms)).min(TASK_ACK_WAIT);
        for msg in done {
            if let Err(e) = msg.ack().await {
                tracing::warn!(node, "acking a task: {e}");
            }
        }
        for (msg, claim) in back {
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            self.release(claim).await;
        }
        Reported { unknown }
    }

    /// Tasks running now, by job: the messages their nodes last said they run (a run of short
    /// tasks counts as one, the one it runs).
    pub(super) fn running_by_job(&self) -> HashMap<String, u64> {
        let mut running = HashMap::new();
        for h in self.held().values().filter(|h| h.running) {
            *running.entry(h.job.clone()).or_default() += 1;
        }
        running
    }

    /// Keeps held messages alive while their nodes report them and their deadline is ahead;
    /// lets the others go back to the queue. Runs until the broker stops.
    pub(super) async fn keep_alive(&self) {
        let mut tick = tokio::time::interval(TASK_PROGRESS_EVERY);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let (mut alive, mut gone) = (Vec::new(), Vec::new());
            {
                let mut held = self.held();
                held.retain(|_, h| {
                    let silent = now.duration_since(h.reported) > TASK_ACK_WAIT;
                    let overdue = now > h.deadline;
                    if overdue {
                        tracing::warn!(node = %h.node, subject = %h.msg.subject, "a task held past its time limit and grace: taken back");
                        metrics::counter!("grid_deliveries_taken_back_total", "node" => h.node.clone()).increment(1);
                    }
                    if silent || overdue {
                        // A node that went silent may never have seen the message: its
                        // replica claim goes too, or no node could take the replica again.
                        let claim = if silent && !overdue { h.claim.clone() } else { None };
                        gone.push((h.msg.clone(), claim));
                        false
                    } else {
                        alive.push(h.msg.clone());
                        true
                    }
                });
            }
            // Jobs none of whose messages is held any more.
            self.objects
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, objects| Arc::strong_count(objects) > 1);
            for (msg, claim) in gone {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                self.release(claim).await;
            }
            {
                // Messages in hand stay alive; and every node may be asked again for a replica
                // (a claim that kept one away may have been released since).
                let mut pool = self.lock_pool();
                for h in pool.iter_mut() {
                    h.refused.clear();
                    alive.push(h.msg.clone());
                }
            }
            for msg in alive {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    }

    /// Chunks of an object the task of delivery `req.delivery`, held by `node`, needs.
    pub(super) async fn fetch(&self, node: &str, req: &FetchRequest) -> Result<Fetched> {
        let tenant = {
            let held = self.held();
            match held.get(&req.delivery) {
                Some(h) if h.node == node && h.objects.contains(&req.sha256) => h.tenant.clone(),
                Some(h) if h.node == node => {
                    bail!(
                        "the task of delivery {} does not name object {}",
                        req.delivery,
                        req.sha256
                    )
                }
                _ => bail!("node {node} holds no delivery {}", req.delivery),
            }
        };
        let (size, chunks, data) = self
            .grid
            .object_chunks(&tenant, &req.sha256, req.after_seq, FETCH_BYTES)
            .await?;
        let last_seq = data.last().map_or(req.after_seq, |(seq, _)| *seq);
        Ok(Fetched {
            size,
            chunks,
            data: data.into_iter().map(|(_, bytes)| bytes.to_vec()).collect(),
            last_seq,
        })
    }

    /// `node`'s heartbeat: what it serves and with how many slots.
    async fn node_info(&self, node: &str) -> Result<NodeInfo> {
        let bytes = self
            .grid
            .nodes()
            .await?
            .get(node)
            .await
            .map_err(|e| anyhow!("reading node {node}'s heartbeat: {e}"))?
            .ok_or_else(|| {
                anyhow!("node {node} sends no heartbeat: send one before taking tasks")
            })?;
        let info: NodeInfo = decode(&bytes)?;
        if info.id != node {
            bail!("node {node}'s heartbeat names {}", info.id);
        }
        Ok(info)
    }
}
