//! Wire messages: postcard inside a versioned envelope.
//!
//! Every NATS payload is `Envelope { version, kind, body }` in postcard. A reader rejects a
//! message of another wire version or another kind with a [`WireError`] that says so, instead of
//! misreading it; callers log it and terminate the message so it is not redelivered forever.

use crate::{Outcome, Sha256Hex};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::fmt;

/// Bumped on any incompatible change of a wire type.
pub const WIRE_VERSION: u16 = 14;

/// A type that travels over NATS.
pub trait Message: Serialize + DeserializeOwned {
    const KIND: &'static str;
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    version: u16,
    kind: String,
    body: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum WireError {
    Garbled(String),
    Version { got: u16, want: u16 },
    Kind { got: String, want: &'static str },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Garbled(e) => write!(f, "garbled message: {e}"),
            WireError::Version { got, want } => {
                write!(
                    f,
                    "message of wire version {got}, this build speaks {want}: upgrade the older side"
                )
            }
            WireError::Kind { got, want } => write!(f, "expected a {want} message, got a {got}"),
        }
    }
}

impl std::error::Error for WireError {}

pub fn encode<T: Message>(msg: &T) -> Vec<u8> {
    let body = postcard::to_stdvec(msg).expect("wire types serialize");
    postcard::to_stdvec(&Envelope {
        version: WIRE_VERSION,
        kind: T::KIND.into(),
        body,
    })
    .expect("envelope serializes")
}

pub fn decode<T: Message>(bytes: &[u8]) -> Result<T, WireError> {
    let env: Envelope =
        postcard::from_bytes(bytes).map_err(|e| WireError::Garbled(e.to_string()))?;
    if env.version != WIRE_VERSION {
        return Err(WireError::Version {
            got: env.version,
            want: WIRE_VERSION,
        });
    }
    if env.kind != T::KIND {
        return Err(WireError::Kind {
            got: env.kind,
            want: T::KIND,
        });
    }
    postcard::from_bytes(&env.body).map_err(|e| WireError::Garbled(e.to_string()))
}

/// Limits as a job asks for them (node caps apply on top).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLimits {
    pub memory_bytes: u64,
    pub timeout_ms: u64,
    pub max_output_bytes: u64,
    /// GPU jobs: bytes of a task's GPU buffers together.
    pub gpu_memory_bytes: u64,
    /// GPU jobs: time a task's GPU work may take in all.
    pub gpu_time_ms: u64,
}

/// A file given to tasks, stored in the blob bucket by content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    pub name: String,
    pub sha256: Sha256Hex,
    pub bytes: u64,
}

/// One page of a params file: whole lines, a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamsPage {
    pub sha256: Sha256Hex,
    /// Its task lines (non-blank lines, see [`params_lines`]).
    pub lines: u64,
}

/// A program run by a pinned runtime (see [`crate::runtime`]): the job's module is then the
/// runtime's own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramRef {
    /// The runtime's name (`python`).
    pub runtime: String,
    /// The program file (a blob), shown to tasks at `/job/<name>`.
    pub file: InputRef,
    /// The runtime's stdlib (a blob, its pinned hash).
    pub stdlib_sha256: Sha256Hex,
}

/// Where a job's tasks come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskSource {
    /// `--tasks N`: N tasks with empty stdin.
    Count(u64),
    /// `--params FILE.jsonl`: one task per line. The file is stored as pages of whole lines
    /// (see [`ParamsPager`]), so that neither submit nor the broker ever holds more than a few
    /// pages of a file with a million tasks.
    Params { pages: Vec<ParamsPage>, lines: u64 },
    /// `--input DIR`: one task per file, in byte order of name.
    Inputs(Vec<InputRef>),
}

impl TaskSource {
    pub fn len(&self) -> u64 {
        match self {
            TaskSource::Count(n) => *n,
            TaskSource::Params { lines, .. } => *lines,
            TaskSource::Inputs(files) => files.len() as u64,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything a node needs to run any task of a job, besides the task's own params or input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub tenant: String,
    /// The capability class whose nodes run it: `cpu`, or `gpu` (tasks get the node's GPU).
    pub class: String,
    pub module_sha256: Sha256Hex,
    /// The file name the user submitted, for display.
    pub module_name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub limits: JobLimits,
    pub seed: u64,
    /// Attempts after the first for a failed or lost task (with replicas: for a lost replica).
    pub retries: u32,
    /// Each task runs on this many distinct nodes (1: no replicas).
    pub replicas: u32,
    /// Replicas whose results (outcome and outputs, see [`result_digest`]) must agree.
    pub quorum: u32,
    pub tasks: TaskSource,
    /// Read-only at `/in/shared/` for every task.
    pub shared: Vec<InputRef>,
    /// A program for a runtime (`grid submit job.py`); `None` for a module of the user's own.
    pub program: Option<ProgramRef>,
    /// Among its tenant's jobs, higher goes first (`grid submit --priority`); tenants share
    /// the grid by their weights whatever their jobs' priorities.
    pub priority: i32,
    /// A name the tenant gave it (`grid submit --name`), to find it by; empty for none. See
    /// [`check_job_name`].
    pub name: String,
}

/// The most bytes of a job's name.
pub const JOB_NAME_BYTES: usize = 64;

/// Why `name` cannot name a job, if so: at most [`JOB_NAME_BYTES`] of letters, digits, `-`, `_`
/// and `.`, starting with a letter (so that a name is never taken for a job id's prefix).
pub fn check_job_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= JOB_NAME_BYTES
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "job name {name:?}: use at most {JOB_NAME_BYTES} letters, digits, -, _ and ., starting with a letter"
        ))
    }
}

