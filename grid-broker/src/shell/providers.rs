//! Providers' requests on `grid.provider.<node>.<verb>`, served beside the broker's loop, never
//! in it: a provider cannot stall tenants' requests or result intake by asking. The node is
//! the subject's (NATS lets a provider publish only under its own name).
//!
//! - `stage`: make (or update) the node's stage stream (`grid_client::stage`), with the
//!   grid's `--stage-quota`.
//! - `take`, `report`: deliveries of task messages (see [`super::dispatch`]).
//! - `claim`: place a replica on the node, unless it runs (or ran) another replica of the same
//!   task in the same round: a create in `grid_claims`, which only the broker writes. The
//!   claim must carry the seal of the message that sent the replica.

use super::dispatch::Dispatcher;
use crate::rules::SealKey;
use anyhow::{Result, anyhow};
use futures::StreamExt;
use grid_client::Grid;
use grid_proto::{
    Answer, ClaimRequest, Claimed, DeliveryReport, JobRecord, Message, Request, StageRequest,
    StoreReady, TakeRequest, decode, encode, names,
};
use std::sync::Arc;

/// Providers' requests answered at once (a take may wait a second for tasks); more wait in
/// the subscription.
const AT_ONCE: usize = 256;

/// What the service needs of the broker's settings.
#[derive(Clone)]
pub(super) struct Settings {
    pub stage_quota_bytes: u64,
    pub stream_replicas: usize,
    pub seal: SealKey,
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
    while let Some(msg) = requests.next().await {
        let permit = at_once.clone().acquire_owned().await?;
        let (grid, settings) = (grid.clone(), settings.clone());
        tokio::spawn(async move {
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
        StageRequest::VERB => reply(
            async {
                decode::<StageRequest>(payload)?;
                grid.create_stage(node, settings.stage_quota_bytes, settings.stream_replicas)
                    .await?;
                tracing::debug!(node, "stage ready");
                Ok(StoreReady {})
            }
            .await,
        ),
        TakeRequest::VERB => reply(
            async {
                let req = decode::<TakeRequest>(payload)?;
                settings.dispatcher.take(node, &req).await
            }
            .await,
        ),
        DeliveryReport::VERB => reply(
            async {
                let req = decode::<DeliveryReport>(payload)?;
                Ok(settings.dispatcher.report(node, &req).await)
            }
            .await,
        ),
        ClaimRequest::VERB => reply(
            async {
                let req = decode::<ClaimRequest>(payload)?;
                claim(grid, &settings.seal, node, &req).await
            }
            .await,
        ),
        verb => reply::<StoreReady>(Err(anyhow!("no such request: {verb}"))),
    }
}

fn reply<T: Message>(result: Result<T>) -> Vec<u8> {
    encode(&match result {
        Ok(reply) => Answer::Granted(reply),
        Err(e) => Answer::Refused(format!("{e:#}")),
    })
}

/// Places replica `req.replica` on `node` (see the module docs).
async fn claim(grid: &Grid, seal: &SealKey, node: &str, req: &ClaimRequest) -> Result<Claimed> {
    seal.check_task(
        &req.tenant,
        &req.job_id,
        req.index,
        req.attempt,
        req.replica,
        node,
        &req.seal,
    )
    .map_err(|why| anyhow!("a claim from node {node}: {why}"))?;
    let key = names::job_key(&req.tenant, &req.job_id);
    let job = grid
        .jobs()
        .await?
        .get(&key)
        .await
        .map_err(|e| anyhow!("reading job {key}: {e}"))?
        .ok_or_else(|| anyhow!("no job {key}"))?;
    let job: JobRecord = decode(&job)?;
    let round = grid_proto::round_of(req.attempt, job.spec.retries);
    let key = names::claim_key(&req.job_id, req.index, round, node);
    let mine = req.replica.to_le_bytes();
    let claims = grid.claims().await?;
    match claims.create(&key, mine.to_vec().into()).await {
        Ok(_) => Ok(Claimed {}),
        Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
            match claims.get(&key).await {
                // A redelivery of its own replica.
                Ok(Some(v)) if v.as_ref() == mine => Ok(Claimed {}),
                Ok(_) => anyhow::bail!("node {node} runs another replica of the task"),
                Err(e) => Err(anyhow!("reading claim {key}: {e}")),
            }
        }
        Err(e) => Err(anyhow!("claiming {key}: {e}")),
    }
}
