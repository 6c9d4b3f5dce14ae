//! `poll_oneoff` that never blocks the task's thread.
//!
//! The sandbox lets file reads and writes run on the task's own thread (see
//! `Sandbox::prepare`): they are short and bounded, and skipping `spawn_blocking` saves a copy
//! and a thread hop per call. wasmtime-wasi ties one more thing to that setting: a
//! `poll_oneoff` of one relative timer — what `std::thread::sleep` and `time.sleep` become —
//! then sleeps with `std::thread::sleep`, where neither the time limit nor a cancel can end it.
//! This shadows `poll_oneoff`: a lone relative timer sleeps on tokio's timer instead, which a
//! timeout or a cancel drops; every other poll goes to wasmtime-wasi's own implementation.

use crate::task_state::TaskState;
use std::time::Duration;
use wasmtime::{AsContextMut, Caller, Linker, Result};

const WASI: &str = "wasi_snapshot_preview1";
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_FAULT: i32 = 21;
/// `subscription`: userdata u64 @0, tag u8 @8, clock { id u32 @16, timeout u64 @24,
/// precision u64 @32, flags u16 @40 }; 48 bytes.
const SUBSCRIPTION_BYTES: usize = 48;
/// `event`: userdata u64 @0, error u16 @8, type u8 @10, fd_readwrite { nbytes u64 @16,
/// flags u16 @24 }; 32 bytes.
const EVENT_BYTES: usize = 32;
const EVENTTYPE_CLOCK: u8 = 0;
const SUBCLOCKFLAGS_ABSTIME: u16 = 1;

/// Replaces the `poll_oneoff` that `wasmtime_wasi::p1::add_to_linker_async` defined.
pub fn add_to_linker(linker: &mut Linker<TaskState>) -> Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap_async(
        WASI,
        "poll_oneoff",
        |mut caller: Caller<'_, TaskState>, (subs, events, n, nevents): (i32, i32, i32, i32)| {
            Box::new(async move {
                if n == 1
                    && let Some((userdata, timeout)) = lone_relative_timer(&mut caller, subs)
                {
                    let mem = memory(&mut caller);
                    if slice_at(mem, events, EVENT_BYTES).is_none()
                        || slice_at(mem, nevents, 4).is_none()
                    {
                        return Ok(ERRNO_FAULT);
                    }
                    tokio::time::sleep(Duration::from_nanos(timeout)).await;
                    return Ok(write_clock_event(&mut caller, events, nevents, userdata));
                }
                let fuel = caller.as_context_mut().hostcall_fuel();
                let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
                    wasmtime::bail!("missing required memory export");
                };
                let (bytes, state) = memory.data_and_store_mut(&mut caller);
                let wasi = &mut state.wasi;
                wasmtime_wasi::p1::wasi_snapshot_preview1::WasiSnapshotPreview1::set_hostcall_fuel(
                    wasi, fuel,
                );
                let mut memory = wiggle::GuestMemory::Unshared(bytes);
                wasmtime_wasi::p1::wasi_snapshot_preview1::poll_oneoff(
                    wasi,
                    &mut memory,
                    subs,
                    events,
                    n,
                    nevents,
                )
                .await
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn memory<'a>(caller: &'a mut Caller<'_, TaskState>) -> &'a mut [u8] {
    match caller.get_export("memory").and_then(|e| e.into_memory()) {
        Some(m) => m.data_mut(caller),
        None => &mut [],
    }
}

fn slice_at(mem: &mut [u8], ptr: i32, len: usize) -> Option<&mut [u8]> {
    let start = ptr as u32 as usize;
    mem.get_mut(start..start.checked_add(len)?)
}

/// The userdata and timeout of subscription `subs` when it is a relative clock timer.
fn lone_relative_timer(caller: &mut Caller<'_, TaskState>, subs: i32) -> Option<(u64, u64)> {
    let sub = slice_at(memory(caller), subs, SUBSCRIPTION_BYTES)?;
    let u64_at = |at: usize| u64::from_le_bytes(sub[at..at + 8].try_into().unwrap_or_default());
    let tag = sub[8];
    let flags = u16::from_le_bytes([sub[40], sub[41]]);
    (tag == EVENTTYPE_CLOCK && flags & SUBCLOCKFLAGS_ABSTIME == 0).then(|| (u64_at(0), u64_at(24)))
}

/// Writes the timer's event and a count of one; the errno `poll_oneoff` returns.
fn write_clock_event(
    caller: &mut Caller<'_, TaskState>,
    events: i32,
    nevents: i32,
    userdata: u64,
) -> i32 {
    let mem = memory(caller);
    let Some(event) = slice_at(mem, events, EVENT_BYTES) else {
        return ERRNO_FAULT;
    };
    event.fill(0);
    event[..8].copy_from_slice(&userdata.to_le_bytes());
    event[10] = EVENTTYPE_CLOCK;
    let Some(count) = slice_at(mem, nevents, 4) else {
        return ERRNO_FAULT;
    };
    count.copy_from_slice(&1u32.to_le_bytes());
    ERRNO_SUCCESS
}
