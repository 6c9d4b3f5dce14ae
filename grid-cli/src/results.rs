//! What a job left: `grid results` (outputs, manifest, joined tables) and `grid logs`.

use crate::conn::{Conn, Session, runtime};
use anyhow::{Context, Result, anyhow, bail};
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
    #[arg(value_name = "JOB", help = crate::help::JOB)]
    pub job: String,
    /// Folder to write DIR/<index>/ and DIR/manifest.jsonl into.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: PathBuf,
    /// Also join the tasks' output files that PATTERN matches into one table: a name
    /// (`metrics.csv`) or a shell pattern (`'part-*.csv'`; `*` and `?` stop at `/`, `**/`
    /// crosses folders). Tasks in index order, one task's files in path order; a CSV or TSV
    /// header shared by the files is kept once. The table is DIR/PATTERN, each run of wildcards
    /// written `all` (`part-*.csv` → DIR/part-all.csv). Fails (exit 2) when PATTERN matches no
    /// file of any task, naming some that exist. Repeatable.
    #[arg(long, value_name = "PATTERN")]
    pub concat: Vec<String>,
    #[command(flatten)]
    pub conn: Conn,
}

/// How `--concat` patterns match output paths: as a shell does (`*` and `?` stop at `/`), with
/// `**/` for any depth of folders.
const CONCAT_MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// One `--concat PATTERN`: the output files it matches, joined into one table.
struct Concat {
    pattern: glob::Pattern,
    /// The table's path under the results folder ([`joined_name`] of the pattern).
    name: PathBuf,
    joined: Vec<u8>,
    files: u64,
    tasks: u64,
    /// Tasks collected with no file it matched: how many, and the first few (index, state).
    left_out: u64,
    left_out_first: Vec<(u64, &'static str)>,
}

impl Concat {
    /// The `--concat` of `pattern`, or why it cannot be one, in one line.
    fn new(pattern: &str) -> Result<Self> {
        let matcher = glob::Pattern::new(pattern)
            .map_err(|e| anyhow!("--concat '{pattern}': not a pattern: {}", e.msg))?;
        let Some(name) = safe_relative(&joined_name(pattern)) else {
            bail!("--concat '{pattern}': not a relative path inside the output folder");
        };
        // DIR/manifest.jsonl and DIR/<index>/ are `grid results`' own: a table there would
        // overwrite the manifest or a task's output.
        let first = name
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        if let Some(first) = first
            && (first == MANIFEST || first.bytes().all(|b| b.is_ascii_digit()))
        {
            bail!(
                "--concat '{pattern}': its table would be {}, where `grid results` keeps {}",
                name.display(),
                if first == MANIFEST {
                    "the manifest"
                } else {
                    "a task's outputs"
                }
            );
        }
        Ok(Self {
            pattern: matcher,
            name,
            joined: Vec::new(),
            files: 0,
            tasks: 0,
            left_out: 0,
            left_out_first: Vec::new(),
        })
    }
}

/// The results folder's list of tasks, one JSON line each.
const MANIFEST: &str = "manifest.jsonl";

/// The name of the table `--concat PATTERN` writes: the pattern with each run of wildcards
/// (`*`, `**`, `?`, `[…]`) written `all` — `part-*.csv` gives `part-all.csv`, a plain name
/// itself — so that no file is named with a `*`.
fn joined_name(pattern: &str) -> String {
    let mut name = String::with_capacity(pattern.len());
    let mut chars = pattern.chars().peekable();
    let mut in_wildcards = false;
    while let Some(c) = chars.next() {
        let wildcard = match c {
            '*' | '?' => true,
            '[' => {
                // A `]` first in the set (after an optional `!`) is one of its characters.
                if chars.peek() == Some(&'!') {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                }
                for inside in chars.by_ref() {
                    if inside == ']' {
                        break;
                    }
                }
                true
            }
            _ => false,
        };
        if !wildcard {
            name.push(c);
        } else if !in_wildcards {
            name.push_str("all");
        }
        in_wildcards = wildcard;
    }
    name
}

/// The error line of `--concat` patterns that matched nothing: what the tasks wrote instead,
/// so that the next try can be right.
fn matched_nothing(patterns: &[&str], collected: u64, seen: &[String]) -> String {
    let patterns: Vec<String> = patterns.iter().map(|p| format!("'{p}'")).collect();
    let tasks = if collected == 1 { "task" } else { "tasks" };
    let why = match (collected, seen.is_empty()) {
        (0, _) => "no task of the job has ended yet".to_string(),
        (n, true) => format!("the {n} {tasks} collected wrote none"),
        (n, false) => format!("the {n} {tasks} collected wrote e.g. {}", seen.join(", ")),
    };
    format!(
        "--concat {} matched no output file: {why}",
        patterns.join(", ")
    )
}

/// Appends one task's `bytes` of a joined file, the task's output `name`: a first line equal
/// to the header already written is dropped for CSV and TSV files.
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
    let mut concats = args
        .concat
        .iter()
        .map(String::as_str)
        .map(Concat::new)
        .collect::<Result<Vec<_>>>()?;
    for (i, concat) in concats.iter().enumerate() {
        if let Some(other) = concats[..i].iter().find(|c| c.name == concat.name) {
            bail!(
                "--concat '{}' and '{}' would both write {}",
                other.pattern.as_str(),
                concat.pattern.as_str(),
                concat.name.display()
            );
        }
    }
    runtime()?.block_on(async {
        let grid = args.conn.open("results").await?;
        let record = grid.job_record(&grid.resolve_job(&args.job).await?).await?;
        let tenant = record.spec.tenant.clone();
        std::fs::create_dir_all(&args.output).with_context(|| format!("cannot create {}", args.output.display()))?;
        let mut manifest = String::new();
        let mut collected = 0u64;
        // A few of the tasks' output paths, for the line that says a pattern matched none.
        let mut seen: Vec<String> = Vec::new();
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
                // In path order, the order a task's files are joined in.
                let mut files: Vec<_> = r.files.iter().collect();
                files.sort_by(|a, b| a.path.cmp(&b.path));
                let mut joined_here = vec![false; concats.len()];
                // A record is a provider's word: a bad path, a file where a folder must be, or a
                // missing object costs that file (named, with why), never the rest.
                let mut skipped = Vec::new();
                for file in files {
                    if seen.len() < 3 && !seen.contains(&file.path) {
                        seen.push(file.path.clone());
                    }
                    let bytes = match safe_relative(&file.path) {
                        None => Err("not a relative path inside the task's folder".to_string()),
                        Some(_) => grid.get_object(&tenant, &file.sha256, file.bytes).await.map_err(|e| format!("{e:#}")),
                    };
                    match bytes.and_then(|bytes| write_output(&dir, &file.path, &bytes).map(|()| bytes)) {
                        Ok(bytes) => {
                            for (concat, joined) in concats.iter_mut().zip(&mut joined_here) {
                                if concat.pattern.matches_with(&file.path, CONCAT_MATCH) {
                                    concat_into(&mut concat.joined, &file.path, &bytes);
                                    concat.files += 1;
                                    *joined = true;
                                }
                            }
                        }
                        Err(why) => {
                            eprintln!("grid: task {index}: skipping output {:?}: {}", file.path, crate::terminal::for_stderr(&why));
                            skipped.push(json!({"path": file.path, "why": why}));
                        }
                    }
                }
                for (concat, joined) in concats.iter_mut().zip(joined_here) {
                    concat.tasks += u64::from(joined);
                    if !joined {
                        concat.left_out += 1;
                        if concat.left_out_first.len() < 3 {
                            concat.left_out_first.push((index, task.state.as_str()));
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
                    // The guest's last line of stderr, when it failed.
                    "detail": r.detail,
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
        let path = args.output.join(MANIFEST);
        std::fs::write(&path, &manifest).with_context(|| format!("writing {}", path.display()))?;
        collecting?;
        for concat in concats.iter().filter(|c| c.files > 0) {
            let path = args.output.join(&concat.name);
            if let Some(folder) = path.parent() {
                std::fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))?;
            }
            std::fs::write(&path, &concat.joined).with_context(|| format!("writing {}", path.display()))?;
            let files = if concat.files == concat.tasks {
                String::new()
            } else {
                format!(" ({} files)", concat.files)
            };
            eprintln!(
                "grid: {} joins '{}' of {} tasks{files}",
                path.display(),
                concat.pattern.as_str(),
                concat.tasks
            );
            if concat.left_out > 0 {
                // Which tasks have no row there, so that a missing row is never a surprise.
                let named: Vec<String> = concat
                    .left_out_first
                    .iter()
                    .map(|(index, state)| format!("task {index} ({state})"))
                    .collect();
                let more = concat.left_out - named.len() as u64;
                eprintln!(
                    "grid: {} collected task(s) wrote no file matching '{}': {}{}",
                    concat.left_out,
                    concat.pattern.as_str(),
                    named.join(", "),
                    if more > 0 { format!(" and {more} more") } else { String::new() }
                );
            }
        }
        eprintln!(
            "grid: {collected} of {} tasks collected into {} ({})",
            record.counts.total,
            args.output.display(),
            record.state.as_str()
        );
        let unmatched: Vec<&str> = concats.iter().filter(|c| c.files == 0).map(|c| c.pattern.as_str()).collect();
        if !unmatched.is_empty() {
            // The tasks' paths are a provider's word: main shows the line escaped on a terminal.
            bail!(matched_nothing(&unmatched, collected, &seen));
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    #[arg(value_name = "JOB", help = crate::help::JOB)]
    pub job: String,
    /// Only this task, as `grid run` shows one: its stdout on stdout and its stderr on stderr,
    /// as written and without headers (`grid logs JOB --task 3 > out.txt` is its stdout byte
    /// for byte).
    #[arg(long, value_name = "I")]
    pub task: Option<u64>,
    /// Only the tasks that failed or were disputed (those `grid status JOB --failed` lists).
    #[arg(long, conflicts_with = "task")]
    pub failed: bool,
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

/// `grid logs JOB --task I`: the task's stdout to stdout, its stderr to stderr, as written.
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

/// The header of one stream of a task's logs in a listing: `== task 3 stderr ==`, with the
/// round of a retried task, how a task that did not succeed ended, and whether its logs were
/// cut at the cap.
fn log_header(task: &TaskRecord, stream: &str) -> String {
    let mut notes = Vec::new();
    if task.round > 0 {
        notes.push(format!("retry {}", task.round));
    }
    match (task.state, task.result.outcome.reason()) {
        (TaskState::Succeeded, _) => {}
        (TaskState::Failed, Some(reason)) => notes.push(format!("failed: {reason}")),
        (TaskState::Failed, None) => notes.push("failed".into()),
        (TaskState::Disputed, _) => notes.push("disputed".into()),
    }
    if task.result.logs_truncated {
        notes.push("truncated".into());
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join(", "))
    };
    // A reason may carry a provider's line breaks: a header is one line.
    grid_proto::one_line(
        &format!("== task {} {stream}{notes} ==", task.result.index),
        " ",
    )
}

/// Prints `task`'s logs into a listing (see [`logs`]): each stream it wrote to under its
/// header, on stdout. False when it wrote to neither.
async fn list_task_logs(
    grid: &Grid,
    tenant: &str,
    task: &TaskRecord,
    escape: bool,
) -> Result<bool> {
    use std::io::Write;
    let mut wrote = false;
    for (stream, blob) in [
        ("stdout", &task.result.stdout),
        ("stderr", &task.result.stderr),
    ] {
        let Some(sha) = blob else {
            continue;
        };
        let bytes = grid
            .get_object(tenant, sha, grid_proto::caps::LOG_BYTES)
            .await?;
        if bytes.is_empty() {
            continue;
        }
        let mut out = std::io::stdout().lock();
        // The reason in it is a provider's word: shown, not obeyed, on a terminal.
        writeln!(
            out,
            "{}",
            crate::terminal::for_stdout(&log_header(task, stream))
        )?;
        crate::terminal::write_bytes(&mut out, &bytes, escape)?;
        if !bytes.ends_with(b"\n") {
            out.write_all(b"\n")?;
        }
        wrote = true;
    }
    Ok(wrote)
}

/// The listing's last word on stderr: how many of the `listed` tasks wrote nothing (they have
/// no header, so would otherwise go unmentioned).
fn say_silent(silent: u64, listed: u64, failed_only: bool) {
    if silent > 0 {
        let which = if failed_only { "failed tasks" } else { "tasks" };
        eprintln!("grid: {silent} of {listed} {which} wrote nothing to stdout or stderr");
    }
}

/// Prints each task's logs as its record appears, until the job has ended and all are printed.
/// (Polled, like `status --wait`: a tenant may read its own records, not watch the bucket.)
async fn follow_logs(
    grid: &Session,
    record: JobRecord,
    failed_only: bool,
    escape: bool,
) -> Result<()> {
    // A task's record of each round: `grid retry` replaces a failed one with the new round's.
    let mut printed = std::collections::HashSet::new();
    let (mut silent, mut listed) = (0u64, 0u64);
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
            // Every round's failure, the one a retry runs again too: each is one to look at.
            if failed_only && task.state == TaskState::Succeeded {
                continue;
            }
            if printed.insert((task.result.index, task.round)) {
                listed += 1;
                if !list_task_logs(grid, &record.spec.tenant, &task, escape).await? {
                    silent += 1;
                }
            }
        }
        let c = &now.counts;
        if now.state.is_final() && decided >= c.succeeded + c.failed + c.disputed {
            say_silent(silent, listed, failed_only);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `grid logs JOB [--failed]`: the listing [`logs`] describes, of the tasks decided now.
async fn list_logs(
    grid: &Session,
    record: &JobRecord,
    failed_only: bool,
    escape: bool,
) -> Result<()> {
    let indices: Box<dyn Iterator<Item = u64>> = if failed_only {
        let mut failed = Vec::new();
        crate::status::for_each_failed(grid, record, |task| failed.push(task.result.index)).await?;
        failed.sort_unstable();
        Box::new(failed.into_iter())
    } else {
        Box::new(0..record.counts.total)
    };
    let (mut silent, mut listed) = (0u64, 0u64);
    for index in indices {
        let Some(task) = grid.task_record(&record.id, index).await? else {
            continue;
        };
        // A retry may have started since the failures were read: its tasks are not failed now.
        if failed_only && !crate::status::failed_now(&task, record) {
            continue;
        }
        listed += 1;
        if !list_task_logs(grid, &record.spec.tenant, &task, escape).await? {
            silent += 1;
        }
    }
    if failed_only && listed == 0 {
        eprintln!(
            "grid: job {} has no failed tasks ({})",
            record.id,
            record.state.as_str()
        );
    }
    say_silent(silent, listed, failed_only);
    let c = &record.counts;
    let ended = c.succeeded + c.failed + c.disputed;
    if ended < c.total {
        eprintln!(
            "grid: {} of {} tasks have not ended yet (`grid logs {} --follow` prints their logs as they end)",
            c.total - ended,
            c.total,
            record.id
        );
    }
    Ok(())
}

/// `grid logs JOB`: the tasks' logs, in index order, on stdout. Each stream a task wrote to
/// comes under a header of its own — `== task 3 stderr ==`, with `(retry 1, failed: exit: 1,
/// truncated)` as they apply — and a log that does not end a line is given a newline so that
/// the next header starts one; streams a task left empty are not shown. A last line on stderr
/// says how many tasks wrote nothing, and how many have not ended yet. With `--task I`, that
/// task's logs as `grid run` shows them.
pub fn logs(args: LogsArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("logs").await?;
        let record = grid.job_record(&grid.resolve_job(&args.job).await?).await?;
        let escape = Escape::new(args.raw);
        if args.follow {
            follow_logs(&grid, record, args.failed, escape.stdout).await?;
            return Ok(ExitCode::SUCCESS);
        }
        let Some(index) = args.task else {
            list_logs(&grid, &record, args.failed, escape.stdout).await?;
            return Ok(ExitCode::SUCCESS);
        };
        if index >= record.counts.total {
            bail!(
                "job {} has no task {index} (it has {})",
                record.id,
                record.counts.total
            )
        }
        match grid.task_record(&record.id, index).await? {
            None => eprintln!("grid: task {index} of job {} has not ended yet", record.id),
            Some(task) if task.result.stdout.is_none() && task.result.stderr.is_none() => {
                eprintln!("grid: task {index} wrote nothing to stdout or stderr")
            }
            Some(task) => print_logs(&grid, &record.spec.tenant, &task, escape).await?,
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use grid_proto::{Outcome, Reason, ResultMsg, Seal, Sha256Hex, Usage};

    #[test]
    fn a_joined_table_is_never_named_with_a_wildcard() {
        assert_eq!(joined_name("metrics.csv"), "metrics.csv");
        assert_eq!(joined_name("part-*.csv"), "part-all.csv");
        assert_eq!(joined_name("part-?????.csv"), "part-all.csv");
        assert_eq!(joined_name("part-[0-9]*.csv"), "part-all.csv");
        assert_eq!(joined_name("part-[!]x].csv"), "part-all.csv");
        assert_eq!(joined_name("**/*.tsv"), "all/all.tsv");
    }

    #[test]
    fn concat_patterns_match_as_a_shell_does() {
        let matches = |pattern: &str, path: &str| {
            Concat::new(pattern)
                .unwrap()
                .pattern
                .matches_with(path, CONCAT_MATCH)
        };
        assert!(matches("part-*.csv", "part-00001.csv"));
        assert!(!matches("part-*.csv", "sub/part-1.csv"), "`*` stops at `/`");
        assert!(matches("**/part-*.csv", "sub/deep/part-1.csv"));
        assert!(matches("**/part-*.csv", "part-1.csv"));
        assert!(matches("metrics.csv", "metrics.csv"));
        assert!(!matches("metrics.csv", "metrics.csv.bak"));
    }

    #[test]
    fn a_concat_that_would_overwrite_grid_results_own_files_is_refused() {
        for (pattern, why) in [
            ("manifest.jsonl", "keeps the manifest"),
            ("0/*.csv", "keeps a task's outputs"),
            ("../*.csv", "not a relative path"),
            ("/tmp/x.csv", "not a relative path"),
            ("part-[.csv", "not a pattern"),
        ] {
            let Err(e) = Concat::new(pattern) else {
                panic!("{pattern} was taken");
            };
            let line = format!("{e:#}");
            assert!(line.contains(why), "{pattern}: {line}");
            assert!(line.starts_with(&format!("--concat '{pattern}'")), "{line}");
        }
    }

    #[test]
    fn a_pattern_that_matched_nothing_is_told_with_what_was_there() {
        let seen = ["part-00000.csv".to_string(), "part-00001.csv".to_string()];
        assert_eq!(
            matched_nothing(&["part-*.tsv"], 6, &seen),
            "--concat 'part-*.tsv' matched no output file: the 6 tasks collected wrote e.g. \
             part-00000.csv, part-00001.csv"
        );
        assert_eq!(
            matched_nothing(&["a", "b*"], 1, &[]),
            "--concat 'a', 'b*' matched no output file: the 1 task collected wrote none"
        );
        assert_eq!(
            matched_nothing(&["a"], 0, &[]),
            "--concat 'a' matched no output file: no task of the job has ended yet"
        );
    }

    #[test]
    fn tables_from_several_files_keep_one_header() {
        let mut joined = Vec::new();
        concat_into(&mut joined, "part-a.csv", b"x,y\n1,2\n");
        concat_into(&mut joined, "part-b.csv", b"x,y\n3,4");
        concat_into(&mut joined, "sub/part-c.csv", b"x,y\n5,6\n");
        assert_eq!(joined, b"x,y\n1,2\n3,4\n5,6\n");
    }

    fn task_record(state: TaskState, outcome: Outcome, round: u32) -> TaskRecord {
        TaskRecord {
            state,
            attempts: 1,
            failures: Vec::new(),
            result: ResultMsg {
                tenant: "t".into(),
                job_id: "j".into(),
                index: 3,
                attempt: 0,
                replica: 0,
                node_id: "node-0".into(),
                outcome,
                digest: Sha256Hex([0; 32]),
                usage: Usage::default(),
                files: Vec::new(),
                stdout: None,
                stderr: None,
                logs_truncated: false,
                detail: None,
                seal: Seal::default(),
                staged: Vec::new(),
            },
            votes: Vec::new(),
            round,
            earlier: Vec::new(),
        }
    }

    #[test]
    fn a_log_header_says_which_task_stream_round_and_why() {
        let ok = task_record(TaskState::Succeeded, Outcome::Succeeded, 0);
        assert_eq!(log_header(&ok, "stdout"), "== task 3 stdout ==");
        let mut failed = task_record(
            TaskState::Failed,
            Outcome::Failed(Reason::Trap("unreachable\n  at 0x2a".into())),
            2,
        );
        failed.result.logs_truncated = true;
        assert_eq!(
            log_header(&failed, "stderr"),
            "== task 3 stderr (retry 2, failed: trap: unreachable at 0x2a, truncated) =="
        );
        let disputed = task_record(TaskState::Disputed, Outcome::Succeeded, 0);
        assert_eq!(
            log_header(&disputed, "stdout"),
            "== task 3 stdout (disputed) =="
        );
    }

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
