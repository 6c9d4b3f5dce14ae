//! The broker's reads and writes of JetStream that the rules ask for: records, votes, tallies,
//! purges, task publishes, and a params job's pages.

use crate::faults::{REPLY_LOST, reply_lost};
use anyhow::{Result, anyhow, bail};
use async_nats::jetstream;
use futures::StreamExt;
use grid_client::Grid;
use grid_proto::{JobRecord, ResultMsg, TaskMsg, TaskRecord, decode, encode, names};

/// The final records of `job`'s tasks in `grid_tasks` — all of them: a record missed here
/// belongs to a result that is already acked and never comes back.
pub async fn stored_records(grid: &Grid, tenant: &str, job: &str) -> Result<Vec<TaskRecord>> {
    let entries = grid
        .entries(names::TASKS_BUCKET, Some(&format!("{tenant}.{job}")))
        .await?;
    Ok(entries
        .iter()
        .filter_map(|(_, bytes)| decode::<TaskRecord>(bytes).ok())
        .collect())
}

/// Job `job_id` of `tenant`'s, as stored (`None`: no such job).
pub async fn job_record(grid: &Grid, tenant: &str, job_id: &str) -> Result<Option<JobRecord>> {
    match grid.jobs().await?.get(names::job_key(tenant, job_id)).await {
        Ok(Some(bytes)) => Ok(Some(decode::<JobRecord>(&bytes)?)),
        Ok(None) => Ok(None),
        Err(e) if e.kind() == jetstream::kv::EntryErrorKind::InvalidKey => Ok(None),
        Err(e) => Err(anyhow!("reading job {job_id}: {e}")),
    }
}

/// Job `job_id` of `tenant`'s for a result of it: as [`job_record`], but a record that does
/// not decode is no job (logged), so that the result is settled rather than redelivered.
pub async fn job_of_result(grid: &Grid, result: &ResultMsg) -> Result<Option<JobRecord>> {
    match job_record(grid, &result.tenant, &result.job_id).await {
        Err(e) if e.downcast_ref::<grid_proto::WireError>().is_some() => {
            tracing::error!(job = %result.job_id, "unreadable job record: {e:#}");
            Ok(None)
        }
        read => read,
    }
}