/// What one job may ask of the grid, checked by `grid submit` and by the broker
/// ([`JobSpec::validate`]): a job's spec travels in every task message, and the broker reads its
/// params pages at submit, so each is bounded by what a broker serving many tenants can afford.
pub mod caps {
    /// Tasks of one job.
    pub const TASKS: u64 = 1_000_000;
    /// Params pages of one job (each at most [`PARAMS_PAGE_BYTES`]).
    pub const PARAMS_PAGES: u64 = 1024;
    /// Bytes of one params page: a page holds whole lines up to [`super::PARAMS_PAGE_BYTES`],
    /// more only for a single longer line.
    pub const PARAMS_PAGE_BYTES: u64 = 2 * super::PARAMS_PAGE_BYTES as u64;
    /// Files shown to every task at `/in/shared/`.
    pub const SHARED_FILES: u64 = 1024;
    /// Arguments after the module's name.
    pub const ARGS: u64 = 4096;
    /// Environment variables.
    pub const ENV: u64 = 4096;
    /// Bytes of the arguments and environment together.
    pub const ARGS_ENV_BYTES: u64 = 128 * 1024;
    /// Bytes of a name shown for display (the module's).
    pub const NAME_BYTES: u64 = 1024;
    /// Bytes of the spec every task message carries (args, env, shared files' names, …):
    /// with a task's params line, a message must stay within NATS's 1 MiB payload.
    pub const SPEC_BYTES: u64 = 256 * 1024;
    /// Bytes of one params line (a task's stdin); larger inputs go in files (`--input`).
    pub const PARAMS_LINE_BYTES: u64 = 256 * 1024;
    /// Bytes of a module, a runtime or its library: what any reader of one expects at most.
    pub const MODULE_BYTES: u64 = 1 << 30;
    /// Bytes of a task's captured stdout or stderr: what a reader of a log expects at most.
    pub const LOG_BYTES: u64 = 16 << 20;
}

/// The most replicas a job may ask for.
pub const MAX_REPLICAS: u32 = 16;

/// Whether `1 <= quorum <= replicas <= MAX_REPLICAS` (part of [`JobSpec::validate`]).
pub fn check_replicas(replicas: u32, quorum: u32) -> Result<(), String> {
    if !(1..=MAX_REPLICAS).contains(&replicas) || !(1..=replicas).contains(&quorum) {
        return Err(format!(
            "--replicas must be 1..={MAX_REPLICAS} and --quorum 1..=replicas (got {replicas} and {quorum})"
        ));
    }
    Ok(())
}

impl JobSpec {
    /// Whether the spec is one a grid can run, checked the same way by `grid submit` (before
    /// it uploads anything) and by the broker (which trusts no client): a known class, at least
    /// one task, `1 <= quorum <= replicas <= MAX_REPLICAS`, limits a task can run under
    /// ([`JobLimits::check`]) and the [`caps`]. The error is one line for a user.
    pub fn validate(&self) -> Result<(), String> {
        if !crate::names::CLASSES.contains(&self.class.as_str()) {
            return Err(format!(
                "unknown class {:?}: a job runs on class {}",
                self.class,
                crate::names::CLASSES.join(" or ")
            ));
        }
        if self.tasks.is_empty() {
            return Err("the job has no tasks".into());
        }
        check_replicas(self.replicas, self.quorum)?;
        if !self.name.is_empty() {
            check_job_name(&self.name)?;
        }
        self.limits.check()?;
        self.within_caps()
    }

    /// Bytes of what every task message carries of the spec, encoded.
    fn carried_bytes(&self) -> u64 {
        let carried = (
            &self.tenant,
            &self.module_name,
            &self.args,
            &self.env,
            &self.shared,
            &self.program,
        );
        postcard::to_stdvec(&carried).map_or(u64::MAX, |b| b.len() as u64)
    }

    /// Whether the spec is within [`caps`]: the error names the cap and what to do.
    fn within_caps(&self) -> Result<(), String> {
        let over = |what: &str, got: u64, most: u64, hint: &str| {
            (got > most)
                .then(|| format!("{what} is {got}: the most a job may have is {most}; {hint}"))
        };
        let pages = match &self.tasks {
            TaskSource::Params { pages, .. } => pages.len() as u64,
            _ => 0,
        };
        let env_args: u64 = self
            .args
            .iter()
            .map(|a| a.len() as u64 + 1)
            .chain(self.env.iter().map(|(k, v)| (k.len() + v.len()) as u64 + 2))
            .sum();
        let checks = [
            over(
                "the number of tasks",
                self.tasks.len(),
                caps::TASKS,
                "split it into several jobs",
            ),
            over(
                "the number of params pages",
                pages,
                caps::PARAMS_PAGES,
                "split the params file into several jobs",
            ),
            over(
                "the number of shared files",
                self.shared.len() as u64,
                caps::SHARED_FILES,
                "pack them into an archive",
            ),
            over(
                "the number of args",
                self.args.len() as u64,
                caps::ARGS,
                "pass them in a file",
            ),
            over(
                "the number of env variables",
                self.env.len() as u64,
                caps::ENV,
                "pass them in a file",
            ),
            over(
                "the size of args and env in bytes",
                env_args,
                caps::ARGS_ENV_BYTES,
                "pass them in a file",
            ),
            over(
                "the length of the module's name",
                self.module_name.len() as u64,
                caps::NAME_BYTES,
                "rename it",
            ),
            over(
                "the size in bytes of what every task carries (args, env, shared files' names)",
                self.carried_bytes(),
                caps::SPEC_BYTES,
                "pass large arguments in a file",
            ),
        ];
        match checks.into_iter().flatten().next() {
            Some(line) => Err(line),
            None => Ok(()),
        }
    }

    /// The stored objects the job itself names: its module, params file, inputs, shared files,
    /// program and runtime library.
    pub fn objects(&self) -> Vec<Sha256Hex> {
        let mut objects = vec![self.module_sha256];
        match &self.tasks {
            TaskSource::Params { pages, .. } => objects.extend(pages.iter().map(|p| p.sha256)),
            TaskSource::Inputs(files) => objects.extend(files.iter().map(|f| f.sha256)),
            TaskSource::Count(_) => {}
        }
        objects.extend(self.shared.iter().map(|f| f.sha256));
        if let Some(program) = &self.program {
            objects.push(program.file.sha256);
            objects.push(program.stdlib_sha256);
        }
        objects
    }
}

/// A tenant's request to the broker, sent on `grid.api.<tenant>.<VERB>`
/// ([`crate::names::api_subject`]); the broker answers with an [`Answer`] of its `Reply`.
pub trait Request: Message {
    /// The last token of its subject.
    const VERB: &'static str;
    /// What the broker answers when it grants the request.
    type Reply: Message;
}

/// The broker's answer to a [`Request`]: its reply, or one line for a user that says why not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer<T> {
    Granted(T),
    Refused(String),
}
impl<T: Message> Message for Answer<T> {
    const KIND: &'static str = T::KIND;
}

