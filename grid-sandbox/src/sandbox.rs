//! The sandbox: one task of untrusted WebAssembly, run with hard limits.
//!
//! A [`Sandbox`] owns one wasmtime [`Engine`] (and its compiled-module cache) and serves many
//! tasks at once on a multi-thread tokio runtime. A task that hits a limit, traps or misbehaves
//! ends with a [`Reason`]; the engine stays healthy for the next one.
//!
//! # How each limit is enforced
//! | limit | mechanism |
//! |---|---|
//! | memory, tables | a [`ResourceLimiter`](wasmtime::ResourceLimiter) per store: `memory.grow` past the limit returns -1 in the guest; a task that then fails reports `limit: memory` |
//! | time | a wall deadline checked on every epoch tick (10 ms) while wasm runs, and a tokio timeout around the whole call for a guest blocked in a host call (`poll_oneoff` sleeps) |
//! | output bytes and files, open files | checks around the writing WASI calls, see [`crate::guard`] and [`crate::fs_guard`]; when the task ends, a walk of `/out` ([`crate::outputs::measure`]) ends one whose `/out` no result can hold (deeper than [`crate::tree::MAX_DEPTH`] folders, a path longer than 4096 bytes) with `limit: output`; a task over its output limit leaves an empty `/out` |
//! | logs | [`crate::capture::CappedPipe`]: truncated and marked, not fatal |
//! | stack | `max_wasm_stack` on the engine (per node) |
//!
//! # Isolation
//! A guest sees exactly: its args, its env plus `GRID_*`, stdin, `/in` read-only, `/out`
//! read-write. No host env, no other preopens, no sockets (wasmtime-wasi grants no network unless
//! asked), no threads (shared memory is refused by [`crate::validate`]).
//!
//! # Runtimes
//! A task with a [`Program`] runs a pinned runtime (the Python interpreter, see
//! [`grid_proto::runtime`]) on the user's program, under the same limits and the same view, plus
//! three read-only folders — the runtime's stdlib at `/usr/local/lib`, Grid's helper module at
//! `/usr/local/grid`, and the program at `/job` — and a writable, empty `/tmp` (also `HOME`),
//! whose bytes and files count in the task's output limits and which is removed afterwards. The runtime is a WASI *reactor*: `_initialize`,
//! then `run`, whose return value is the exit code; its one extra import, `host::call`, answers
//! "no host" and grants nothing.
//!
//! # Example
//! ```no_run
//! # async fn demo(bytes: &[u8]) -> anyhow::Result<()> {
//! use grid_sandbox::{Limits, Sandbox, SandboxConfig, TaskSpec};
//! let sandbox = Sandbox::new(SandboxConfig::default())?;
//! let module = sandbox.load(bytes, &Limits::default()).await.map_err(|r| anyhow::anyhow!("{r}"))?;
//! let out = tempfile::tempdir()?;
//! let report = sandbox.run(&module, TaskSpec::new(out.path())).await;
//! println!("{:?} in {:.3}s", report.outcome, report.wall_seconds);
//! # Ok(()) }
//! ```

use crate::cache::ModuleCache;
use crate::capture::CappedPipe;
use crate::determinism::{FixedWallClock, VirtualMonotonicClock, seeded_rng};
use crate::fs_guard;
use crate::guard;
use crate::limits::{Limits, NodeCaps};
use crate::quota::OutputQuota;
use crate::task_state::{LimitHit, TaskGpu, TaskLimiter, TaskState, wasm_err};
use crate::validate::{CompileCaps, check_module};
use grid_proto::{Limit, Outcome, Reason, Sha256Hex};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::{Config, Engine, Linker, Module, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder, WasiView};

/// Core-seconds to compile a megabyte of wasm before this machine has measured its own rate:
/// the Python runtime (104.5 MB) took about 70 s on 2 cores.
const DEFAULT_COMPILE_CORE_SECONDS_PER_MB: f64 = 1.4;

/// How often the engine's epoch advances; the granularity of the time limit for running wasm.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Settings of one node's sandbox (shared by all its tasks).
#[derive(Clone)]
pub struct SandboxConfig {
    /// Ceilings on every task's limits.
    pub caps: NodeCaps,
    /// Static caps on compile work, checked before compiling.
    pub compile_caps: CompileCaps,
    /// Wasm stack per task. Default 1 MiB; deep recursion past it is `trap: stack overflow`.
    pub max_wasm_stack_bytes: usize,
    /// Where compiled modules are kept between runs; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// The node's GPU worker, for tasks that ask for a GPU (`grid_gpu_v1`); `None`: no GPU here.
    pub gpu: Option<Arc<crate::gpu_worker::GpuWorker>>,
    /// How modules are compiled: the fastest code, or the fastest compile.
    pub compiler: Compiler,
    /// At most this many tasks run at once (a node's slots): their instances, memories, tables
    /// and stacks are then made once and reused, reset between tasks, instead of mapped and
    /// unmapped for each (wasmtime's pooling allocator; a trivial task's fixed cost halves).
    /// A task past that number fails to start. `None`: allocated per task, no ceiling.
    pub pooled_tasks: Option<u32>,
}

