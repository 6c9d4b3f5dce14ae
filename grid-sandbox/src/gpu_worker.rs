//! The GPU worker: a child process that owns the node's GPU, so that GPU work can be stopped.
//!
//! wgpu cannot cancel a submission: a dispatch that runs too long (a `loop {}` kernel on a real
//! GPU, a huge dispatch of long invocations on lavapipe) keeps the device busy however long the
//! task's GPU time limit is. So no task touches wgpu in the node's process. The node starts one
//! worker process (the node's own executable with [`WORKER_ARG`]) that opens the device and runs
//! every task's [`GpuSession`]; the node talks to it over its stdin and stdout.
//!
//! - **One call at a time.** The node sends one request and waits for its reply before it sends
//!   the next, from whichever task. A dispatch waits for its GPU work, so while a call runs the
//!   device does only that task's work: the time a call takes is that task's GPU time, and no task
//!   is charged for another's work. The cost is that tasks do not overlap GPU work, which a single
//!   queue would mostly serialize anyway.
//! - **Overrun.** Each call may take at most the task's remaining GPU time. Past it, the node kills
//!   the worker (SIGKILL frees the device, whatever the GPU was doing), the task ends with
//!   `limit: gpu-time`, and the next call starts a fresh worker.
//! - **Others caught in a restart.** A task that had GPU objects in the killed worker cannot go
//!   on; its next call ends it with [`GpuLost`], reported as `lost`, which a node hands back to
//!   the grid to run again without charging the task's retries. A task that had no live objects
//!   there (the node counts them) just opens its session in the new worker.
//! - **Crash.** If the worker dies during a call (a driver crash), the task of that call ends
//!   with `trap: …` (it may have caused it) and the others are lost as above. A worker that
//!   cannot start again makes its callers `lost` too: another node may run them.
//! - **A task that ends mid-call** (cancelled, out of wall time) leaves its call running to its
//!   end (the pipe must not be left mid-frame), but a call never runs past the task's wall
//!   deadline, and a closed session is never reopened.
//! - **The worker is not trusted blindly either**: reply lengths are checked against what was
//!   asked before anything is allocated, and the worker keeps frames on a private copy of its
//!   stdout, pointing fd 1 at stderr so that nothing a driver prints can corrupt them.
//!
//! Wire: each frame is `u32 length (LE) · u32 header length · postcard header · raw payload`;
//! buffer contents travel as the raw payload, never through serde.

use grid_gpu::{GpuDevice, GpuError, GpuErrorKind, GpuInfo, GpuLimits, GpuSession, Handle};
use grid_proto::Limit;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The first argument that makes a Grid executable serve as a GPU worker (see [`serve_if_asked`]).
pub const WORKER_ARG: &str = "__grid-gpu-worker";
/// How long a new worker may take to open the device.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long opening or closing a session may take (no GPU work): past it the worker is stuck.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest postcard header either side accepts.
const MAX_HEADER: u32 = 64 << 10;
/// Largest payload a call may carry: a frame's length is a `u32`.
const MAX_PAYLOAD: u64 = (u32::MAX - 2 * MAX_HEADER) as u64;
/// Size asked for the pipes to the worker.
const PIPE_BYTES: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Open {
        session: u64,
        limits: GpuLimits,
    },
    Close {
        session: u64,
    },
    BufferCreate {
        session: u64,
        size: u64,
    },
    /// The data is the frame's payload.
    Write {
        session: u64,
        buffer: Handle,
        offset: u64,
    },
    Read {
        session: u64,
        buffer: Handle,
        offset: u64,
        len: u64,
    },
    KernelCreate {
        session: u64,
        wgsl: String,
        entry: String,
    },
    Dispatch {
        session: u64,
        kernel: Handle,
        buffers: Vec<Handle>,
        groups: [u32; 3],
    },
    Destroy {
        session: u64,
        handle: Handle,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    /// The first frame of a worker that opened its device.
    Ready(GpuInfo),
    /// The first frame of a worker that found no GPU; the worker then exits.
    NoGpu(String),
    Done,
    Handle(Handle),
    /// The bytes are the frame's payload.
    Bytes,
    Failed(GpuError),
}