/// A job, by id: what submit, owner and cancel answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    pub job_id: String,
}
impl Message for JobRef {
    const KIND: &'static str = "job-ref";
}

/// `grid.api.<tenant>.submit`: run a job. Answered with the new job's id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmitRequest {
    pub spec: JobSpec,
}
impl Message for SubmitRequest {
    const KIND: &'static str = "submit";
}
impl Request for SubmitRequest {
    const VERB: &'static str = "submit";
    type Reply = JobRef;
}

/// What a delete removed: the job's stored objects no other job of the tenant's names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub job_id: String,
    pub objects: u64,
    pub bytes: u64,
}
impl Message for Deleted {
    const KIND: &'static str = "deleted";
}

/// An ended job's failed tasks running again: how many.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retrying {
    pub job_id: String,
    pub tasks: u64,
}
impl Message for Retrying {
    const KIND: &'static str = "retrying";
}

/// The tenant's object store exists (with the grid's quota).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreReady {}
impl Message for StoreReady {
    const KIND: &'static str = "store-ready";
}

/// `grid.api.<tenant>.owner` request: whose is this job? The reply is `Ok` with the job id
/// when it is the asker's, else one line that says why not (another tenant's, or unknown).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRequest {
    pub job_id: String,
}
impl Message for OwnerRequest {
    const KIND: &'static str = "owner";
}
impl Request for OwnerRequest {
    const VERB: &'static str = "owner";
    type Reply = JobRef;
}

/// `grid.api.<tenant>.delete` request: remove an ended job's records, and the stored objects
/// (outputs, logs, inputs, module) that no other job of the tenant's uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRequest {
    pub job_id: String,
}
impl Message for DeleteRequest {
    const KIND: &'static str = "delete";
}
impl Request for DeleteRequest {
    const VERB: &'static str = "delete";
    type Reply = Deleted;
}

/// `grid.api.<tenant>.retry` request: run an ended job's failed and disputed tasks again, in
/// the same job (their outputs join the others'), with the job's retries afresh. The reply is
/// [`Retrying`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryRequest {
    pub job_id: String,
    /// The new round's limits (`grid retry --memory 1GiB`): all of them, checked as a submit's
    /// are; `None` keeps the job's.
    pub limits: Option<JobLimits>,
}
impl Message for RetryRequest {
    const KIND: &'static str = "retry";
}
impl Request for RetryRequest {
    const VERB: &'static str = "retry";
    type Reply = Retrying;
}

/// `grid.api.<tenant>.storage` request: make the tenant's object store (the broker sets its
/// quota). The reply's `job_id` is empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageRequest {}
impl Message for StorageRequest {
    const KIND: &'static str = "storage";
}
impl Request for StorageRequest {
    const VERB: &'static str = "storage";
    type Reply = StoreReady;
}

/// `grid.api.<tenant>.cancel` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub job_id: String,
}
impl Message for CancelRequest {
    const KIND: &'static str = "cancel";
}
impl Request for CancelRequest {
    const VERB: &'static str = "cancel";
    type Reply = JobRef;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Tasks handed to the work queue and not yet finished (queued or running).
    pub in_flight: u64,
    /// Tasks whose replicas never reached a quorum.
    pub disputed: u64,
    /// Of `in_flight`: tasks a node has started (as nodes report every few seconds); the others
    /// wait in the queue or for a slot on the node that holds them.
    pub running: u64,
    /// Of a cancelled job: the tasks that had not ended when it was cancelled (they end
    /// `cancelled`; `grid retry` runs them again).
    pub cancelled: u64,
}

/// The job record in `grid_jobs`. Only the broker writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub reason: Option<String>,
    pub created_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    pub counts: TaskCounts,
    /// Tasks `0..enqueued` have been handed to the work queue at least once (in this round:
    /// a retry starts again from 0, passing over the tasks that succeeded).
    pub enqueued: u64,
    /// How many times `grid retry` has run the job's failed tasks again.
    pub retried: u32,
}
impl Message for JobRecord {
    const KIND: &'static str = "job";
}

impl JobRecord {
    /// The attempt number a task starts at in this round. Each round has its own attempt
    /// numbers (`retries + 1` of them), so an attempt of a retried task is a new message id
    /// and a new ledger entry, and a late result of an earlier round is known as one.
    pub fn first_attempt(&self) -> u32 {
        self.retried
            .saturating_mul(self.spec.retries.saturating_add(1))
    }

    /// Whether a failed attempt `attempt` gets another within this round.
    pub fn retries_left(&self, attempt: u32) -> bool {
        attempt < self.first_attempt().saturating_add(self.spec.retries)
    }

    /// Whether attempt `attempt` may have been sent out, in this round or an earlier one.
    pub fn attempt_sent(&self, attempt: u32) -> bool {
        attempt <= self.first_attempt().saturating_add(self.spec.retries)
    }
}

/// The most tasks one task message may carry.
pub const MAX_TASKS_PER_MESSAGE: u32 = 256;

/// Tasks handed to a node: one, or a run of short ones in one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMsg {
    pub job_id: String,
    /// The first task's index.
    pub index: u64,
    /// The tasks `index .. index + count` (at least 1): the broker sends a job's short tasks
    /// several to a message — one publish, delivery and ack for all of them. A retry, a
    /// replica or a task with its own input file is always alone (the first attempt of a
    /// job's retry round is not a retry: see [`JobRecord::first_attempt`]).
    pub count: u32,
    /// 0 for the first try, 1 for the first retry, … (counting on across `grid retry` rounds)
    pub attempt: u32,
    /// Which replica of the task this is (0 without replicas).
    pub replica: u32,
    /// stdin of each task, in order: its params line; empty for a job without params.
    pub params: Vec<Vec<u8>>,
    /// The task's own input, shown at `/in/<name>`.
    pub input: Option<InputRef>,
    /// The job's spec, without its task list (`tasks` is `Count` of the job's tasks): a node
    /// learns what to run from the task it was given, and reads no job records.
    pub spec: JobSpec,
    /// The broker's seal on this message; a node returns it with each result.
    pub seal: Seal,
}
impl Message for TaskMsg {
    const KIND: &'static str = "task";
}

