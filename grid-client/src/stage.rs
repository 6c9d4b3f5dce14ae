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
//! A blob of at most [`names::INLINE_BLOB_BYTES`] may instead travel in the result message
//! itself ([`Staged::inline`], up to [`names::INLINE_MESSAGE_BYTES`] a message, see
//! [`InlineBudget`]): the broker checks its hash the same way and stores it, and the stage
//! write, read and delete that a small output or log would cost are saved.
//!
//! The stage cannot hurt anyone but its provider: it allows no rollups and no purges, holds at
//! most its quota in chunks (a full stage refuses the provider's next chunk: that provider's error,
//! not the grid's) and forgets what is older than [`STAGE_MAX_AGE`]. Only the operator may
//! delete from it (the provider's permissions name no JetStream API but its consumers').

use crate::Grid;
use anyhow::{Result, anyhow};
use async_nats::jetstream::{self, stream};
use grid_proto::{Sha256Hex, Staged, names};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// How long staged chunks live at most: the broker takes them within seconds; a broker down
/// for longer than this finds them gone, and the attempt runs again.
pub const STAGE_MAX_AGE: Duration = Duration::from_secs(3600);

/// Chunks in flight while staging or copying one blob.
const CHUNKS_IN_FLIGHT: usize = 32;
/// Staged chunks being read at once while the broker takes one blob.
const READS_IN_FLIGHT: usize = 8;

/// What the broker found when it took a staged blob.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// The chunks hold exactly the blob's bytes; it is in the tenant's store (when asked to
    /// copy).
    Verified,
    /// They do not, or are not there: the line says what is wrong.
    Forged(String),
}

/// What a node may still carry inline in the results message it is building (see the module
/// docs); a blob that does not fit is staged.
#[derive(Debug)]
pub struct InlineBudget(u64);

impl Default for InlineBudget {
    fn default() -> Self {
        Self(names::INLINE_MESSAGE_BYTES)
    }
}

impl InlineBudget {
    /// No blob inline: everything is staged.
    pub fn none() -> Self {
        Self(0)
    }

    /// Takes `bytes` of the budget for a blob, if it may go inline.
    fn take(&mut self, bytes: u64) -> bool {
        let fits = bytes <= names::INLINE_BLOB_BYTES && bytes <= self.0;
        if fits {
            self.0 -= bytes;
        }
        fits
    }
}