/// A GPU call: what to do, and for writes, the data.
pub enum GpuCall {
    BufferCreate {
        size: u64,
    },
    Write {
        buffer: Handle,
        offset: u64,
        data: Vec<u8>,
    },
    Read {
        buffer: Handle,
        offset: u64,
        len: u64,
    },
    KernelCreate {
        wgsl: String,
        entry: String,
    },
    Dispatch {
        kernel: Handle,
        buffers: Vec<Handle>,
        groups: [u32; 3],
    },
    Destroy {
        handle: Handle,
    },
}

/// What a successful call gives back.
#[derive(Debug)]
pub enum GpuValue {
    Done,
    Handle(Handle),
    Bytes(Vec<u8>),
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// The call failed inside the session (a status for the guest, or a limit).
    Gpu(GpuError),
    /// The worker was restarted after another task's overrun or crash and took this task's
    /// objects with it, or it cannot start: the task can run again, here or elsewhere.
    Lost,
    /// The worker died during this call.
    Crashed(String),
}

/// A task that cannot go on because the node's GPU worker was restarted under it (or cannot
/// start); reported as `lost`.
#[derive(Debug, thiserror::Error)]
#[error("the node's GPU worker was restarted under the task; the task can run again")]
pub struct GpuLost;

/// Runs this process as a GPU worker when it was started as one, and exits. Call it first thing
/// in `main` of every executable that may start a worker (`grid`, `grid-node`), with the
/// executable's own logging setup (`grid_client::init_tracing`), which a worker runs before it
/// serves: the sandbox leaves logging to the program that embeds it.
pub fn serve_if_asked(init_tracing: impl FnOnce()) {
    if std::env::args_os().nth(1).is_some_and(|a| a == WORKER_ARG) {
        init_tracing();
        std::process::exit(serve());
    }
}

fn serve() -> i32 {
    // Frames go to a private copy of stdout; fd 1 becomes stderr, so that whatever a driver
    // prints cannot corrupt the frame stream.
    let Ok(frames) = rustix::io::dup(std::io::stdout()) else {
        return 1;
    };
    if rustix::stdio::dup2_stdout(std::io::stderr()).is_err() {
        return 1;
    }
    let mut input = std::io::BufReader::new(std::io::stdin().lock());
    let mut output = std::io::BufWriter::new(std::fs::File::from(frames));
    let gpu = match GpuDevice::open(false) {
        Ok(gpu) => Arc::new(gpu),
        Err(e) => {
            let _ = write_frame_sync(&mut output, &Reply::NoGpu(e), &[]);
            return 0;
        }
    };
    gpu.on_lost(|why| {
        tracing::error!("the GPU device was lost: {why}");
        std::process::exit(3);
    });
    if write_frame_sync(&mut output, &Reply::Ready(gpu.info().clone()), &[]).is_err() {
        return 0;
    }
    let mut sessions: HashMap<u64, GpuSession> = HashMap::new();
    loop {
        let (request, payload) = match read_frame_sync::<Request>(&mut input) {
            Ok(frame) => frame,
            Err(_) => return 0, // the node went away
        };
        let mut bytes = Vec::new();
        let reply = handle(&gpu, &mut sessions, request, payload, &mut bytes);
        if write_frame_sync(&mut output, &reply, &bytes).is_err() {
            return 0;
        }
    }
}

