//! Helpers shared by the tests: guest modules, a shared sandbox, fresh directories, `grid`.

use grid_node::{Sandbox, SandboxConfig, TaskReport, TaskSpec};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("grid-cli sits in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A guest built by `cargo xtask build-guests`; fails with the command to run when missing.
pub fn guest(name: &str) -> PathBuf {
    let path = target_dir()
        .join("wasm32-wasip1/guest")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the guests with `cargo xtask build-guests` (`cargo xtask test` does it for you)",
        path.display()
    );
    path
}

pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).expect("readable guest")
}

pub fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("valid WAT in the test")
}

/// One sandbox for the whole test binary: every test's tasks share its engine, concurrently,
/// which is how a node runs them.
pub fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let cache = tempfile::tempdir().expect("temp dir").keep();
        Sandbox::new(SandboxConfig {
            cache_dir: Some(cache),
            ..SandboxConfig::default()
        })
        .expect("sandbox starts")
    })
}

/// A task's world on the host: `root/in` (with `data.txt`) and `root/out`. Anything else that
/// appears under `root` was written outside the sandbox's `/out`.
pub struct TaskDirs {
    pub root: tempfile::TempDir,
}

impl TaskDirs {
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join("in")).unwrap();
        std::fs::create_dir(root.path().join("out")).unwrap();
        std::fs::write(root.path().join("in/data.txt"), "input data").unwrap();
        Self { root }
    }
    pub fn input(&self) -> PathBuf {
        self.root.path().join("in")
    }
    pub fn output(&self) -> PathBuf {
        self.root.path().join("out")
    }

    /// Asserts that nothing appeared beside `in/` and `out/`, and that `in/` is unchanged.
    pub fn assert_nothing_outside_out(&self) {
        let mut names: Vec<String> = std::fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["in", "out"], "the task wrote outside /out");
        let mut inputs: Vec<String> = std::fs::read_dir(self.input())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        inputs.sort();
        assert_eq!(inputs, ["data.txt"], "the task changed /in");
        assert_eq!(
            std::fs::read_to_string(self.input().join("data.txt")).unwrap(),
            "input data"
        );
    }
}

/// Loads `bytes` and runs one task of it with `configure` applied to the spec.
pub async fn run_task(
    bytes: &[u8],
    dirs: &TaskDirs,
    configure: impl FnOnce(&mut TaskSpec),
) -> TaskReport {
    let mut spec = TaskSpec::new(&dirs.output());
    spec.input_dir = Some(dirs.input());
    configure(&mut spec);
    match sandbox().load(bytes, &spec.limits).await {
        Ok(module) => sandbox().run(&module, spec).await,
        Err(reason) => TaskReport::refused(reason),
    }
}

pub fn reason(report: &TaskReport) -> String {
    report
        .outcome
        .reason()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "succeeded".into())
}

/// Runs a well-behaved task in the shared engine and checks its result: proof that whatever
/// ran before left the engine healthy.
pub async fn assert_a_good_task_runs() {
    let dirs = TaskDirs::new();
    let report = run_task(&guest_bytes("monte-carlo-pi"), &dirs, |s| {
        s.stdin = br#"{"samples": 20000}"#.to_vec()
    })
    .await;
    assert_eq!(
        reason(&report),
        "succeeded",
        "stderr: {}",
        String::from_utf8_lossy(&report.stderr)
    );
    let estimate = std::fs::read_to_string(dirs.output().join("estimate.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&estimate).unwrap();
    assert_eq!(v["samples"], 20000);
    assert!((v["pi"].as_f64().unwrap() - std::f64::consts::PI).abs() < 0.1);
}

/// `grid` with `args`, `stdin` on its standard input, and a private module cache.
pub fn grid(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let cache = cli_cache_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_grid"))
        .args(args)
        .env("GRID_CACHE_DIR", cache)
        .env("GRID_TEST_HOST_SECRET", "must-not-leak")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("grid starts");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().expect("grid finishes")
}

fn cli_cache_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap().keep())
}

/// `grid run --json …`: the parsed JSON line and the exit code.
pub fn grid_run_json(args: &[&str], stdin: &[u8]) -> (serde_json::Value, i32) {
    let mut all = vec!["run", "--json"];
    all.extend_from_slice(args);
    let out = grid(&all, stdin);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "--json prints exactly one line, got: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    (value, out.status.code().expect("exit code"))
}