/// Cranelift's settings for a sandbox's compiles: what a compile costs against how fast the code
/// runs. (Winch, wasmtime's single-pass compiler, is not offered: wasmtime 48 does not support
/// epoch interruption with it, and without epochs a guest's loop could not be stopped at its
/// time limit.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compiler {
    /// Optimised code and the backtracking register allocator: the fastest code.
    #[default]
    Optimized,
    /// No optimisations and the single-pass register allocator: a quicker compile of slower
    /// code.
    Quick,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            caps: NodeCaps::default(),
            compile_caps: CompileCaps::default(),
            max_wasm_stack_bytes: 1 << 20,
            cache_dir: None,
            gpu: None,
            compiler: Compiler::default(),
            pooled_tasks: None,
        }
    }
}

/// One task to run: what the guest sees, and its limits.
#[derive(Clone, Debug)]
pub struct TaskSpec {
    /// args after `argv[0]` (which is always `job.wasm`, so that every node passes the same).
    pub args: Vec<String>,
    /// The job's env; `GRID_*` names are set by the sandbox and win over these.
    pub env: Vec<(String, String)>,
    pub stdin: Vec<u8>,
    /// Host directory shown read-only at `/in`; `None` shows an empty directory.
    pub input_dir: Option<PathBuf>,
    /// Host directory shown read-write at `/out`. It should be empty: the quota counts what is there.
    pub output_dir: PathBuf,
    /// More host folders shown read-write, each under a guest name (`grid run --dir
    /// HOST::GUEST`, as other WASI runtimes offer): counted in the output quota with `/out`.
    /// Tasks of a grid job have none.
    pub dirs: Vec<(PathBuf, String)>,
    pub limits: Limits,
    pub job_id: String,
    pub task_index: u64,
    pub task_count: u64,
    /// The task's own seed (`GRID_SEED`), see [`grid_proto::task_seed`].
    pub seed: u64,
    /// Fixed clocks and seeded randomness (the default). Off: the host's clocks and randomness.
    pub deterministic: bool,
    /// Which try of this task this is (`GRID_ATTEMPT`): 0 first, 1 the first retry, …
    pub attempt: u32,
    /// The task may use the node's GPU through `grid_gpu_v1` (otherwise every call says so).
    pub gpu: bool,
    /// The program a runtime runs (the module is then that runtime's).
    pub program: Option<Program>,
}

/// A program for a runtime: the folders the guest sees besides `/in` and `/out`.
#[derive(Clone, Debug)]
pub struct Program {
    pub runtime: &'static grid_proto::runtime::Runtime,
    /// The runtime's files on this host, see [`crate::runtime::RuntimeFiles`].
    pub files: crate::runtime::RuntimeFiles,
    /// Host folder shown read-only at `/job`, holding the program.
    pub dir: PathBuf,
    /// The program's file name in `dir`.
    pub file: String,
}

impl TaskSpec {
    /// A task with the defaults of `grid run`: job `local`, index 0 of 1, seed of job seed 0.
    pub fn new(output_dir: &Path) -> Self {
        Self {
            args: Vec::new(),
            env: Vec::new(),
            stdin: Vec::new(),
            input_dir: None,
            output_dir: output_dir.to_path_buf(),
            dirs: Vec::new(),
            limits: Limits::default(),
            job_id: "local".into(),
            task_index: 0,
            task_count: 1,
            seed: grid_proto::task_seed(0, 0),
            deterministic: true,
            attempt: 0,
            gpu: false,
            program: None,
        }
    }
}

/// What one run produced.
#[derive(Clone, Debug)]
pub struct TaskReport {
    pub outcome: Outcome,
    /// CPU time of the threads while they ran this task's wasm and host calls.
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    /// Time the task's GPU calls held the node's GPU.
    pub gpu_seconds: f64,
    /// The largest linear memory the task had (0 when it never started).
    pub peak_memory_bytes: u64,
    /// Apparent size of `/out` when the task ended (a hard-linked file once); 0 after a task
    /// over its output limit, whose `/out` is emptied.
    pub bytes_out: u64,
    /// `/out` was found empty when the task ended (or emptied, after a task over its output
    /// limit): there is nothing to list.
    pub out_empty: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub logs_truncated: bool,
}

impl TaskReport {
    /// The report of a task whose module was refused before running.
    pub fn refused(reason: Reason) -> Self {
        Self {
            outcome: Outcome::Failed(reason),
            cpu_seconds: 0.0,
            wall_seconds: 0.0,
            gpu_seconds: 0.0,
            peak_memory_bytes: 0,
            bytes_out: 0,
            out_empty: false,
            stdout: Vec::new(),
            stderr: Vec::new(),
            logs_truncated: false,
        }
    }
}

/// A module that passed validation and is compiled for this sandbox's engine.
#[derive(Clone)]
pub struct LoadedModule {
    pub sha256: Sha256Hex,
    /// The guest, rewired through the guard when it imports a guarded WASI call.
    module: Module,
    /// The guard module instantiated before the guest, see [`crate::guard`].
    guard: Option<Module>,
    /// A runtime's reactor (`_initialize`, `run`) rather than a command (`_start`).
    reactor: bool,
}

