//! The `/out` quota and the open-handle limit, enforced inside the WASI calls that write.
//!
//! The preview 1 functions that can grow `/out` (`fd_write`, `fd_pwrite`, `fd_allocate`,
//! `fd_filestat_set_size`) or add entries to it (`path_open` with `O_CREAT`,
//! `path_create_directory`, `path_symlink`, `path_link`) reach wasmtime-wasi through the guard
//! module (see [`crate::guard`]), which calls the hooks here before and after each of them: a
//! write never puts more bytes on disk than the quota has room for, and a task whose `/out`
//! grows past its limit ends at once with `limit: output` / `limit: files` — while writing, not
//! afterwards.
//!
//! The byte and entry counts are kept by [`crate::quota::OutputQuota`], which says how they stay
//! exact and cheap, why they fail closed (its walks go through directory handles, see
//! [`crate::tree`], and a tree they cannot account for whole counts as over the limit), and how
//! far the disk a task uses can pass its limit; the hooks here feed it the sizes of the task's
//! open writable files.
//!
//! Links: a guest may create only relative symlinks whose target has no `..` component, so a
//! link cannot point outside `/out`; outputs are collected without following links. Hard links
//! are made only between writable folders (wasmtime-wasi refuses one out of `/in`: it would make
//! an input writable) and count once in the quota.
//!
//! Open files: the WASI handle table is capped at the task's `max_open_files`; a guest that runs
//! out of handles ends with `limit: open-files`.

use crate::guard::HOOKS_MODULE;
use crate::task_state::{LimitHit, TaskState};
use grid_proto::Limit;
use std::os::unix::fs::MetadataExt;
use wasmtime::{Caller, Linker, Result};
use wasmtime_wasi::filesystem::Descriptor;
use wasmtime_wasi::{OpenMode, WasiView};

const ERRNO_PERM: i32 = 63;
const OFLAGS_CREAT: i32 = 1;

/// (dev, ino) and size of every file the guest has open for writing.
fn open_writable_files(store: &mut TaskState) -> Vec<((u64, u64), u64)> {
    let table = store.wasi.ctx().table;
    let mut files = Vec::new();
    for entry in table.iter_mut() {
        if let Some(Descriptor::File(f)) = entry.downcast_ref::<Descriptor>()
            && f.open_mode.contains(OpenMode::WRITE)
            && let Ok(meta) = f.file.metadata()
        {
            files.push(((meta.dev(), meta.ino()), meta.len()));
        }
    }
    files
}

fn check_bytes(caller: &mut Caller<'_, TaskState>, extra: u64) -> Result<()> {
    let files = open_writable_files(caller.data_mut());
    if caller.data_mut().quota.fits(&files, extra) {
        Ok(())
    } else {
        Err(LimitHit(Limit::Output).into())
    }
}

fn check_new_entry(caller: &mut Caller<'_, TaskState>) -> Result<()> {
    let files = open_writable_files(caller.data_mut());
    if caller.data_mut().quota.add_entry(&files) {
        Ok(())
    } else {
        Err(LimitHit(Limit::Files).into())
    }
}

fn memory<'a>(caller: &'a mut Caller<'_, TaskState>) -> &'a [u8] {
    match caller.get_export("memory").and_then(|e| e.into_memory()) {
        Some(m) => m.data(caller),
        None => &[],
    }
}

