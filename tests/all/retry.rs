//! `grid retry JOB --failed`: an ended job's failed tasks run again in the same job, with new
//! attempt numbers; the tasks that succeeded are not run again; every attempt is billed once and
//! every task counted once, also when the broker dies part-way through a retry.

use crate::ledger::usage;
use crate::support::*;

/// A job of 6 tasks whose odd tasks fail on their first attempt (no retries): ends failed.
fn failed_job(grid: &TestGrid) -> String {
    let hostile = guest("hostile");
    let status = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--tasks",
            "6",
            "--retries",
            "0",
            "--wait",
            "--",
            "odd-fail-first",
        ],
        1,
    );
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(status["tasks"]["failed"], 3, "{status}");
    assert_eq!(status["tasks"]["succeeded"], 3, "{status}");
    status["job_id"].as_str().unwrap().to_string()
}

/// Checks the retried `job` as a whole: every task succeeded once, the odd ones on attempt 1
/// after a failure on attempt 0 (which their records tell of), the even ones on attempt 0 and
/// never again; 9 attempts billed.
fn assert_retried(grid: &TestGrid, job: &str) {
    let status = grid.wait(job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], 6, "{status}");
    assert_eq!(status["tasks"]["failed"], 0, "{status}");
    assert_eq!(status["retried"], 1, "{status}");
    let (dir, manifest) = grid.results(job);
    assert_eq!(manifest.len(), 6);
    for task in &manifest {
        let index = task["index"].as_u64().unwrap();
        let odd = index % 2 == 1;
        assert_eq!(task["state"], "succeeded", "{task}");
        assert_eq!(task["attempts"], if odd { 2 } else { 1 }, "{task}");
        let failures = task["failures"].as_array().unwrap();
        assert_eq!(failures.len(), usize::from(odd), "{task}");
        let attempt = std::fs::read_to_string(dir.path().join(format!("{index}/attempt.txt")))
            .unwrap_or_else(|e| panic!("task {index}'s output: {e}"));
        assert_eq!(attempt, if odd { "1" } else { "0" }, "task {index}");
    }
    // The first round's 6 attempts and the retry's 3, each billed once.
    let billed = usage(grid, &["--job", job]);
    assert_eq!(billed["total"]["attempts"], 9, "{billed}");
}

#[test]
fn retry_failed_runs_only_the_failed_tasks_again_in_the_same_job() {
    let grid = TestGrid::start(1, &[]);
    let job = failed_job(&grid);
    // Which tasks is not implied.
    let out = grid.grid(&["retry", &job]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--failed"));

    let status = grid.grid_json(&["retry", &job, "--failed", "--wait"], 0);
    assert_eq!(status["state"], "done", "{status}");
    assert_retried(&grid, &job);
    // `grid logs --follow` of the job ends, with each task's record of the round that decided
    // it: the retried ones succeeded without a word, so all six are counted as silent.
    let logs = grid.grid(&["logs", &job, "--follow"]);
    let stderr = String::from_utf8_lossy(&logs.stderr);
    assert!(logs.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "");
    assert!(
        stderr.contains("grid: 6 of 6 tasks wrote nothing to stdout or stderr"),
        "{stderr}"
    );
    let text = grid.grid(&["status", &job]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("retried once"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // Nothing left to retry: one line that says so, and the job is unchanged.
    let again = grid.grid(&["retry", &job, "--failed"]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("has no failed tasks (done)"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(grid.wait(&job)["retried"], 1);

    // Deleting it frees what both rounds stored: the module, the two outputs ("0" and "1"),
    // and the first round's three failure logs, which no record names but the retried ones.
    let deleted = grid.grid_json(&["delete", &job], 0);
    assert_eq!(deleted["objects_deleted"], 6, "{deleted}");
}

#[test]
fn retry_refuses_running_and_unknown_jobs_in_one_line() {
    let grid = TestGrid::start(1, &[]);
    let hostile = guest("hostile");
    let running = grid.grid_json(
        &["submit", hostile.to_str().unwrap(), "--", "nap", "60000"],
        0,
    )["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = |job: &str, why: &str| {
        let out = grid.grid(&["retry", job, "--failed"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    };
    refused(&running, "is still");
    refused("0000000000000000nope", "unknown job");
}

/// Kills the broker at `point` of a retry, starts a normal one, and checks that the retry
/// completes as if nothing had happened.
fn broker_crash_in_retry_at(point: &str) {
    let mut grid = TestGrid::start(1, &[]);
    let job = failed_job(&grid);
    grid.broker.kill();
    grid.broker = GridProcess::broker_crashing_at(&grid.nats, point);
    // The new broker answers once it has subscribed; it dies at `point`, before or after it
    // replies to the retry.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut asked = false;
    while !grid.broker.exited() {
        if !asked {
            asked = grid.grid(&["retry", &job, "--failed"]).status.success();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broker never reached {point}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    grid.broker = GridProcess::broker(&grid.nats, &[]);
    assert_retried(&grid, &job);
}

#[test]
fn a_broker_killed_after_saving_a_retry_finishes_it_after_a_restart() {
    broker_crash_in_retry_at("retry-saved");
}

#[test]
fn a_broker_killed_after_a_retried_task_replaced_its_record_counts_it_once() {
    broker_crash_in_retry_at("after-replace");
}
