//! The Grid provider service: it serves a grid's tasks in the sandbox of [`grid_sandbox`].
//!
//! Start at [`worker`]: the task loop — take tasks from the broker, run each in a
//! [`grid_sandbox::Sandbox`], stage outputs and logs, publish results — with its life
//! cycle, memory budget and table of timeouts. What runs one task (validation, limits, WASI,
//! the compiled-module cache, the GPU worker) is `grid_sandbox`'s; this crate is the service
//! around it.
//!
//! Modules: [`settings`] (flags and the TOML config file, merged into a [`settings::NodeConfig`]),
//! [`worker`], [`deliveries`] (task messages taken from the broker, held and reported),
//! [`workdirs`] (task folders, reused), [`disk`] (the disk budget of the caches),
//! [`privileges`] (dropping root, no-new-privileges, seccomp: the second line of defence).

pub mod deliveries;
pub mod disk;
pub mod privileges;
pub mod settings;
pub mod workdirs;
pub mod worker;