fn handle(
    gpu: &Arc<GpuDevice>,
    sessions: &mut HashMap<u64, GpuSession>,
    request: Request,
    payload: Vec<u8>,
    bytes: &mut Vec<u8>,
) -> Reply {
    let session_id = match &request {
        Request::Open { session, limits } => {
            sessions.insert(*session, GpuSession::new(gpu.clone(), limits.clone()));
            return Reply::Done;
        }
        Request::Close { session } => {
            sessions.remove(session);
            return Reply::Done;
        }
        Request::BufferCreate { session, .. }
        | Request::Write { session, .. }
        | Request::Read { session, .. }
        | Request::KernelCreate { session, .. }
        | Request::Dispatch { session, .. }
        | Request::Destroy { session, .. } => *session,
    };
    let Some(s) = sessions.get_mut(&session_id) else {
        return Reply::Failed(GpuError {
            kind: GpuErrorKind::Device,
            message: format!("no GPU session {session_id} in this worker"),
        });
    };
    let result = match request {
        Request::BufferCreate { size, .. } => s.create_buffer(size).map(Reply::Handle),
        Request::Write { buffer, offset, .. } => {
            s.write(buffer, offset, &payload).map(|()| Reply::Done)
        }
        Request::Read {
            buffer,
            offset,
            len,
            ..
        } => s.read(buffer, offset, len).map(|data| {
            *bytes = data;
            Reply::Bytes
        }),
        Request::KernelCreate { wgsl, entry, .. } => {
            s.create_kernel(&wgsl, &entry).map(Reply::Handle)
        }
        Request::Dispatch {
            kernel,
            buffers,
            groups,
            ..
        } => s.dispatch(kernel, &buffers, groups).map(|()| Reply::Done),
        Request::Destroy { handle, .. } => s.destroy(handle).map(|()| Reply::Done),
        Request::Open { .. } | Request::Close { .. } => unreachable!("handled above"),
    };
    result.unwrap_or_else(Reply::Failed)
}

fn frame_header<T: Serialize>(header: &T, payload_len: usize) -> std::io::Result<Vec<u8>> {
    let head = postcard::to_stdvec(header).map_err(std::io::Error::other)?;
    let total = 4 + head.len() + payload_len;
    let total = u32::try_from(total).map_err(|_| std::io::Error::other("GPU frame over 4 GiB"))?;
    let mut out = Vec::with_capacity(8 + head.len());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    Ok(out)
}

/// Splits a frame's length (after the leading `u32`) into header and payload lengths.
fn frame_lengths(total: u32, head_len: u32) -> std::io::Result<(usize, usize)> {
    let payload = total
        .checked_sub(4)
        .and_then(|rest| rest.checked_sub(head_len))
        .filter(|_| head_len <= MAX_HEADER)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "garbled GPU frame"))?;
    Ok((head_len as usize, payload as usize))
}

fn header_of<T: DeserializeOwned>(head: &[u8]) -> std::io::Result<T> {
    postcard::from_bytes(head)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "garbled GPU frame"))
}

fn write_frame_sync<T: Serialize>(
    out: &mut impl Write,
    header: &T,
    payload: &[u8],
) -> std::io::Result<()> {
    out.write_all(&frame_header(header, payload.len())?)?;
    out.write_all(payload)?;
    out.flush()
}

fn read_frame_sync<T: DeserializeOwned>(input: &mut impl Read) -> std::io::Result<(T, Vec<u8>)> {
    let mut lengths = [0u8; 8];
    input.read_exact(&mut lengths)?;
    let [t0, t1, t2, t3, h0, h1, h2, h3] = lengths;
    let (head_len, payload_len) = frame_lengths(
        u32::from_le_bytes([t0, t1, t2, t3]),
        u32::from_le_bytes([h0, h1, h2, h3]),
    )?;
    let mut head = vec![0u8; head_len];
    input.read_exact(&mut head)?;
    // The payload (buffer contents) is read straight into its own vector: no copy.
    let mut payload = vec![0u8; payload_len];
    input.read_exact(&mut payload)?;
    Ok((header_of(&head)?, payload))
}

/// A running worker process and the pipes to it.
struct Conn {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    generation: u64,
}

impl Conn {
    async fn send(&mut self, request: &Request, payload: &[u8]) -> std::io::Result<()> {
        self.stdin
            .write_all(&frame_header(request, payload.len())?)
            .await?;
        self.stdin.write_all(payload).await?;
        self.stdin.flush().await
    }

    /// Reads a reply whose payload is `expected` bytes long (a read's length, else 0); any
    /// other length is refused before anything is allocated.
    async fn receive(&mut self, expected: usize) -> std::io::Result<(Reply, Vec<u8>)> {
        let total = self.stdout.read_u32_le().await?;
        let head_len = self.stdout.read_u32_le().await?;
        let (head_len, payload_len) = frame_lengths(total, head_len)?;
        if payload_len != expected && payload_len != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the GPU worker sent {payload_len} bytes for {expected}"),
            ));
        }
        let mut head = vec![0u8; head_len];
        self.stdout.read_exact(&mut head).await?;
        let mut payload = vec![0u8; payload_len];
        self.stdout.read_exact(&mut payload).await?;
        Ok((header_of(&head)?, payload))
    }

    async fn round_trip(
        &mut self,
        request: &Request,
        payload: &[u8],
    ) -> std::io::Result<(Reply, Vec<u8>)> {
        let expected = match request {
            Request::Read { len, .. } => *len as usize,
            _ => 0,
        };
        self.send(request, payload).await?;
        self.receive(expected).await
    }
}

