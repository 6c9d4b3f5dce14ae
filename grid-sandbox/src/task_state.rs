//! What one task's store holds, and how a limit ends the task from inside it.
//!
//! [`TaskState`] is the data of a task's wasmtime `Store`: its WASI context, its memory and
//! table limiter, its `/out` quota and its GPU session. The [`crate::sandbox`] builds it; the
//! host functions it links (the `/out` hooks in [`crate::fs_guard`], the `poll_oneoff` shadow in
//! `poll`, `grid_gpu_v1` in [`crate::gpu_binding`], `host::call` in [`crate::runtime`])
//! read and change it, and end the task with a [`LimitHit`]. It imports none of them.

use crate::gpu_worker::RemoteSession;
use crate::quota::OutputQuota;
use grid_proto::Limit;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::p1::WasiP1Ctx;

/// A limit that ended the task, raised from inside the store.
#[derive(Debug, thiserror::Error)]
#[error("limit: {0}")]
pub struct LimitHit(pub Limit);

/// Per-task store data.
pub struct TaskState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: TaskLimiter,
    pub(crate) quota: OutputQuota,
    pub(crate) stdio_replaced: bool,
    pub(crate) gpu: TaskGpu,
}

impl TaskState {
    pub(crate) fn is_stdio(&self, fd: i32) -> bool {
        (fd == 1 || fd == 2) && !self.stdio_replaced
    }
}

pub(crate) struct TaskLimiter {
    pub(crate) memory_bytes: u64,
    /// The largest memory size granted, for the usage ledger.
    pub(crate) peak_memory_bytes: u64,
    pub(crate) table_elements: u64,
    pub(crate) tables_total: u64,
    pub(crate) hit: Option<Limit>,
}

impl ResourceLimiter for TaskLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_bytes {
            self.hit.get_or_insert(Limit::Memory);
            return Ok(false);
        }
        self.peak_memory_bytes = self.peak_memory_bytes.max(desired as u64);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .tables_total
            .saturating_add((desired - current.min(desired)) as u64);
        if total > self.table_elements {
            self.hit.get_or_insert(Limit::Table);
            return Ok(false);
        }
        self.tables_total = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        2 // the guest and its guard
    }
    fn memories(&self) -> usize {
        1
    }
    fn tables(&self) -> usize {
        100
    }
}

/// The task's GPU state: a session in the node's GPU worker when the task may use the GPU, and
/// the last error message.
#[derive(Default)]
pub struct TaskGpu {
    pub session: Option<RemoteSession>,
    pub last_error: String,
}

/// wasmtime's error as an `anyhow` error (wasmtime 48's `Error` is not `std::error::Error`).
pub(crate) fn wasm_err(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}