impl TaskMsg {
    /// The message's tasks, one message each (`count` 1), in index order.
    pub fn split(&self) -> Vec<TaskMsg> {
        (0..self.count.max(1))
            .map(|i| TaskMsg {
                index: self.index + u64::from(i),
                count: 1,
                params: self
                    .params
                    .get(i as usize)
                    .map(|p| vec![p.clone()])
                    .unwrap_or_default(),
                ..self.clone()
            })
            .collect()
    }

    /// A single task's stdin: its params line (empty without one).
    pub fn stdin(&self) -> &[u8] {
        self.params.first().map_or(&[], Vec::as_slice)
    }
}

/// The broker's proof that it sent a task message: which tasks (`first_index ..
/// first_index + count`), when it published them and when it handed them to a node (its clock),
/// and an HMAC-SHA256 of all that, of the message's tenant, job, attempt and replica and of the
/// node it was handed to, under a key only the broker holds. A node copies it into each result
/// of the message; the broker accepts a result only under a seal it made for that task and that
/// node, so a provider cannot report, or bill, an attempt it was not handed. Only the broker
/// makes and checks seals (`grid_broker::rules::seal`); to everyone else they are opaque.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub first_index: u64,
    pub count: u32,
    pub sent_unix_ms: u64,
    /// When the broker handed the message to the node (0 until it does).
    pub handed_unix_ms: u64,
    pub mac: [u8; 32],
}

/// A blob a node hands the broker, with its hash and size: staged
/// ([`crate::names::stage_stream`]), with the stream sequence of each of its chunks in order
/// (each [`crate::names::STAGE_CHUNK_BYTES`] long but the last); or, when it is at most
/// [`crate::names::INLINE_BLOB_BYTES`], carried in the result itself (`inline`, no chunks): a
/// small output or log then costs no stage write, read and delete of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub sha256: Sha256Hex,
    pub bytes: u64,
    pub chunks: Vec<u64>,
    pub inline: Vec<u8>,
}

impl Staged {
    /// A blob carried in the result.
    pub fn inline(bytes: Vec<u8>) -> Self {
        Self {
            sha256: Sha256Hex::of(&bytes),
            bytes: bytes.len() as u64,
            chunks: Vec::new(),
            inline: bytes,
        }
    }
}

/// A provider asks the broker for its stage stream (`grid.provider.<node>.stage`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRequest {}
impl Message for StageRequest {
    const KIND: &'static str = "stage";
}
impl Request for StageRequest {
    const VERB: &'static str = "stage";
    type Reply = StoreReady;
}

/// Task messages a node may hold per slot it advertises: one running, the others being fetched
/// or reported. The broker hands no node more.
pub const HELD_PER_SLOT: u32 = 4;

/// A node asks the broker for task messages of `class` (`grid.provider.<node>.take`), at most
/// `max`: the broker waits up to a second for some, and hands out no more than the node's
/// advertised slots justify ([`HELD_PER_SLOT`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeRequest {
    pub class: String,
    pub max: u32,
}
impl Message for TakeRequest {
    const KIND: &'static str = "take";
}
impl Request for TakeRequest {
    const VERB: &'static str = "take";
    type Reply = Deliveries;
}

/// Task messages the broker handed a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deliveries {
    pub deliveries: Vec<Delivery>,
}
impl Message for Deliveries {
    const KIND: &'static str = "deliveries";
}

/// One task message handed to a node: the node reports it done or handed back by `id`
/// ([`DeliveryReport`]). Its seal is bound to the node it was handed to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: u64,
    /// How many times JetStream has delivered the message (1 the first time).
    pub delivered: u64,
    /// When the broker published it, by the server's clock.
    pub published_unix_ms: u64,
    /// The task message, as the broker published it (encoded).
    pub task: Vec<u8>,
}

/// What became of deliveries (`grid.provider.<node>.report`): `done` (its results are
/// published, or it was a message to drop), `back` (handed back, to be offered again after
/// `back_delay_ms`), and `holding`: every delivery the node still holds, sent every few
/// seconds — a delivery not in it for the ack wait goes back to the queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryReport {
    pub done: Vec<u64>,
    pub back: Vec<u64>,
    pub back_delay_ms: u32,
    pub holding: Vec<u64>,
    /// Of `holding`: the deliveries whose task runs now (the others wait for a slot), so that
    /// `grid status` tells running tasks from those waiting on a node.
    pub running: Vec<u64>,
}
impl Message for DeliveryReport {
    const KIND: &'static str = "report";
}
impl Request for DeliveryReport {
    const VERB: &'static str = "report";
    type Reply = Reported;
}

/// The broker took a [`DeliveryReport`]; `unknown`: ids it does not hold for the node (taken
/// back, or handed out by a broker before a restart).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    pub unknown: Vec<u64>,
}
impl Message for Reported {
    const KIND: &'static str = "reported";
}

/// A node asks the broker for an object a task it holds needs — its module or runtime, program,
/// input or shared files (`grid.provider.<node>.fetch`): the chunks after stream sequence
/// `after_seq` (0 for the first), as many as fit in one reply. A provider reads tenants' stores
/// only this way, and only what the deliveries it holds name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub delivery: u64,
    pub sha256: Sha256Hex,
    pub after_seq: u64,
}
impl Message for FetchRequest {
    const KIND: &'static str = "fetch";
}
impl Request for FetchRequest {
    const VERB: &'static str = "fetch";
    type Reply = Fetched;
}

/// Chunks of an object, in order ([`FetchRequest`]): the object's size and chunk count as its
/// store says (the node checks the bytes against the hash it asked for), and the stream
/// sequence of the last chunk given, to ask after.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetched {
    pub size: u64,
    pub chunks: u64,
    pub data: Vec<Vec<u8>>,
    pub last_seq: u64,
}
impl Message for Fetched {
    const KIND: &'static str = "fetched";
}

/// A regular file a task left in `/out`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Relative to `/out`, `/`-separated.
    pub path: String,
    pub bytes: u64,
    pub sha256: Sha256Hex,
}

impl OutputFile {
    /// Whether `path` is one a walk of `/out` gives: relative, `/`-separated, no empty, `.` or
    /// `..` parts, no NUL, at most 4096 bytes.
    pub fn is_plain_path(path: &str) -> bool {
        !path.is_empty()
            && path.len() <= 4096
            && !path.contains('\0')
            && path
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..")
    }
}

