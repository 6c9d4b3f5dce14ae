//! The public WASI testsuite (WebAssembly/wasi-testsuite, wasm32-wasip1) run through Grid's
//! sandbox. Its tests are pinned at the last version whose configs preopen *named* directories
//! (`dirs`); later versions want a preopen named `/`, which a Grid task never has.
//!
//! A test is `NAME.wasm` with an optional `NAME.json`, every field optional:
//! `{"args": [..], "env": {..}, "dirs": ["fs-tests.dir"], "exit_code": 0, "stdout": "..", "stderr": ".."}`.
//! Mapped onto a task as the suite's runner maps it onto any runtime: a `dirs` entry (a copy) is
//! preopened read-write under its own name, as `grid run --dir HOST::NAME` does; args and env
//! as given. Exit code, and stdout/stderr where the config gives them, must match.

use crate::support::*;
use grid_sandbox::{Limits, TaskReport, TaskSpec};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const SUITES: &[&str] = &["assemblyscript", "c", "rust"];

/// Tests that cannot pass in any Grid task, and why.
const EXCLUDED: &[(&str, &str)] = &[
    (
        "assemblyscript/environ_get-multiple-variables",
        "wants exactly the config's env; Grid adds GRID_*",
    ),
    (
        "assemblyscript/environ_sizes_get-multiple-variables",
        "wants exactly the config's env; Grid adds GRID_*",
    ),
    (
        "assemblyscript/environ_sizes_get-no-variables",
        "wants an empty env; Grid adds GRID_*",
    ),
    // Any runtime with a preopen gives ENOTSOCK here (WASI's errno for a descriptor that is
    // not a socket); `sock_shutdown_errnos` in `sandbox.rs` checks EBADF on a bad one.
    (
        "c/sock_shutdown-invalid_fd",
        "takes fd 3 for a bad descriptor; in Grid fd 3 is /in (ENOTSOCK, not EBADF)",
    ),
];

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {
    args: Vec<String>,
    env: BTreeMap<String, String>,
    dirs: Vec<String>,
    exit_code: i32,
    stdout: Option<String>,
    stderr: Option<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn wasi_testsuite() {
    let root = workspace_root().join("tests/wasi-testsuite");
    let (mut ran, mut failures) = (0, Vec::new());
    for suite in SUITES {
        let mut tests: Vec<_> = std::fs::read_dir(root.join(suite))
            .unwrap_or_else(|e| panic!("{}/{suite}: {e}", root.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        tests.sort();
        for wasm in tests {
            let name = format!("{suite}/{}", wasm.file_stem().unwrap().to_string_lossy());
            if EXCLUDED.iter().any(|(n, _)| *n == name) {
                continue;
            }
            ran += 1;
            if let Err(why) = run_one(&wasm).await {
                failures.push(format!("{name}: {why}"));
            }
        }
    }
    assert!(ran >= 68, "only {ran} tests found under {}", root.display());
    assert!(
        failures.is_empty(),
        "{} of {ran} wasi-testsuite tests failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs one test as a Grid task; `Err` says what differed from its config.
async fn run_one(wasm: &Path) -> Result<(), String> {
    let config: Config = match std::fs::read_to_string(wasm.with_extension("json")) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("config: {e}"))?,
        Err(_) => Config::default(),
    };
    assert!(
        config.dirs.len() <= 1,
        "{}: one `dirs` entry at most",
        wasm.display()
    );
    // Each `dirs` entry is a copy (the tests write there), shown under its own name, as
    // `grid run --dir HOST::NAME` shows it (and as the suite's runner asks of any runtime).
    let (out, scratch) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut spec = TaskSpec::new(out.path());
    for dir in &config.dirs {
        let copy = scratch.path().join(dir);
        std::fs::create_dir_all(&copy).unwrap();
        copy_dir(&wasm.with_file_name(dir), &copy);
        spec.dirs.push((copy, dir.clone()));
    }
    spec.args = config.args.clone();
    spec.env = config.env.into_iter().collect();
    spec.deterministic = false;
    spec.limits = Limits {
        timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let bytes = std::fs::read(wasm).unwrap();
    let report = match sandbox().load(&bytes, &spec.limits).await {
        Ok(module) => sandbox().run(&module, spec).await,
        Err(refused) => TaskReport::refused(refused),
    };

    let mut problems = Vec::new();
    if report.outcome.exit_code() != Some(config.exit_code) {
        problems.push(format!(
            "ended `{}`, want exit {}",
            reason(&report),
            config.exit_code
        ));
    }
    for (stream, got, want) in [
        ("stdout", &report.stdout, &config.stdout),
        ("stderr", &report.stderr, &config.stderr),
    ] {
        if let Some(want) = want
            && got != want.as_bytes()
        {
            problems.push(format!(
                "{stream} {:?}, want {want:?}",
                String::from_utf8_lossy(got)
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&report.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
    problems.push(format!(
        "stderr ends: {:?}",
        tail.into_iter().rev().collect::<Vec<_>>()
    ));
    Err(problems.join("; "))
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir(&dest).unwrap();
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// `grid run --dir HOST::NAME` runs a program that opens its folder by name, unmodified.
#[test]
fn grid_run_shows_a_folder_under_its_own_name() {
    let root = workspace_root().join("tests/wasi-testsuite/c");
    let scratch = tempfile::tempdir().unwrap();
    copy_dir(&root.join("fs-tests.dir"), scratch.path());
    let dir = format!("{}::fs-tests.dir", scratch.path().display());
    for test in ["fopen-with-access", "pwrite-with-access", "stat-dev-ino"] {
        let wasm = root.join(format!("{test}.wasm"));
        let (v, code) = grid_run_json(&[wasm.to_str().unwrap(), "--dir", &dir], b"");
        assert_eq!(
            (code, &v["exit_code"]),
            (0, &serde_json::json!(0)),
            "{test}: {v}"
        );
    }
    let (v, code) = grid_run_json(
        &[root.join("fopen-with-access.wasm").to_str().unwrap()],
        b"",
    );
    assert_ne!(code, 0, "without --dir the folder is not there: {v}");
}