/// Saves a job record.
pub async fn save_job(grid: &Grid, record: &JobRecord) -> Result<()> {
    grid.jobs()
        .await?
        .put(
            names::job_key(&record.spec.tenant, &record.id),
            encode(record).into(),
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The tenant whose job `job_id` is, from the keys of `grid_jobs` (`<tenant>.<job>`, found
/// with a subject filter), if the job exists.
pub async fn stored_owner(grid: &Grid, job_id: &str) -> Result<Option<String>> {
    if !names::valid_name(job_id) {
        return Ok(None);
    }
    let stream = grid
        .js
        .get_stream(format!("KV_{}", names::JOBS_BUCKET))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let filter = format!("$KV.{}.*.{job_id}", names::JOBS_BUCKET);
    let mut subjects = stream
        .info_with_subjects(filter)
        .await
        .map_err(|e| anyhow!("{e}"))?;
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

/// Removes every entry of `bucket` whose key matches `keys` (NATS wildcards), with its
/// history: what is purged leaves no tombstone, and a create under its key succeeds.
pub async fn purge(grid: &Grid, bucket: &str, keys: &str) -> Result<()> {
    grid.js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| anyhow!("{e}"))?
        .purge()
        .filter(format!("$KV.{bucket}.{keys}"))
        .await
        .map_err(|e| anyhow!("removing {bucket} {keys}: {e}"))?;
    Ok(())
}

/// Removes the job's task messages still in the work queue.
pub async fn drop_queued(grid: &Grid, job: &JobRecord) -> Result<()> {
    grid.js
        .get_stream(names::TASKS_STREAM)
        .await
        .map_err(|e| anyhow!("{e}"))?
        .purge()
        .filter(names::tasks_subject(&job.spec.class, &job.id))
        .await
        .map_err(|e| anyhow!("dropping job {}'s queued tasks: {e}", job.id))?;
    Ok(())
}

/// The final record of `result`'s task, if the task is decided (in any round).
pub async fn decided(grid: &Grid, result: &ResultMsg) -> Result<Option<TaskRecord>> {
    let key = names::task_key(&result.tenant, &result.job_id, result.index);
    let bytes = grid
        .tasks()
        .await?
        .get(&key)
        .await
        .map_err(|e| anyhow!("reading task {key}: {e}"))?;
    Ok(bytes.and_then(|b| decode::<TaskRecord>(&b).ok()))
}

/// Stores a replica's result in `grid_votes` as a vote of round `round`, once: false if it
/// was stored already.
pub async fn store_vote(grid: &Grid, result: &ResultMsg, round: u32) -> Result<bool> {
    let key = names::vote_key(&result.job_id, result.index, round, result.replica);
    match grid
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

/// The stored votes of `result`'s task in round `round`, replicas `0..replicas`.
pub async fn stored_votes(
    grid: &Grid,
    result: &ResultMsg,
    round: u32,
    replicas: u32,
) -> Vec<ResultMsg> {
    let mut votes = Vec::new();
    let Ok(bucket) = grid.votes().await else {
        return votes;
    };
    for replica in 0..replicas {
        let key = names::vote_key(&result.job_id, result.index, round, replica);
        if let Ok(Some(bytes)) = bucket.get(&key).await
            && let Ok(vote) = decode::<ResultMsg>(&bytes)
        {
            votes.push(vote);
        }
    }
    votes
}

/// Counts the votes of a decided task in their nodes' tallies.
pub async fn tally_votes(grid: &Grid, record: &TaskRecord) {
    for vote in &record.votes {
        tally(grid, &vote.node_id, vote.agreed).await;
    }
}

/// Counts one vote of `node` in its tally (only the broker writes tallies).
pub async fn tally(grid: &Grid, node: &str, agreed: bool) {
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

/// Publishes a task message to the work queue under `message_id` and waits for JetStream's
/// ack (a second publish of the same id is dropped as a duplicate).
pub fn publish_task(
    grid: &Grid,
    subject: String,
    message_id: String,
    task: &TaskMsg,
) -> impl Future<Output = Result<()>> + use<> {
    let msg = jetstream::message::PublishMessage::build()
        .payload(encode(task).into())
        .message_id(message_id);
    let js = grid.js.clone();
    async move {
        js.send_publish(subject, msg)
            .await
            .map_err(|e| anyhow!("{e}"))?
            .await
            .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }
}

/// A params job's task lines, read a page at a time: a fill reads forward, and retries and
/// extra replicas are of tasks in the window, so a few pages in memory serve them all however
/// long the file is. A fill reads its pages off the loop first ([`ParamsPages::missing`],
/// [`ParamsPages::insert`]); a retry whose page has left the cache reads it in place.
pub struct ParamsPages {
    tenant: String,
    pages: Vec<grid_proto::ParamsPage>,
    index: grid_proto::ParamsIndex,
    /// The pages read last, newest at the back.
    cache: std::collections::VecDeque<(usize, std::sync::Arc<ParamsPageLines>)>,
}

/// Params pages a job keeps in memory.
pub const PARAMS_PAGES_CACHED: usize = 4;

impl ParamsPages {
    /// The pages of `spec`'s params file, or `None` for a job without one.
    pub fn of(spec: &grid_proto::JobSpec) -> Option<Self> {
        let grid_proto::TaskSource::Params { pages, .. } = &spec.tasks else {
            return None;
        };
        Some(Self {
            tenant: spec.tenant.clone(),
            index: grid_proto::ParamsIndex::new(pages),
            pages: pages.clone(),
            cache: Default::default(),
        })
    }

    /// The pages (number, and the page) that tasks `indices` need and the cache lacks, in
    /// order, at most as many as it holds.
    pub fn missing(
        &self,
        indices: impl Iterator<Item = u64>,
    ) -> Vec<(usize, grid_proto::ParamsPage)> {
        let mut missing: Vec<(usize, grid_proto::ParamsPage)> = Vec::new();
        for index in indices {
            let Some((page, _)) = self.index.locate(index) else {
                continue;
            };
            if !self.cache.iter().any(|(p, _)| *p == page)
                && !missing.iter().any(|(p, _)| *p == page)
            {
                missing.push((page, self.pages[page].clone()));
                if missing.len() == PARAMS_PAGES_CACHED {
                    break;
                }
            }
        }
        missing
    }

    /// Whether task `index`'s page is in memory.
    pub fn has(&self, index: u64) -> bool {
        self.index
            .locate(index)
            .is_some_and(|(page, _)| self.cache.iter().any(|(p, _)| *p == page))
    }

    /// Keeps page `page`'s lines, read off the loop.
    pub fn insert(&mut self, page: usize, lines: std::sync::Arc<ParamsPageLines>) {
        if self.cache.iter().any(|(p, _)| *p == page) {
            return;
        }
        if self.cache.len() == PARAMS_PAGES_CACHED {
            self.cache.pop_front();
        }
        self.cache.push_back((page, lines));
    }

    /// Task `index`'s params line (read in place when its page is not in memory).
    pub async fn line(&mut self, grid: &Grid, index: u64) -> Result<Vec<u8>> {
        let Some((page, offset)) = self.index.locate(index) else {
            bail!("task {index} has no params line");
        };
        if !self.cache.iter().any(|(p, _)| *p == page) {
            let lines = read_params_page(grid, &self.tenant, &self.pages[page]).await?;
            self.insert(page, std::sync::Arc::new(lines));
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
pub struct ParamsPageLines {
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
pub async fn read_params_page(
    grid: &Grid,
    tenant: &str,
    page: &grid_proto::ParamsPage,
) -> Result<ParamsPageLines> {
    let bytes = grid
        .get_object(tenant, &page.sha256, grid_proto::caps::PARAMS_PAGE_BYTES)
        .await?;
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
    if let Some((start, end)) = lines
        .iter()
        .find(|(start, end)| u64::from(end - start) > grid_proto::caps::PARAMS_LINE_BYTES)
    {
        bail!(
            "params page {} has a line of {} bytes: the most a line may have is {}",
            page.sha256,
            end - start,
            grid_proto::caps::PARAMS_LINE_BYTES
        );
    }
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
