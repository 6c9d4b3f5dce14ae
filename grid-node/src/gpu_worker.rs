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
//!   the grid to run again without charging the task's retries. A task that had no objects there
//!   just opens its session in the new worker.
//! - **Crash.** If the worker dies during a call (a driver crash), the task of that call ends
//!   with `trap: …` (it may have caused it) and the others are lost as above.
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
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The first argument that makes a Grid executable serve as a GPU worker (see [`serve_if_asked`]).
pub const WORKER_ARG: &str = "__grid-gpu-worker";
/// How long a new worker may take to open the device.
const START_TIMEOUT: Duration = Duration::from_secs(60);
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
    /// The worker was restarted after another task's overrun or crash, and took this task's
    /// objects with it.
    Lost,
    /// The worker died during this call.
    Crashed(String),
}

/// A task that cannot go on because the GPU worker was restarted under it; reported as `lost`.
#[derive(Debug, thiserror::Error)]
#[error("the GPU worker was restarted after another task's fault; the task can run again")]
pub struct GpuLost;

/// Runs this process as a GPU worker when it was started as one, and exits. Call it first thing
/// in `main` of every executable that may start a worker (`grid`, `grid-node`).
pub fn serve_if_asked() {
    if std::env::args_os().nth(1).is_some_and(|a| a == WORKER_ARG) {
        grid_client::init_tracing();
        std::process::exit(serve());
    }
}

fn serve() -> i32 {
    let mut input = std::io::BufReader::new(std::io::stdin().lock());
    let mut output = std::io::BufWriter::new(std::io::stdout().lock());
    let gpu = match GpuDevice::open(false) {
        Ok(gpu) => Arc::new(gpu),
        Err(e) => {
            let _ = write_frame_sync(&mut output, &Reply::NoGpu(e), &[]);
            return 0;
        }
    };
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
    if head_len > total.saturating_sub(4) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "garbled GPU frame",
        ));
    }
    Ok((head_len as usize, (total - 4 - head_len) as usize))
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

    async fn receive(&mut self) -> std::io::Result<(Reply, Vec<u8>)> {
        let total = self.stdout.read_u32_le().await?;
        let head_len = self.stdout.read_u32_le().await?;
        let (head_len, payload_len) = frame_lengths(total, head_len)?;
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
        self.send(request, payload).await?;
        self.receive().await
    }
}