/// The node's state of its worker, behind one lock: holding it is holding the GPU.
struct State {
    conn: Option<Conn>,
    /// Where each open session lives.
    bound: HashMap<u64, Bound>,
    generation: u64,
}

/// A session's place in a worker: its generation, and how many objects it holds there.
#[derive(Clone, Copy)]
struct Bound {
    generation: u64,
    objects: u64,
}

/// What a session shares with its calls, which may outlive the task (see [`GpuWorker::call`]).
#[derive(Default)]
struct SessionShared {
    /// The task ended: its session must not be opened (again).
    closed: AtomicBool,
    /// GPU time used, in nanoseconds.
    used_nanos: AtomicU64,
}

/// How to start a worker: an executable that calls [`serve_if_asked`], and its arguments.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl WorkerCommand {
    /// This very executable, with [`WORKER_ARG`].
    pub fn current_exe() -> std::io::Result<Self> {
        // Through /proc: a node that dropped to an unprivileged user may not be able to reach
        // its own binary by path (say, under root's home), but may still run it.
        let proc_exe = PathBuf::from("/proc/self/exe");
        Ok(Self {
            program: if proc_exe.exists() {
                proc_exe
            } else {
                std::env::current_exe()?
            },
            args: vec![WORKER_ARG.into()],
        })
    }

    /// `program` with [`WORKER_ARG`] (for tests and benches, whose own executable is not one).
    pub fn of(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: vec![WORKER_ARG.into()],
        }
    }
}

/// The node side of the GPU worker: starts it, sends it calls one at a time, kills and restarts
/// it on overrun. Shared by all tasks of a node.
pub struct GpuWorker {
    command: WorkerCommand,
    info: GpuInfo,
    state: tokio::sync::Mutex<State>,
    next_session: AtomicU64,
    restarts: AtomicU64,
    pid: AtomicU32,
}

impl GpuWorker {
    /// Starts a worker and waits until it has opened the GPU. `Err` says why there is no GPU
    /// (with the install command for lavapipe when there is no driver at all).
    pub async fn start(command: WorkerCommand) -> Result<Arc<Self>, String> {
        let (conn, info) = spawn(&command, 0).await?;
        let pid = AtomicU32::new(conn.child.id().unwrap_or(0));
        tracing::info!(adapter = %info.name, backend = %info.backend, kind = %info.device_type, "GPU worker ready");
        Ok(Arc::new(Self {
            command,
            info,
            state: tokio::sync::Mutex::new(State {
                conn: Some(conn),
                bound: HashMap::new(),
                generation: 0,
            }),
            next_session: AtomicU64::new(1),
            restarts: AtomicU64::new(0),
            pid,
        }))
    }

    /// The GPU the worker opened.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// The process id of the latest worker (for operators and fault tests). Read without the
    /// lock, so it answers while a call runs.
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// How often the worker was killed and restarted (overruns and crashes).
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// A new session for one task, whose calls may not run past `deadline` (the task's wall
    /// deadline); it opens in the worker on its first call.
    pub fn session(self: &Arc<Self>, limits: GpuLimits, deadline: Instant) -> RemoteSession {
        RemoteSession {
            worker: self.clone(),
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            limits,
            deadline,
            shared: Arc::new(SessionShared::default()),
        }
    }

