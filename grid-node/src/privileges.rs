//! The node's second line of defence, behind wasmtime: what the node *process* may still do if a
//! guest ever found a way out of the sandbox (a wasmtime, cranelift or wgpu bug).
//!
//! Done once, in [`drop_privileges`], before the node starts any thread or connects:
//!
//! - **A user of its own.** Started as root with `--user NAME` (config `user`), the node makes
//!   its cache folder NAME's, reads its credentials, and switches to NAME's uid and gid with no
//!   supplementary groups. Leaving root clears every capability (effective, permitted and
//!   ambient). Started as root without `--user`, it warns and keeps root.
//! - **No new privileges** (`PR_SET_NO_NEW_PRIVS`): nothing the node or its GPU worker executes
//!   can gain privileges (set-uid programs, file capabilities).
//! - **A seccomp filter** ([`seccompiler`], from rust-vmm, as in Firecracker) on every thread and
//!   inherited by the GPU worker: the system calls a node never makes and an attacker wants —
//!   debugging other processes and taking their file descriptors (`pidfd_getfd`), kernel
//!   modules and kexec, mounts (`mount` and the new API: `fsopen`, `fsconfig`, `fsmount`,
//!   `fspick`, `move_mount`, `open_tree`, `mount_setattr`) and namespaces (`unshare`, `setns`,
//!   and `clone` with any `CLONE_NEW*` flag), io_uring (a large kernel surface that seccomp
//!   cannot see into), BPF, perf events, keyrings, userfaultfd, raw I/O ports, clock and swap
//!   changes, reboot — fail with `EPERM`. `clone3` fails with `ENOSYS`: its flags sit in a
//!   struct that seccomp cannot read, and `ENOSYS` is the answer on which glibc (2.34 and later,
//!   for threads and `posix_spawn`) falls back to `clone`, whose flags it can; `EPERM` would
//!   make every new thread fail.
//! - **Private folders**: task folders (`work/`), fetched modules and programs are mode 0700
//!   (see [`crate::workdirs`]); compiled code is too (`grid_sandbox::cache`).
//!
//! What remains: the filter is a deny list, not an allow list — wasmtime, tokio, NATS and a GPU
//! driver need a large and version-dependent set of calls (JIT memory, threads, sockets, GPU
//! ioctls), and an allow list that misses one kills the node in the field. So a system call
//! added to the kernel after this list was written is allowed until it is listed (the newest
//! mount calls, `open_tree_attr`, `listmount` and `statmount`, have no constant in `libc` yet),
//! and `clone`'s flags are read as its first argument, which they are on the architectures
//! seccompiler builds filters for (x86_64, aarch64, riscv64). The node can still read what its
//! user can read, reach the network (it must reach NATS), and write its cache folder. Run it as
//! a dedicated user, in a container or VM if the machine holds secrets.

use std::path::Path;

/// The system calls the node's filter refuses (see the module docs for why these).
const DENIED: &[(&str, i64)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("reboot", libc::SYS_reboot),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("syslog", libc::SYS_syslog),
    ("quotactl", libc::SYS_quotactl),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("vhangup", libc::SYS_vhangup),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
];

/// The flags that make `clone` create namespaces, refused like `unshare`. (`CLONE_NEWTIME`
/// exists only for `unshare` and `clone3`.)
const CLONE_NAMESPACES: [libc::c_int; 7] = [
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWCGROUP,
];

/// What [`drop_privileges`] did, for the log.
#[derive(Debug)]
pub struct Dropped {
    /// The user the node now runs as, when it switched.
    pub user: Option<String>,
    pub denied_syscalls: usize,
}

/// Switches to `user` (when started as root), sets no-new-privileges and installs the seccomp
/// filter on every thread. Call it before the node starts threads: `Err` is one line.
pub fn drop_privileges(user: Option<&str>, cache_dir: &Path) -> Result<Dropped, String> {
    let switched = match user {
        Some(name) => {
            switch_user(name, cache_dir)?;
            Some(name.to_string())
        }
        None => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                tracing::warn!(
                    "grid-node runs as root: pass --user NAME (a user of its own, e.g. grid) to run it unprivileged"
                );
            }
            None
        }
    };
    let denied_syscalls = install_filter(true)?;
    Ok(Dropped {
        user: switched,
        denied_syscalls,
    })
}

/// Installs the filter on the calling thread only, or with `all_threads` on every thread of the
/// process (and, either way, on what they start later). Returns how many system calls it
/// refuses, outright or for some arguments.
pub fn install_filter(all_threads: bool) -> Result<usize, String> {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule,
    };
    use std::collections::BTreeMap;
    let arch: seccompiler::TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: {e:?}"))?;
    let rule_error = |e: seccompiler::BackendError| format!("seccomp rule: {e}");
    let mut refused: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
    // `clone` whose flags (its first argument) carry any namespace flag; rules of a system
    // call are alternatives.
    let mut clone = Vec::new();
    for flag in CLONE_NAMESPACES {
        let flag = flag as u64;
        let has_flag = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .map_err(rule_error)?;
        clone.push(SeccompRule::new(vec![has_flag]).map_err(rule_error)?);
    }
    refused.insert(libc::SYS_clone, clone);
    let unsupported = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let count = refused.len() + unsupported.len();
    // Two filters, one answer each; the kernel runs both on every call.
    for (rules, errno) in [(refused, libc::EPERM), (unsupported, libc::ENOSYS)] {
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )
        .map_err(|e| format!("seccomp filter: {e}"))?;
        let program: BpfProgram = filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))?;
        // Both set no-new-privileges first, as the kernel requires of an unprivileged process.
        let applied = if all_threads {
            seccompiler::apply_filter_all_threads(&program)
        } else {
            seccompiler::apply_filter(&program)
        };
        applied.map_err(|e| format!("installing the seccomp filter: {e}"))?;
    }
    Ok(count)
}

