//! The stage: how a provider hands its tasks' outputs and logs to the broker without writing
//! into anybody's store.
//!
//! A provider may publish into one JetStream stream only: its own stage, `GRID_STAGE_<node>`
//! (subject `grid.stage.<node>`), which the broker makes when the node first asks. A blob goes
//! there as chunks of [`names::STAGE_CHUNK_BYTES`]; the result lists each blob's hash, size and
//! chunk sequences ([`Staged`]). The broker reads the chunks back ([`Grid::take_staged`]),
//! hashing as it reads, copies the blob into the tenant's store under the hash it computed —
//! never under one the node reported — and, once the result is recorded, deletes the chunks.
//!
//! The stage cannot hurt anyone but its provider: it allows no rollups and no purges, holds at
//! most its byte quota (a full stage refuses the provider's next chunk: that provider's error,
//! not the grid's) and forgets what is older than [`STAGE_MAX_AGE`]. Only the operator may
//! delete from it (the provider's permissions name no JetStream API but its consumers').

use crate::Grid;
use anyhow::{Result, anyhow};
use async_nats::jetstream::{self, stream};
use grid_proto::{Sha256Hex, Staged, names};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long staged chunks live at most: the broker takes them within seconds; a broker down
/// for longer than this finds them gone, and the attempt runs again.
pub const STAGE_MAX_AGE: Duration = Duration::from_secs(3600);

/// Chunks a node has in flight while staging one blob.
const CHUNKS_IN_FLIGHT: usize = 32;

/// What the broker found when it took a staged blob.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// The chunks hold exactly the blob's bytes; it is in the tenant's store (when asked to
    /// copy).
    Verified,
    /// They do not, or are not there: the line says what is wrong.
    Forged(String),
}

impl Grid {
    /// Makes (or updates) `node`'s stage stream, holding at most `max_bytes`. The broker does
    /// it, so that a provider cannot choose its own limits.
    pub async fn create_stage(&self, node: &str, max_bytes: u64, replicas: usize) -> Result<()> {
        let name = names::stage_stream(node);
        self.js
            .create_or_update_stream(stream::Config {
                name: name.clone(),
                subjects: vec![names::stage_subject(node)],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                max_bytes: max_bytes.min(i64::MAX as u64) as i64,
                max_age: STAGE_MAX_AGE,
                // A chunk and its headers.
                max_message_size: (names::STAGE_CHUNK_BYTES + 4096) as i32,
                discard: stream::DiscardPolicy::New,
                allow_rollup: false,
                deny_purge: true,
                // Deletes are the broker's, once a blob is copied (providers may not).
                deny_delete: false,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("creating stream {name}: {e}"))?;
        Ok(())
    }

    /// Stages the file at `path` (whose hash and size the caller computed) as `node`.
    pub async fn stage_file(
        &self,
        node: &str,
        sha256: Sha256Hex,
        bytes: u64,
        path: &std::path::Path,
    ) -> Result<Staged> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| anyhow!("opening {}: {e}", path.display()))?;
        let mut chunks = Vec::new();
        let mut in_flight = std::collections::VecDeque::new();
        let mut left = bytes;
        while left > 0 {
            let len = left.min(names::STAGE_CHUNK_BYTES) as usize;
            let mut chunk = vec![0u8; len];
            file.read_exact(&mut chunk)
                .await
                .map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
            left -= len as u64;
            in_flight.push_back(self.stage_chunk(node, chunk).await?);
            if in_flight.len() >= CHUNKS_IN_FLIGHT
                && let Some(ack) = in_flight.pop_front()
            {
                chunks.push(staged_at(ack).await?);
            }
        }
        for ack in in_flight {
            chunks.push(staged_at(ack).await?);
        }
        Ok(Staged {
            sha256,
            bytes,
            chunks,
        })
    }

    /// Stages `bytes` (a log) as `node`.
    pub async fn stage_bytes(&self, node: &str, bytes: &[u8]) -> Result<Staged> {
        let mut acks = Vec::new();
        for chunk in bytes.chunks(names::STAGE_CHUNK_BYTES as usize) {
            acks.push(self.stage_chunk(node, chunk.to_vec()).await?);
        }
        let mut chunks = Vec::with_capacity(acks.len());
        for ack in acks {
            chunks.push(staged_at(ack).await?);
        }
        Ok(Staged {
            sha256: Sha256Hex::of(bytes),
            bytes: bytes.len() as u64,
            chunks,
        })
    }

    async fn stage_chunk(
        &self,
        node: &str,
        chunk: Vec<u8>,
    ) -> Result<jetstream::context::PublishAckFuture> {
        self.js
            .publish(names::stage_subject(node), chunk.into())
            .await
            .map_err(|e| anyhow!("staging an output: {e}"))
    }

    /// Takes blob `staged` from `node`'s stage: reads its chunks, checks them against its size
    /// and hash, and (with `copy`) stores it in `tenant`'s store under the hash computed from
    /// its bytes. `Err` is a failure to reach JetStream (try again later); a blob that is not
    /// what the node said is [`Taken::Forged`].
    pub async fn take_staged(
        &self,
        node: &str,
        tenant: &str,
        staged: &Staged,
        copy: bool,
    ) -> Result<Taken> {
        let expected = staged.bytes.div_ceil(names::STAGE_CHUNK_BYTES);
        if staged.chunks.len() as u64 != expected {
            return Ok(Taken::Forged(format!(
                "blob {} of {} bytes listed in {} chunks, not {expected}",
                staged.sha256,
                staged.bytes,
                staged.chunks.len()
            )));
        }
        let reader = match self.stage_reader(node).await? {
            Some(reader) => reader,
            None => return Ok(Taken::Forged(format!("node {node} has no stage"))),
        };
        if !copy || self.has_object(tenant, &staged.sha256).await {
            let mut sink = tokio::io::sink();
            return reader.check(staged, &mut sink).await;
        }
        // Copied as it is read: the put reads what the check writes into the pipe.
        let (mut tx, rx) = tokio::io::duplex(2 * names::STAGE_CHUNK_BYTES as usize);
        let check = async {
            let taken = reader.check(staged, &mut tx).await;
            drop(tx); // the end of the blob
            taken
        };
        let put = self.put_once(tenant, &staged.sha256, || async { Ok(rx) });
        let (taken, put) = tokio::join!(check, put);
        let taken = match taken {
            // Stored meanwhile by another writer: the put did not read the pipe.
            Err(_) if matches!(put, Ok(false)) => {
                let mut sink = tokio::io::sink();
                return reader.check(staged, &mut sink).await;
            }
            taken => taken,
        };
        if !matches!(taken, Ok(Taken::Verified)) && matches!(put, Ok(true)) {
            // Stored under a name its bytes do not hash to: removed again.
            if let Ok(store) = self.store(tenant).await {
                let _ = store.delete(names::object_name(&staged.sha256)).await;
            }
        }
        let taken = taken?;
        put?;
        Ok(taken)
    }

    /// Deletes staged chunks (the broker, once the result naming them is recorded). A chunk
    /// that is gone already is no error; one that fails to go ages out.
    pub async fn free_staged(&self, node: &str, chunks: &[u64]) {
        let Ok(stage) = self.js.get_stream_no_info(names::stage_stream(node)).await else {
            return;
        };
        let deletes = chunks.iter().map(|&seq| {
            let stage = &stage;
            async move {
                if let Err(e) = stage.delete_message(seq).await {
                    tracing::debug!(node, seq, "freeing a staged chunk: {e}");
                }
            }
        });
        futures::future::join_all(deletes).await;
    }

    /// A reader of `node`'s stage, or `None` when it has none.
    async fn stage_reader(&self, node: &str) -> Result<Option<StageReader>> {
        let name = names::stage_stream(node);
        let known = self
            .buckets
            .stages
            .lock()
            .is_ok_and(|stages| stages.contains(node));
        if !known {
            match self.js.get_stream(&name).await {
                Ok(_) => {
                    if let Ok(mut stages) = self.buckets.stages.lock() {
                        stages.insert(node.to_string());
                    }
                }
                Err(e) => {
                    if let jetstream::context::GetStreamErrorKind::JetStream(js) = e.kind()
                        && js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                    {
                        return Ok(None);
                    }
                    return Err(anyhow!("opening {name}: {e}"));
                }
            }
        }
        let stream = self
            .js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| anyhow!("opening {name}: {e}"))?;
        Ok(Some(StageReader {
            stream,
            subject: names::stage_subject(node),
        }))
    }
}

