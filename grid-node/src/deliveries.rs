//! The node's side of deliveries: it asks the broker for task messages
//! (`grid.provider.<node>.take`), tells it every few seconds which it still holds, and reports
//! each one done or handed back (`grid.provider.<node>.report`). Only the broker touches the
//! work queue (see `grid_broker`'s `shell::dispatch` for why): a provider's credentials allow it
//! no JetStream acks at all.

use anyhow::{Result, anyhow, bail};
use grid_client::TASK_PROGRESS_EVERY;
use grid_proto::{
    Answer, Deliveries, DeliveryReport, FetchRequest, Fetched, Reported, Request, Sha256Hex,
    TakeRequest, decode, encode, names,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a request to the broker may take before the node tries again: long, because a
/// take whose answer never arrives leaves tasks handed to this node unseen until the broker
/// takes them back (a busy broker answers in seconds, not milliseconds).
const ASK_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon a change in which held deliveries run is reported (see [`Dispatch::hold_loop`]).
const RUNNING_TOLD_EVERY: Duration = Duration::from_millis(500);
/// Fetches a node has in flight at once (the broker answers at most 64 requests of one node at
/// a time and refuses more).
const FETCHES_AT_ONCE: usize = 32;

/// Deliveries of one node.
pub struct Dispatch {
    client: async_nats::Client,
    node: String,
    /// Ids of the deliveries held now.
    holding: Mutex<HashSet<u64>>,
    /// Of those, the ones whose task runs now.
    running: Mutex<HashSet<u64>>,
    fetches: tokio::sync::Semaphore,
}

/// A task message the broker handed this node. Dropped without [`Delivery::done`] or
/// [`Delivery::back`], it is no longer reported as held, and the broker offers it again after
/// the ack wait.
pub struct Delivery {
    pub id: u64,
    /// How many times it has been delivered (1 the first time).
    pub delivered: u64,
    /// When the broker published it (Unix ms, the server's clock).
    pub published_unix_ms: u64,
    /// The task message, encoded.
    pub task: Vec<u8>,
    dispatch: Arc<Dispatch>,
}

impl Dispatch {
    pub fn new(client: async_nats::Client, node: String) -> Arc<Self> {
        Arc::new(Self {
            client,
            node,
            holding: Mutex::new(HashSet::new()),
            running: Mutex::new(HashSet::new()),
            fetches: tokio::sync::Semaphore::new(FETCHES_AT_ONCE),
        })
    }

    fn holding(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.holding.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the broker `request` on this node's subject; its answer, or the refusal's line.
    pub async fn ask<R: Request>(&self, request: &R) -> Result<R::Reply> {
        let reply = tokio::time::timeout(
            ASK_TIMEOUT,
            self.client.request(
                names::provider_subject(&self.node, R::VERB),
                encode(request).into(),
            ),
        )
        .await
        .map_err(|_| anyhow!("no broker answered"))?
        .map_err(|e| anyhow!("{e}"))?;
        match decode::<Answer<R::Reply>>(&reply.payload)? {
            Answer::Granted(reply) => Ok(reply),
            Answer::Refused(why) => bail!("{why}"),
        }
    }

    /// Up to `max` task messages of `class` (the broker waits up to a second for some).
    pub async fn take(self: &Arc<Self>, class: &str, max: usize) -> Result<Vec<Delivery>> {
        let Deliveries { deliveries } = self
            .ask(&TakeRequest {
                class: class.to_string(),
                max: u32::try_from(max).unwrap_or(u32::MAX),
            })
            .await?;
        let mut holding = self.holding();
        Ok(deliveries
            .into_iter()
            .map(|d| {
                holding.insert(d.id);
                Delivery {
                    id: d.id,
                    delivered: d.delivered,
                    published_unix_ms: d.published_unix_ms,
                    task: d.task,
                    dispatch: self.clone(),
                }
            })
            .collect())
    }

    /// Object `sha256`, which the task of delivery `delivery` needs, read through the broker
    /// (a provider may read tenants' stores no other way) and checked against its hash; more
    /// than `max_bytes` is an error.
    pub async fn fetch(
        &self,
        delivery: u64,
        sha256: &Sha256Hex,
        max_bytes: u64,
    ) -> Result<Vec<u8>> {
        let _turn = self.fetches.acquire().await?;
        let mut bytes = Vec::new();
        let (mut after_seq, mut chunks) = (0, 0u64);
        loop {
            let Fetched {
                chunks: total,
                data,
                last_seq,
                ..
            } = self
                .ask(&FetchRequest {
                    delivery,
                    sha256: *sha256,
                    after_seq,
                })
                .await
                .map_err(|e| anyhow!("fetching object {sha256}: {e:#}"))?;
            if data.is_empty() {
                break;
            }
            for chunk in data {
                if bytes.len() as u64 + chunk.len() as u64 > max_bytes {
                    bail!("object {sha256} is larger than the {max_bytes} bytes expected");
                }
                bytes.extend_from_slice(&chunk);
                chunks += 1;
            }
            after_seq = last_seq;
            if chunks >= total {
                break;
            }
        }
        if Sha256Hex::of(&bytes) != *sha256 {
            bail!("object {sha256} does not match its hash");
        }
        Ok(bytes)
    }

    /// Tells the broker which deliveries this node still holds, every few seconds, until the
    /// node stops; and which of them run, soon after that changes (at most twice a second), so
    /// that `grid status` tells running tasks from waiting ones without lagging a keep-alive.
    pub async fn hold_loop(self: Arc<Self>) -> Result<()> {
        let mut told: Vec<u64> = Vec::new();
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RUNNING_TOLD_EVERY).await;
            let mut running: Vec<u64> = self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied()
                .collect();
            running.sort_unstable();
            if running == told && last.elapsed() < TASK_PROGRESS_EVERY {
                continue;
            }
            let holding: Vec<u64> = self.holding().iter().copied().collect();
            last = tokio::time::Instant::now();
            told = running.clone();
            if holding.is_empty() {
                continue;
            }
            let report = DeliveryReport {
                holding,
                running,
                ..DeliveryReport::default()
            };
            match self.ask(&report).await {
                Ok(Reported { unknown }) if !unknown.is_empty() => {
                    tracing::debug!(
                        ?unknown,
                        "deliveries the broker no longer holds for this node"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("reporting held tasks: {e:#}"),
            }
        }
    }
}

impl Delivery {
    /// Marks its task as running (`true`) or waiting (`false`), for the next report.
    pub fn running(&self, running: bool) {
        let mut set = self
            .dispatch
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if running {
            set.insert(self.id);
        } else {
            set.remove(&self.id);
        }
    }

    /// Its results are published (or it is a message to drop): the broker acks it.
    pub async fn done(self) {
        self.settle(true, Duration::ZERO).await;
    }

    /// Hands it back: the broker offers it again after `delay`.
    pub async fn back(self, delay: Duration) {
        self.settle(false, delay).await;
    }

    async fn settle(self, done: bool, delay: Duration) {
        self.dispatch.holding().remove(&self.id);
        self.running(false);
        let report = DeliveryReport {
            done: if done { vec![self.id] } else { Vec::new() },
            back: if done { Vec::new() } else { vec![self.id] },
            back_delay_ms: u32::try_from(delay.as_millis()).unwrap_or(u32::MAX),
            ..DeliveryReport::default()
        };
        if let Err(e) = self.dispatch.ask(&report).await {
            // Not held any more either way: the broker offers it again after the ack wait.
            tracing::warn!(
                "reporting a task {}: {e:#}",
                if done { "done" } else { "handed back" }
            );
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        self.dispatch.holding().remove(&self.id);
        self.running(false);
    }
}