    /// Sends one call of `session` and waits for it at most `budget`. Runs as its own tokio task,
    /// so a caller that goes away (a cancelled task) never leaves the pipe mid-frame; the time
    /// the call held the GPU is added to the session's.
    async fn call(
        self: &Arc<Self>,
        session: u64,
        shared: Arc<SessionShared>,
        limits: GpuLimits,
        call: GpuCall,
        budget: Duration,
    ) -> Result<GpuValue, CallError> {
        let worker = self.clone();
        let handle = tokio::spawn(async move {
            let (result, used) = worker
                .call_locked(session, &shared, limits, call, budget)
                .await;
            shared
                .used_nanos
                .fetch_add(used.as_nanos() as u64, Ordering::Relaxed);
            result
        });
        match handle.await {
            Ok(result) => result,
            Err(e) => {
                // The call may have stopped between a request and its reply.
                let mut state = self.state.lock().await;
                self.kill(&mut state, "a GPU call panicked");
                Err(CallError::Crashed(format!("GPU call panicked: {e}")))
            }
        }
    }

    async fn call_locked(
        &self,
        session: u64,
        shared: &SessionShared,
        limits: GpuLimits,
        call: GpuCall,
        budget: Duration,
    ) -> (Result<GpuValue, CallError>, Duration) {
        let gpu_time = limits.gpu_time;
        let mut state = self.state.lock().await;
        if shared.closed.load(Ordering::Acquire) {
            return (Err(CallError::Lost), Duration::ZERO);
        }
        if let Some(conn) = state.conn.as_mut()
            && !matches!(conn.child.try_wait(), Ok(None))
        {
            self.kill(&mut state, "the GPU worker exited between calls");
        }
        if state.conn.is_none() {
            let generation = state.generation + 1;
            match spawn(&self.command, generation).await {
                Ok((conn, _)) => {
                    self.pid
                        .store(conn.child.id().unwrap_or(0), Ordering::Relaxed);
                    state.conn = Some(conn);
                    state.generation = generation;
                }
                Err(e) => {
                    // Not this task's fault: it goes back to the grid.
                    tracing::warn!("the GPU worker cannot start again: {e}");
                    return (Err(CallError::Lost), Duration::ZERO);
                }
            }
        }
        let generation = state.generation;
        match state.bound.get(&session) {
            Some(b) if b.generation == generation => {}
            Some(b) if b.objects > 0 => return (Err(CallError::Lost), Duration::ZERO),
            _ => {
                // New, or holding nothing in the worker that was lost: open here.
                let open = Request::Open { session, limits };
                let Some(conn) = state.conn.as_mut() else {
                    return (Err(CallError::Lost), Duration::ZERO);
                };
                match tokio::time::timeout(CONTROL_TIMEOUT, conn.round_trip(&open, &[])).await {
                    Ok(Ok((Reply::Done, _))) => {}
                    other => {
                        self.kill(&mut state, &format!("opening a session failed: {other:?}"));
                        return (Err(CallError::Lost), Duration::ZERO);
                    }
                }
                state.bound.insert(
                    session,
                    Bound {
                        generation,
                        objects: 0,
                    },
                );
            }
        }
        let destroys = matches!(call, GpuCall::Destroy { .. });
        let (request, payload) = request_of(session, call);
        let Some(conn) = state.conn.as_mut() else {
            return (Err(CallError::Lost), Duration::ZERO);
        };
        let started = Instant::now();
        let replied = tokio::time::timeout(budget, conn.round_trip(&request, &payload)).await;
        let used = started.elapsed();
        let result = match replied {
            Ok(Ok((reply, bytes))) => match reply {
                Reply::Done => Ok(GpuValue::Done),
                Reply::Handle(h) => Ok(GpuValue::Handle(h)),
                Reply::Bytes => Ok(GpuValue::Bytes(bytes)),
                Reply::Failed(e) => {
                    if e.kind == GpuErrorKind::Limit(Limit::GpuTime) {
                        // The worker gave up waiting; the device may still be busy.
                        self.kill(&mut state, "a task's GPU work ran past its GPU time");
                    }
                    Err(CallError::Gpu(e))
                }
                Reply::Ready(_) | Reply::NoGpu(_) => {
                    self.kill(&mut state, "the GPU worker spoke out of turn");
                    Err(CallError::Crashed(
                        "the GPU worker spoke out of turn".into(),
                    ))
                }
            },
            Ok(Err(e)) => {
                self.kill(&mut state, &format!("the GPU worker died: {e}"));
                Err(CallError::Crashed(format!(
                    "the GPU worker died during this task's call ({e})"
                )))
            }
            Err(_elapsed) => {
                self.kill(&mut state, "a task's GPU work ran past its time");
                Err(CallError::Gpu(GpuError {
                    kind: GpuErrorKind::Limit(Limit::GpuTime),
                    message: format!("GPU work ran past the task's GPU time limit of {gpu_time:?}"),
                }))
            }
        };
        if let Some(b) = state.bound.get_mut(&session) {
            match &result {
                Ok(GpuValue::Handle(_)) => b.objects += 1,
                Ok(_) if destroys => b.objects = b.objects.saturating_sub(1),
                _ => {}
            }
        }
        (result, used)
    }

