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

/// A valid command module of about `mib` MiB of code that takes seconds to compile: many
/// functions of plain arithmetic, encoded by hand.
fn slow_to_compile(mib: usize) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn section(id: u8, payload: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(payload.len(), out);
        out.extend_from_slice(payload);
    }
    // One local; 4,000 times `local.get 0, i32.const k, i32.add, local.set 0`.
    let mut body = vec![1, 1, 0x7f];
    for k in 0..4000 {
        body.extend_from_slice(&[0x20, 0, 0x41]);
        leb(k % 60 + 1, &mut body);
        body.extend_from_slice(&[0x6a, 0x21, 0]);
    }
    body.push(0x0b);
    let functions = (mib << 20) / body.len();
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut module);
    let mut funcs = Vec::new();
    leb(functions, &mut funcs);
    funcs.resize(funcs.len() + functions, 0);
    section(3, &funcs, &mut module);
    section(7, b"\x01\x06_start\x00\x00", &mut module);
    let mut code = Vec::new();
    leb(functions, &mut code);
    for _ in 0..functions {
        leb(body.len(), &mut code);
        code.extend_from_slice(&body);
    }
    section(10, &code, &mut module);
    module
}

#[test]
fn a_long_compile_is_shown_with_an_estimate_then_comes_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("big.wasm");
    std::fs::write(&module, slow_to_compile(16)).unwrap();
    let cache = dir.path().join("cache");
    let run = || {
        let out = grid(
            &[
                "run",
                "--cache-dir",
                cache.to_str().unwrap(),
                module.to_str().unwrap(),
            ],
            b"",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // `grid run`: a line (stderr is no terminal here) saying what and about how long.
    let first = run();
    assert!(
        first.contains("grid: compiling the module once for this machine (about "),
        "{first}"
    );
    assert!(!run().contains("compiling"), "compiled once");

    // A node says it in its heartbeat, with its estimate, while it compiles.
    let grid = TestGrid::start(1, &[]);
    let job = grid.grid_json(&["submit", module.to_str().unwrap()], 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let preparing = loop {
        let node = grid.grid_json(&["nodes"], 0);
        if !node["preparing"].is_null() {
            break node["preparing"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "no compile was told");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(preparing["what"], "compiling the module", "{preparing}");
    assert!(
        preparing["estimate_ms"].as_u64().unwrap() > 0,
        "{preparing}"
    );
    let status = grid.wait(job["job_id"].as_str().unwrap());
    assert_eq!(status["state"], "done", "{status}");
    // And stops saying it by its next heartbeat.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !grid.grid_json(&["nodes"], 0)["preparing"].is_null() {
        assert!(
            std::time::Instant::now() < deadline,
            "the compile is still told"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
