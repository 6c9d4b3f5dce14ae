//! `grid_gpu_v1`: the host functions through which a guest uses the node's GPU.
//!
//! Every function returns a status (`i32`): 0 ok, 1 bad handle, 2 bad argument (including any
//! pointer or length outside guest memory), 3 shader error, 4 device error, 5 no GPU for this task.
//! After a non-zero status, `last_error` copies a one-line message into guest memory. A hard
//! limit (`gpu-memory`, `gpu-objects`, `gpu-dispatch`, `gpu-time`) does not return: it ends the
//! task with `limit: …`. No pointer from the guest is trusted: every (ptr, len) is checked
//! against the guest's memory before use. The ABI is documented for guest authors in
//! `grid-guest`'s `gpu` module.
//!
//! The functions are async: each call goes to the node's GPU worker process
//! ([`crate::gpu_worker`]), which the node can kill when GPU work overruns.

use crate::gpu_worker::{CallError, GpuCall, GpuLost, GpuValue};
use crate::task_state::{LimitHit, TaskState};
use grid_gpu::{GpuError, GpuErrorKind};
use wasmtime::{Caller, Linker, Result};

pub const MODULE: &str = "grid_gpu_v1";
pub const FUNCTIONS: &[&str] = &[
    "buffer_create",
    "buffer_write",
    "buffer_read",
    "kernel_create",
    "dispatch",
    "destroy",
    "last_error",
];

const OK: i32 = 0;
const BAD_HANDLE: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const SHADER: i32 = 3;
const DEVICE: i32 = 4;
const UNAVAILABLE: i32 = 5;
/// Longest entry point name a guest may pass.
const MAX_ENTRY_BYTES: usize = 256;
/// Most buffers one dispatch may bind.
const MAX_BINDINGS: usize = 64;

/// A task's GPU call failed because the GPU worker died during it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GpuCrashed(pub String);

fn memory<'a>(caller: &'a mut Caller<'_, TaskState>) -> (&'a mut [u8], &'a mut TaskState) {
    match caller.get_export("memory").and_then(|e| e.into_memory()) {
        Some(m) => m.data_and_store_mut(caller),
        None => (&mut [], caller.data_mut()),
    }
}

fn range(mem_len: usize, ptr: i32, len: i32) -> Option<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start.checked_add(len as u32 as usize)?;
    (end <= mem_len).then_some(start..end)
}

/// Records `message` for `last_error` and returns `status`.
fn fail(state: &mut TaskState, status: i32, message: impl Into<String>) -> i32 {
    state.gpu.last_error = message.into();
    status
}

/// Turns a session error into a status, or ends the task for a limit.
fn status_of(state: &mut TaskState, e: GpuError) -> Result<i32> {
    let status = match e.kind {
        GpuErrorKind::Limit(limit) => {
            state.gpu.last_error = e.message;
            return Err(LimitHit(limit).into());
        }
        GpuErrorKind::BadHandle => BAD_HANDLE,
        GpuErrorKind::BadArgument => BAD_ARGUMENT,
        GpuErrorKind::Shader => SHADER,
        GpuErrorKind::Device => DEVICE,
    };
    Ok(fail(state, status, e.message))
}

/// Runs `call` in the task's GPU session. `Ok(Err(status))`: there is none, or the call failed
/// (the message is kept for `last_error`); `Err`: the task ends (a limit, a lost or crashed
/// worker).
async fn call(state: &mut TaskState, call: GpuCall) -> Result<std::result::Result<GpuValue, i32>> {
    let Some(session) = state.gpu.session.as_mut() else {
        return Ok(Err(fail(state, UNAVAILABLE, "no GPU for this task")));
    };
    match session.call(call).await {
        Ok(value) => Ok(Ok(value)),
        Err(CallError::Gpu(e)) => status_of(state, e).map(Err),
        Err(CallError::Lost) => Err(GpuLost.into()),
        Err(CallError::Crashed(why)) => Err(GpuCrashed(why).into()),
    }
}