    /// Kills the worker (the next call starts a new one); sessions with objects in it are lost.
    fn kill(&self, state: &mut State, why: &str) {
        if let Some(mut conn) = state.conn.take() {
            let _ = conn.child.start_kill();
            self.restarts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                generation = conn.generation,
                "restarting the GPU worker: {why}"
            );
            tokio::spawn(async move {
                let _ = conn.child.wait().await;
            });
        }
    }

    /// Frees a session's objects in the worker (if it still lives there).
    async fn close(&self, session: u64) {
        let mut state = self.state.lock().await;
        let Some(bound) = state.bound.remove(&session) else {
            return;
        };
        if bound.generation != state.generation {
            return;
        }
        let Some(conn) = state.conn.as_mut() else {
            return;
        };
        let closed = tokio::time::timeout(
            CONTROL_TIMEOUT,
            conn.round_trip(&Request::Close { session }, &[]),
        )
        .await;
        if !matches!(closed, Ok(Ok((Reply::Done, _)))) {
            self.kill(&mut state, &format!("closing a session failed: {closed:?}"));
        }
    }
}

fn request_of(session: u64, call: GpuCall) -> (Request, Vec<u8>) {
    match call {
        GpuCall::BufferCreate { size } => (Request::BufferCreate { session, size }, Vec::new()),
        GpuCall::Write {
            buffer,
            offset,
            data,
        } => (
            Request::Write {
                session,
                buffer,
                offset,
            },
            data,
        ),
        GpuCall::Read {
            buffer,
            offset,
            len,
        } => (
            Request::Read {
                session,
                buffer,
                offset,
                len,
            },
            Vec::new(),
        ),
        GpuCall::KernelCreate { wgsl, entry } => (
            Request::KernelCreate {
                session,
                wgsl,
                entry,
            },
            Vec::new(),
        ),
        GpuCall::Dispatch {
            kernel,
            buffers,
            groups,
        } => (
            Request::Dispatch {
                session,
                kernel,
                buffers,
                groups,
            },
            Vec::new(),
        ),
        GpuCall::Destroy { handle } => (Request::Destroy { session, handle }, Vec::new()),
    }
}

/// A directory only this user can use, for a worker's `XDG_RUNTIME_DIR`.
fn private_runtime_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = std::env::temp_dir().join(format!(
        "grid-runtime-{}",
        rustix::process::getuid().as_raw()
    ));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    let private = meta.is_dir()
        && meta.uid() == rustix::process::getuid().as_raw()
        && meta.permissions().mode() & 0o077 == 0;
    private.then_some(dir)
}

/// Starts a worker process and reads its first frame.
async fn spawn(command: &WorkerCommand, generation: u64) -> Result<(Conn, GpuInfo), String> {
    let mut cmd = tokio::process::Command::new(&command.program);
    // Vulkan's window-system probing (libwayland) prints "XDG_RUNTIME_DIR is invalid or not
    // set" on every start unless it names an absolute path; empty counts as unset.
    let usable = std::env::var_os("XDG_RUNTIME_DIR")
        .is_some_and(|dir| std::path::Path::new(&dir).is_absolute());
    if !usable && let Some(dir) = private_runtime_dir() {
        cmd.env("XDG_RUNTIME_DIR", dir);
    }
    let mut child = cmd
        .args(&command.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting the GPU worker {}: {e}", command.program.display()))?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("the GPU worker has no pipes".into());
    };
    // Buffer contents cross these pipes: 1 MiB pipes (Linux's default ceiling) instead of 64 KiB
    // mean far fewer wake-ups per transfer. Best effort: smaller pipes only cost speed.
    let _ = rustix::pipe::fcntl_setpipe_size(&stdin, PIPE_BYTES);
    let _ = rustix::pipe::fcntl_setpipe_size(&stdout, PIPE_BYTES);
    let mut conn = Conn {
        child,
        stdin,
        stdout: BufReader::new(stdout),
        generation,
    };
    match tokio::time::timeout(START_TIMEOUT, conn.receive(0)).await {
        Ok(Ok((Reply::Ready(info), _))) => Ok((conn, info)),
        Ok(Ok((Reply::NoGpu(why), _))) => Err(why),
        Ok(Ok((other, _))) => Err(format!("the GPU worker started with {other:?}")),
        Ok(Err(e)) => Err(format!(
            "the GPU worker {} exited before opening the GPU ({e}); is it a Grid executable?",
            command.program.display()
        )),
        Err(_) => Err(format!(
            "the GPU worker did not open the GPU within {START_TIMEOUT:?}"
        )),
    }
}