/// The node's state of its worker, behind one lock: holding it is holding the GPU.
struct State {
    conn: Option<Conn>,
    /// The worker generation each open session lives in.
    bound: HashMap<u64, u64>,
    generation: u64,
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
        Ok(Self {
            program: std::env::current_exe()?,
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

    /// A new session for one task; it opens in the worker on its first call.
    pub fn session(self: &Arc<Self>, limits: GpuLimits) -> RemoteSession {
        RemoteSession {
            worker: self.clone(),
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            limits,
            used: Duration::ZERO,
        }
    }

    /// Sends one call of `session` and waits for it at most `budget`. Runs as its own tokio task,
    /// so a caller that goes away (a cancelled task) never leaves the pipe mid-frame. Returns the
    /// result and the time the call held the GPU.
    async fn call(
        self: &Arc<Self>,
        session: u64,
        limits: GpuLimits,
        call: GpuCall,
        budget: Duration,
    ) -> (Result<GpuValue, CallError>, Duration) {
        let worker = self.clone();
        let handle =
            tokio::spawn(async move { worker.call_locked(session, limits, call, budget).await });
        handle.await.unwrap_or_else(|e| {
            (
                Err(CallError::Crashed(format!("GPU call panicked: {e}"))),
                Duration::ZERO,
            )
        })
    }

    async fn call_locked(
        &self,
        session: u64,
        limits: GpuLimits,
        call: GpuCall,
        budget: Duration,
    ) -> (Result<GpuValue, CallError>, Duration) {
        let gpu_time = limits.gpu_time;
        let mut state = self.state.lock().await;
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
                Err(e) => return (Err(CallError::Crashed(e)), Duration::ZERO),
            }
        }
        let generation = state.generation;
        match state.bound.get(&session) {
            Some(g) if *g != generation => return (Err(CallError::Lost), Duration::ZERO),
            Some(_) => {}
            None => {
                let open = Request::Open { session, limits };
                let conn = state.conn.as_mut().expect("started above");
                if let Err(e) = conn.round_trip(&open, &[]).await {
                    self.kill(&mut state, &format!("the GPU worker failed: {e}"));
                    return (Err(CallError::Crashed(e.to_string())), Duration::ZERO);
                }
                state.bound.insert(session, generation);
            }
        }
        let (request, payload) = request_of(session, call);
        let conn = state.conn.as_mut().expect("started above");
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
                self.kill(&mut state, "a task's GPU work ran past its GPU time");
                Err(CallError::Gpu(GpuError {
                    kind: GpuErrorKind::Limit(Limit::GpuTime),
                    message: format!("GPU work ran past the task's GPU time limit of {gpu_time:?}"),
                }))
            }
        };
        (result, used)
    }

    /// Kills the worker (the next call starts a new one); sessions bound to it are lost.
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
        let Some(generation) = state.bound.remove(&session) else {
            return;
        };
        if generation != state.generation {
            return;
        }
        if let Some(conn) = state.conn.as_mut()
            && let Err(e) = conn.round_trip(&Request::Close { session }, &[]).await
        {
            self.kill(&mut state, &format!("the GPU worker failed: {e}"));
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
    if std::env::var_os("XDG_RUNTIME_DIR").is_none()
        && let Some(dir) = private_runtime_dir()
    {
        // Vulkan's window-system probing prints an error on every start without it.
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
    match tokio::time::timeout(START_TIMEOUT, conn.receive()).await {
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
    used: Duration,
}

impl RemoteSession {
    /// GPU time used so far: the time this task's calls held the worker.
    pub fn gpu_time_used(&self) -> Duration {
        self.used
    }

    /// Runs one call within the task's remaining GPU time.
    pub async fn call(&mut self, call: GpuCall) -> Result<GpuValue, CallError> {
        // What cannot fit any buffer or kernel of this task never crosses the pipe.
        let max = self.limits.max_buffer_bytes;
        let refused = match &call {
            GpuCall::Write { data, .. } if data.len() as u64 > max => Some((
                GpuErrorKind::BadArgument,
                format!(
                    "a write of {} bytes, over the task's GPU memory of {max}",
                    data.len()
                ),
            )),
            GpuCall::Read { len, .. } if *len > max => Some((
                GpuErrorKind::BadArgument,
                format!("a read of {len} bytes, over the task's GPU memory of {max}"),
            )),
            GpuCall::KernelCreate { wgsl, .. } if wgsl.len() > self.limits.max_shader_bytes => {
                Some((
                    GpuErrorKind::Shader,
                    format!(
                        "shader source of {} bytes, over the cap of {}",
                        wgsl.len(),
                        self.limits.max_shader_bytes
                    ),
                ))
            }
            _ => None,
        };
        if let Some((kind, message)) = refused {
            return Err(CallError::Gpu(GpuError { kind, message }));
        }
        let remaining = self.limits.gpu_time.saturating_sub(self.used);
        if remaining.is_zero() {
            return Err(CallError::Gpu(GpuError {
                kind: GpuErrorKind::Limit(Limit::GpuTime),
                message: format!(
                    "the task used its GPU time limit of {:?}",
                    self.limits.gpu_time
                ),
            }));
        }
        let (result, used) = self
            .worker
            .call(self.id, self.limits.clone(), call, remaining)
            .await;
        self.used += used;
        match result {
            Ok(_) if self.used > self.limits.gpu_time => Err(CallError::Gpu(GpuError {
                kind: GpuErrorKind::Limit(Limit::GpuTime),
                message: format!(
                    "GPU work ran past the task's GPU time limit of {:?}",
                    self.limits.gpu_time
                ),
            })),
            other => other,
        }
    }
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        let (worker, id) = (self.worker.clone(), self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { worker.close(id).await });
        }
    }
}
