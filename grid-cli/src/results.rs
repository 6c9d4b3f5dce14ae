//! What a job left: `grid results` (outputs, manifest, joined tables) and `grid logs`.

use crate::conn::{Conn, Session, runtime};
use anyhow::{Context, Result, bail};
use clap::Args;
use grid_client::Grid;
use grid_proto::{JobRecord, TaskRecord, TaskState, decode, names};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// A path from a result manifest, checked to stay inside the results folder.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    ok.then(|| p.to_path_buf())
}

#[derive(Args, Debug)]
pub struct ResultsArgs {
    pub job: String,
    /// Folder to write DIR/<index>/ and DIR/manifest.jsonl into.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: PathBuf,
    /// Also join every task's output file NAME, in task order, into one table DIR/NAME (a CSV
    /// or TSV header shared by the tasks is kept once); repeatable.
    #[arg(long, value_name = "NAME")]
    pub concat: Vec<String>,
    #[command(flatten)]
    pub conn: Conn,
}

/// Appends one task's `bytes` of a joined file: a first line equal to the header already
/// written is dropped for CSV and TSV files.
fn concat_into(joined: &mut Vec<u8>, name: &str, bytes: &[u8]) {
    let tabular = name.ends_with(".csv") || name.ends_with(".tsv");
    let header = |b: &[u8]| {
        b.split_inclusive(|c| *c == b'\n')
            .next()
            .map(<[u8]>::to_vec)
    };
    let mut rest = bytes;
    if tabular && !joined.is_empty() && header(joined) == header(bytes) {
        rest = &bytes[header(bytes).map_or(0, |h| h.len())..];
    }
    if !joined.is_empty() && !joined.ends_with(b"\n") {
        joined.push(b'\n');
    }
    joined.extend_from_slice(rest);
}

/// Writes one output file, `path` from a task record, into the task's folder `dir`, or says
/// why not in one line: a path that leaves the folder, a file where a folder must be (or a
/// folder where the file goes), a link on the way. Nothing outside `dir` is touched.
fn write_output(dir: &Path, path: &str, bytes: &[u8]) -> std::result::Result<(), String> {
    let rel = safe_relative(path).ok_or("not a relative path inside the task's folder")?;
    let mut at = dir.to_path_buf();
    let folders = rel.parent().map(|p| p.components().count()).unwrap_or(0);
    for part in rel.components().take(folders) {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "{} is a file of the task's, not a folder",
                    at.strip_prefix(dir).unwrap_or(&at).display()
                ));
            }
            Err(_) => {
                std::fs::create_dir(&at).map_err(|e| format!("creating {}: {e}", at.display()))?
            }
        }
    }
    let target = dir.join(&rel);
    if let Ok(meta) = std::fs::symlink_metadata(&target)
        && !meta.is_file()
    {
        return Err(format!("{path} is a folder of the task's, not a file"));
    }
    std::fs::write(&target, bytes).map_err(|e| format!("writing {}: {e}", target.display()))
}