fn read_u32(mem: &[u8], ptr: i32) -> Option<u32> {
    let start = ptr as u32 as usize;
    let bytes = mem.get(start..start.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// The total length of a guest iovec array, if it lies in memory (else the original reports EFAULT).
fn iovecs_len(caller: &mut Caller<'_, TaskState>, iovs: i32, count: i32) -> u64 {
    let mem = memory(caller);
    let mut total = 0u64;
    for i in 0..(count as u32).min(1024) {
        let Some(at) = (iovs as u32).checked_add(i * 8) else {
            break;
        };
        if let Some(len) = read_u32(mem, at as i32 + 4) {
            total = total.saturating_add(len as u64);
        }
    }
    total
}

fn guest_str(caller: &mut Caller<'_, TaskState>, ptr: i32, len: i32) -> Option<String> {
    let mem = memory(caller);
    let start = ptr as u32 as usize;
    let bytes = mem.get(start..start.checked_add(len as u32 as usize)?)?;
    String::from_utf8(bytes.to_vec()).ok()
}

/// A symlink target that stays inside the directory tree it is created in.
fn is_contained_link_target(target: &str) -> bool {
    !target.is_empty() && !target.starts_with('/') && !target.split('/').any(|c| c == "..")
}

fn hook<P: wasmtime::WasmTyList + Send + Sync + 'static>(
    linker: &mut Linker<TaskState>,
    name: &str,
    check: impl Fn(&mut Caller<'_, TaskState>, P) -> Result<i32> + Send + Sync + 'static,
) -> Result<()> {
    let check = std::sync::Arc::new(check);
    linker.func_wrap_async(
        HOOKS_MODULE,
        &format!("pre_{name}"),
        move |mut caller: Caller<'_, TaskState>, args: P| {
            let check = check.clone();
            Box::new(async move { check(&mut caller, args) })
        },
    )?;
    Ok(())
}

/// Defines the `grid_hooks` functions the guard module calls around each guarded WASI call.
/// A pre-hook returns 0 to let the call through, or an errno to return instead; a limit ends
/// the task by returning a [`LimitHit`] error.
pub fn add_hooks(linker: &mut Linker<TaskState>) -> Result<()> {
    hook(
        linker,
        "fd_write",
        |c, (fd, iovs, n, _nw): (i32, i32, i32, i32)| {
            if !c.data().is_stdio(fd) {
                let want = iovecs_len(c, iovs, n);
                check_bytes(c, want)?;
            }
            Ok(0)
        },
    )?;
    hook(
        linker,
        "fd_pwrite",
        |c, (_fd, iovs, n, _off, _nw): (i32, i32, i32, i64, i32)| {
            let want = iovecs_len(c, iovs, n);
            check_bytes(c, want)?;
            Ok(0)
        },
    )?;
    hook(
        linker,
        "fd_allocate",
        |c, (_fd, offset, len): (i32, i64, i64)| {
            let end = (offset as u64).saturating_add(len as u64);
            if end > c.data().quota.max_bytes {
                return Err(LimitHit(Limit::Output).into());
            }
            Ok(0)
        },
    )?;
    hook(
        linker,
        "fd_filestat_set_size",
        |c, (_fd, size): (i32, i64)| {
            if size as u64 > c.data().quota.max_bytes {
                return Err(LimitHit(Limit::Output).into());
            }
            Ok(0)
        },
    )?;
    hook(
        linker,
        "path_open",
        |c, args: (i32, i32, i32, i32, i32, i64, i64, i32, i32)| {
            if args.4 & OFLAGS_CREAT != 0 {
                check_new_entry(c)?;
            }
            Ok(0)
        },
    )?;
    hook(linker, "path_create_directory", |c, _: (i32, i32, i32)| {
        check_new_entry(c)?;
        Ok(0)
    })?;
    hook(
        linker,
        "path_symlink",
        |c, (target, target_len, _fd, _new, _new_len): (i32, i32, i32, i32, i32)| {
            if !guest_str(c, target, target_len).is_some_and(|t| is_contained_link_target(&t)) {
                return Ok(ERRNO_PERM);
            }
            check_new_entry(c)?;
            Ok(0)
        },
    )?;
    // Hard links: wasmtime-wasi links only between writable directories of the same
    // permissions (`/out`, a runtime's `/tmp`), so no read-only file gains a writable name; a
    // link is an entry, and its file counts once (by inode) in the quota.
    hook(
        linker,
        "path_link",
        |c, _: (i32, i32, i32, i32, i32, i32, i32)| {
            check_new_entry(c)?;
            Ok(0)
        },
    )?;
    // Renumbering onto 0..=2 turns a standard stream into a file: from then on, count it.
    hook(linker, "fd_renumber", |c, (_from, to): (i32, i32)| {
        if (0..=2).contains(&to) {
            c.data_mut().stdio_replaced = true;
        }
        Ok(0)
    })?;
    linker.func_wrap(HOOKS_MODULE, "post", |mut caller: Caller<'_, TaskState>| {
        check_bytes(&mut caller, 0)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets_must_stay_inside() {
        assert!(is_contained_link_target("data.csv"));
        assert!(is_contained_link_target("shards/0.csv"));
        assert!(!is_contained_link_target("/etc/passwd"));
        assert!(!is_contained_link_target("../../etc"));
        assert!(!is_contained_link_target("a/../../b"));
        assert!(!is_contained_link_target(""));
    }
}
