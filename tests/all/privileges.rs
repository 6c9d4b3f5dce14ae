//! The node's second line of defence behind wasmtime (`grid_node::privileges`): started as
//! root with `--user`, it runs as that user with no capabilities; always, with
//! no-new-privileges and a seccomp filter, and with task folders that are its user's alone —
//! and it still serves CPU and GPU tasks. (What the filter refuses is checked system call by
//! system call in `grid_node::privileges`'s own tests, under the same filter.)

use crate::support::{GridProcess, TestGrid, guest};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn uid_of(user: &str) -> u32 {
    let out = std::process::Command::new("id")
        .args(["-u", user])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn a_node_runs_unprivileged_under_seccomp_and_still_serves() {
    let mut grid = TestGrid::start(0, &[]);
    let root = rustix::process::geteuid().is_root();
    // A cache the user can reach (temp dirs are root's alone).
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = base.path().join("node");
    let flags: &[&str] = if root { &["--user", "nobody"] } else { &[] };
    grid.nodes.push(GridProcess::node_with(
        &grid.nats, "locked", &cache, 2, flags,
    ));
    grid.wait_for_nodes(1);

    let status = proc_status(grid.nodes[0].pid());
    assert_eq!(field(&status, "NoNewPrivs"), "1", "{status}");
    assert_eq!(field(&status, "Seccomp"), "2", "filter mode: {status}");
    if root {
        let nobody = uid_of("nobody").to_string();
        assert_eq!(
            field(&status, "Uid").split_whitespace().collect::<Vec<_>>(),
            [nobody.as_str(); 4],
            "{status}"
        );
        for caps in ["CapEff", "CapPrm", "CapAmb"] {
            assert_eq!(field(&status, caps), "0000000000000000", "{caps}: {status}");
        }
    }

    // It serves a CPU job and a GPU job (its GPU worker runs as the same user, same filter).
    let cpu = grid.grid_json(
        &[
            "submit",
            guest("monte-carlo-pi").to_str().unwrap(),
            "--tasks",
            "2",
            "--wait",
        ],
        0,
    );
    assert_eq!(cpu["state"], "done", "{cpu}");
    let gpu = grid.grid_json(
        &[
            "submit",
            guest("hostile").to_str().unwrap(),
            "--gpu",
            "--wait",
            "--",
            "gpu-double",
        ],
        0,
    );
    assert_eq!(gpu["state"], "done", "{gpu}");
    if root {
        let modules = std::fs::metadata(cache.join("modules")).unwrap();
        assert_eq!(modules.uid(), uid_of("nobody"), "the cache is the user's");
    }
    // Task folders (kept for the next task) and tenants' modules: the node's user's alone.
    let mut private = vec![cache.join("work"), cache.join("modules")];
    for task in std::fs::read_dir(cache.join("work")).unwrap() {
        let task = task.unwrap().path();
        private.extend([task.join("in"), task.join("out"), task]);
    }
    assert!(private.len() > 2, "a task folder is kept for reuse");
    for dir in private {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
    }
}

#[test]
fn a_node_refuses_a_user_it_cannot_become() {
    let grid = TestGrid::start(0, &[]);
    let creds = crate::support::creds(crate::support::Role::Provider, "nouser");
    let out = grid.grid(&[
        "node",
        "--no-gpu",
        "--creds",
        creds.to_str().unwrap(),
        "--user",
        "no-such-user-here",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--user no-such-user-here: no such user on this machine"),
        "{stderr}"
    );
}
