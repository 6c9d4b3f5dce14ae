//! Providers' requests on `grid.provider.<node>.<verb>`, served beside the broker's loop, never
//! in it: a provider cannot stall tenants' requests or result intake by asking. The node is
//! the subject's (NATS lets a provider publish only under its own name).
//!
//! - `stage`: make (or update) the node's stage stream (`grid_client::stage`), with the
//!   grid's `--stage-quota`.
//! - `take`, `report`, `fetch`: deliveries of task messages, and reads of the objects their
//!   tasks need (see [`super::dispatch`]).

use super::dispatch::Dispatcher;
use anyhow::{Result, anyhow};
use futures::StreamExt;
use grid_client::Grid;
use grid_proto::{
    Answer, DeliveryReport, FetchRequest, Request, StageRequest, StoreReady, TakeRequest, decode,
    encode, names,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Providers' requests answered at once (a take may wait a second for tasks); more wait in
/// the subscription.
const AT_ONCE: usize = 256;
/// One node's requests answered at once: more are refused at once, so that one provider cannot
/// take every turn (`grid-node` makes a take per class, a report and at most 32 fetches at a
/// time).
const PER_NODE: usize = 64;

/// What the service needs of the broker's settings.
#[derive(Clone)]
pub(super) struct Settings {
    pub stage_quota_bytes: u64,
    pub stream_replicas: usize,
    pub dispatcher: Arc<Dispatcher>,
}

/// Serves providers' requests until the subscription ends.
pub(super) async fn serve(grid: Grid, settings: Settings) -> Result<()> {
    let mut requests = grid
        .client
        .queue_subscribe(names::provider_subject("*", "*"), "broker".into())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let at_once = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let dispatcher = settings.dispatcher.clone();
    tokio::spawn(async move { dispatcher.keep_alive().await });
    let busy: Arc<std::sync::Mutex<HashMap<String, usize>>> = Default::default();
    while let Some(msg) = requests.next().await {
        let Some((node, _)) = names::provider_of(msg.subject.as_str()) else {
            continue;
        };
        let node = node.to_string();
        let turn = Turn::take(&busy, &node);
        if turn.is_none() {
            metrics::counter!("grid_provider_requests_refused_total", "node" => node.clone())
                .increment(1);
            if let Some(to) = &msg.reply {
                let refused = Answer::<StoreReady>::Refused(format!(
                    "node {node} has {PER_NODE} requests in progress already"
                ));
                let _ = grid
                    .client
                    .publish(to.clone(), encode(&refused).into())
                    .await;
            }
            continue;
        }
        let permit = at_once.clone().acquire_owned().await?;
        let (grid, settings) = (grid.clone(), settings.clone());
        tokio::spawn(async move {
            let _turn = turn;
            let answer = match names::provider_of(msg.subject.as_str()) {
                Some((node, verb)) => answer(&grid, &settings, node, verb, &msg.payload).await,
                None => encode(&Answer::<StoreReady>::Refused("bad subject".into())),
            };
            if let Some(to) = &msg.reply
                && let Err(e) = grid.client.publish(to.clone(), answer.into()).await
            {
                tracing::warn!("replying to a provider: {e}");
            }
            drop(permit);
        });
    }
    Ok(())
}

async fn answer(
    grid: &Grid,
    settings: &Settings,
    node: &str,
    verb: &str,
    payload: &[u8],
) -> Vec<u8> {
    match verb {
        StageRequest::VERB => super::requests::answer(
            async {
                decode::<StageRequest>(payload)?;
                grid.create_stage(node, settings.stage_quota_bytes, settings.stream_replicas)
                    .await?;
                tracing::debug!(node, "stage ready");
                Ok(StoreReady {})
            }
            .await,
        ),
        TakeRequest::VERB => super::requests::answer(
            async {
                let req = decode::<TakeRequest>(payload)?;
                settings.dispatcher.take(node, &req).await
            }
            .await,
        ),
        DeliveryReport::VERB => super::requests::answer(
            async {
                let req = decode::<DeliveryReport>(payload)?;
                Ok(settings.dispatcher.report(node, &req).await)
            }
            .await,
        ),
        FetchRequest::VERB => super::requests::answer(
            async {
                let req = decode::<FetchRequest>(payload)?;
                settings.dispatcher.fetch(node, &req).await
            }
            .await,
        ),
        verb => super::requests::answer::<StoreReady>(Err(anyhow!("no such request: {verb}"))),
    }
}

/// One of a node's [`PER_NODE`] turns, given back when dropped.
struct Turn {
    busy: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    node: String,
}

impl Turn {
    fn take(busy: &Arc<std::sync::Mutex<HashMap<String, usize>>>, node: &str) -> Option<Turn> {
        let mut counts = busy.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(node.to_string()).or_default();
        if *count >= PER_NODE {
            return None;
        }
        *count += 1;
        Some(Turn {
            busy: busy.clone(),
            node: node.to_string(),
        })
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut counts = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.node) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.node);
            }
        }
    }
}