/// Before copying anything out of guest memory: `Some(status)` when the task has no GPU, or when
/// `len` bytes are more than the task's `cap` allows.
fn refuse_early(
    state: &mut TaskState,
    len: usize,
    cap: impl Fn(&grid_gpu::GpuLimits) -> u64,
    status: i32,
    what: &str,
) -> Option<i32> {
    let Some(session) = state.gpu.session.as_ref() else {
        return Some(fail(state, UNAVAILABLE, "no GPU for this task"));
    };
    let cap = cap(session.limits());
    (len as u64 > cap).then(|| {
        fail(
            state,
            status,
            format!(
                "{what} of {len} bytes, over the task's cap of {}",
                grid_proto::units::size_text(cap)
            ),
        )
    })
}

/// The status of a call that gives back nothing (or a value the guest does not need).
fn status(result: std::result::Result<GpuValue, i32>) -> i32 {
    match result {
        Ok(_) => OK,
        Err(status) => status,
    }
}

fn write_u32(mem: &mut [u8], ptr: i32, value: u32) -> bool {
    match range(mem.len(), ptr, 4) {
        Some(r) => {
            mem[r].copy_from_slice(&value.to_le_bytes());
            true
        }
        None => false,
    }
}

/// Writes a handle the worker returned to `out` (already checked to be in guest memory).
fn give_handle(
    c: &mut Caller<'_, TaskState>,
    out: i32,
    result: std::result::Result<GpuValue, i32>,
) -> i32 {
    match result {
        Ok(GpuValue::Handle(h)) => {
            let (mem, state) = memory(c);
            if write_u32(mem, out, h) {
                OK
            } else {
                fail(
                    state,
                    BAD_ARGUMENT,
                    "the handle pointer is outside guest memory",
                )
            }
        }
        Ok(_) => fail(c.data_mut(), DEVICE, "the GPU worker gave no handle"),
        Err(status) => status,
    }
}