/// Why `files` cannot be what a walk of one `/out` left, if so: a path that is not plain
/// ([`OutputFile::is_plain_path`]), a path listed twice, or a file where another's folder is.
pub fn files_clash(files: &[OutputFile]) -> Option<String> {
    if let Some(bad) = files.iter().find(|f| !OutputFile::is_plain_path(&f.path)) {
        return Some(format!(
            "output path {:?} is not a plain relative path",
            bad.path
        ));
    }
    let mut paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    paths.sort_unstable();
    for pair in paths.windows(2) {
        if pair[0] == pair[1] {
            return Some(format!("output {:?} is listed twice", pair[0]));
        }
        if pair[1].starts_with(pair[0]) && pair[1].as_bytes().get(pair[0].len()) == Some(&b'/') {
            return Some(format!(
                "output {:?} is a file and the folder of {:?}",
                pair[0], pair[1]
            ));
        }
    }
    None
}

/// What one attempt of a task used on the node that ran it: the ledger's unit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    /// Time the task's GPU calls held the node's GPU.
    pub gpu_seconds: f64,
    /// The largest linear memory the task had.
    pub peak_memory_bytes: u64,
    /// What the task was given: its params, its input file and the job's shared files.
    pub bytes_in: u64,
    /// Apparent size of `/out` when it ended.
    pub bytes_out: u64,
}

impl Usage {
    /// What can be billed of a usage a node reported, under the job's `limits`: no time past
    /// the task's time limit, no memory or output past theirs, and nothing negative or not a
    /// number. A provider cannot bill more than the limits it enforced.
    pub fn within(&self, limits: &JobLimits) -> Usage {
        let seconds = |v: f64, cap_ms: u64| {
            let cap = cap_ms as f64 / 1000.0;
            if v.is_finite() {
                v.clamp(0.0, cap)
            } else {
                0.0
            }
        };
        Usage {
            cpu_seconds: seconds(self.cpu_seconds, limits.timeout_ms),
            wall_seconds: seconds(self.wall_seconds, limits.timeout_ms),
            gpu_seconds: seconds(self.gpu_seconds, limits.gpu_time_ms.min(limits.timeout_ms)),
            peak_memory_bytes: self.peak_memory_bytes.min(limits.memory_bytes),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out.min(limits.max_output_bytes),
        }
    }

    /// Adds `other` in: times and bytes sum, peak memory is the larger.
    pub fn add(&mut self, other: &Usage) {
        self.cpu_seconds += other.cpu_seconds;
        self.wall_seconds += other.wall_seconds;
        self.gpu_seconds += other.gpu_seconds;
        self.peak_memory_bytes = self.peak_memory_bytes.max(other.peak_memory_bytes);
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
    }
}

/// One billable attempt in the usage ledger (`grid_usage`), written once by the broker when
/// the attempt's result arrives: the tenant pays for it and the provider (`node_id`) ran it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageEntry {
    pub tenant: String,
    pub job_id: String,
    pub index: u64,
    pub attempt: u32,
    pub replica: u32,
    pub node_id: String,
    pub usage: Usage,
    pub recorded_unix_ms: u64,
    /// The job's replicas per task: above 1, the provider is paid only when its result agreed
    /// with the accepted one (`digest` against the task's record), which `grid usage` checks.
    pub replicas: u32,
    /// The retry round of the attempt ([`round_of`]): a replica is judged by its own round's
    /// decision.
    pub round: u32,
    /// The result's [`result_digest`].
    pub digest: Sha256Hex,
}
impl Message for UsageEntry {
    const KIND: &'static str = "usage";
}

/// What one attempt of a task produced, published by the node that ran it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultMsg {
    /// The job's tenant: where its record and store are.
    pub tenant: String,
    pub job_id: String,
    pub index: u64,
    pub attempt: u32,
    pub replica: u32,
    pub node_id: String,
    pub outcome: Outcome,
    /// [`result_digest`] of the outcome and the files: what replicas vote with.
    pub digest: Sha256Hex,
    pub usage: Usage,
    pub files: Vec<OutputFile>,
    /// Blobs of the captured logs, when not empty.
    pub stdout: Option<Sha256Hex>,
    pub stderr: Option<Sha256Hex>,
    pub logs_truncated: bool,
    /// Of a failed attempt: the line its guest wrote last to stderr ([`last_words`]), to say
    /// why beside the reason (a panic's message beside `trap: unreachable`). The provider's
    /// word, as the logs are; the broker keeps one line of at most [`DETAIL_BYTES`].
    pub detail: Option<String>,
    /// The seal of the task message that sent this attempt ([`TaskMsg::seal`]).
    pub seal: Seal,
    /// Where the node staged each blob the result names (its files and logs, each once): the
    /// broker reads them from the node's stage, checks them against their hashes and sizes,
    /// and copies them into the tenant's store; empty in a stored task record.
    pub staged: Vec<Staged>,
}
impl Message for ResultMsg {
    const KIND: &'static str = "result";
}

/// What a node publishes on the results stream: the results of one task message's tasks
/// (one, or a run of short ones), in index order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultsMsg {
    pub results: Vec<ResultMsg>,
}
impl Message for ResultsMsg {
    const KIND: &'static str = "results";
}

/// The most bytes of a failed attempt's [`ResultMsg::detail`].
pub const DETAIL_BYTES: usize = 200;

/// The line of a failed task's `stderr` that says why: its last line with text, passing over
/// Rust's `note: run with `RUST_BACKTRACE=1`…` hint (a panic's message is the line before it),
/// as one line of at most [`DETAIL_BYTES`].
pub fn last_words(stderr: &[u8]) -> Option<String> {
    let tail = &stderr[stderr.len().saturating_sub(4 * DETAIL_BYTES)..];
    let text = String::from_utf8_lossy(tail);
    let line = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))?;
    detail_line(line)
}

