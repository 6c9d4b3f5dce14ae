//! The `sandbox` target: generated modules (and raw bytes) loaded and run under small limits.

use crate::Verdict;
use grid_sandbox::{Limits, Sandbox, SandboxConfig, TaskReport, TaskSpec};
use std::time::{Duration, Instant};

/// What generated modules may import: real WASI calls with their real types, so that
/// generated code reaches the host side (file system, clocks, randomness, exit).
const WASI_IMPORTS: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_seek" (func (param i32 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_pwrite" (func (param i32 i32 i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_filestat_set_size" (func (param i32 i64) (result i32)))
  (import "wasi_snapshot_preview1" "fd_readdir" (func (param i32 i32 i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_create_directory" (func (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_symlink" (func (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_rename" (func (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_unlink_file" (func (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
)"#;

pub struct Fuzzer {
    sandbox: Sandbox,
    config: wasm_smith::Config,
}

impl Fuzzer {
    pub fn new() -> anyhow::Result<Self> {
        let mut config = wasm_smith::Config {
            available_imports: Some(wat::parse_str(WASI_IMPORTS)?),
            // WASI calls need an exported memory to read their arguments from.
            exports: Some(wat::parse_str(
                r#"(module (func (export "_start")) (memory (export "memory") 1))"#,
            )?),
            max_memory32_bytes: 32 << 20,
            max_table_elements: 10_000,
            max_tables: 2,
            max_memories: 0, // besides the exported one
            max_instructions: 400,
            threads_enabled: false,
            ..wasm_smith::Config::default()
        };
        config.memory64_enabled = false;
        Ok(Self {
            sandbox: Sandbox::new(SandboxConfig::default())?,
            config,
        })
    }

    pub async fn case(&self, input: &[u8]) -> Verdict {
        let mut u = arbitrary::Unstructured::new(input);
        // One case in eight is raw bytes; the rest become a module.
        let raw = input.first().is_some_and(|b| b % 8 == 0);
        let bytes = if raw {
            input.to_vec()
        } else {
            match wasm_smith::Module::new(self.config.clone(), &mut u) {
                Ok(module) => module.to_bytes(),
                Err(_) => return Ok("too little input".into()),
            }
        };
        let limits = Limits {
            memory_bytes: 32 << 20,
            timeout: Duration::from_millis(250),
            max_output_bytes: 256 << 10,
            max_output_files: 64,
            max_log_bytes: 64 << 10,
            ..Limits::default()
        };
        let root = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let (input_dir, out) = (root.path().join("in"), root.path().join("out"));
        for dir in [&input_dir, &out] {
            std::fs::create_dir(dir).map_err(|e| format!("{e}"))?;
        }
        std::fs::write(input_dir.join("data.txt"), "input").map_err(|e| format!("{e}"))?;
        let mut spec = TaskSpec::new(&out);
        spec.input_dir = Some(input_dir.clone());
        spec.stdin = input.iter().take(64).copied().collect();
        spec.limits = limits.clone();
        let started = Instant::now();
        let report = match self.sandbox.load(&bytes, &limits).await {
            Ok(module) => self.sandbox.run(&module, spec).await,
            Err(reason) => TaskReport::refused(reason),
        };
        // Compiling is not charged; running is, with room for the node's own work after it.
        let ran = started.elapsed();
        if report.wall_seconds > limits.timeout.as_secs_f64() + 2.0 {
            return Err(format!(
                "the task ran {:.1} s under a {:?} limit (outcome {:?})",
                report.wall_seconds, limits.timeout, report.outcome
            ));
        }
        if ran > Duration::from_secs(60) {
            return Err(format!("loading and running took {ran:?}"));
        }
        let mut names: Vec<String> = std::fs::read_dir(root.path())
            .map_err(|e| format!("{e}"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        if names != ["in", "out"] {
            return Err(format!("the task wrote outside /out: {names:?}"));
        }
        let inputs: Vec<_> = std::fs::read_dir(&input_dir)
            .map_err(|e| format!("{e}"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        if inputs.len() != 1
            || std::fs::read(input_dir.join("data.txt")).ok().as_deref() != Some(b"input")
        {
            return Err(format!("the task changed /in: {inputs:?}"));
        }
        Ok(label(&report))
    }
}

/// A coarse label for the summary: `succeeded`, or the kind of reason (`trap`, `limit: time`…).
pub fn label(report: &TaskReport) -> String {
    match report.outcome.reason() {
        None => "succeeded".into(),
        Some(reason) => {
            let text = reason.to_string();
            match text.split_once(": ") {
                Some(("limit", what)) => format!("limit: {what}"),
                Some(("invalid", why)) if std::env::var_os("GRID_FUZZ_VERBOSE").is_some() => {
                    format!("invalid: {}", why.chars().take(60).collect::<String>())
                }
                Some((kind, _)) => kind.to_string(),
                None => text,
            }
        }
    }
}