impl LoadedModule {
    /// The memory the module declares it starts with, in bytes (its own or its guard's).
    fn initial_memory_bytes(&self) -> u64 {
        let pages = |m: &Module| m.resources_required().max_initial_memory_size.unwrap_or(0);
        let guard = self.guard.as_ref().map_or(0, pages);
        pages(&self.module).max(guard).saturating_mul(65_536)
    }
}

/// How a task's wasm ended, and what it used besides CPU time.
struct Ran {
    outcome: Outcome,
    gpu_time: Duration,
    peak_memory_bytes: u64,
}

pub struct Sandbox {
    engine: Engine,
    linker: Linker<TaskState>,
    config: SandboxConfig,
    cache: Option<Arc<ModuleCache>>,
    loaded: Mutex<HashMap<Sha256Hex, LoadedModule>>,
    runtime_compile: tokio::sync::Mutex<()>,
    /// The compile under way, if any (see [`Sandbox::compiling`]).
    compiling: tokio::sync::watch::Sender<Option<Compiling>>,
    /// Shown (read-only) at `/in` to tasks that have no inputs.
    empty_in: tempfile::TempDir,
    _ticker: EpochTicker,
}

/// A compile under way: compiling a large module (a runtime's 100 MB) takes minutes on a small
/// machine, and whoever waits for it is shown how far along it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Compiling {
    /// What is compiled: `the python runtime`, `the module`.
    pub label: String,
    pub started: std::time::SystemTime,
    /// About how long it takes on this machine ([`Sandbox::compile_estimate`]).
    pub estimate: Duration,
}

/// Tells a compile on a [`Sandbox::compiling`] channel until dropped (ended, failed, or given
/// up by its task).
struct Told<'a> {
    channel: &'a tokio::sync::watch::Sender<Option<Compiling>>,
    started: std::time::SystemTime,
}

impl<'a> Told<'a> {
    fn start(channel: &'a tokio::sync::watch::Sender<Option<Compiling>>, c: Compiling) -> Self {
        let started = c.started;
        channel.send_replace(Some(c));
        Self { channel, started }
    }
}

impl Drop for Told<'_> {
    fn drop(&mut self) {
        // Only its own: another compile may have started since.
        self.channel.send_if_modified(|now| {
            let mine = now.as_ref().is_some_and(|c| c.started == self.started);
            if mine {
                *now = None;
            }
            mine
        });
    }
}

/// Tables a module may define: enough for any toolchain's output, and what each pooled task
/// slot holds (see [`SandboxConfig::pooled_tasks`]).
pub const MAX_TABLES: u32 = 8;

/// The pool for `tasks` tasks at once. Each task is at most two instances (the guest, and its
/// guard, which defines the memory), one memory (multi-memory is off), a GC heap, and one
/// stack at a time; a few spare slots cover a task whose instances are still being dropped as
/// the next starts.
///
/// A slot's memory holds up to 4 GiB (the task's own limit is the `ResourceLimiter`'s), its
/// tables up to the node's cap on table elements (at most 2^24).
fn pool(tasks: u32, caps: &NodeCaps) -> wasmtime::PoolingAllocationConfig {
    let tasks = tasks.clamp(1, 4096);
    let instances = 2 * tasks + 4;
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_core_instances(instances)
        // A task's memory, and its store's GC heap (a pooled memory too) when it has one.
        .total_memories(2 * (tasks + 4))
        .total_tables(MAX_TABLES * (tasks + 4))
        .total_stacks(tasks + 4)
        .max_memories_per_module(1)
        .max_tables_per_module(MAX_TABLES)
        .max_memory_size(1 << 32)
        .table_elements(
            usize::try_from(caps.0.table_elements)
                .unwrap_or(usize::MAX)
                .min(1 << 24),
        )
        // An instance's own data (function references, globals) grows with its module: room
        // for modules far larger than the Python runtime.
        .max_core_instance_size(16 << 20)
        .total_component_instances(0)
        .total_gc_heaps(tasks + 4)
        // What a small task touched is zeroed in place rather than unmapped: the next task
        // does not fault those pages in again.
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10);
    pool
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
struct EpochTicker;