/// `text` as a detail: one line of at most [`DETAIL_BYTES`] (cut at a character, marked `…`),
/// `None` when empty.
pub fn detail_line(text: &str) -> Option<String> {
    let mut line = crate::one_line(text, " ");
    if line.len() > DETAIL_BYTES {
        let mut cut = DETAIL_BYTES - '…'.len_utf8();
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    (!line.is_empty()).then_some(line)
}

impl ResultMsg {
    /// How its attempt failed, as task records and `grid status` tell it: the reason, then the
    /// guest's last words (`trap: unreachable — the guest panicked on purpose`). `None` for a
    /// success.
    pub fn failure(&self) -> Option<String> {
        let reason = self.outcome.reason()?;
        Some(match &self.detail {
            Some(detail) => format!("{reason} — {detail}"),
            None => reason.to_string(),
        })
    }

    /// The stored objects the result names: its output files and logs.
    pub fn objects(&self) -> impl Iterator<Item = Sha256Hex> + '_ {
        self.files
            .iter()
            .map(|f| f.sha256)
            .chain(self.stdout)
            .chain(self.stderr)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Succeeded,
    Failed,
    /// Its replicas did not reach a quorum.
    Disputed,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Disputed => "disputed",
        }
    }
}

/// One replica's vote on a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub replica: u32,
    pub node_id: String,
    pub digest: Sha256Hex,
    /// It agreed with the accepted result (false for every vote of a disputed task).
    pub agreed: bool,
}

/// A task's final state in `grid_tasks`, written once by the broker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub state: TaskState,
    /// Attempts made, including the counted one.
    pub attempts: u32,
    /// Why each failed attempt failed, in order.
    pub failures: Vec<String>,
    /// The accepted result (for a disputed task, the first vote's).
    pub result: ResultMsg,
    /// With replicas: every replica's vote.
    pub votes: Vec<Vote>,
    /// The job's retry round that decided it (see [`JobRecord::retried`]).
    pub round: u32,
    /// How each earlier round of this task was decided, oldest first: `grid retry` ran it
    /// again after it failed or was disputed.
    pub earlier: Vec<EarlierRound>,
}
impl Message for TaskRecord {
    const KIND: &'static str = "task-record";
}

impl TaskRecord {
    /// This record taking the place of `earlier`, a record of an earlier round of the same
    /// task: it adds that round's attempts and failures, and its decision.
    pub fn after(&self, earlier: &TaskRecord) -> TaskRecord {
        let mut record = self.clone();
        record.attempts = record.attempts.saturating_add(earlier.attempts);
        record.failures = earlier
            .failures
            .iter()
            .chain(&self.failures)
            .cloned()
            .collect();
        record.earlier = earlier.earlier.clone();
        record.earlier.push(EarlierRound {
            round: earlier.round,
            state: earlier.state,
            digest: earlier.result.digest,
            objects: earlier.result.objects().collect(),
        });
        record
    }

    /// The stored objects the record names: its result's, and its earlier rounds' (their
    /// logs and outputs stay the tenant's until the job is deleted).
    pub fn objects(&self) -> impl Iterator<Item = Sha256Hex> + '_ {
        self.result
            .objects()
            .chain(self.earlier.iter().flat_map(|r| r.objects.iter().copied()))
    }

    /// How round `round` of the task was decided: its state and accepted digest (`None` for a
    /// round not decided yet).
    pub fn verdict(&self, round: u32) -> Option<(TaskState, Sha256Hex)> {
        if round == self.round {
            return Some((self.state, self.result.digest));
        }
        self.earlier
            .iter()
            .find(|r| r.round == round)
            .map(|r| (r.state, r.digest))
    }
}

/// An earlier round's decision of a task (see [`TaskRecord::earlier`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlierRound {
    pub round: u32,
    pub state: TaskState,
    /// Its accepted result's digest (for a disputed task, the first vote's).
    pub digest: Sha256Hex,
    /// The stored objects its result named (see [`TaskRecord::objects`]).
    pub objects: Vec<Sha256Hex>,
}

/// The retry round an attempt belongs to, for a job with `retries` retries: each round owns
/// `retries + 1` attempt numbers (see [`JobRecord::first_attempt`]).
pub fn round_of(attempt: u32, retries: u32) -> u32 {
    (u64::from(attempt) / (u64::from(retries) + 1)) as u32
}

/// How a node's replica results fared in votes, in `grid_tally` (written by the broker).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTally {
    pub agreed: u64,
    /// Votes it lost: its result differed from the accepted one, or no quorum was reached.
    pub outvoted: u64,
}
impl Message for NodeTally {
    const KIND: &'static str = "tally";
}

/// What replicas of a task compare: the outcome and every output file's path, size and hash.
pub fn result_digest(outcome: &Outcome, files: &[OutputFile]) -> Sha256Hex {
    let mut text = format!(
        "{}\n",
        outcome
            .reason()
            .map_or("succeeded".into(), |r| r.to_string())
    );
    let mut lines: Vec<String> = files
        .iter()
        .map(|f| format!("{}\t{}\t{}\n", f.path, f.bytes, f.sha256))
        .collect();
    lines.sort();
    text.extend(lines);
    Sha256Hex::of(text.as_bytes())
}

/// A node's heartbeat in `grid_nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// The classes it serves: its own (`cpu` by default), and `gpu` when it has a GPU.
    pub classes: Vec<String>,
    /// Its GPU, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) (vulkan, cpu)`.
    pub gpu: Option<String>,
    pub slots: u32,
    /// Its slots for GPU tasks (0 without a GPU).
    pub gpu_slots: u32,
    /// Tasks it holds: running, or waiting for memory.
    pub busy: u32,
    /// Tasks running now (each holds its memory limit of the node's budget).
    pub running: u32,
    /// The memory limits of the running tasks together, never above `memory_budget_bytes`.
    pub memory_reserved_bytes: u64,
    /// What the provider gave its tasks in all (`--memory-budget`).
    pub memory_budget_bytes: u64,
    pub tasks_done: u64,
    pub started_unix_ms: u64,
    /// Work that delays its tasks, e.g. compiling the Python runtime (once per machine).
    pub preparing: Option<Preparing>,
    /// The runtimes it has compiled and loaded (`python`): their tasks start at once here, and
    /// the broker hands them to such nodes first.
    pub runtimes_ready: Vec<String>,
    /// The largest limits it accepts (its caps): it does not take a task of a job that asks
    /// for more.
    pub accepts: JobLimits,
}
/// Work a node does before its tasks can start ([`NodeInfo::preparing`]), and how far along.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preparing {
    /// `compiling the python runtime`, `fetching the python runtime`.
    pub what: String,
    pub started_unix_ms: u64,
    /// About how long it takes in all; 0 when the node cannot say.
    pub estimate_ms: u64,
}