pub fn results(args: ResultsArgs) -> Result<ExitCode> {
    if let Some(bad) = args.concat.iter().find(|n| safe_relative(n).is_none()) {
        bail!("--concat {bad:?}: not a relative path inside the output folder");
    }
    runtime()?.block_on(async {
        let grid = args.conn.open("results").await?;
        let record = grid.job_record(&args.job).await?;
        let tenant = record.spec.tenant.clone();
        std::fs::create_dir_all(&args.output).with_context(|| format!("cannot create {}", args.output.display()))?;
        let mut manifest = String::new();
        let mut collected = 0u64;
        let mut joined: Vec<(String, Vec<u8>, u64)> = args.concat.iter().map(|n| (n.clone(), Vec::new(), 0)).collect();
        // The manifest is written whatever happens below: what was collected is listed.
        // A task of a cancelled job that left no record ended with the cancel.
        let unrecorded = match record.state {
            grid_proto::JobState::Cancelled => "cancelled",
            _ => "pending",
        };
        let collecting = async {
            for index in 0..record.counts.total {
                let Some(task) = grid.task_record(&record.id, index).await? else {
                    manifest.push_str(&format!("{}\n", json!({"index": index, "state": unrecorded})));
                    continue;
                };
                let dir = args.output.join(index.to_string());
                std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
                let r = &task.result;
                // A record is a provider's word: a bad path, a file where a folder must be, or a
                // missing object costs that file (named, with why), never the rest.
                let mut skipped = Vec::new();
                for file in &r.files {
                    let bytes = match safe_relative(&file.path) {
                        None => Err("not a relative path inside the task's folder".to_string()),
                        Some(_) => grid.get_object(&tenant, &file.sha256, file.bytes).await.map_err(|e| format!("{e:#}")),
                    };
                    match bytes.and_then(|bytes| write_output(&dir, &file.path, &bytes).map(|()| bytes)) {
                        Ok(bytes) => {
                            for (name, all, tasks) in joined.iter_mut().filter(|(n, _, _)| *n == file.path) {
                                concat_into(all, name, &bytes);
                                *tasks += 1;
                            }
                        }
                        Err(why) => {
                            eprintln!("grid: task {index}: skipping output {:?}: {}", file.path, crate::terminal::for_stderr(&why));
                            skipped.push(json!({"path": file.path, "why": why}));
                        }
                    }
                }
                collected += 1;
                let mut line = json!({
                    "index": index,
                    "state": task.state.as_str(),
                    "votes": task.votes.iter().map(|v| json!({"replica": v.replica, "node": v.node_id, "agreed": v.agreed})).collect::<Vec<_>>(),
                    "exit_code": r.outcome.exit_code(),
                    "reason": r.outcome.reason().map(|x| x.to_string()),
                    "attempts": task.attempts,
                    "failures": task.failures,
                    "node": r.node_id,
                    "cpu_seconds": r.usage.cpu_seconds,
                    "wall_seconds": r.usage.wall_seconds,
                    "gpu_seconds": r.usage.gpu_seconds,
                    "files": r.files.iter().map(|f| json!({"path": f.path, "bytes": f.bytes, "sha256": f.sha256.to_string()})).collect::<Vec<_>>(),
                });
                if !skipped.is_empty() {
                    line["skipped"] = json!(skipped);
                }
                manifest.push_str(&format!("{line}\n"));
            }
            anyhow::Ok(())
        }
        .await;
        let path = args.output.join("manifest.jsonl");
        std::fs::write(&path, &manifest).with_context(|| format!("writing {}", path.display()))?;
        collecting?;
        for (name, all, tasks) in &joined {
            let path = args.output.join(safe_relative(name).unwrap_or_default());
            std::fs::write(&path, all).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("grid: {} joins {name} of {tasks} tasks", path.display());
        }
        eprintln!(
            "grid: {collected} of {} tasks collected into {} ({})",
            record.counts.total,
            args.output.display(),
            record.state.as_str()
        );
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    pub job: String,
    /// Only this task.
    #[arg(long)]
    pub task: Option<u64>,
    /// Keep printing tasks' logs as they finish, until the job ends.
    #[arg(long, conflicts_with = "task")]
    pub follow: bool,
    /// Print the logs exactly as the task wrote them, even on a terminal (where control
    /// characters are otherwise shown as `\x1b`, `\u{9b}`, …; a pipe or file always gets them
    /// as they are).
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// Whether each of stdout and stderr gets the logs escaped (see [`crate::terminal`]).
#[derive(Clone, Copy)]
struct Escape {
    stdout: bool,
    stderr: bool,
}

impl Escape {
    fn new(raw: bool) -> Self {
        use crate::terminal::escape_for;
        use std::io::IsTerminal;
        Self {
            stdout: escape_for(std::io::stdout().is_terminal(), raw),
            stderr: escape_for(std::io::stderr().is_terminal(), raw),
        }
    }
}

async fn print_logs(grid: &Grid, tenant: &str, task: &TaskRecord, escape: Escape) -> Result<()> {
    use crate::terminal::write_bytes;
    for (blob, to_stderr) in [(&task.result.stdout, false), (&task.result.stderr, true)] {
        if let Some(sha) = blob {
            let bytes = grid
                .get_object(tenant, sha, grid_proto::caps::LOG_BYTES)
                .await?;
            if to_stderr {
                write_bytes(&mut std::io::stderr(), &bytes, escape.stderr)?;
            } else {
                write_bytes(&mut std::io::stdout(), &bytes, escape.stdout)?;
            }
        }
    }
    Ok(())
}

/// Prints each task's logs as its record appears, until the job has ended and all are printed.
/// (Polled, like `status --wait`: a tenant may read its own records, not watch the bucket.)
async fn follow_logs(grid: &Session, record: JobRecord, escape: Escape) -> Result<()> {
    // A task's record of each round: `grid retry` replaces a failed one with the new round's.
    let mut printed = std::collections::HashSet::new();
    let prefix = format!("{}.{}", grid.tenant, record.id);
    loop {
        let now = grid.job_record(&record.id).await?;
        let mut decided = 0;
        for (_, bytes) in grid.entries(names::TASKS_BUCKET, Some(&prefix)).await? {
            let Ok(task) = decode::<TaskRecord>(&bytes) else {
                continue;
            };
            if task.state == TaskState::Succeeded || task.round >= now.retried {
                decided += 1;
            }
            if printed.insert((task.result.index, task.round)) {
                match task.round {
                    0 => println!("== task {} ==", task.result.index),
                    round => println!("== task {} (retry {round}) ==", task.result.index),
                }
                print_logs(grid, &record.spec.tenant, &task, escape).await?;
            }
        }
        let c = &now.counts;
        if now.state.is_final() && decided >= c.succeeded + c.failed + c.disputed {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub fn logs(args: LogsArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("logs").await?;
        let record = grid.job_record(&args.job).await?;
        let escape = Escape::new(args.raw);
        if args.follow {
            follow_logs(&grid, record, escape).await?;
            return Ok(ExitCode::SUCCESS);
        }
        let indices: Vec<u64> = match args.task {
            Some(i) if i >= record.counts.total => {
                bail!(
                    "job {} has no task {i} (it has {})",
                    record.id,
                    record.counts.total
                )
            }
            Some(i) => vec![i],
            None => (0..record.counts.total).collect(),
        };
        for index in indices {
            let Some(task) = grid.task_record(&record.id, index).await? else {
                continue;
            };
            if args.task.is_none() {
                println!("== task {index} ==");
            }
            print_logs(&grid, &record.spec.tenant, &task, escape).await?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_output_path_costs_that_file_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("0");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(write_output(&dir, "ok.txt", b"a"), Ok(()));
        // A file where a folder must be, then a folder where a file goes.
        let clash = write_output(&dir, "ok.txt/inner", b"b").unwrap_err();
        assert!(clash.contains("ok.txt is a file"), "{clash}");
        assert_eq!(write_output(&dir, "sub/deep/x.csv", b"c"), Ok(()));
        let clash = write_output(&dir, "sub/deep", b"d").unwrap_err();
        assert!(clash.contains("is a folder"), "{clash}");
        for bad in ["../escape", "/etc/passwd", "", "a/../../b"] {
            assert!(write_output(&dir, bad, b"e").is_err(), "{bad}");
        }
        assert_eq!(std::fs::read(dir.join("ok.txt")).unwrap(), b"a");
        assert_eq!(std::fs::read(dir.join("sub/deep/x.csv")).unwrap(), b"c");
        let outside: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(outside.len(), 1, "nothing written beside the task's folder");
    }
}