async fn staged_at(ack: jetstream::context::PublishAckFuture) -> Result<u64> {
    Ok(ack
        .await
        .map_err(|e| anyhow!("staging an output: {e}"))?
        .sequence)
}

/// Reads blobs from one node's stage.
struct StageReader {
    stream: stream::Stream<()>,
    subject: String,
}

impl StageReader {
    /// Reads `staged`'s chunks in order into `out`, checking each chunk's subject and length
    /// and the whole blob's hash.
    async fn check<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        staged: &Staged,
        out: &mut W,
    ) -> Result<Taken> {
        let mut hasher = Sha256::new();
        let mut left = staged.bytes;
        for &seq in &staged.chunks {
            let chunk = match self.stream.direct_get(seq).await {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                    return Ok(Taken::Forged(format!(
                        "chunk {seq} of blob {} is not staged",
                        staged.sha256
                    )));
                }
                Err(e) => return Err(anyhow!("reading staged chunk {seq}: {e}")),
            };
            let want = left.min(names::STAGE_CHUNK_BYTES);
            if chunk.subject.as_str() != self.subject || chunk.payload.len() as u64 != want {
                return Ok(Taken::Forged(format!(
                    "chunk {seq} of blob {} is not one of its chunks",
                    staged.sha256
                )));
            }
            left -= want;
            hasher.update(&chunk.payload);
            out.write_all(&chunk.payload)
                .await
                .map_err(|e| anyhow!("copying blob {}: {e}", staged.sha256))?;
        }
        if Sha256Hex::from_hasher(hasher) != staged.sha256 {
            return Ok(Taken::Forged(format!(
                "blob {}'s chunks hash to something else",
                staged.sha256
            )));
        }
        Ok(Taken::Verified)
    }
}
