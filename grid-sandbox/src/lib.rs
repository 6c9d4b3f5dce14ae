//! The Grid sandbox: it runs strangers' WebAssembly under hard limits, one task at a time.
//!
//! Start at [`Sandbox`]: one engine per node, [`Sandbox::load`] to validate and compile a module
//! (refused modules get an `invalid: …` reason before any code runs), [`Sandbox::run`] to run one
//! task of it with [`Limits`]. The node (`grid-node`), `grid run`, the fuzzer and the benches use
//! exactly this code, so a task behaves the same on a user's laptop as on any node. Nothing here
//! talks to a grid: fetching tasks and reporting results is `grid-node`'s.
//!
//! Modules: [`validate`] (static checks before compiling), [`limits`], [`sandbox`],
//! [`task_state`] (what a task's store holds, shared by the host functions), [`guard`] and
//! [`fs_guard`] (the `/out` quota inside WASI, counted by [`quota`]), [`tree`] (walking and
//! removing a task's folders through directory handles, for the quota and [`outputs`]),
//! [`capture`] (capped logs), [`determinism`] (fixed clocks, seeded randomness), [`cache`]
//! (compiled modules on disk), [`task`] (what one task of a grid job sees, for a node and
//! `grid run --from`), [`runtime`] (pinned runtimes such as Python on a host), [`gpu_binding`]
//! (the guest's `grid_gpu_v1` imports) over [`gpu_worker`] (the process that owns the GPU,
//! killed and restarted when GPU work overruns).

pub mod cache;
pub mod capture;
mod cpu;
pub mod determinism;
pub mod fs_guard;
pub mod gpu_binding;
pub mod gpu_worker;
pub mod guard;
pub mod limits;
pub mod outputs;
mod poll;
pub mod quota;
pub mod runtime;
pub mod sandbox;
pub mod task;
pub mod task_state;
pub mod tree;
pub mod validate;

pub use gpu_worker::{GpuWorker, WorkerCommand};
pub use limits::{Limits, NodeCaps};
pub use sandbox::{
    Compiler, Compiling, LoadedModule, Program, Sandbox, SandboxConfig, TaskReport, TaskSpec,
};
pub use task::GridTask;
pub use validate::CompileCaps;