impl Preparing {
    /// `compiling the python runtime: 0:40 of about 2:20`, as of `now_ms`.
    pub fn progress(&self, now_ms: u64) -> String {
        let clock = |ms: u64| format!("{}:{:02}", ms / 60_000, ms / 1000 % 60);
        let elapsed = now_ms.saturating_sub(self.started_unix_ms);
        match self.estimate_ms {
            0 => format!("{}: {}", self.what, clock(elapsed)),
            estimate => format!(
                "{}: {} of about {}",
                self.what,
                clock(elapsed),
                clock(estimate)
            ),
        }
    }
}

impl Message for NodeInfo {
    const KIND: &'static str = "node";
}

/// The default limits of a job, as the sandbox contract states them.
impl Default for JobLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 512 << 20,
            timeout_ms: 600_000,
            max_output_bytes: 1 << 30,
            gpu_memory_bytes: 256 << 20,
            gpu_time_ms: 60_000,
        }
    }
}

impl JobLimits {
    /// The least memory a task may be given. A module's memory comes in 64 KiB pages, a Rust
    /// or C program's stack alone is about 1 MiB, and a node's memory budget is counted in
    /// MiB: less is a typo, not a limit.
    pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
    /// The least time a task may be given (and the least GPU time the flags take): limits
    /// travel in whole milliseconds, and zero would end every task before it starts.
    pub const MIN_TIME: std::time::Duration = std::time::Duration::from_millis(1);

    /// Whether every task could run under these limits at all: memory of at least
    /// [`Self::MIN_MEMORY_BYTES`] and time of at least [`Self::MIN_TIME`] (part of
    /// [`JobSpec::validate`]; `grid run` and `grid submit` refuse less as they read their
    /// flags). The GPU limits may be zero: a CPU job never uses them.
    pub fn check(&self) -> Result<(), String> {
        use crate::units::{duration_text, size_text};
        if self.memory_bytes < Self::MIN_MEMORY_BYTES {
            return Err(format!(
                "a memory limit of {} is below the least a task may have, {}",
                size_text(self.memory_bytes),
                size_text(Self::MIN_MEMORY_BYTES)
            ));
        }
        if std::time::Duration::from_millis(self.timeout_ms) < Self::MIN_TIME {
            return Err(format!(
                "a time limit of {} is below the least a task may have, {}",
                crate::units::millis_text(self.timeout_ms),
                duration_text(Self::MIN_TIME)
            ));
        }
        Ok(())
    }

    /// Why a node whose caps are `caps` does not take a job with these limits (the first limit
    /// over its cap), or `None` when it does.
    pub fn over(&self, caps: &JobLimits) -> Option<String> {
        let size = |b: u64| crate::units::size_text(b);
        let time = |ms: u64| crate::units::millis_text(ms);
        [
            (
                "memory",
                self.memory_bytes,
                caps.memory_bytes,
                &size as &dyn Fn(u64) -> String,
            ),
            ("time", self.timeout_ms, caps.timeout_ms, &time),
            (
                "output",
                self.max_output_bytes,
                caps.max_output_bytes,
                &size,
            ),
            (
                "gpu memory",
                self.gpu_memory_bytes,
                caps.gpu_memory_bytes,
                &size,
            ),
            ("gpu time", self.gpu_time_ms, caps.gpu_time_ms, &time),
        ]
        .into_iter()
        .find(|(_, asked, cap, _)| asked > cap)
        .map(|(what, asked, cap, show)| format!("{what} {} over its {}", show(asked), show(cap)))
    }
}

/// Where each task's line lies in a params file stored as pages ([`TaskSource::Params`]): the
/// one lookup of a task's params line, for the broker (which sends it with the task) and for
/// `grid run --from` (which reruns the task here).
#[derive(Clone, Debug)]
pub struct ParamsIndex {
    /// The first task index of each page.
    starts: Vec<u64>,
    /// Tasks in all.
    total: u64,
}

impl ParamsIndex {
    pub fn new(pages: &[ParamsPage]) -> Self {
        let mut total = 0u64;
        let starts = pages
            .iter()
            .map(|page| {
                let start = total;
                total = total.saturating_add(page.lines);
                start
            })
            .collect();
        Self { starts, total }
    }

    /// The page that holds task `index`'s line, and the line's place among the page's task
    /// lines ([`params_lines`]); `None` past the last task.
    pub fn locate(&self, index: u64) -> Option<(usize, usize)> {
        if index >= self.total {
            return None;
        }
        let page = self
            .starts
            .partition_point(|&start| start <= index)
            .checked_sub(1)?;
        let line = usize::try_from(index - self.starts[page]).ok()?;
        Some((page, line))
    }
}

/// The task lines of a params file: every non-blank line, in order. Submit and broker both use
/// this, so that they agree on the task count.
pub fn params_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    params_line_ranges(bytes).map(|range| &bytes[range])
}

/// Where each of [`params_lines`] lies in `bytes`.
pub fn params_line_ranges(bytes: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0;
    bytes.split(|b| *b == b'\n').filter_map(move |line| {
        let range = start..start + line.len();
        start = range.end + 1;
        line.iter()
            .any(|b| !b.is_ascii_whitespace())
            .then_some(range)
    })
}

/// Bytes a params page holds at most, unless one line is longer.
pub const PARAMS_PAGE_BYTES: usize = 1 << 20;

/// Splits a params file into pages of whole lines as it reads it: each item is a page's bytes
/// and its task count. Pages without a task line are left out.
pub struct ParamsPager<R> {
    reader: R,
    page_bytes: usize,
    /// A line read that did not fit the last page: the next page's first.
    carry: Vec<u8>,
}

impl<R: std::io::BufRead> ParamsPager<R> {
    pub fn new(reader: R) -> Self {
        Self::with_page_bytes(reader, PARAMS_PAGE_BYTES)
    }

    pub fn with_page_bytes(reader: R, page_bytes: usize) -> Self {
        Self {
            reader,
            page_bytes,
            carry: Vec::new(),
        }
    }
}

