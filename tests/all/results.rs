//! What a job left, read the way a newcomer reads it: `grid results --concat` joining the tasks'
//! tables, `grid logs` (labelled, on stdout, `--failed`), and `grid status --failed`. Each test
//! goes through the `grid` command only: its output, its exit code and the files it writes.

use crate::support::*;
use std::path::Path;

/// Submits `hostile MODE` as `tasks` tasks without retries and waits for it; its job id.
fn hostile_job(grid: &TestGrid, tasks: &str, mode: &str, code: i32) -> String {
    let hostile = guest("hostile");
    let status = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--tasks",
            tasks,
            "--retries",
            "0",
            "--wait",
            "--",
            mode,
        ],
        code,
    );
    status["job_id"].as_str().unwrap().to_string()
}

/// `grid results JOB -o DIR ARGS…`: exit code, stderr.
fn results(grid: &TestGrid, job: &str, dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["results", job, "-o", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = grid.grid(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn concat_joins_the_files_a_pattern_matches_and_fails_when_it_matches_none() {
    let grid = TestGrid::start(1, &[]);
    let tmp = tempfile::tempdir().unwrap();

    // The README's case: each task writes part-<index>.csv.
    let params = write_params(tmp.path(), (0..3).map(|_| r#"{"rows": 2}"#.to_string()));
    let status = grid.grid_json(
        &[
            "submit",
            guest("synth-data").to_str().unwrap(),
            "--params",
            params.to_str().unwrap(),
            "--wait",
        ],
        0,
    );
    let synth = status["job_id"].as_str().unwrap().to_string();
    let out = tmp.path().join("synth");
    let (code, stderr) = results(&grid, &synth, &out, &["--concat", "part-*.csv"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("part-all.csv joins 'part-*.csv' of 3 tasks"),
        "{stderr}"
    );
    let table = read(&out.join("part-all.csv"));
    let mut lines = table.lines();
    assert_eq!(lines.next(), Some("id,group,age,income,score,label"));
    let ids: Vec<u64> = lines
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids, (0..6).collect::<Vec<_>>(), "tasks in index order");
    assert!(
        !out.join("part-*.csv").exists(),
        "no file is named with a `*`"
    );

    // Several files per task, written out of path order, one in a folder.
    let parts = hostile_job(&grid, "2", "csv-parts", 0);
    let out = tmp.path().join("parts");
    let (code, stderr) = results(
        &grid,
        &parts,
        &out,
        &[
            "--concat",
            "part-*.csv",
            "--concat",
            "**/part-*.csv",
            "--concat",
            "part-b.csv",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    // `*` stops at `/`: the folder's table is not in it. A task's files join in path order.
    assert_eq!(
        read(&out.join("part-all.csv")),
        "task,part\n0,a\n0,b\n1,a\n1,b\n"
    );
    assert!(
        stderr.contains("joins 'part-*.csv' of 2 tasks (4 files)"),
        "{stderr}"
    );
    // `**/` crosses folders; each run of wildcards is written `all`.
    assert_eq!(
        read(&out.join("all/part-all.csv")),
        "task,part\n0,a\n0,b\n0,c\n1,a\n1,b\n1,c\n"
    );
    // A plain name is that one file, as before.
    assert_eq!(read(&out.join("part-b.csv")), "task,part\n0,b\n1,b\n");
    assert_eq!(read(&out.join("1/sub/part-c.csv")), "task,part\n1,c\n");

    // Nothing matches: exit 2, one line that names what the tasks did write; the outputs and
    // the manifest are still collected, and no empty table is written.
    let out = tmp.path().join("none");
    let (code, stderr) = results(&grid, &parts, &out, &["--concat", "part-*.tsv"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(
            "grid: --concat 'part-*.tsv' matched no output file: the 2 tasks collected wrote \
             e.g. part-a.csv, part-b.csv, sub/part-c.csv"
        ),
        "{stderr}"
    );
    assert!(out.join("manifest.jsonl").exists());
    assert!(out.join("0/part-a.csv").exists());
    assert!(!out.join("part-all.tsv").exists());

    // A table where `grid results` keeps its own files is refused before anything is read.
    let (code, stderr) = results(&grid, &parts, &out, &["--concat", "manifest.jsonl"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("where `grid results` keeps the manifest"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

/// What `hostile odd-fail-first` writes to stderr in task `index` when it fails (an odd index,
/// attempt 0); even tasks write nothing.
fn failure_log(index: u64) -> String {
    format!("task {index} failing on attempt 0\n")
}

#[test]
fn logs_are_labelled_on_stdout_and_failed_selects_the_failures() {
    let grid = TestGrid::start(1, &[]);
    let job = hostile_job(&grid, "4", "odd-fail-first", 1);
    let failed_listing = format!(
        "== task 1 stderr (failed: exit: 9) ==\n{}== task 3 stderr (failed: exit: 9) ==\n{}",
        failure_log(1),
        failure_log(3)
    );

    // Every task: the two that wrote something, under headers, all on stdout; the two that
    // wrote nothing are counted on stderr, which has none of the guests' bytes.
    let all = grid.grid(&["logs", &job]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&all.stdout),
        String::from_utf8_lossy(&all.stderr),
    );
    assert!(all.status.success(), "{stderr}");
    assert_eq!(stdout, failed_listing);
    assert_eq!(
        stderr.trim_end(),
        "grid: 2 of 4 tasks wrote nothing to stdout or stderr"
    );

    // Only the failures: the same two, and nothing to count.
    let failed = grid.grid(&["logs", &job, "--failed"]);
    assert!(failed.status.success());
    assert_eq!(String::from_utf8_lossy(&failed.stdout), failed_listing);
    assert_eq!(String::from_utf8_lossy(&failed.stderr), "");
    let followed = grid.grid(&["logs", &job, "--failed", "--follow"]);
    assert!(followed.status.success());
    assert_eq!(String::from_utf8_lossy(&followed.stdout), failed_listing);

    // One task is shown as `grid run` shows it: its stderr on stderr, as written.
    let one = grid.grid(&["logs", &job, "--task", "1"]);
    assert!(one.status.success());
    assert_eq!(String::from_utf8_lossy(&one.stdout), "");
    assert_eq!(String::from_utf8_lossy(&one.stderr), failure_log(1));
    let quiet = grid.grid(&["logs", &job, "--task", "0"]);
    assert_eq!(String::from_utf8_lossy(&quiet.stdout), "");
    assert_eq!(
        String::from_utf8_lossy(&quiet.stderr).trim_end(),
        "grid: task 0 wrote nothing to stdout or stderr"
    );
    let both = grid.grid(&["logs", &job, "--task", "1", "--failed"]);
    assert_eq!(both.status.code(), Some(2), "one task, or the failed ones");
    // Joined tables say which collected tasks have no row: here the two that failed.
    let out = tempfile::tempdir().unwrap();
    let (code, stderr) = results(&grid, &job, out.path(), &["--concat", "attempt.txt"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(
            "grid: 2 collected task(s) wrote no file matching 'attempt.txt': task 1 (failed), task 3 (failed)"
        ),
        "{stderr}"
    );
}

#[test]
fn status_failed_lists_each_failed_task_with_why_in_text_and_json() {
    let grid = TestGrid::start(1, &[]);
    let job = hostile_job(&grid, "4", "odd-fail-first", 1);

    let text = grid.grid(&["status", &job, "--failed"]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("job {job}: ")) && lines[0].contains("2 failed"),
        "{stdout}"
    );
    // Each with its guest's last words (its last line of stderr).
    assert_eq!(
        lines[1],
        "  task 1: failed: exit: 9 — task 1 failing on attempt 0 (1 attempt, on node-0)"
    );
    assert_eq!(
        lines[2],
        "  task 3: failed: exit: 9 — task 3 failing on attempt 0 (1 attempt, on node-0)"
    );

    let status = grid.grid_json(&["status", &job, "--failed"], 0);
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(status["tasks"]["failed"], 2, "{status}");
    let failed = status["failed"].as_array().unwrap();
    let indices: Vec<u64> = failed
        .iter()
        .map(|t| t["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [1, 3], "{status}");
    for task in failed {
        assert_eq!(task["state"], "failed", "{task}");
        let index = task["index"].as_u64().unwrap();
        let detail = format!("task {index} failing on attempt 0");
        assert_eq!(task["reason"], "exit: 9", "{task}");
        assert_eq!(task["detail"], detail.as_str(), "{task}");
        assert_eq!(task["attempts"], 1, "{task}");
        assert_eq!(
            task["failures"],
            serde_json::json!([format!("exit: 9 — {detail}")]),
            "{task}"
        );
        assert_eq!(task["node"], "node-0", "{task}");
    }

    // `--wait` with it: the list once the job has ended, and the exit code of a failed job.
    let waited = grid.grid(&["status", &job, "--wait", "--failed"]);
    assert_eq!(waited.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&waited.stdout), stdout);

    // After a retry that fixes them, nothing is listed.
    grid.grid_json(&["retry", &job, "--failed", "--wait"], 0);
    let status = grid.grid_json(&["status", &job, "--failed"], 0);
    assert_eq!(status["failed"], serde_json::json!([]), "{status}");
}