/// One task's GPU session in the worker: its limits and the GPU time it has used. Dropping it
/// frees the task's objects in the worker.
pub struct RemoteSession {
    worker: Arc<GpuWorker>,
    id: u64,
    limits: GpuLimits,
    deadline: Instant,
    shared: Arc<SessionShared>,
}

fn refused(kind: GpuErrorKind, message: String) -> CallError {
    CallError::Gpu(GpuError { kind, message })
}

impl RemoteSession {
    /// GPU time used so far: the time this task's calls held the worker.
    pub fn gpu_time_used(&self) -> Duration {
        Duration::from_nanos(self.shared.used_nanos.load(Ordering::Relaxed))
    }

    /// The task's GPU limits.
    pub fn limits(&self) -> &GpuLimits {
        &self.limits
    }

    /// Refuses at once what cannot fit any buffer or kernel of this task, so that it never
    /// crosses the pipe.
    fn precheck(&self, call: &GpuCall) -> Result<(), CallError> {
        let max = self.limits.max_buffer_bytes.min(MAX_PAYLOAD);
        match call {
            GpuCall::BufferCreate { size: 0 } => Err(refused(
                GpuErrorKind::BadArgument,
                "buffer size 0 is not a positive multiple of 4".into(),
            )),
            GpuCall::Write { data, .. } if data.len() as u64 > max => Err(refused(
                GpuErrorKind::BadArgument,
                format!(
                    "a write of {} bytes, over the task's GPU memory of {}",
                    data.len(),
                    grid_proto::units::size_text(max)
                ),
            )),
            GpuCall::Read { len, .. } if *len > max => Err(refused(
                GpuErrorKind::BadArgument,
                format!(
                    "a read of {len} bytes, over the task's GPU memory of {}",
                    grid_proto::units::size_text(max)
                ),
            )),
            GpuCall::KernelCreate { wgsl, .. } if wgsl.len() > self.limits.max_shader_bytes => {
                Err(refused(
                    GpuErrorKind::Shader,
                    format!(
                        "shader source of {} bytes, over the cap of {}",
                        wgsl.len(),
                        self.limits.max_shader_bytes
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Runs one call within the task's remaining GPU time and wall time.
    pub async fn call(&mut self, call: GpuCall) -> Result<GpuValue, CallError> {
        self.precheck(&call)?;
        let remaining = self.limits.gpu_time.saturating_sub(self.gpu_time_used());
        if remaining.is_zero() {
            return Err(refused(
                GpuErrorKind::Limit(Limit::GpuTime),
                format!(
                    "the task used its GPU time limit of {:?}",
                    self.limits.gpu_time
                ),
            ));
        }
        let budget = remaining.min(self.deadline.saturating_duration_since(Instant::now()));
        let result = self
            .worker
            .call(
                self.id,
                self.shared.clone(),
                self.limits.clone(),
                call,
                budget,
            )
            .await;
        match result {
            Ok(_) if self.gpu_time_used() > self.limits.gpu_time => Err(refused(
                GpuErrorKind::Limit(Limit::GpuTime),
                format!(
                    "GPU work ran past the task's GPU time limit of {:?}",
                    self.limits.gpu_time
                ),
            )),
            other => other,
        }
    }
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        let (worker, id) = (self.worker.clone(), self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { worker.close(id).await });
        }
    }
}
