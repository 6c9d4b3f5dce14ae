//! A job's `manifest.jsonl`, as `grid results` writes it, read for the fault runs' checks
//! (`cargo xtask chaos`, `cargo xtask netgrid faults`): each task's outputs, attempts and node,
//! and the checks both runs make of them.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::Path;

pub struct TaskResult {
    /// (path, sha256) of each output, sorted.
    pub files: Vec<(String, String)>,
    pub attempts: u64,
    /// The node whose result was counted.
    pub node: String,
}

/// Each task of the manifest at `path`, by index; a task listed twice is an error.
pub fn read(path: &Path) -> Result<BTreeMap<u64, TaskResult>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut tasks = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let index = v["index"].as_u64().context("index")?;
        let mut files: Vec<(String, String)> = v["files"]
            .as_array()
            .context("files")?
            .iter()
            .map(|f| (f["path"].to_string(), f["sha256"].to_string()))
            .collect();
        files.sort();
        let task = TaskResult {
            files,
            attempts: v["attempts"].as_u64().context("attempts")?,
            node: v["node"].as_str().unwrap_or_default().to_string(),
        };
        if tasks.insert(index, task).is_some() {
            bail!("task {index} is in the results twice");
        }
    }
    Ok(tasks)
}

/// What is wrong with `tasks`, if anything: not `expected` tasks; outputs that differ from
/// `calm`'s (when there is a calm run to compare with); more attempts than `max_attempts`.
pub fn check(
    tasks: &BTreeMap<u64, TaskResult>,
    calm: Option<&BTreeMap<u64, TaskResult>>,
    expected: u64,
    max_attempts: u64,
) -> Vec<String> {
    let mut problems = Vec::new();
    if tasks.len() as u64 != expected {
        problems.push(format!(
            "{} of {expected} tasks in the results",
            tasks.len()
        ));
    }
    for (index, task) in tasks {
        if let Some(calm) = calm {
            match calm.get(index) {
                Some(c) if c.files == task.files => {}
                _ => problems.push(format!("task {index}: outputs differ from the calm run")),
            }
        }
        if task.attempts > max_attempts {
            problems.push(format!("task {index}: {} attempts", task.attempts));
        }
    }
    problems
}
