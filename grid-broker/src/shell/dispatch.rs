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
//! - **A result comes from the node the message was handed to.** The seal is bound to the node
//!   on the way out ([`SealKey::bind`]).
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
    Deliveries, Delivery, DeliveryReport, HELD_PER_SLOT, NodeInfo, Reported, TakeRequest, TaskMsg,
    decode, encode, names,
};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most messages one take hands out, and one node holds, whatever it advertises.
const MOST_HELD: usize = 4096;
/// How long a take waits for messages when there are none.
const TAKE_WAIT: Duration = Duration::from_secs(1);

/// A message handed to a node.
struct Held {
    msg: jetstream::Message,
    node: String,
    /// Its time limit and the grace, from when it was handed out.
    deadline: Instant,
    /// When its node last listed it as held.
    reported: Instant,
}

/// The broker's side of deliveries (see the module docs).
pub(super) struct Dispatcher {
    grid: Grid,
    seal: SealKey,
    grace: Duration,
    consumers: HashMap<String, jetstream::consumer::PullConsumer>,
    held: Mutex<HashMap<u64, Held>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Dispatcher {
    pub(super) async fn new(grid: Grid, seal: SealKey, grace: Duration) -> Result<Self> {
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
        let room = most.saturating_sub(holding).min(req.max as usize);
        if room == 0 {
            return Ok(Deliveries::default());
        }
        let mut batch = consumer
            .fetch()
            .max_messages(room)
            .expires(TAKE_WAIT)
            .messages()
            .await
            .map_err(|e| anyhow!("fetching tasks: {e}"))?;
        let mut deliveries = Vec::new();
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| anyhow!("fetching tasks: {e}"))?;
            match self.hand_out(node, msg) {
                Some(delivery) => deliveries.push(delivery),
                None => continue,
            }
        }
        if !deliveries.is_empty() {
            metrics::counter!("grid_deliveries_total").increment(deliveries.len() as u64);
        }
        Ok(Deliveries { deliveries })
    }

    /// Binds `msg`'s seal to `node` and keeps it as held; `None` for a message that is not a
    /// task message (terminated).
    fn hand_out(&self, node: &str, msg: jetstream::Message) -> Option<Delivery> {
        let mut task = match decode::<TaskMsg>(&msg.payload) {
            Ok(task) => task,
            Err(e) => {
                tracing::error!(subject = %msg.subject, "dropping a task message: {e}");
                let msg = msg.clone();
                tokio::spawn(async move { msg.ack_with(AckKind::Term).await });
                return None;
            }
        };
        task.seal = self.seal.bind(&task.seal, node);
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
                deadline: now + limit + self.grace,
                reported: now,
            },
        );
        Some(Delivery {
            id,
            delivered,
            published_unix_ms,
            task: encode(&task),
        })
    }

    /// Settles what `node` reports done or handed back, and marks what it still holds.
    pub(super) async fn report(&self, node: &str, report: &DeliveryReport) -> Reported {
        let mut unknown = Vec::new();
        let (mut done, mut back) = (Vec::new(), Vec::new());
        {
            let mut held = self.held();
            let now = Instant::now();
            for id in &report.holding {
                match held.get_mut(id) {
                    Some(h) if h.node == node => h.reported = now,
                    _ => unknown.push(*id),
                }
            }
            for (ids, into) in [(&report.done, &mut done), (&report.back, &mut back)] {
                for id in ids {
                    match held.get(id) {
                        Some(h) if h.node == node => {
                            if let Some(h) = held.remove(id) {
                                into.push(h.msg);
                            }
                        }
                        _ => unknown.push(*id),
                    }
                }
            }
        }
        let delay = Duration::from_millis(u64::from(report.back_delay_ms)).min(TASK_ACK_WAIT);
        for msg in done {
            if let Err(e) = msg.ack().await {
                tracing::warn!(node, "acking a task: {e}");
            }
        }
        for msg in back {
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
        }
        Reported { unknown }
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
                        gone.push(h.msg.clone());
                        false
                    } else {
                        alive.push(h.msg.clone());
                        true
                    }
                });
            }
            for msg in gone {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
            }
            for msg in alive {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
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
