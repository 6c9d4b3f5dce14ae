//! Per-tenant storage: each tenant's object store is capped by the grid's quota, and `grid
//! delete` frees what a job stored without touching what other jobs use.

use crate::support::{TestGrid, guest, tenant_creds};
use serde_json::Value;
use std::path::Path;

/// `count` files of `bytes` bytes each, all different, in a new folder.
fn inputs(count: usize, bytes: usize, salt: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..count {
        let mut state = salt * 1000 + i as u64 + 1;
        let data: Vec<u8> = (0..bytes)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        std::fs::write(dir.path().join(format!("part-{i}.bin")), data).unwrap();
    }
    dir
}

fn as_tenant(grid: &TestGrid, tenant: &str, args: &[&str]) -> std::process::Output {
    let creds = tenant_creds(tenant);
    let mut all = args.to_vec();
    all.splice(1..1, ["--creds", creds.to_str().unwrap()]);
    grid.grid(&all)
}

fn json_of(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

fn submit_inputs(grid: &TestGrid, tenant: &str, dir: &Path) -> std::process::Output {
    as_tenant(
        grid,
        tenant,
        &[
            "submit",
            guest("hostile").to_str().unwrap(),
            "--input",
            dir.to_str().unwrap(),
            "--wait",
            "--json",
            "--",
            "exit",
            "0",
        ],
    )
}

#[test]
fn a_tenants_store_is_capped_by_its_quota_and_delete_frees_it() {
    let grid = TestGrid::start(1, &["--tenant-quota", "1MiB"]);
    let first = inputs(2, 350_000, 1);
    let second = inputs(2, 350_000, 2);
    let done = json_of(&submit_inputs(&grid, "carol", first.path()));
    assert_eq!(done["state"], "done", "{done}");
    let job = done["job_id"].as_str().unwrap().to_string();

    // The module and 700 kB of inputs are stored; 700 kB more do not fit in 1 MiB.
    let full = submit_inputs(&grid, "carol", second.path());
    let stderr = String::from_utf8_lossy(&full.stderr);
    assert_eq!(full.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the storage quota of tenant carol is full")
            && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
    // Another tenant's quota is its own.
    let other = json_of(&submit_inputs(&grid, "dave", second.path()));
    assert_eq!(other["state"], "done", "{other}");

    let deleted = json_of(&as_tenant(&grid, "carol", &["delete", &job, "--json"]));
    let module = std::fs::metadata(guest("hostile")).unwrap().len();
    assert_eq!(deleted["objects_deleted"], 3, "{deleted}");
    assert_eq!(deleted["bytes_freed"], module + 700_000, "{deleted}");
    let gone = as_tenant(&grid, "carol", &["status", &job]);
    assert_eq!(gone.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&gone.stderr).trim(),
        format!("grid: unknown job {job}")
    );
    // Room again.
    let again = json_of(&submit_inputs(&grid, "carol", second.path()));
    assert_eq!(again["state"], "done", "{again}");
}

#[test]
fn deleting_a_job_keeps_what_other_jobs_use() {
    let grid = TestGrid::start(1, &[]);
    let module = guest("monte-carlo-pi");
    let run = |tasks: &str| {
        json_of(&grid.grid(&[
            "submit",
            module.to_str().unwrap(),
            "--tasks",
            tasks,
            // One seed for both jobs, so that their tasks 0 and 1 write the same bytes.
            "--seed",
            "1",
            "--wait",
            "--json",
        ]))
    };
    let kept = run("2");
    let doomed = run("3");
    let doomed_id = doomed["job_id"].as_str().unwrap();
    // The same module, and (same seed) the same outputs for tasks 0 and 1: all shared.
    let deleted = json_of(&grid.grid(&["delete", doomed_id, "--json"]));
    assert_eq!(
        deleted["objects_deleted"], 2,
        "only task 2's output and log are the deleted job's alone: {deleted}"
    );
    let (dir, manifest) = grid.results(kept["job_id"].as_str().unwrap());
    assert_eq!(manifest.len(), 2);
    for task in 0..2 {
        assert!(dir.path().join(format!("{task}/estimate.json")).is_file());
    }
    // A job that still runs is not deleted.
    let running = json_of(&grid.grid(&[
        "submit",
        guest("hostile").to_str().unwrap(),
        "--json",
        "--",
        "nap",
        "3000",
    ]));
    let id = running["job_id"].as_str().unwrap();
    let out = grid.grid(&["delete", id]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cancel it first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nor another tenant's.
    let out = as_tenant(&grid, "eve", &["delete", kept["job_id"].as_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("permission denied: tenant eve cannot delete job"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The broker often stores the same output at about the same moment (tasks whose outputs are
/// equal), and a tenant may upload the same file from several places. Each put used to send
/// the bytes again, and one that found the object stored by the time it wrote its metadata
/// purged the old chunks. Now puts of one object go one at a time and each checks first: the
/// bytes travel once.
#[tokio::test(flavor = "multi_thread")]
async fn one_object_stored_by_many_puts_at_once_is_sent_once_and_every_put_succeeds() {
    let grid = TestGrid::start(0, &[]);
    // The tenant's store comes with its first job (no node: it only waits).
    let submitted = as_tenant(
        &grid,
        "puts",
        &["submit", guest("hostile").to_str().unwrap(), "--json"],
    );
    json_of(&submitted);
    let tenant = tenant_creds("puts");
    let client = grid_client::connect_with(&grid.nats.url, false, Some(&tenant))
        .await
        .unwrap();
    let store = grid_client::Grid::open(client).await.unwrap();
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let puts: Vec<_> = (0..8)
        .map(|_| {
            let (store, bytes) = (store.clone(), bytes.clone());
            tokio::spawn(async move { store.put_object("puts", &bytes).await })
        })
        .collect();
    let mut sent = 0;
    let mut sha = None;
    for put in puts {
        let (hash, was_sent) = put.await.unwrap().expect("every put succeeds");
        sent += usize::from(was_sent);
        sha = Some(hash);
    }
    assert_eq!(sent, 1, "the bytes travel once");
    let sha = sha.unwrap();
    assert_eq!(
        store
            .get_object("puts", &sha, bytes.len() as u64)
            .await
            .unwrap(),
        bytes
    );
}