fn switch_user(name: &str, cache_dir: &Path) -> Result<(), String> {
    let (uid, gid) = lookup(name)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        if euid == uid {
            return Ok(()); // already that user
        }
        return Err(format!(
            "--user {name}: switching users needs the node started as root (it runs as uid {euid})"
        ));
    }
    if uid == 0 {
        return Err(format!(
            "--user {name}: that is root; name an unprivileged user"
        ));
    }
    // The cache becomes the user's: it writes modules, compiled code and task folders there.
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| format!("creating {}: {e}", cache_dir.display()))?;
    chown_tree(cache_dir, uid, gid)
        .map_err(|e| format!("giving {} to {name}: {e}", cache_dir.display()))?;
    // SAFETY: plain system calls with no pointers but the empty group list; glibc applies
    // setgid/setuid to every thread of the process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(format!(
                "dropping groups: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::setgid(gid) != 0 {
            return Err(format!(
                "setgid({gid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::setuid(uid) != 0 {
            return Err(format!(
                "setuid({uid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        // Root cannot be regained.
        if libc::setuid(0) == 0 {
            return Err("the node could become root again after dropping it".into());
        }
    }
    // Every ancestor must let the user through, or nothing would work later.
    let probe = cache_dir.join(".grid-user-probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            format!(
                "user {name} cannot write the cache folder {} ({e}): pick a --cache-dir it can reach, e.g. /var/cache/grid",
                cache_dir.display()
            )
        })?;
    Ok(())
}

/// The uid and gid of user `name`.
fn lookup(name: &str) -> Result<(u32, u32), String> {
    let c_name = std::ffi::CString::new(name).map_err(|_| format!("--user {name:?}: bad name"))?;
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buffer` outlives the use of `entry`.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!(
            "--user {name}: no such user on this machine (create one, e.g. `useradd --system {name}`)"
        ));
    }
    Ok((entry.pw_uid, entry.pw_gid))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errno of a system call that returned `rc`, or `None` if it succeeded.
    fn errno(rc: libc::c_long) -> Option<i32> {
        (rc == -1).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    #[test]
    fn the_filter_refuses_what_it_lists_and_nothing_a_node_needs() {
        // On a thread of its own: the filter stays there.
        std::thread::spawn(|| {
            install_filter(false).unwrap();
            let null = std::ptr::null_mut::<libc::c_void>();
            // SAFETY: plain system calls, each refused before the kernel looks at its arguments
            // (the filter's answers differ from the kernel's: EPERM where the kernel would say
            // EINVAL, EFAULT or EBADF, ENOSYS where it would say EINVAL); a clone that got
            // through anyway exits at once in the child.
            unsafe {
                assert_eq!(
                    errno(libc::unshare(libc::CLONE_NEWUTS).into()),
                    Some(libc::EPERM)
                );
                assert_eq!(
                    errno(libc::unshare(libc::CLONE_NEWUSER).into()),
                    Some(libc::EPERM)
                );
                assert_eq!(
                    errno(libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0)),
                    Some(libc::EPERM)
                );
                assert_eq!(
                    errno(libc::syscall(libc::SYS_bpf, 0, 0, 0)),
                    Some(libc::EPERM)
                );
                for flags in [libc::CLONE_NEWUSER, libc::CLONE_NEWNET | libc::CLONE_NEWNS] {
                    let flags = (flags | libc::SIGCHLD) as libc::c_ulong;
                    let child = libc::syscall(libc::SYS_clone, flags, null, null, null, 0usize);
                    if child == 0 {
                        libc::_exit(0);
                    }
                    if child > 0 {
                        libc::waitpid(child as libc::pid_t, std::ptr::null_mut(), 0);
                    }
                    assert_eq!(errno(child), Some(libc::EPERM), "clone with {flags:#x}");
                }
                assert_eq!(
                    errno(libc::syscall(libc::SYS_io_uring_setup, 1u32, null)),
                    Some(libc::EPERM)
                );
                assert_eq!(
                    errno(libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), 0u32)),
                    Some(libc::EPERM)
                );
                assert_eq!(
                    errno(libc::syscall(libc::SYS_pidfd_getfd, -1i32, 0i32, 0u32)),
                    Some(libc::EPERM)
                );
                assert_eq!(
                    errno(libc::syscall(libc::SYS_clone3, null, 0usize)),
                    Some(libc::ENOSYS),
                    "ENOSYS, on which glibc falls back to clone"
                );
            }
            // What a node does every day still works: files, threads (glibc tries clone3 first,
            // then clone), memory, a child process (posix_spawn, the same way).
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("f"), b"x").unwrap();
            std::thread::spawn(|| 1 + 1).join().unwrap();
            let v = vec![0u8; 64 << 20];
            assert_eq!(v.len(), 64 << 20);
            assert!(
                std::process::Command::new("true")
                    .status()
                    .unwrap()
                    .success()
            );
        })
        .join()
        .unwrap();
    }
}