impl<R: std::io::BufRead> Iterator for ParamsPager<R> {
    type Item = std::io::Result<(Vec<u8>, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut page = std::mem::take(&mut self.carry);
        let mut line = Vec::new();
        loop {
            line.clear();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // blank lines are not tasks: left out of the pages
            }
            if line.len() as u64 > caps::PARAMS_LINE_BYTES {
                return Some(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "a params line of {} bytes: the most a line may have is {}; put large inputs in files (--input DIR)",
                        line.len(),
                        caps::PARAMS_LINE_BYTES
                    ),
                )));
            }
            if !page.is_empty() && page.len() + line.len() > self.page_bytes {
                self.carry = std::mem::take(&mut line);
                break;
            }
            page.extend_from_slice(&line);
        }
        let lines = params_lines(&page).count() as u64;
        (lines > 0).then_some(Ok((page, lines)))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_last_words_of_a_failed_task_are_its_last_line_with_text() {
        let panic = b"thread 'main' panicked at src/main.rs:4:5:\nthe guest panicked on purpose\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            last_words(panic).as_deref(),
            Some("the guest panicked on purpose")
        );
        let python = b"Traceback (most recent call last):\n  File \"/job/job.py\", line 3\nValueError: no rows\n\n";
        assert_eq!(last_words(python).as_deref(), Some("ValueError: no rows"));
        assert_eq!(last_words(b"\n \n"), None);
        let long = "x".repeat(10_000) + "\n" + &"é".repeat(300);
        let words = last_words(long.as_bytes()).unwrap();
        assert!(
            words.len() <= DETAIL_BYTES && words.ends_with('…'),
            "{words}"
        );
    }
    use super::*;

    #[test]
    fn limits_no_task_can_run_under_are_refused_in_human_units() {
        assert_eq!(JobLimits::default().check(), Ok(()));
        let none = JobLimits {
            memory_bytes: 100,
            ..JobLimits::default()
        };
        assert_eq!(
            none.check(),
            Err("a memory limit of 100 B is below the least a task may have, 1 MiB".into())
        );
        let instant = JobLimits {
            timeout_ms: 0,
            ..JobLimits::default()
        };
        assert_eq!(
            instant.check(),
            Err("a time limit of 0s is below the least a task may have, 1ms".into())
        );
        let cpu_only = JobLimits {
            gpu_memory_bytes: 0,
            gpu_time_ms: 0,
            ..JobLimits::default()
        };
        assert_eq!(
            cpu_only.check(),
            Ok(()),
            "a CPU job may leave the GPU at zero"
        );
        let caps = JobLimits {
            timeout_ms: 60_000,
            ..JobLimits::default()
        };
        assert_eq!(
            JobLimits::default().over(&caps).as_deref(),
            Some("time 10m over its 1m")
        );
    }

    #[test]
    fn params_pages_hold_whole_lines_and_every_task_line_once() {
        let file = b"\n{\"a\":1}\n\n  \n{\"a\":22}\n{\"a\":333}\n\n{\"a\":4444}";
        let pages: Vec<(Vec<u8>, u64)> = ParamsPager::with_page_bytes(&file[..], 12)
            .collect::<std::io::Result<_>>()
            .unwrap();
        let lines: Vec<&[u8]> = pages.iter().flat_map(|(p, _)| params_lines(p)).collect();
        assert_eq!(lines, params_lines(file).collect::<Vec<_>>());
        assert_eq!(lines.len(), 4);
        for (page, count) in &pages {
            assert_eq!(params_lines(page).count() as u64, *count);
            assert!(*count > 0, "no page without a task");
            assert!(
                page.len() <= 12 || *count == 1,
                "a page is over its size only for one long line"
            );
        }
        assert!(pages.len() >= 3, "{pages:?}");
        assert!(ParamsPager::new(&b"\n \n\n"[..]).next().is_none());
        let pages = [3, 0, 2].map(|lines| ParamsPage {
            sha256: Sha256Hex::of(b"page"),
            lines,
        });
        let index = ParamsIndex::new(&pages);
        let found: Vec<_> = (0..6).map(|i| index.locate(i)).collect();
        assert_eq!(
            found,
            [
                Some((0, 0)),
                Some((0, 1)),
                Some((0, 2)),
                Some((2, 0)),
                Some((2, 1)),
                None
            ]
        );
    }

    #[test]
    fn billed_usage_stays_within_the_limits() {
        let limits = JobLimits {
            timeout_ms: 2_000,
            gpu_time_ms: 500,
            memory_bytes: 1 << 20,
            max_output_bytes: 10,
            ..JobLimits::default()
        };
        let claimed = Usage {
            cpu_seconds: f64::NAN,
            wall_seconds: 1e9,
            gpu_seconds: -3.0,
            peak_memory_bytes: u64::MAX,
            bytes_in: 7,
            bytes_out: 1 << 40,
        };
        let billed = claimed.within(&limits);
        assert_eq!(billed.cpu_seconds, 0.0);
        assert_eq!(billed.wall_seconds, 2.0);
        assert_eq!(billed.gpu_seconds, 0.0);
        assert_eq!(billed.peak_memory_bytes, 1 << 20);
        assert_eq!(billed.bytes_in, 7);
        assert_eq!(billed.bytes_out, 10);
        let honest = Usage {
            cpu_seconds: 0.5,
            wall_seconds: 0.6,
            gpu_seconds: 0.1,
            ..Usage::default()
        };
        assert_eq!(honest.within(&limits), honest);
    }

    #[test]
    fn round_trip_and_rejections() {
        let msg = CancelRequest {
            job_id: "j1".into(),
        };
        let bytes = encode(&msg);
        assert_eq!(decode::<CancelRequest>(&bytes).unwrap().job_id, "j1");
        assert!(matches!(
            decode::<TaskMsg>(&bytes),
            Err(WireError::Kind { .. })
        ));
        assert!(matches!(
            decode::<TaskMsg>(b"\xff\xff\xff"),
            Err(WireError::Garbled(_))
        ));
        let future = postcard::to_stdvec(&Envelope {
            version: 99,
            kind: "cancel".into(),
            body: vec![],
        })
        .unwrap();
        assert_eq!(
            decode::<CancelRequest>(&future),
            Err(WireError::Version {
                got: 99,
                want: WIRE_VERSION
            })
        );
    }
}
