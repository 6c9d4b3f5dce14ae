//! The Grid provider: it runs strangers' WebAssembly under hard limits.
//!
//! Start at [`Sandbox`]: one engine per node, [`Sandbox::load`] to validate and compile a module
//! (refused modules get an `invalid: …` reason before any code runs), [`Sandbox::run`] to run one
//! task of it with [`Limits`]. `grid run` uses exactly this code, so a task behaves the same on a
//! user's laptop as on any node.
//!
//! Modules: [`validate`] (static checks before compiling), [`limits`], [`sandbox`],
//! [`fs_guard`] (the `/out` quota inside WASI), [`capture`] (capped logs), [`determinism`]
//! (fixed clocks, seeded randomness), [`cache`] (compiled modules on disk), [`outputs`],
//! [`gpu_binding`] (the guest's `grid_gpu_v1` imports) over [`gpu_worker`] (the process that
//! owns the GPU, killed and restarted when GPU work overruns).

pub mod cache;
pub mod capture;
mod cpu;
pub mod determinism;
pub mod disk;
pub mod fs_guard;
pub mod gpu_binding;
pub mod gpu_worker;
pub mod guard;
pub mod limits;
pub mod outputs;
mod poll;
pub mod privileges;
pub mod runtime;
pub mod sandbox;
pub mod settings;
pub mod validate;
pub mod workdirs;
pub mod worker;

pub use gpu_worker::{GpuWorker, WorkerCommand};
pub use limits::{Limits, NodeCaps};
pub use sandbox::{LoadedModule, Program, Sandbox, SandboxConfig, TaskReport, TaskSpec};
pub use validate::CompileCaps;
