//! The compiled-module cache: reused when intact, never trusted when not.

use crate::support::*;
use grid_sandbox::{Limits, Sandbox, SandboxConfig, TaskSpec};

fn artifacts(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    found.sort();
    found
}

async fn run_pi(sandbox: &Sandbox) -> String {
    let module = sandbox
        .load(&guest_bytes("monte-carlo-pi"), &Limits::default())
        .await
        .expect("loads");
    let out = tempfile::tempdir().unwrap();
    let mut spec = TaskSpec::new(out.path());
    spec.stdin = br#"{"samples": 1000}"#.to_vec();
    let report = sandbox.run(&module, spec).await;
    assert_eq!(report.outcome, grid_proto::Outcome::Succeeded);
    String::from_utf8(report.stdout).unwrap()
}

fn sandbox_with_cache(dir: &std::path::Path) -> Sandbox {
    Sandbox::new(SandboxConfig {
        cache_dir: Some(dir.to_path_buf()),
        ..SandboxConfig::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_artifact_is_detected_and_recompiled() {
    let cache = tempfile::tempdir().unwrap();
    let first = run_pi(&sandbox_with_cache(cache.path())).await;
    let files = artifacts(cache.path());
    assert!(!files.is_empty(), "the compiled module was cached");
    for file in &files {
        let mut bytes = std::fs::read(file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(file, bytes).unwrap();
    }
    let modified: Vec<_> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert_eq!(run_pi(&sandbox_with_cache(cache.path())).await, first);
    let rewritten: Vec<_> = artifacts(cache.path())
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    assert_ne!(
        modified, rewritten,
        "tampered artifacts were replaced by fresh ones"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_artifact_written_by_another_node_is_not_loaded() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    run_pi(&sandbox_with_cache(ours.path())).await;
    run_pi(&sandbox_with_cache(theirs.path())).await;
    // Same module, same engine, different node keys: swap their artifacts.
    for (a, b) in artifacts(ours.path()).iter().zip(artifacts(theirs.path())) {
        assert_eq!(a.file_name(), b.file_name());
        std::fs::copy(&b, a).unwrap();
    }
    let foreign: Vec<_> = artifacts(ours.path())
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    run_pi(&sandbox_with_cache(ours.path())).await;
    let after: Vec<_> = artifacts(ours.path())
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    assert_ne!(
        foreign, after,
        "a foreign artifact fails the node's HMAC and is recompiled"
    );
}

#[test]
fn the_cache_key_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let cache = tempfile::tempdir().unwrap();
    sandbox_with_cache(cache.path());
    let mode = std::fs::metadata(cache.path().join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(cache.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
}