impl EpochTicker {
    fn start(engine: &Engine) -> std::io::Result<Self> {
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("grid-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(Self)
    }
}

impl Sandbox {
    pub fn new(config: SandboxConfig) -> anyhow::Result<Self> {
        let mut wasm = Config::new();
        wasm.epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack_bytes)
            .wasm_multi_memory(false)
            .parallel_compilation(true);
        if let Some(tasks) = config.pooled_tasks {
            wasm.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool(
                tasks,
                &config.caps,
            )));
            // Stacks are not wiped between tasks (wasmtime's default): wasm cannot read the
            // native stack, and wiping each one cost a trivial task a tenth of its rate.
        }
        if config.compiler == Compiler::Quick {
            wasm.cranelift_opt_level(wasmtime::OptLevel::None)
                .cranelift_regalloc_algorithm(wasmtime::RegallocAlgorithm::SinglePass);
        }
        let engine = Engine::new(&wasm).map_err(wasm_err)?;
        let mut linker: Linker<TaskState> = Linker::new(&engine);
        p1::add_to_linker_async(&mut linker, |s: &mut TaskState| &mut s.wasi).map_err(wasm_err)?;
        crate::poll::add_to_linker(&mut linker).map_err(wasm_err)?;
        fs_guard::add_hooks(&mut linker).map_err(wasm_err)?;
        crate::gpu_binding::add_to_linker(&mut linker).map_err(wasm_err)?;
        crate::runtime::add_host_call(&mut linker).map_err(wasm_err)?;
        let cache = match &config.cache_dir {
            Some(dir) => Some(Arc::new(ModuleCache::open(dir, &engine)?)),
            None => None,
        };
        let ticker = EpochTicker::start(&engine)?;
        Ok(Self {
            engine,
            linker,
            config,
            cache,
            loaded: Mutex::new(HashMap::new()),
            runtime_compile: tokio::sync::Mutex::new(()),
            compiling: tokio::sync::watch::Sender::new(None),
            empty_in: tempfile::tempdir()?,
            _ticker: ticker,
        })
    }

    /// The compile under way, told as it starts and ends: a node puts it in its heartbeat,
    /// `grid run` draws a progress bar of it.
    pub fn compiling(&self) -> tokio::sync::watch::Receiver<Option<Compiling>> {
        self.compiling.subscribe()
    }

    /// About how long compiling `wasm_bytes` of module takes here: this machine's rate from
    /// its last runtime compile (kept in the cache), or, before any, a rate measured on a 2-core
    /// machine (a 100 MB runtime in about 70 s), shared by the cores compiling in parallel.
    /// Other code may compile several times faster: it is an estimate for runtimes first.
    pub fn compile_estimate(&self, wasm_bytes: usize) -> Duration {
        let cores = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(16);
        let core_seconds_per_mb = self
            .cache
            .as_ref()
            .and_then(|c| c.compile_rate())
            .unwrap_or(DEFAULT_COMPILE_CORE_SECONDS_PER_MB);
        let seconds = wasm_bytes as f64 / 1e6 * core_seconds_per_mb / cores as f64;
        Duration::from_secs_f64(seconds.clamp(0.0, 24.0 * 3600.0))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The GPU worker of this sandbox's tasks, if it has a GPU.
    pub fn gpu_worker(&self) -> Option<&crate::gpu_worker::GpuWorker> {
        self.config.gpu.as_deref()
    }

    /// Validates and compiles (or fetches from the cache) a module for a task with `limits`.
    /// `Err` is always `Reason::Invalid`, refused before running.
    pub async fn load(&self, bytes: &[u8], limits: &Limits) -> Result<LoadedModule, Reason> {
        let limits = limits.capped_by(&self.config.caps);
        check_module(bytes, &limits, &self.config.compile_caps).map_err(Reason::Invalid)?;
        let sha256 = Sha256Hex::of(bytes);
        if let Some(module) = self.already_loaded(&sha256) {
            return Ok(module);
        }
        self.compile_and_keep(bytes, sha256, false, "the module")
            .await
    }

    /// The interpreter module of `runtime`, compiled once per sandbox: `fetch` is called for its
    /// bytes only when it is not loaded yet. The bytes must hash to the runtime's pin; they are
    /// exempt from the rules for user modules (a command, the size cap) because of that pin.
    pub async fn load_runtime<F>(
        &self,
        runtime: &grid_proto::runtime::Runtime,
        fetch: F,
    ) -> Result<LoadedModule, Reason>
    where
        F: Future<Output = anyhow::Result<Vec<u8>>>,
    {
        let pinned: Sha256Hex = runtime
            .module_sha256
            .parse()
            .map_err(|e| Reason::Invalid(format!("runtime {}: bad pin: {e}", runtime.name)))?;
        if let Some(module) = self.already_loaded(&pinned) {
            return Ok(module);
        }
        // One compile at a time: tasks that arrive meanwhile wait for it instead of compiling
        // the same 100 MB module again.
        let _compiling = self.runtime_compile.lock().await;
        if let Some(module) = self.already_loaded(&pinned) {
            return Ok(module);
        }
        let bytes = fetch
            .await
            .map_err(|e| Reason::Invalid(format!("runtime {}: {}", runtime.name, one_line(&e))))?;
        let sha256 = Sha256Hex::of(&bytes);
        if sha256 != pinned {
            return Err(Reason::Invalid(format!(
                "runtime {}: module has sha256 {sha256}, not the pinned {pinned}",
                runtime.name
            )));
        }
        tracing::info!(
            runtime = runtime.name,
            "loading the runtime (compiled once per node; the first time takes a minute)"
        );
        let label = format!("the {} runtime", runtime.name);
        self.compile_and_keep(&bytes, sha256, true, &label).await
    }

    /// Whether the module `sha256` (a runtime's, say) is compiled and loaded here: its tasks
    /// start without a compile.
    pub fn is_loaded(&self, sha256: &Sha256Hex) -> bool {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(sha256)
    }

    fn already_loaded(&self, sha256: &Sha256Hex) -> Option<LoadedModule> {
        let found = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
            .cloned();
        if found.is_some() {
            metrics::counter!("grid_module_loads_total", "from" => "memory").increment(1);
        }
        found
    }

    async fn compile_and_keep(
        &self,
        bytes: &[u8],
        sha256: Sha256Hex,
        reactor: bool,
        label: &str,
    ) -> Result<LoadedModule, Reason> {
        let guarded = guard::rewrite(bytes).map_err(Reason::Invalid)?;
        let (module, guard) = match guarded {
            None => (
                self.compiled(bytes, &sha256, "plain", label, reactor)
                    .await?,
                None,
            ),
            Some(g) => {
                let guest = self
                    .compiled(&g.module, &sha256, "guarded", label, reactor)
                    .await?;
                let guard_bytes = guard::guard_module(g.memory);
                let guard_sha = Sha256Hex::of(&guard_bytes);
                (
                    guest,
                    Some(
                        self.compiled(&guard_bytes, &guard_sha, "guard", "its guard", false)
                            .await?,
                    ),
                )
            }
        };
        let loaded = LoadedModule {
            sha256,
            module,
            guard,
            reactor,
        };
        let mut all = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() >= 64 {
            // Runtimes stay: they are few, and costly to compile again.
            all.retain(|_, m| m.reactor);
        }
        all.insert(sha256, loaded.clone());
        Ok(loaded)
    }

    /// Compiles `bytes`, or fetches them compiled from the cache under (`sha256`, `variant`).
    /// A compile is told on [`Sandbox::compiling`] while it runs, as `label`; a runtime's
    /// (`runtime`) also sets this machine's rate for estimating the next (see
    /// [`Sandbox::compile_estimate`]: runtimes are what is worth estimating well, and their code
    /// compiles at a rate of its own).
    async fn compiled(
        &self,
        bytes: &[u8],
        sha256: &Sha256Hex,
        variant: &str,
        label: &str,
        runtime: bool,
    ) -> Result<Module, Reason> {
        if let Some(m) = self
            .cache
            .as_ref()
            .and_then(|c| c.get(&self.engine, sha256, variant))
        {
            if variant != "guard" {
                metrics::counter!("grid_module_loads_total", "from" => "disk").increment(1);
            }
            return Ok(m);
        }
        // The compile runs to its end on its own thread and lands in the cache even if the
        // task that asked for it is cancelled meanwhile. With a cache, it holds the cache's lock
        // for this artifact: a process sharing the cache (another node of this machine, `grid
        // run`) that is compiling the same module is waited for, and its artifact used.
        let (engine, owned, cache) = (self.engine.clone(), bytes.to_vec(), self.cache.clone());
        let (sha, kind) = (*sha256, variant.to_string());
        let started = Instant::now();
        // Told when it is worth a word: a second or more.
        let estimate = self.compile_estimate(bytes.len());
        let _told = (variant != "guard" && estimate >= Duration::from_secs(1)).then(|| {
            Told::start(
                &self.compiling,
                Compiling {
                    label: label.to_string(),
                    started: std::time::SystemTime::now(),
                    estimate,
                },
            )
        });
        let len = bytes.len();
        let (module, compiled) = tokio::task::spawn_blocking(move || {
            let _lock = cache.as_ref().map(|c| c.lock(&sha, &kind));
            if let Some(m) = cache.as_ref().and_then(|c| c.get(&engine, &sha, &kind)) {
                return Ok((m, false));
            }
            let compile_started = Instant::now();
            let module = Module::new(&engine, &owned)?;
            if let Some(cache) = &cache {
                cache.put(&sha, &kind, &module);
                if runtime {
                    cache.record_compile(len, compile_started.elapsed());
                }
            }
            Ok((module, true))
        })
        .await
        .map_err(|e| Reason::Invalid(format!("compiler crashed: {e}")))?
        .map_err(|e: wasmtime::Error| Reason::Invalid(one_line(&e)))?;
        if variant != "guard" {
            let from = if compiled { "compiled" } else { "disk" };
            metrics::counter!("grid_module_loads_total", "from" => from).increment(1);
        }
        if compiled {
            tracing::debug!(module = %sha256, variant, seconds = started.elapsed().as_secs_f64(), "compiled");
        }
        Ok(module)
    }

    /// Runs one task to its end. Never panics on guest behaviour; every way a task can end is an
    /// [`Outcome`].
    pub async fn run(&self, module: &LoadedModule, spec: TaskSpec) -> TaskReport {
        self.run_until(module, spec, std::future::pending()).await
    }

    /// [`Sandbox::run`], stopped when `stop` resolves (a cancelled job): the task ends
    /// `cancelled`, with what it used until then and the outputs and logs it left, as a task
    /// over its time limit does.
    pub async fn run_until(
        &self,
        module: &LoadedModule,
        spec: TaskSpec,
        stop: impl Future<Output = ()>,
    ) -> TaskReport {
        let limits = spec.limits.capped_by(&self.config.caps);
        // Said in the user's terms, not as wasmtime's "minimum size of N pages exceeds memory
        // limits": a runtime's starting memory is not in any file of theirs.
        let starts_with = module.initial_memory_bytes();
        if starts_with > limits.memory_bytes {
            let what = match &spec.program {
                Some(p) => format!("the {} runtime", p.runtime.name),
                None => "the module".to_string(),
            };
            let mib = starts_with.div_ceil(1 << 20);
            return TaskReport::refused(Reason::Invalid(format!(
                "{what} needs {mib} MiB of memory to start, over the task's memory limit of {}: give --memory {}MiB or more",
                grid_proto::units::size_text(limits.memory_bytes),
                mib.next_multiple_of(16)
            )));
        }
        let stdout = CappedPipe::new(limits.max_log_bytes);
        let stderr = CappedPipe::new(limits.max_log_bytes);
        let started = Instant::now();
        // A runtime gets a writable /tmp (its HOME too), the node's user's alone (mode 0700,
        // in the host's shared temp folder), counted in the output quota and removed when the
        // task ends.
        let scratch = match spec.program {
            Some(_) => match tempfile::Builder::new()
                .prefix("grid-tmp-")
                .permissions(std::fs::Permissions::from_mode(0o700))
                .tempdir()
            {
                Ok(dir) => Some(dir),
                Err(e) => {
                    return TaskReport::refused(Reason::Invalid(format!(
                        "could not set up the task: a scratch folder: {e}"
                    )));
                }
            },
            None => None,
        };
        let scratch_path = scratch.as_ref().map(|d| d.path());
        let (ran, cpu_seconds) = match self.prepare(&spec, &limits, &stdout, &stderr, scratch_path)
        {
            Ok(store) => {
                let run = self.call_start(store, module, &limits, started, stop);
                let (ran, cpu) = crate::cpu::CpuTimed::new(run).await;
                (ran, cpu.as_secs_f64())
            }
            Err(e) => (
                Ran {
                    outcome: Outcome::Failed(Reason::Invalid(format!(
                        "could not set up the task: {e:#}"
                    ))),
                    gpu_time: Duration::ZERO,
                    peak_memory_bytes: 0,
                },
                0.0,
            ),
        };
        let mut outcome = ran.outcome;
        let wall_seconds = started.elapsed().as_secs_f64();
        // The hooks keep `/out` within its limits while the guest runs; this walk also catches
        // what they had no cause to walk (a tree deeper than `tree::MAX_DEPTH`, a path longer
        // than a result may name) and ends such a task as over its output limit.
        let left = crate::outputs::measure(&spec.output_dir);
        if !over_output_limit(&outcome)
            && let Some(limit) = output_limit_passed(&left, &limits)
        {
            outcome = Outcome::Failed(Reason::Limit(limit));
        }
        let left = if over_output_limit(&outcome) {
            // The last write may have left a sparse file past the quota, or one entry too many:
            // a task over its output limit leaves nothing behind.
            crate::outputs::clear(&spec.output_dir);
            crate::outputs::measure(&spec.output_dir)
        } else {
            left
        };
        let (bytes_out, out_empty) = left.map_or((0, false), |m| (m.bytes, m.entries == 0));
        if let Some(dir) = &scratch
            && let Err(e) = crate::tree::remove_contents(dir.path())
        {
            // Emptied here, at any depth: the `TempDir` then removes an empty folder.
            tracing::warn!(dir = %dir.path().display(), error = %e, "could not empty a task's /tmp");
        }
        let (stdout, out_truncated) = stdout.take();
        let (stderr, err_truncated) = stderr.take();
        TaskReport {
            outcome,
            cpu_seconds,
            wall_seconds,
            gpu_seconds: ran.gpu_time.as_secs_f64(),
            peak_memory_bytes: ran.peak_memory_bytes,
            bytes_out,
            out_empty,
            stdout,
            stderr,
            logs_truncated: out_truncated || err_truncated,
        }
    }

    fn prepare(
        &self,
        spec: &TaskSpec,
        limits: &Limits,
        stdout: &CappedPipe,
        stderr: &CappedPipe,
        scratch: Option<&Path>,
    ) -> anyhow::Result<Store<TaskState>> {
        let mut b = WasiCtxBuilder::new();
        match &spec.program {
            None => b.arg("job.wasm"),
            Some(p) => b.args(&crate::runtime::guest_argv(p.runtime)).arg(format!(
                "{}/{}",
                grid_proto::runtime::Runtime::PROGRAM_GUEST_DIR,
                p.file
            )),
        };
        b.args(&spec.args);
        let mut env: Vec<(String, String)> = Vec::new();
        if spec.program.is_some() {
            env.extend(crate::runtime::guest_env());
        }
        for (k, v) in &spec.env {
            if k.starts_with("GRID_") {
                continue;
            }
            match env.iter_mut().find(|(name, _)| name == k) {
                Some((_, value)) => *value = v.clone(),
                None => env.push((k.clone(), v.clone())),
            }
        }
        for (k, v) in &env {
            b.env(k, v);
        }
        b.env("GRID_JOB_ID", &spec.job_id)
            .env("GRID_TASK_INDEX", spec.task_index.to_string())
            .env("GRID_TASK_COUNT", spec.task_count.to_string())
            .env("GRID_SEED", spec.seed.to_string())
            .env("GRID_ATTEMPT", spec.attempt.to_string());
        b.stdin(wasmtime_wasi::p2::pipe::MemoryInputPipe::new(
            spec.stdin.clone(),
        ))
        .stdout(stdout.clone())
        .stderr(stderr.clone());
        let in_dir = spec.input_dir.as_deref().unwrap_or(self.empty_in.path());
        b.preopened_dir(in_dir, "/in", FsPerms::ReadOnly)
            .map_err(wasm_err)?;
        b.preopened_dir(&spec.output_dir, "/out", FsPerms::ReadWrite)
            .map_err(wasm_err)?;
        for (host, guest) in &spec.dirs {
            b.preopened_dir(host, guest, FsPerms::ReadWrite)
                .map_err(wasm_err)?;
        }
        if let Some(p) = &spec.program {
            for (host, guest) in p.files.guest_dirs(p.runtime) {
                b.preopened_dir(host, guest, FsPerms::ReadOnly)
                    .map_err(wasm_err)?;
            }
            b.preopened_dir(
                &p.dir,
                grid_proto::runtime::Runtime::PROGRAM_GUEST_DIR,
                FsPerms::ReadOnly,
            )
            .map_err(wasm_err)?;
        }
        if let Some(dir) = scratch {
            b.preopened_dir(dir, "/tmp", FsPerms::ReadWrite)
                .map_err(wasm_err)?;
        }
        if spec.deterministic {
            b.secure_random(seeded_rng(spec.seed, 0))
                .insecure_random(seeded_rng(spec.seed, 1))
                .insecure_random_seed(u128::from(spec.seed))
                .wall_clock(FixedWallClock)
                .monotonic_clock(VirtualMonotonicClock::default());
        }
        // File reads and writes run on this thread, straight from the guest's memory: the guest's
        // code runs on it anyway, and the alternative (`spawn_blocking`) copies every write and
        // wakes another thread for it — a sixth of the time of an output-heavy task. Each call is
        // bounded: by the guest's buffer, and for writes by the `/out` quota (see `fs_guard`).
        // Sleeps stay asynchronous (see `poll`).
        b.allow_blocking_current_thread(true);
        let mut wasi = b.build_p1();
        wasi.ctx()
            .table
            .set_max_capacity(usize::try_from(limits.max_open_files).unwrap_or(usize::MAX));
        let state = TaskState {
            wasi,
            limiter: TaskLimiter {
                memory_bytes: limits.memory_bytes,
                peak_memory_bytes: 0,
                table_elements: limits.table_elements,
                tables_total: 0,
                hit: None,
            },
            quota: {
                let mut quota = OutputQuota::new(
                    &spec.output_dir,
                    limits.max_output_bytes,
                    limits.max_output_files,
                );
                if let Some(dir) = scratch {
                    quota.also_count(dir);
                }
                for (host, _) in &spec.dirs {
                    quota.also_count(host);
                }
                quota
            },
            stdio_replaced: false,
            gpu: TaskGpu {
                session: match (&self.config.gpu, spec.gpu) {
                    (Some(worker), true) => {
                        Some(worker.session(limits.gpu.clone(), Instant::now() + limits.timeout))
                    }
                    _ => None,
                },
                last_error: String::new(),
            },
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        Ok(store)
    }

    async fn call_start(
        &self,
        mut store: Store<TaskState>,
        module: &LoadedModule,
        limits: &Limits,
        started: Instant,
        stop: impl Future<Output = ()>,
    ) -> Ran {
        let deadline = started + limits.timeout;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Err(LimitHit(Limit::Time).into())
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        let run = async {
            let instance = match self.instantiate(&mut store, module).await {
                Ok(instance) => instance,
                Err(e) => return Err(Reason::Invalid(one_line(&e))),
            };
            if !module.reactor {
                let start = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .map_err(|e| Reason::Invalid(one_line(&e)))?;
                return Ok(start.call_async(&mut store, ()).await);
            }
            // A runtime's reactor: `_initialize` (if any), then `run`, which returns the exit code.
            if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize")
                && let Err(e) = init.call_async(&mut store, ()).await
            {
                return Ok(Err(e));
            }
            let run = instance
                .get_typed_func::<(), i32>(&mut store, "run")
                .map_err(|e| Reason::Invalid(one_line(&e)))?;
            Ok(match run.call_async(&mut store, ()).await {
                Ok(0) => Ok(()),
                Ok(code) => Err(I32Exit(code).into()),
                Err(e) => Err(e),
            })
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let ran = tokio::select! {
            ran = tokio::time::timeout(remaining, run) => ran,
            () = stop => Ok(Err(Reason::Cancelled)),
        };
        let gpu_used = store
            .data()
            .gpu
            .session
            .as_ref()
            .map_or(Duration::ZERO, |s| s.gpu_time_used());
        let outcome = match ran {
            Ok(Ok(result)) => classify(result, store.data().limiter.hit),
            Ok(Err(invalid)) => Outcome::Failed(invalid),
            Err(_elapsed) => Outcome::Failed(Reason::Limit(Limit::Time)),
        };
        Ran {
            outcome,
            gpu_time: gpu_used,
            peak_memory_bytes: store.data().limiter.peak_memory_bytes,
        }
    }
}

impl Sandbox {
    /// Instantiates the guest, through its guard when it has one. A failure here (an import of
    /// the wrong type, a start function that traps while the instance is created) means the
    /// module was refused before `_start` ran.
    async fn instantiate(
        &self,
        store: &mut Store<TaskState>,
        module: &LoadedModule,
    ) -> wasmtime::Result<wasmtime::Instance> {
        let Some(guard) = &module.guard else {
            return self
                .linker
                .instantiate_async(&mut *store, &module.module)
                .await;
        };
        let guard = self.linker.instantiate_async(&mut *store, guard).await?;
        let mut imports = Vec::new();
        for import in module.module.imports() {
            let export = if import.module() == guard::GUARD_MODULE {
                guard
                    .get_export(&mut *store, import.name())
                    .ok_or_else(|| wasmtime::format_err!("the guard lacks {}", import.name()))?
            } else {
                self.linker
                    .get(&mut *store, import.module(), import.name())?
            };
            imports.push(export);
        }
        wasmtime::Instance::new_async(&mut *store, &module.module, &imports).await
    }
}

/// Whether `outcome` is a task over its output limits (bytes or entries).
fn over_output_limit(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Failed(Reason::Limit(Limit::Output | Limit::Files))
    )
}

/// The output limit a task's `/out` (as `left` measured it) is over, if any. One that cannot be
/// measured, or listed as a result, is over `max_output_bytes`.
fn output_limit_passed(
    left: &Result<crate::outputs::Measured, crate::outputs::OutputsError>,
    limits: &Limits,
) -> Option<Limit> {
    match left {
        Err(e) => {
            tracing::debug!(error = %e, "a task's /out cannot be listed as a result");
            Some(Limit::Output)
        }
        Ok(m) if m.bytes > limits.max_output_bytes => Some(Limit::Output),
        Ok(m) if m.entries > limits.max_output_files => Some(Limit::Files),
        Ok(_) => None,
    }
}

/// Turns the result of `_start` into an outcome. A failure after a denied `memory.grow` or
/// `table.grow` is blamed on that limit: the guest's allocator aborts in its own words
/// (`unreachable`, an exit code), but the cause is the limit.
fn classify(result: wasmtime::Result<()>, limiter_hit: Option<Limit>) -> Outcome {
    let reason = match result {
        Ok(()) => return Outcome::Succeeded,
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                if exit.0 == 0 {
                    return Outcome::Succeeded;
                }
                Reason::Exit(exit.0)
            } else if let Some(LimitHit(limit)) = e.downcast_ref::<LimitHit>() {
                Reason::Limit(*limit)
            } else if e.downcast_ref::<crate::gpu_worker::GpuLost>().is_some() {
                return Outcome::Failed(Reason::Lost);
            } else if let Some(crashed) = e.downcast_ref::<crate::gpu_binding::GpuCrashed>() {
                Reason::Trap(crashed.0.clone())
            } else if let Some(trap) = e.downcast_ref::<Trap>() {
                Reason::Trap(trap_name(*trap))
            } else if format!("{e:#}").contains("resource table has no free keys") {
                Reason::Limit(Limit::OpenFiles)
            } else {
                Reason::Trap(one_line(&e))
            }
        }
    };
    match (limiter_hit, &reason) {
        (Some(limit), Reason::Trap(_) | Reason::Exit(_)) => Outcome::Failed(Reason::Limit(limit)),
        _ => Outcome::Failed(reason),
    }
}

fn trap_name(trap: Trap) -> String {
    match trap {
        Trap::StackOverflow => "stack overflow".into(),
        Trap::UnreachableCodeReached => "unreachable".into(),
        Trap::MemoryOutOfBounds => "out of bounds memory access".into(),
        Trap::HeapMisaligned => "misaligned memory access".into(),
        Trap::TableOutOfBounds => "undefined table element".into(),
        Trap::IndirectCallToNull => "indirect call to null".into(),
        Trap::BadSignature => "indirect call type mismatch".into(),
        Trap::IntegerOverflow => "integer overflow".into(),
        Trap::IntegerDivisionByZero => "integer divide by zero".into(),
        Trap::BadConversionToInteger => "invalid conversion to integer".into(),
        other => other.to_string(),
    }
}

/// An error chain on one line.
fn one_line(e: &impl std::fmt::Display) -> String {
    grid_proto::one_line(&format!("{e:#}"), "; ")
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("sha256", &self.sha256)
            .finish()
    }
}