impl Grid {
    /// Makes (or updates) `node`'s stage stream, holding at most `max_bytes`. The broker does
    /// it, so that a provider cannot choose its own limits.
    ///
    /// The bound is a count of chunks, each at most a chunk's size, not JetStream's byte limit:
    /// a stream's byte limit is *reserved* on every server that keeps a copy, so that a core
    /// with 36 GB of JetStream storage held the stages of 8 providers at the 4 GiB default, and
    /// refused the 9th provider's stage and every later tenant's store. A count reserves
    /// nothing and bounds the bytes alike.
    pub async fn create_stage(&self, node: &str, max_bytes: u64, replicas: usize) -> Result<()> {
        let name = names::stage_stream(node);
        let max_chunks = max_bytes
            .div_ceil(names::STAGE_CHUNK_BYTES)
            .clamp(1, i64::MAX as u64);
        self.js
            .create_or_update_stream(stream::Config {
                name: name.clone(),
                subjects: vec![names::stage_subject(node)],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                max_messages: max_chunks as i64,
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

    /// Stages `file` (whose hash and size the caller computed, open for reading at its start)
    /// as `node`, or carries it inline when it is small and `inline` allows. An open file
    /// rather than a path: a task's output may lie past `PATH_MAX`.
    pub async fn stage_file(
        &self,
        node: &str,
        sha256: Sha256Hex,
        bytes: u64,
        file: std::fs::File,
        inline: &mut InlineBudget,
    ) -> Result<Staged> {
        let mut file = tokio::fs::File::from_std(file);
        if inline.take(bytes) {
            let mut all = Vec::with_capacity(bytes as usize);
            (&mut file)
                .take(bytes + 1)
                .read_to_end(&mut all)
                .await
                .map_err(|e| anyhow!("reading the file of blob {sha256}: {e}"))?;
            let staged = Staged::inline(all);
            if staged.sha256 != sha256 {
                return Err(anyhow!("blob {sha256} changed while it was read"));
            }
            return Ok(staged);
        }
        let mut chunks = Vec::new();
        let mut in_flight = std::collections::VecDeque::new();
        let mut left = bytes;
        while left > 0 {
            let len = left.min(names::STAGE_CHUNK_BYTES) as usize;
            let mut chunk = vec![0u8; len];
            file.read_exact(&mut chunk)
                .await
                .map_err(|e| anyhow!("reading the file of blob {sha256}: {e}"))?;
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
            inline: Vec::new(),
        })
    }

    /// Stages `bytes` (a log) as `node`, or carries them inline when `inline` allows.
    pub async fn stage_bytes(
        &self,
        node: &str,
        bytes: &[u8],
        inline: &mut InlineBudget,
    ) -> Result<Staged> {
        if inline.take(bytes.len() as u64) {
            return Ok(Staged::inline(bytes.to_vec()));
        }
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
            inline: Vec::new(),
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
    ///
    /// The copy is written as it is read, chunk for chunk, with reads and writes pipelined
    /// (a chunk read and a chunk write per round trip would cap it at a few dozen MB/s); the
    /// object's metadata, which makes it visible under its name, goes last and only if the
    /// bytes hashed to that name. A copy that does not is purged again.
    pub async fn take_staged(
        &self,
        node: &str,
        tenant: &str,
        staged: &Staged,
        copy: bool,
    ) -> Result<Taken> {
        if staged.chunks.is_empty() {
            return self.take_inline(tenant, staged, copy).await;
        }
        if !staged.inline.is_empty() {
            return Ok(Taken::Forged(format!(
                "blob {} is both staged and carried",
                staged.sha256
            )));
        }
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
        // One copy of an object at a time in this process (see `put_once`).
        let stripe = usize::from(staged.sha256.0[0]) % crate::PUT_STRIPES;
        let _one_at_a_time = self.buckets.puts[stripe].lock().await;
        if !copy || self.has_object(tenant, &staged.sha256).await {
            return reader.check(staged, None).await;
        }
        let bucket = names::tenant_store(tenant);
        let nuid = random_token()?;
        let chunk_subject = format!("$O.{bucket}.C.{nuid}");
        let taken = reader
            .check(staged, Some((&self.js, chunk_subject.as_str())))
            .await;
        match taken {
            Ok(Taken::Verified) => {
                self.publish_object_info(tenant, staged, &nuid).await?;
                Ok(Taken::Verified)
            }
            other => {
                // Written in part, or in full under a name its bytes do not hash to.
                let _ = self
                    .js
                    .get_stream_no_info(format!("OBJ_{bucket}"))
                    .await
                    .map_err(|e| anyhow!("{e}"))?
                    .purge()
                    .filter(chunk_subject)
                    .await;
                other
            }
        }
    }

    /// Takes a blob carried in its result: checks its size and hash, and (with `copy`) stores
    /// it in `tenant`'s store.
    async fn take_inline(&self, tenant: &str, staged: &Staged, copy: bool) -> Result<Taken> {
        let carried = staged.inline.len() as u64;
        if carried != staged.bytes || carried > names::INLINE_BLOB_BYTES {
            return Ok(Taken::Forged(format!(
                "blob {} of {} bytes carried as {carried} (at most {} may be)",
                staged.sha256,
                staged.bytes,
                names::INLINE_BLOB_BYTES
            )));
        }
        if Sha256Hex::of(&staged.inline) != staged.sha256 {
            return Ok(Taken::Forged(format!(
                "blob {}'s bytes hash to something else",
                staged.sha256
            )));
        }
        if copy {
            self.put_object(tenant, &staged.inline).await?;
        }
        Ok(Taken::Verified)
    }

    /// Makes a copied blob an object of `tenant`'s store: its metadata, as the object store
    /// writes it (readable by any NATS object-store client).
    async fn publish_object_info(&self, tenant: &str, staged: &Staged, nuid: &str) -> Result<()> {
        let name = names::object_name(&staged.sha256);
        let bucket = names::tenant_store(tenant);
        let info = jetstream::object_store::ObjectInfo {
            name: name.clone(),
            description: None,
            metadata: Default::default(),
            headers: None,
            options: Some(jetstream::object_store::ObjectOptions {
                max_chunk_size: Some(names::STAGE_CHUNK_BYTES as usize),
                link: None,
            }),
            bucket: bucket.clone(),
            nuid: nuid.to_string(),
            size: staged.bytes as usize,
            chunks: staged.chunks.len(),
            modified: None,
            digest: Some(format!(
                "SHA-256={}",
                data_encoding::BASE64URL.encode(&staged.sha256.0)
            )),
            deleted: false,
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        let subject = format!(
            "$O.{bucket}.M.{}",
            data_encoding::BASE64URL.encode(name.as_bytes())
        );
        self.js
            .publish_with_headers(subject, headers, serde_json::to_vec(&info)?.into())
            .await
            .map_err(|e| anyhow!("storing object {name}: {e}"))?
            .await
            .map_err(|e| anyhow!("storing object {name}: {e}"))?;
        Ok(())
    }

    /// Deletes staged chunks (the broker, once the result naming them is recorded). A chunk
    /// that is gone already is no error; one that fails to go ages out. Deleted without
    /// erasing (JetStream's default overwrites each message on disk: no secret is in a chunk
    /// that its tenant's store does not now hold).
    pub async fn free_staged(&self, node: &str, chunks: &[u64]) {
        use futures::StreamExt;
        let subject = format!("$JS.API.STREAM.MSG.DELETE.{}", names::stage_stream(node));
        let deletes = chunks.iter().copied().map(|seq| {
            let (client, subject) = (self.client.clone(), subject.clone());
            async move {
                let body = format!(r#"{{"seq":{seq},"no_erase":true}}"#);
                if let Err(e) = client.request(subject, body.into()).await {
                    tracing::debug!(node, seq, "freeing a staged chunk: {e}");
                }
            }
        });
        futures::stream::iter(deletes)
            .buffer_unordered(CHUNKS_IN_FLIGHT)
            .collect::<Vec<()>>()
            .await;
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
    /// Reads `staged`'s chunks in order — several reads in flight — checking each chunk's
    /// subject and length and the whole blob's hash; with `copy_to`, publishes each chunk to
    /// that subject as it goes (several acks in flight).
    async fn check(
        &self,
        staged: &Staged,
        copy_to: Option<(&jetstream::Context, &str)>,
    ) -> Result<Taken> {
        use futures::StreamExt;
        let mut hasher = Sha256::new();
        let mut left = staged.bytes;
        let mut reads = futures::stream::iter(staged.chunks.iter().copied())
            .map(|seq| async move { (seq, self.stream.direct_get(seq).await) })
            .buffered(READS_IN_FLIGHT);
        let mut writes = std::collections::VecDeque::new();
        while let Some((seq, chunk)) = reads.next().await {
            let chunk = match chunk {
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
            if let Some((js, subject)) = copy_to {
                let ack = js
                    .publish(subject.to_string(), chunk.payload)
                    .await
                    .map_err(|e| anyhow!("copying blob {}: {e}", staged.sha256))?;
                writes.push_back(ack);
                if writes.len() >= CHUNKS_IN_FLIGHT
                    && let Some(ack) = writes.pop_front()
                {
                    ack.await
                        .map_err(|e| anyhow!("copying blob {}: {e}", staged.sha256))?;
                }
            }
        }
        for ack in writes {
            ack.await
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

/// A fresh token for an object's chunk subject (the object store's `nuid`).
fn random_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut bytes))
        .map_err(|e| anyhow!("reading /dev/urandom: {e}"))?;
    Ok(data_encoding::HEXLOWER.encode(&bytes))
}