pub fn add_to_linker(linker: &mut Linker<TaskState>) -> Result<()> {
    linker.func_wrap_async(
        MODULE,
        "buffer_create",
        |mut c: Caller<'_, TaskState>, (size, out): (i64, i32)| {
            Box::new(async move {
                let (mem, state) = memory(&mut c);
                if range(mem.len(), out, 4).is_none() {
                    return Ok(fail(
                        state,
                        BAD_ARGUMENT,
                        "the handle pointer is outside guest memory",
                    ));
                }
                let Ok(size) = u64::try_from(size) else {
                    return Ok(fail(
                        state,
                        BAD_ARGUMENT,
                        format!("buffer size {size} is negative"),
                    ));
                };
                let result = call(state, GpuCall::BufferCreate { size }).await?;
                Ok(give_handle(&mut c, out, result))
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "buffer_write",
        |mut c: Caller<'_, TaskState>, (h, offset, ptr, len): (i32, i64, i32, i32)| {
            Box::new(async move {
                let (mem, state) = memory(&mut c);
                let Some(r) = range(mem.len(), ptr, len) else {
                    return Ok(fail(
                        state,
                        BAD_ARGUMENT,
                        "the data range is outside guest memory",
                    ));
                };
                let max = |l: &grid_gpu::GpuLimits| l.max_buffer_bytes;
                if let Some(status) = refuse_early(state, r.len(), max, BAD_ARGUMENT, "a write") {
                    return Ok(status);
                }
                let write = GpuCall::Write {
                    buffer: h as u32,
                    offset: offset as u64,
                    data: mem[r].to_vec(),
                };
                Ok(status(call(state, write).await?))
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "buffer_read",
        |mut c: Caller<'_, TaskState>, (h, offset, ptr, len): (i32, i64, i32, i32)| {
            Box::new(async move {
                let (mem, state) = memory(&mut c);
                let Some(r) = range(mem.len(), ptr, len) else {
                    return Ok(fail(
                        state,
                        BAD_ARGUMENT,
                        "the destination range is outside guest memory",
                    ));
                };
                let read = GpuCall::Read {
                    buffer: h as u32,
                    offset: offset as u64,
                    len: r.len() as u64,
                };
                match call(state, read).await? {
                    Ok(GpuValue::Bytes(bytes)) => {
                        // Memory cannot shrink, and nothing ran in the guest since the check.
                        let (mem, state) = memory(&mut c);
                        match mem.get_mut(r) {
                            Some(dst) if dst.len() == bytes.len() => {
                                dst.copy_from_slice(&bytes);
                                Ok(OK)
                            }
                            _ => Ok(fail(state, DEVICE, "the GPU worker read the wrong length")),
                        }
                    }
                    Ok(_) => Ok(fail(c.data_mut(), DEVICE, "the GPU worker gave no bytes")),
                    Err(status) => Ok(status),
                }
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "kernel_create",
        |mut c: Caller<'_, TaskState>,
         (src, src_len, entry, entry_len, out): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let (mem, state) = memory(&mut c);
                let (Some(sr), Some(er)) = (
                    range(mem.len(), src, src_len),
                    range(mem.len(), entry, entry_len),
                ) else {
                    return Ok(fail(
                        state,
                        BAD_ARGUMENT,
                        "the source or entry point is outside guest memory",
                    ));
                };
                if range(mem.len(), out, 4).is_none() || er.len() > MAX_ENTRY_BYTES {
                    return Ok(fail(
                        state,
                        BAD_ARGUMENT,
                        "bad handle pointer or entry point name",
                    ));
                }
                let max = |l: &grid_gpu::GpuLimits| l.max_shader_bytes as u64;
                if let Some(status) = refuse_early(state, sr.len(), max, SHADER, "shader source") {
                    return Ok(status);
                }
                let (Ok(wgsl), Ok(entry)) =
                    (std::str::from_utf8(&mem[sr]), std::str::from_utf8(&mem[er]))
                else {
                    return Ok(fail(
                        state,
                        BAD_ARGUMENT,
                        "the source and entry point must be UTF-8",
                    ));
                };
                let kernel = GpuCall::KernelCreate {
                    wgsl: wgsl.to_string(),
                    entry: entry.to_string(),
                };
                let result = call(state, kernel).await?;
                Ok(give_handle(&mut c, out, result))
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "dispatch",
        |mut c: Caller<'_, TaskState>,
         (kernel, handles, count, x, y, z): (i32, i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let (mem, state) = memory(&mut c);
                let n = count as u32 as usize;
                let Some(r) = (n <= MAX_BINDINGS)
                    .then(|| range(mem.len(), handles, (n * 4) as i32))
                    .flatten()
                else {
                    return Ok(fail(
                        state,
                        BAD_ARGUMENT,
                        "the handle list is outside guest memory or too long",
                    ));
                };
                let buffers: Vec<u32> = mem[r]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let dispatch = GpuCall::Dispatch {
                    kernel: kernel as u32,
                    buffers,
                    groups: [x as u32, y as u32, z as u32],
                };
                Ok(status(call(state, dispatch).await?))
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "destroy",
        |mut c: Caller<'_, TaskState>, (h,): (i32,)| {
            Box::new(async move {
                let destroy = GpuCall::Destroy { handle: h as u32 };
                Ok(status(call(c.data_mut(), destroy).await?))
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "last_error",
        |mut c: Caller<'_, TaskState>, ptr: i32, len: i32, out: i32| -> Result<i32> {
            let (mem, state) = memory(&mut c);
            let message = state.gpu.last_error.as_bytes();
            let Some(r) = range(mem.len(), ptr, len) else {
                return Ok(BAD_ARGUMENT);
            };
            let n = message.len().min(r.len());
            let copied = message[..n].to_vec();
            mem[r.start..r.start + n].copy_from_slice(&copied);
            if !write_u32(mem, out, n as u32) {
                return Ok(BAD_ARGUMENT);
            }
            Ok(OK)
        },
    )?;
    Ok(())
}
