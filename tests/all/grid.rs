//! The grid end to end: a real nats-server, a broker and nodes as real processes, driven through
//! the `grid` command. Tests assert outcomes and the order of events; a deadline only guards
//! against a hang.

use crate::support::*;
use grid_proto::{Usage, encode, names};
use std::collections::HashSet;
use std::path::Path;

fn submit(grid: &TestGrid, args: &[&str]) -> String {
    let mut all = vec!["submit"];
    all.extend_from_slice(args);
    let v = grid.grid_json(&all, 0);
    v["job_id"].as_str().unwrap().to_string()
}

fn manifest(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_thousand_task_job_on_two_nodes_completes_with_correct_results() {
    let grid = TestGrid::start(2, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let params = write_params(tmp.path(), (0..1000).map(|_| r#"{"rows": 4}"#.to_string()));
    let module = guest("synth-data");
    let status = grid.grid_json(
        &[
            "submit",
            module.to_str().unwrap(),
            "--params",
            params.to_str().unwrap(),
            "--seed",
            "7",
            "--wait",
        ],
        0,
    );
    assert_eq!(status["state"], "done");
    assert_eq!(status["tasks"]["succeeded"], 1000);
    assert_eq!(status["tasks"]["failed"], 0);
    let job = status["job_id"].as_str().unwrap();

    let out = tmp.path().join("results");
    let r = grid.grid(&["results", job, "-o", out.to_str().unwrap()]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let lines = manifest(&out);
    assert_eq!(lines.len(), 1000);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], i as u64, "manifest in index order");
        assert_eq!(line["state"], "succeeded");
        assert_eq!(line["attempts"], 1);
        let name = format!("part-{i:05}.csv");
        assert_eq!(line["files"][0]["path"], name.as_str());
        let csv = std::fs::read_to_string(out.join(i.to_string()).join(&name)).unwrap();
        let ids: Vec<u64> = csv
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(ids, (i as u64 * 4..i as u64 * 4 + 4).collect::<Vec<_>>());
    }
    // A grid task gives exactly the bytes `grid run` gives for the same index and seed.
    for i in [0u64, 517, 999] {
        let local = tempfile::tempdir().unwrap();
        let target = local.path().join("o");
        let (v, code) = grid_run_json(
            &[
                module.to_str().unwrap(),
                "--output",
                target.to_str().unwrap(),
                "--seed",
                "7",
                "--task-index",
                &i.to_string(),
            ],
            br#"{"rows": 4}"#,
        );
        assert_eq!(code, 0, "{v}");
        let name = format!("part-{i:05}.csv");
        assert_eq!(
            std::fs::read(target.join(&name)).unwrap(),
            std::fs::read(out.join(i.to_string()).join(&name)).unwrap()
        );
    }
}

/// A job without `--seed` draws a fresh seed, recorded in the job and printed (two `--tasks`
/// jobs once drew identical numbers); `--seed` still fixes it. What `grid submit` assumes is
/// said: one task when neither `--tasks` nor `--params` says how many, and the blank lines of
/// a params file it skipped.
#[test]
fn a_job_draws_a_fresh_seed_unless_given_one_and_submit_says_what_it_assumed() {
    let grid = TestGrid::start(1, &[]);
    let hostile = guest("hostile");
    let submit_env = |flags: &[&str]| {
        let mut args = vec!["submit", hostile.to_str().unwrap(), "--json"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "env"]);
        let out = grid.grid(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        (v, stderr)
    };
    let (first, said) = submit_env(&[]);
    assert!(
        said.contains("grid: submitted one task (give --tasks N or --params FILE for more)"),
        "{said}"
    );
    let (second, _) = submit_env(&[]);
    let seeds = [&first, &second].map(|v| v["seed"].as_u64().expect("the seed it drew"));
    assert_ne!(seeds[0], seeds[1], "two jobs, two seeds");
    assert!(
        seeds.iter().all(|s| *s < 1 << 53),
        "a seed any JSON reader holds exactly: {seeds:?}"
    );
    // The seed is the job's: `grid status` says it, and the task drew from it.
    let job = first["job_id"].as_str().unwrap();
    let status = grid.wait(job);
    assert_eq!(status["seed"], seeds[0], "{status}");
    let logs = grid.grid(&["logs", job, "--task", "0"]);
    let stdout = String::from_utf8_lossy(&logs.stdout);
    let drawn = format!("GRID_SEED={}", grid_proto::task_seed(seeds[0], 0));
    assert!(stdout.contains(&drawn), "{drawn}: {stdout}");
    // Given, the seed is kept, and a count given is not remarked on.
    let (fixed, said) = submit_env(&["--seed", "7", "--tasks", "1"]);
    assert_eq!(fixed["seed"], 7);
    assert!(!said.contains("one task"), "{said}");
    // Blank lines of a params file are no tasks, and submit says how many it skipped, once.
    let tmp = tempfile::tempdir().unwrap();
    let params = tmp.path().join("params.jsonl");
    std::fs::write(&params, "{}\n\n{}\n   \n\n").unwrap();
    let (paged, said) = submit_env(&["--params", params.to_str().unwrap()]);
    assert_eq!(paged["tasks"], 2, "{paged}");
    let skipped = format!("grid: skipped 3 blank lines of {}", params.display());
    assert!(said.contains(&skipped), "{said}");
    assert_eq!(said.matches("grid: skipped").count(), 1, "{said}");
    assert!(!said.contains("one task"), "{said}");
}

#[test]
fn the_same_module_is_uploaded_once_and_compiled_once_per_node() {
    let grid = TestGrid::start(1, &[]);
    let module = guest("monte-carlo-pi");
    let sha = grid_proto::Sha256Hex::of(&std::fs::read(&module).unwrap()).to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The tenant's store: (objects, how many of them are the module).
    let stored = || {
        rt.block_on(async {
            use futures::StreamExt;
            let store = default_store(&grid.nats.url).await;
            let list: Vec<_> = store.list().await.unwrap().collect().await;
            let modules = list
                .iter()
                .filter(|o| o.as_ref().is_ok_and(|o| o.name == sha))
                .count();
            (list.len(), modules)
        })
    };
    let mut after = Vec::new();
    for _ in 0..2 {
        let job = submit(
            &grid,
            &[module.to_str().unwrap(), "--tasks", "3", "--seed", "1"],
        );
        assert_eq!(grid.wait(&job)["state"], "done");
        after.push(stored());
    }
    assert_eq!(after[0].1, 1, "the module is stored");
    // The same job again (same seed: the same outputs and logs) stores nothing new.
    assert_eq!(after[0], after[1], "one module object for two submits");
    let compiled: Vec<_> = std::fs::read_dir(grid.caches.path().join("node-0/compiled"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.path().extension().is_some_and(|x| x == "cwasm")
                && e.file_name().to_string_lossy().contains("guarded")
        })
        .collect();
    assert_eq!(compiled.len(), 1, "compiled once on the node");
}

#[test]
fn a_flaky_task_is_retried_and_counted_once_and_a_failing_one_fails_the_job() {
    let grid = TestGrid::start(1, &[]);
    let hostile = guest("hostile");
    let status = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--retries",
            "2",
            "--timeout",
            "1s",
            "--wait",
            "--",
            "flaky",
        ],
        0,
    );
    assert_eq!(status["state"], "done");
    assert_eq!(status["tasks"]["succeeded"], 1);
    let tmp = tempfile::tempdir().unwrap();
    let job = status["job_id"].as_str().unwrap();
    grid.grid(&["results", job, "-o", tmp.path().to_str().unwrap()]);
    let m = manifest(tmp.path());
    assert_eq!(m[0]["attempts"], 3);
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("0/attempt.txt")).unwrap(),
        "2"
    );

    let status = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--retries",
            "1",
            "--wait",
            "--",
            "exit",
            "4",
        ],
        1,
    );
    assert_eq!(status["state"], "failed");
    assert_eq!(status["reason"], "task 0 failed: exit: 4");
    assert_eq!(status["tasks"]["failed"], 1);
    let tmp = tempfile::tempdir().unwrap();
    grid.grid(&[
        "results",
        status["job_id"].as_str().unwrap(),
        "-o",
        tmp.path().to_str().unwrap(),
    ]);
    let m = manifest(tmp.path());
    assert_eq!(
        m[0]["attempts"], 1,
        "an exit fails the same way every time: not retried"
    );
    assert_eq!(m[0]["reason"], "exit: 4");
}

#[test]
fn a_result_delivered_twice_is_counted_once() {
    // No nodes: the test plays the node, takes the tasks and publishes results itself.
    let grid = TestGrid::start(0, &[]);
    let job = submit(
        &grid,
        &[guest("monte-carlo-pi").to_str().unwrap(), "--tasks", "2"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect_operator(&grid.nats.url).await;
        let tasks = pull_tasks(&client, "test", 2).await;
        assert_eq!(tasks.len(), 2);
        // Out for longer than the CPU time it reports, so the bill is what it says.
        tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
        let js = async_nats::jetstream::new(client);
        let result = |index: usize| {
            let usage = Usage {
                cpu_seconds: 1.5,
                ..Usage::default()
            };
            empty_result(&tasks[index].0, "test", usage)
        };
        // Task 0 twice under different message ids (JetStream's dedup cannot help), then task 1.
        for (index, id) in [(0, "a"), (0, "b"), (1, "c")] {
            let msg = async_nats::jetstream::message::PublishMessage::build()
                .payload(
                    encode(&grid_proto::ResultsMsg {
                        results: vec![result(index)],
                    })
                    .into(),
                )
                .message_id(id);
            js.send_publish(names::results_subject("test", &job), msg)
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done");
    assert_eq!(status["tasks"]["succeeded"], 2, "{status}");
    // Billed once too: the second delivery of task 0's attempt is not a second attempt.
    let billed = crate::ledger::usage(&grid, &["--job", &job]);
    assert_eq!(billed["total"]["attempts"], 2, "{billed}");
    assert_eq!(billed["total"]["cpu_seconds"], 3.0, "{billed}");
}

#[test]
fn a_node_killed_mid_job_loses_nothing() {
    let mut grid = TestGrid::start(2, &[]);
    let job = submit(
        &grid,
        &[
            guest("hostile").to_str().unwrap(),
            "--tasks",
            "30",
            "--",
            "nap",
            "300",
        ],
    );
    // Let both nodes start work, then kill one of them outright.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    grid.nodes[0].kill();
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], 30);
    let tmp = tempfile::tempdir().unwrap();
    grid.grid(&["results", &job, "-o", tmp.path().to_str().unwrap()]);
    let indices: HashSet<String> = (0..30)
        .map(|i| std::fs::read_to_string(tmp.path().join(format!("{i}/index.txt"))).unwrap())
        .collect();
    assert_eq!(indices.len(), 30, "every task's own output");
}

#[test]
fn the_broker_restarted_mid_job_finishes_it() {
    let mut grid = TestGrid::start(2, &["--window", "4"]);
    let job = submit(
        &grid,
        &[
            guest("hostile").to_str().unwrap(),
            "--tasks",
            "40",
            "--",
            "nap",
            "50",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(800));
    grid.broker.kill();
    std::thread::sleep(std::time::Duration::from_millis(500));
    grid.broker = GridProcess::broker(&grid.nats, &["--window", "4"]);
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], 40);
    assert_eq!(status["tasks"]["total"], 40);
}

/// The broker saves a job's record on a timer, so one killed between enqueueing tasks and its
/// next save leaves a record that lags tasks already done. The test makes the worst case: it
/// kills the broker mid-job and rewinds the saved record to the job's submission.
#[test]
fn a_broker_restarted_from_a_stale_job_record_finishes_the_job() {
    let mut grid = TestGrid::start(2, &["--window", "4"]);
    let job = submit(
        &grid,
        &[
            guest("hostile").to_str().unwrap(),
            "--tasks",
            "24",
            "--",
            "nap",
            "50",
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while grid.grid_json(&["status", &job], 0)["tasks"]["succeeded"].as_u64() < Some(8) {
        assert!(
            std::time::Instant::now() < deadline,
            "the job never got going"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    grid.broker.kill();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect_operator(&grid.nats.url).await;
        let jobs = async_nats::jetstream::new(client)
            .get_key_value(names::JOBS_BUCKET)
            .await
            .unwrap();
        let key = names::job_key(names::DEFAULT_TENANT, &job);
        let saved = jobs.get(&key).await.unwrap().unwrap();
        let mut record: grid_proto::JobRecord = grid_proto::decode(&saved).unwrap();
        record.enqueued = 0;
        record.counts = grid_proto::TaskCounts {
            total: record.counts.total,
            ..Default::default()
        };
        jobs.put(key, encode(&record).into()).await.unwrap();
    });
    grid.broker = GridProcess::broker(&grid.nats, &["--window", "4"]);
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], 24, "{status}");
    // Each task billed once.
    let billed = crate::ledger::usage(&grid, &["--job", &job]);
    assert_eq!(billed["total"]["attempts"], 24, "{billed}");
}

#[test]
fn cancel_stops_running_tasks_and_starts_no_more() {
    let grid = TestGrid::start(1, &["--window", "4"]);
    let job = submit(
        &grid,
        &[
            guest("hostile").to_str().unwrap(),
            "--tasks",
            "20",
            "--",
            "sleep",
        ],
    );
    // Wait until the node is busy with the job's tasks.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let nodes = grid.grid_json(&["nodes"], 0);
        if nodes["busy"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node never started the job"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = grid.grid_json(&["cancel", &job], 0);
    assert_eq!(status["state"], "cancelled");
    // Running tasks stop (the node goes idle) and nothing else of the job starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let nodes = grid.grid_json(&["nodes"], 0);
        if nodes["busy"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "running tasks were not stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        grid.grid_json(&["nodes"], 0)["busy"],
        0,
        "no task of the cancelled job started"
    );
    assert_eq!(grid.grid_json(&["status", &job], 0)["state"], "cancelled");
    let out = grid.grid(&["cancel", &job]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already ended (cancelled)"));
}

/// Polls `check` every 100 ms until it is true; panics with `what` after `secs`.
fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_cancelled_job_settles_bills_what_ran_and_can_be_retried() {
    let grid = TestGrid::start(1, &[]);
    let hostile = guest("hostile");
    let job = submit(
        &grid,
        &[
            hostile.to_str().unwrap(),
            "--tasks",
            "6",
            "--",
            "nap-first",
            "600000",
        ],
    );
    // Both slots of the node run a task of the job, for a second or more.
    eventually(30, "the node never ran the job", || {
        grid.grid_json(&["nodes"], 0)["running"] == 2
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let cancelled_at = std::time::Instant::now();
    assert_eq!(grid.grid_json(&["cancel", &job], 0)["state"], "cancelled");

    // The job is settled at once: every task that had not ended is cancelled, none running.
    let status = grid.grid_json(&["status", &job], 0);
    assert_eq!(status["tasks"]["cancelled"], 6, "{status}");
    assert_eq!(status["tasks"]["running"], 0, "{status}");
    assert_eq!(status["tasks"]["queued"], 0, "{status}");
    let line = String::from_utf8_lossy(&grid.grid(&["status", &job]).stdout).into_owned();
    assert!(
        line.contains("0 of 6 succeeded, 0 failed, 6 cancelled"),
        "{line}"
    );
    assert!(
        !line.contains("(cancelled)"),
        "the state is said once: {line}"
    );
    // Its running tasks stop within seconds and their slots go to the next job.
    eventually(10, "the cancelled tasks kept their slots", || {
        grid.grid_json(&["nodes"], 0)["running"] == 0
    });
    let next = submit(
        &grid,
        &[
            hostile.to_str().unwrap(),
            "--tasks",
            "2",
            "--",
            "nap",
            "100",
        ],
    );
    assert_eq!(grid.wait(&next)["state"], "done");
    assert!(
        cancelled_at.elapsed() < std::time::Duration::from_secs(30),
        "the next job waited for the cancelled one's tasks"
    );
    // The two stopped attempts are billed as they ran: more than the 1.5 s before the cancel.
    let mut billed = serde_json::Value::Null;
    eventually(20, "the stopped attempts were not billed", || {
        billed = crate::ledger::usage(&grid, &["--job", &job]);
        billed["total"]["attempts"] == 2
    });
    let wall = billed["total"]["wall_seconds"].as_f64().unwrap();
    assert!(wall > 2.0 * 1.5 && wall < 2.0 * 30.0, "{billed}");

    let (_dir, manifest) = grid.results(&job);
    assert!(
        manifest.iter().all(|t| t["state"] == "cancelled"),
        "{manifest:?}"
    );
    // A cancelled job can be retried: its six tasks run again, quickly this time.
    let out = grid.grid(&["retry", &job, "--failed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = grid.wait(&job);
    assert_eq!(status["tasks"]["succeeded"], 6, "{status}");
    assert_eq!(status["tasks"]["cancelled"], 0, "{status}");
}

#[test]
fn a_panic_says_why_and_a_task_out_of_room_is_run_again_with_more() {
    let grid = TestGrid::start(1, &[]);
    let hostile = guest("hostile");
    // A panic: its message (the guest's last words on stderr) beside `trap: unreachable`.
    let status = grid.grid_json(
        &["submit", hostile.to_str().unwrap(), "--wait", "--", "panic"],
        1,
    );
    let why = "trap: unreachable — the guest panicked on purpose";
    assert_eq!(
        status["reason"],
        format!("task 0 failed: {why}"),
        "{status}"
    );
    let (_dir, manifest) = grid.results(status["job_id"].as_str().unwrap());
    assert_eq!(manifest[0]["reason"], "trap: unreachable");
    assert_eq!(manifest[0]["detail"], "the guest panicked on purpose");
    assert_eq!(manifest[0]["attempts"], 1, "a panic is not retried");

    // Two tasks that each need 100 MiB, under a 64 MiB limit: the hint names the flag.
    let out = grid.grid(&[
        "submit",
        hostile.to_str().unwrap(),
        "--tasks",
        "2",
        "--memory",
        "64MiB",
        "--wait",
        "--",
        "alloc",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let job = stdout
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "grid: a task ran out of room (its memory limit was 64 MiB): give the failed tasks more with `grid retry {job} --failed --memory 128MiB`"
        )),
        "{stderr}"
    );
    // Run one here with more room, as it ran on the grid otherwise.
    let (local, code) = grid_run_json(
        &[
            "--nats",
            &grid.nats.url,
            "--from",
            &job,
            "--task",
            "1",
            "--memory",
            "256MiB",
        ],
        b"",
    );
    assert_eq!(
        (code, &local["status"]),
        (0, &serde_json::json!("succeeded")),
        "{local}"
    );
    // A replacement module takes the job's place, with the job's params and limits.
    let (fixed, code) = grid_run_json(
        &[
            "--nats",
            &grid.nats.url,
            hostile.to_str().unwrap(),
            "--from",
            &job,
            "--task",
            "0",
        ],
        b"",
    );
    assert_eq!(
        code, 1,
        "the same module under the same limit fails again: {fixed}"
    );
    assert_eq!(fixed["reason"], "limit: memory");
    // Limits no node takes are refused, as at submit.
    let refused = grid.grid(&["retry", &job, "--failed", "--memory", "1TiB"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("node-0"), "{said}");
    // The failed tasks run again in the job, with the new limit.
    let status = grid.grid_json(
        &["retry", &job, "--failed", "--memory", "256MiB", "--wait"],
        0,
    );
    assert_eq!(status["tasks"]["succeeded"], 2, "{status}");
}

#[test]
fn a_job_is_found_by_its_name_or_a_prefix_of_its_id_and_listed_with_its_age() {
    let grid = TestGrid::start(1, &[]);
    let pi = guest("monte-carlo-pi");
    let named = |name: &str| {
        let v = grid.grid_json(
            &["submit", pi.to_str().unwrap(), "--name", name, "--wait"],
            0,
        );
        v["job_id"].as_str().unwrap().to_string()
    };
    let (first, second) = (named("sweep"), named("sweep"));
    let other = named("other-run");
    // A name means the newest job of that name.
    assert_eq!(
        grid.grid_json(&["status", "sweep"], 0)["job_id"],
        second.as_str()
    );
    assert_eq!(
        grid.grid_json(&["status", "other-run"], 0)["name"],
        "other-run"
    );
    // A prefix that starts one id is that job; one that starts several is refused, naming them.
    let unique = (8..first.len())
        .map(|n| &first[..n])
        .find(|p| !second.starts_with(p) && !other.starts_with(p))
        .unwrap();
    assert_eq!(
        grid.grid_json(&["status", unique], 0)["job_id"],
        first.as_str()
    );
    let shared: String = first
        .chars()
        .zip(second.chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a)
        .collect();
    let out = grid.grid(&["status", &shared]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("give more of the id"), "{said}");
    // Other commands take them too.
    let dir = tempfile::tempdir().unwrap();
    let out = grid.grid(&["results", "sweep", "-o", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bad name is refused before anything is sent.
    let out = grid.grid(&["submit", pi.to_str().unwrap(), "--name", "9 lives"]);
    assert_eq!(out.status.code(), Some(2));
    // `grid jobs`: each job's id, name, module, state, progress and age, on one line.
    let listing = String::from_utf8_lossy(&grid.grid(&["jobs"]).stdout).into_owned();
    let line = listing.lines().find(|l| l.starts_with(&second)).unwrap();
    for word in [
        "sweep",
        "monte-carlo-pi.wasm",
        "done",
        "1 of 1 succeeded",
        "s ago",
    ] {
        assert!(line.contains(word), "{word}: {line}");
    }
}

#[test]
fn running_tasks_are_told_apart_from_those_waiting_on_a_node() {
    // One node of two slots, and six long tasks: the node holds more than it runs.
    let grid = TestGrid::start(1, &[]);
    let hostile = guest("hostile");
    let job = submit(
        &grid,
        &[
            hostile.to_str().unwrap(),
            "--tasks",
            "6",
            "--",
            "nap",
            "600000",
        ],
    );
    let mut status = serde_json::Value::Null;
    eventually(30, "the job's running tasks were never told", || {
        status = grid.grid_json(&["status", &job], 0);
        status["tasks"]["running"] == 2
    });
    let tasks = &status["tasks"];
    assert_eq!(
        tasks["waiting"].as_u64().unwrap() + tasks["queued"].as_u64().unwrap(),
        4,
        "{status}"
    );
    let line = String::from_utf8_lossy(&grid.grid(&["status", &job]).stdout).into_owned();
    assert!(line.contains("0 failed, 2 running, 4 waiting"), "{line}");
    grid.grid_json(&["cancel", &job], 0);
}

#[test]
fn ctrl_c_stops_the_waiting_not_the_job_and_says_so() {
    let grid = TestGrid::start(1, &[]);
    let hostile = guest("hostile");
    let job = submit(&grid, &[hostile.to_str().unwrap(), "--", "nap", "600000"]);
    let waiting = std::process::Command::new(env!("CARGO_BIN_EXE_grid"))
        .args(["status", &job, "--wait", "--nats", &grid.nats.url])
        .env("GRID_CREDS", tenant_creds(names::DEFAULT_TENANT))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    // SAFETY: a signal to a child process of this test.
    unsafe { libc::kill(waiting.id() as i32, libc::SIGINT) };
    let out = waiting.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{said}");
    assert!(
        said.contains(&format!("grid: stopped waiting; job {job} keeps running")),
        "{said}"
    );
    let status = grid.grid_json(&["status", &job], 0);
    assert_eq!(status["state"], "running", "{status}");
    grid.grid_json(&["cancel", &job], 0);
}

#[test]
fn long_tasks_are_not_held_ahead_so_every_node_gets_some() {
    // Two nodes of one slot each, four tasks of three seconds: a node that asked first used to
    // hold all four while the other idled.
    let grid = TestGrid::start(0, &[]);
    let caches = tempfile::tempdir().unwrap();
    let _nodes: Vec<GridProcess> = (0..2)
        .map(|i| {
            GridProcess::node(
                &grid.nats,
                &format!("node-{i}"),
                &caches.path().join(format!("node-{i}")),
                1,
            )
        })
        .collect();
    grid.wait_for_nodes(2);
    let hostile = guest("hostile");
    let job = submit(
        &grid,
        &[
            hostile.to_str().unwrap(),
            "--tasks",
            "4",
            "--",
            "nap",
            "3000",
        ],
    );
    let mut most_held = 0;
    loop {
        let out = grid.grid(&["nodes", "--json"]);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let node: serde_json::Value = serde_json::from_str(line).unwrap();
            most_held = most_held.max(node["busy"].as_u64().unwrap_or(0));
        }
        if grid.grid_json(&["status", &job], 0)["state"] == "done" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(most_held, 1, "a node held more than its one slot runs");
    let (_dir, manifest) = grid.results(&job);
    let nodes: HashSet<&str> = manifest
        .iter()
        .map(|t| t["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 2, "both nodes ran tasks: {manifest:?}");
}

#[test]
fn a_small_job_behind_a_large_one_finishes_first() {
    let grid = TestGrid::start(1, &["--window", "4"]);
    let hostile = guest("hostile");
    let big = submit(
        &grid,
        &[
            hostile.to_str().unwrap(),
            "--tasks",
            "60",
            "--",
            "nap",
            "100",
        ],
    );
    let small = submit(
        &grid,
        &[
            hostile.to_str().unwrap(),
            "--tasks",
            "3",
            "--",
            "nap",
            "100",
        ],
    );
    assert_eq!(grid.wait(&small)["state"], "done");
    let big_status = grid.grid_json(&["status", &big], 0);
    assert_eq!(
        big_status["state"], "running",
        "the large job is still going when the small one is done: {big_status}"
    );
    assert_eq!(grid.wait(&big)["state"], "done");
}

/// A params file is stored in pages of about 1 MiB, and the broker reads a page when its tasks
/// come up: padded lines (JSON allows the spaces) make a 2.5 MB file of 25 tasks, ten pages' worth
/// of tasks would otherwise need a file too large for a test.
#[test]
fn a_params_file_of_many_pages_gives_every_task_its_own_line() {
    let grid = TestGrid::start(2, &["--window", "4"]);
    let tmp = tempfile::tempdir().unwrap();
    let pad = " ".repeat(100_000);
    let params = write_params(
        tmp.path(),
        (0..25).map(|i| format!(r#"{{"rows": {}{pad}}}"#, i + 1)),
    );
    assert!(std::fs::metadata(&params).unwrap().len() > 2_500_000);
    let module = guest("synth-data");
    let job = submit(
        &grid,
        &[
            module.to_str().unwrap(),
            "--params",
            params.to_str().unwrap(),
        ],
    );
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    let out = tmp.path().join("results");
    grid.grid(&["results", &job, "-o", out.to_str().unwrap()]);
    for i in 0..25 {
        let csv = std::fs::read_to_string(out.join(i.to_string()).join(format!("part-{i:05}.csv")))
            .unwrap();
        assert_eq!(
            csv.lines().count(),
            i + 2,
            "task {i}: a header and {} rows",
            i + 1
        );
    }
}

/// Short tasks travel several to a message once the broker has seen how short they are: a job
/// of 1,500 tiny tasks takes far fewer task messages than tasks, and each task still gets its
/// own params line and output, counted and billed once.
#[test]
fn short_tasks_travel_several_to_a_message_and_each_still_gets_its_own_line() {
    let grid = TestGrid::start(2, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let tasks = 1500u64;
    let params = write_params(
        tmp.path(),
        (0..tasks).map(|i| format!(r#"{{"samples": {}}}"#, 100 + i)),
    );
    let module = guest("monte-carlo-pi");
    let job = submit(
        &grid,
        &[
            module.to_str().unwrap(),
            "--params",
            params.to_str().unwrap(),
        ],
    );
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], tasks, "{status}");
    let job = job.as_str();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let messages = rt.block_on(async {
        let client = connect_operator(&grid.nats.url).await;
        let mut stream = async_nats::jetstream::new(client)
            .get_stream(names::TASKS_STREAM)
            .await
            .unwrap();
        stream.info().await.unwrap().state.last_sequence
    });
    assert!(
        messages < tasks / 2,
        "{messages} task messages for {tasks} tasks"
    );
    let out = tmp.path().join("results");
    grid.grid(&["results", job, "-o", out.to_str().unwrap()]);
    for i in 0..tasks {
        let estimate: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(i.to_string()).join("estimate.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            estimate["samples"],
            100 + i,
            "task {i} ran with its own line"
        );
    }
    let billed = crate::ledger::usage(&grid, &["--job", job]);
    assert_eq!(billed["total"]["attempts"], tasks, "{billed}");
}

#[test]
fn bad_submissions_are_refused_with_one_line_and_the_grid_keeps_serving() {
    let grid = TestGrid::start(1, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let params = write_params(
        tmp.path(),
        ["{\"rows\": 1}".to_string(), "{not json".to_string()].into_iter(),
    );
    let module = guest("synth-data");
    let out = grid.grid(&[
        "submit",
        module.to_str().unwrap(),
        "--params",
        params.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("params.jsonl line 2 is not valid JSON"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);

    let out = grid.grid(&["submit", "/no/such.wasm", "--tasks", "1"]);
    assert_eq!(out.status.code(), Some(2));

    let bad = tmp.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x01\0\0\0").unwrap();
    let out = grid.grid(&["submit", bad.to_str().unwrap(), "--tasks", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused: no `_start` export"));

    let out = grid.grid(&["status", "nosuchjob"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown job nosuchjob"));

    // Garbled messages straight onto the wire: a task and a result nobody can read.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect_operator(&grid.nats.url).await;
        let js = async_nats::jetstream::new(client);
        for subject in [
            names::tasks_subject("cpu", "garbage"),
            names::results_subject("garbage", "garbage"),
        ] {
            js.publish(subject, bytes::Bytes::from_static(b"\xde\xad\xbe\xef"))
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let job = submit(
        &grid,
        &[guest("monte-carlo-pi").to_str().unwrap(), "--tasks", "2"],
    );
    assert_eq!(grid.wait(&job)["state"], "done");
}

#[test]
fn no_grid_at_the_address_is_a_setup_error() {
    let out = grid(&["status", "x", "--nats", "nats://127.0.0.1:1"], b"");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("grid: cannot reach the grid at nats://127.0.0.1:1"),
        "{stderr}"
    );
}

#[test]
fn the_nats_server_restarted_mid_job_loses_nothing() {
    let mut grid = TestGrid::start(2, &["--window", "8"]);
    let job = submit(
        &grid,
        &[
            guest("hostile").to_str().unwrap(),
            "--tasks",
            "60",
            "--",
            "nap",
            "200",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let before = grid.grid_json(&["status", &job], 0);
    assert_eq!(
        before["state"], "running",
        "the restart happens mid-job: {before}"
    );
    grid.nats = std::mem::replace(&mut grid.nats, NatsServer::placeholder()).restart();
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], 60);
}

#[test]
fn input_files_become_tasks_and_shared_files_reach_every_task() {
    let grid = TestGrid::start(1, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, shared) = (tmp.path().join("inputs"), tmp.path().join("shared"));
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    // Byte order, not creation order: "B" < "a".
    std::fs::write(inputs.join("a.txt"), "alpha").unwrap();
    std::fs::write(inputs.join("B.txt"), "bravo").unwrap();
    std::fs::write(shared.join("ref.txt"), "reference").unwrap();
    let status = grid.grid_json(
        &[
            "submit",
            guest("hostile").to_str().unwrap(),
            "--input",
            inputs.to_str().unwrap(),
            "--shared",
            shared.to_str().unwrap(),
            "--wait",
            "--",
            "show-inputs",
        ],
        0,
    );
    assert_eq!(status["tasks"]["total"], 2);
    let job = status["job_id"].as_str().unwrap();
    let logs =
        |task: &str| String::from_utf8(grid.grid(&["logs", job, "--task", task]).stdout).unwrap();
    assert_eq!(
        logs("0"),
        "/in/B.txt: bravo\n/in/shared/ref.txt: reference\n"
    );
    assert_eq!(
        logs("1"),
        "/in/a.txt: alpha\n/in/shared/ref.txt: reference\n"
    );
    let followed = String::from_utf8(grid.grid(&["logs", job, "--follow"]).stdout).unwrap();
    assert!(
        followed.contains("== task 0 stdout ==\n") && followed.contains("== task 1 stdout ==\n"),
        "{followed}"
    );
    assert_eq!(followed.matches("/in/shared/ref.txt: reference").count(), 2);
}

/// What `hostile terminal-escapes` writes: escape sequences, C1 controls, bytes that are not
/// UTF-8 (kept equal to the guest's own copy in tests/guests/src/main.rs).
const GUEST_STDOUT: &[u8] =
    b"plain\tline\n\x1b[31mred\x1b[0m \x1b]0;title\x07 \xc2\x9b2J \x9b \xff\xfe fake\rreal\n";
const GUEST_STDERR: &[u8] = b"\x1b[2Kerr\x07\n";

/// A pipe gets what a guest wrote byte for byte, from `grid logs` (with `--raw` or without,
/// `--follow`) and from `grid run`. Only a terminal gets control characters escaped; a test's
/// output never is one, so `grid`'s unit tests (`terminal.rs`) cover that side.
#[test]
fn a_pipe_gets_the_guests_bytes_exactly() {
    let contains = |all: &[u8], part: &[u8]| all.windows(part.len()).any(|w| w == part);
    let grid = TestGrid::start(1, &[]);
    let hostile = guest("hostile");
    let job = submit(
        &grid,
        &[
            hostile.to_str().unwrap(),
            "--wait",
            "--",
            "terminal-escapes",
        ],
    );
    let variants: [&[&str]; 2] = [&[], &["--raw"]];
    for extra in variants {
        let mut args = vec!["logs", job.as_str(), "--task", "0"];
        args.extend_from_slice(extra);
        let out = grid.grid(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, GUEST_STDOUT, "grid {args:?}");
        assert!(
            contains(&out.stderr, GUEST_STDERR),
            "grid {args:?}: {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let followed = grid.grid(&["logs", &job, "--follow"]);
    assert!(
        contains(&followed.stdout, GUEST_STDOUT),
        "{:?}",
        String::from_utf8_lossy(&followed.stdout)
    );
    // The same task, here.
    let out = crate::support::grid(
        &["run", hostile.to_str().unwrap(), "--", "terminal-escapes"],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, GUEST_STDOUT);
    assert!(contains(&out.stderr, GUEST_STDERR));
}

#[test]
fn a_task_no_node_can_run_is_retried_then_reported_lost() {
    // Submit with no node up, remove the module from the grid, then start a node: every
    // delivery of the task fails to fetch the module and is handed back, until it is lost.
    let mut grid = TestGrid::start(0, &[]);
    let module = guest("monte-carlo-pi");
    let job = submit(
        &grid,
        &[module.to_str().unwrap(), "--tasks", "1", "--retries", "1"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = default_store(&grid.nats.url).await;
        let sha = grid_proto::Sha256Hex::of(&std::fs::read(&module).unwrap());
        store.delete(names::object_name(&sha)).await.unwrap();
    });
    grid.nodes.push(GridProcess::node(
        &grid.nats,
        "node-0",
        &grid.caches.path().join("node-0"),
        2,
    ));
    let status = grid.wait(&job);
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(status["reason"], "task 0 failed: lost");
    let tmp = tempfile::tempdir().unwrap();
    grid.grid(&["results", &job, "-o", tmp.path().to_str().unwrap()]);
    let m = manifest(tmp.path());
    assert_eq!(m[0]["attempts"], 2, "the lost attempt was retried once");
    assert_eq!(m[0]["reason"], "lost");
}

#[test]
fn a_task_longer_than_the_ack_wait_runs_once() {
    // One node, one slot: a redelivery would have to wait for the slot and run afterwards.
    let mut grid = TestGrid::start(0, &[]);
    grid.nodes.push(GridProcess::node(
        &grid.nats,
        "solo",
        &grid.caches.path().join("solo"),
        1,
    ));
    grid.wait_for_nodes(1);
    let wait = grid_client::TASK_ACK_WAIT.as_millis() + 4000;
    let job = submit(
        &grid,
        &[
            guest("hostile").to_str().unwrap(),
            "--tasks",
            "1",
            "--",
            "nap",
            &wait.to_string(),
        ],
    );
    assert_eq!(grid.wait(&job)["state"], "done");
    std::thread::sleep(std::time::Duration::from_secs(4)); // a redelivery would be running by now
    let node = grid.grid_json(&["nodes"], 0);
    assert_eq!(node["tasks_done"], 1, "{node}");
    assert_eq!(node["busy"], 0, "{node}");
}

/// `grid up` serves until Ctrl-C, one grid per data dir and port; its nodes share the
/// machine's memory rather than each claiming all of it.
#[test]
fn grid_up_serves_until_interrupted_then_stops_everything() {
    let data = tempfile::tempdir().unwrap();
    let mut up = std::process::Command::new(env!("CARGO_BIN_EXE_grid"))
        .args([
            "up",
            "--nodes",
            "2",
            "--no-gpu",
            "--no-warm-runtimes",
            "--nats",
            "nats://127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(up.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("a ready line").unwrap();
    let url = ready
        .strip_prefix("grid: ready ")
        .unwrap_or_else(|| panic!("{ready}"))
        .to_string();
    // One grid per data dir, one per port: a second `grid up` says which holds them.
    let second = grid(&["up", "--data-dir", data.path().to_str().unwrap()], b"");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("another `grid up` runs on data dir")
            && stderr.contains(&format!("pid {}", up.id())),
        "{stderr}"
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let same_port = grid(
        &[
            "up",
            "--data-dir",
            elsewhere.path().to_str().unwrap(),
            "--nats",
            &url,
        ],
        b"",
    );
    let stderr = String::from_utf8_lossy(&same_port.stderr);
    assert_eq!(same_port.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is in use"), "{stderr}");
    // `grid up` made its own operator setup and default tenant.
    let creds = data.path().join("auth/creds/tenant-default.creds");
    // Each node's memory budget is its share: together they promise no more than there is.
    let nodes = grid(
        &[
            "nodes",
            "--json",
            "--nats",
            &url,
            "--creds",
            creds.to_str().unwrap(),
        ],
        b"",
    );
    let budgets: Vec<u64> = String::from_utf8_lossy(&nodes.stdout)
        .lines()
        .map(|l| {
            let node: serde_json::Value = serde_json::from_str(l).unwrap();
            node["memory_budget_bytes"].as_u64().unwrap()
        })
        .collect();
    let machine = grid_node::settings::physical_memory().expect("this machine's RAM");
    assert_eq!(budgets.len(), 2, "{budgets:?}");
    assert_eq!(budgets[0], budgets[1], "equal shares: {budgets:?}");
    assert!(
        budgets.iter().sum::<u64>() <= machine,
        "{budgets:?} of {machine} bytes"
    );
    assert!(
        budgets[0] >= machine / 4,
        "a real share: {budgets:?} of {machine}"
    );
    let out = grid(
        &[
            "submit",
            "--nats",
            &url,
            "--creds",
            creds.to_str().unwrap(),
            "--wait",
            "--json",
            guest("monte-carlo-pi").to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pid = rustix::process::Pid::from_child(&up);
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = up.wait().unwrap();
    assert!(
        status.success(),
        "grid up exits cleanly on Ctrl-C: {status}"
    );
    // Nothing of the grid is left serving.
    assert!(
        std::net::TcpStream::connect(url.trim_start_matches("nats://")).is_err(),
        "nats-server stopped"
    );
}

/// The ids of the nodes `grid nodes` lists.
fn node_ids(grid: &TestGrid) -> Vec<String> {
    let out = grid.grid(&["nodes", "--json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Waits until `node` reports a running task.
fn wait_until_busy(grid: &TestGrid, node: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = grid.grid(&["nodes", "--json"]);
        let busy = String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"] == node && v["busy"].as_u64().unwrap_or(0) > 0
        });
        if busy {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{node} never got busy"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_node_stopped_with_sigterm_finishes_its_task_and_leaves_the_grid() {
    let mut grid = TestGrid::start(0, &[]);
    grid.nodes.push(GridProcess::node_with(
        &grid.nats,
        "leaver",
        &grid.caches.path().join("leaver"),
        1,
        &["--no-gpu", "--grace", "60s"],
    ));
    grid.wait_for_nodes(1);
    let job = submit(
        &grid,
        &[guest("hostile").to_str().unwrap(), "--", "nap", "2000"],
    );
    wait_until_busy(&grid, "leaver");
    assert!(grid.nodes[0].terminate(), "the node exits cleanly");
    assert!(
        !node_ids(&grid).contains(&"leaver".to_string()),
        "the node removed its heartbeat"
    );
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    let tmp = tempfile::tempdir().unwrap();
    grid.grid(&["results", &job, "-o", tmp.path().to_str().unwrap()]);
    let m = manifest(tmp.path());
    assert_eq!(
        m[0]["node"], "leaver",
        "it finished the task before leaving"
    );
    assert_eq!(m[0]["attempts"], 1);
}

#[test]
fn a_node_stopped_with_sigterm_hands_back_what_it_cannot_finish() {
    let mut grid = TestGrid::start(0, &[]);
    grid.nodes.push(GridProcess::node_with(
        &grid.nats,
        "leaver",
        &grid.caches.path().join("leaver"),
        1,
        &["--no-gpu", "--grace", "500ms"],
    ));
    grid.wait_for_nodes(1);
    let job = submit(
        &grid,
        &[guest("hostile").to_str().unwrap(), "--", "nap", "4000"],
    );
    wait_until_busy(&grid, "leaver");
    let stopped = std::time::Instant::now();
    assert!(grid.nodes[0].terminate(), "the node exits cleanly");
    assert!(
        stopped.elapsed() < grid_client::TASK_ACK_WAIT,
        "it handed the task back rather than leaving it to time out"
    );
    grid.nodes.push(GridProcess::node(
        &grid.nats,
        "stayer",
        &grid.caches.path().join("stayer"),
        1,
    ));
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    let tmp = tempfile::tempdir().unwrap();
    grid.grid(&["results", &job, "-o", tmp.path().to_str().unwrap()]);
    let m = manifest(tmp.path());
    assert_eq!(m[0]["node"], "stayer");
    assert_eq!(m[0]["attempts"], 1, "handing back used no retry");
}

#[test]
fn a_node_reads_its_settings_from_a_config_file() {
    let mut grid = TestGrid::start(0, &[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "nats = \"{}\"\ncreds = \"{}\"\nid = \"from-file\"\nslots = 3\ngpu = false\ncache_dir = \"{}\"\n[caps]\nmemory = \"8MiB\"\n",
            grid.nats.url,
            creds(Role::Provider, "from-file").display(),
            dir.path().join("cache").display()
        ),
    )
    .unwrap();
    grid.nodes.push(GridProcess::start(&[
        "node",
        "--config",
        config.to_str().unwrap(),
    ]));
    grid.wait_for_nodes(1);
    let node = grid.grid_json(&["nodes"], 0);
    assert_eq!(node["id"], "from-file");
    assert_eq!(node["slots"], 3);
    assert_eq!(node["classes"], serde_json::json!(["cpu"]));
    // The file's memory cap holds: a job asking for the default 512 MiB is not taken, and one
    // within the cap runs under it.
    let out = grid.grid(&["submit", guest("hostile").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("memory 512 MiB over its 8 MiB"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = grid.grid_json(
        &[
            "submit",
            guest("hostile").to_str().unwrap(),
            "--memory",
            "8MiB",
            "--retries",
            "0",
            "--wait",
            "--",
            "memory-bomb",
        ],
        1,
    );
    // With the guest's last words: its allocator's message.
    assert_eq!(
        status["reason"],
        "task 0 failed: limit: memory — memory allocation of 1048576 bytes failed",
        "{status}"
    );
    // A mistake in the file is one line naming it.
    std::fs::write(&config, "slotz = 3\n").unwrap();
    let out = crate::support::grid(&["node", "--config", config.to_str().unwrap()], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("slotz") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
}

/// Kills the broker at `point` while it counts a job of a flaky task and nine good ones, starts
/// a normal one, and checks that every task is counted exactly once.
fn broker_crash_at(point: &str) {
    let mut grid = TestGrid::start(2, &[]);
    grid.broker.kill();
    grid.broker = GridProcess::broker_crashing_at(&grid.nats, point);
    let hostile = guest("hostile");
    // The new broker answers once it has subscribed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let flaky_args = [
        "submit",
        hostile.to_str().unwrap(),
        "--retries",
        "3",
        "--timeout",
        "1s",
        "--json",
        "--",
        "flaky",
    ];
    let flaky = loop {
        let out = grid.grid(&flaky_args);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            break v["job_id"].as_str().unwrap().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broker never answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let good = submit(
        &grid,
        &[hostile.to_str().unwrap(), "--tasks", "9", "--", "nap", "10"],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !grid.broker.exited() {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker never reached {point}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    grid.broker = GridProcess::broker(&grid.nats, &[]);
    let flaky = grid.wait(&flaky);
    assert_eq!(flaky["state"], "done", "{flaky}");
    let good = grid.wait(&good);
    assert_eq!(good["state"], "done", "{good}");
    assert_eq!(good["tasks"]["succeeded"], 9, "{good}");
    let tmp = tempfile::tempdir().unwrap();
    grid.grid(&[
        "results",
        flaky["job_id"].as_str().unwrap(),
        "-o",
        tmp.path().to_str().unwrap(),
    ]);
    let m = manifest(tmp.path());
    assert_eq!(m.len(), 1);
    assert_eq!(
        m[0]["attempts"], 3,
        "two failures and the success, each counted once"
    );
}

#[test]
fn a_broker_killed_between_storing_a_result_and_acking_it_counts_it_once() {
    broker_crash_at("after-store");
}

#[test]
fn a_broker_killed_after_publishing_a_retry_loses_no_task() {
    broker_crash_at("after-retry");
}

#[test]
fn a_broker_killed_before_saving_a_finished_job_finishes_it_after_a_restart() {
    broker_crash_at("before-finish");
}

#[test]
fn a_result_stored_but_unacknowledged_by_the_server_is_counted_once() {
    // The broker takes the first store of every task record for a failure, as when the server
    // dies between storing and replying: each result comes back and finds its record stored.
    let grid = TestGrid::start_with(2, |nats| {
        GridProcess::broker_with_env(nats, &[("GRID_TEST_LOSE_REPLIES", "1")])
    });
    let hostile = guest("hostile");
    let job = submit(
        &grid,
        &[
            hostile.to_str().unwrap(),
            "--tasks",
            "12",
            "--",
            "nap",
            "10",
        ],
    );
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], 12, "{status}");
    assert_eq!(status["tasks"]["failed"], 0, "{status}");
}

#[test]
fn a_node_never_gives_its_running_tasks_more_memory_than_its_budget() {
    // Four slots, but room for only two tasks of 40 MiB in 100 MiB.
    let mut grid = TestGrid::start(0, &[]);
    let cache = tempfile::tempdir().unwrap();
    grid.nodes.push(GridProcess::node_with(
        &grid.nats,
        "small",
        cache.path(),
        4,
        &["--no-gpu", "--memory-budget", "100MiB"],
    ));
    grid.wait_for_nodes(1);
    let job = submit(
        &grid,
        &[
            guest("hostile").to_str().unwrap(),
            "--tasks",
            "8",
            "--memory",
            "40MiB",
            "--",
            "nap",
            "2500",
        ],
    );
    // Watch the node's heartbeats (every 2 s) while the job runs.
    let mut most_running = 0;
    loop {
        let out = grid.grid(&["nodes", "--json"]);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let node: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(node["memory_budget_bytes"], 100u64 << 20, "{node}");
            let reserved = node["memory_reserved_bytes"].as_u64().unwrap();
            let running = node["running"].as_u64().unwrap();
            assert!(reserved <= 100 << 20, "{node}");
            assert!(running <= 2, "{node}");
            most_running = most_running.max(running);
        }
        let status = grid.grid_json(&["status", &job], 0);
        if status["state"] != "running" && status["state"] != "queued" {
            assert_eq!(status["state"], "done", "{status}");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(most_running, 2, "two tasks fit, and ran together");
    // A job asking for more than the whole budget is not taken, and refused at once.
    let out = grid.grid(&[
        "submit",
        guest("hostile").to_str().unwrap(),
        "--memory",
        "1GiB",
        "--",
        "nap",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "grid: job refused: no live node of class cpu takes a job this large (node small: memory 1 GiB over its 100 MiB): ask for less, or wait for a provider that offers more"
    );
}

/// Bytes of the files directly under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|list| {
            list.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_node_keeps_its_caches_within_its_disk_budget() {
    let mut grid = TestGrid::start(0, &[]);
    let cache = tempfile::tempdir().unwrap();
    // Room for one of these modules with its compiled code (about 0.6 MB each), not two.
    let budget = 1u64 << 20;
    grid.nodes.push(GridProcess::node_with(
        &grid.nats,
        "tight",
        cache.path(),
        1,
        &["--no-gpu", "--disk-budget", "1MiB"],
    ));
    grid.wait_for_nodes(1);
    let cached =
        || dir_bytes(&cache.path().join("modules")) + dir_bytes(&cache.path().join("compiled"));
    for module in ["hostile", "monte-carlo-pi", "synth-data", "hostile"] {
        let path = guest(module);
        let mut args = vec!["submit", path.to_str().unwrap(), "--tasks", "2", "--wait"];
        if module == "hostile" {
            args.extend(["--", "nap", "10"]);
        }
        let status = grid.grid_json(&args, 0);
        assert_eq!(status["state"], "done", "{module}: {status}");
    }
    // Soon after the last new module, the caches are back within the budget.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cached() > budget {
        assert!(
            std::time::Instant::now() < deadline,
            "{} bytes cached, budget {budget}",
            cached()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Least recently used first: monte-carlo-pi went (synth-data may stay: hostile came back
    // as its module alone, its compiled code still in the node's memory), hostile stayed.
    let module_file = |name: &str| {
        let sha = grid_proto::Sha256Hex::of(&guest_bytes(name));
        cache.path().join("modules").join(format!("{sha}.wasm"))
    };
    assert!(!module_file("monte-carlo-pi").exists());
    assert!(module_file("hostile").exists());
    assert!(
        cache.path().join("compiled/node.key").exists(),
        "the node's key stays"
    );
}

#[test]
fn a_provider_takes_no_job_over_its_caps_and_another_node_does() {
    let mut grid = TestGrid::start(0, &[]);
    let caches = tempfile::tempdir().unwrap();
    grid.nodes.push(GridProcess::node_with(
        &grid.nats,
        "small",
        &caches.path().join("small"),
        2,
        &["--no-gpu", "--max-memory", "64MiB", "--max-time", "1min"],
    ));
    grid.nodes.push(GridProcess::node(
        &grid.nats,
        "big",
        &caches.path().join("big"),
        2,
    ));
    grid.wait_for_nodes(2);
    let node = grid.grid(&["nodes", "--json"]);
    let small: serde_json::Value = String::from_utf8_lossy(&node.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|n| n["id"] == "small")
        .unwrap();
    assert_eq!(small["accepts"]["memory_bytes"], 64u64 << 20, "{small}");
    // Within the small node's time cap, over its memory cap: every task runs on the big node.
    let status = grid.grid_json(
        &[
            "submit",
            guest("hostile").to_str().unwrap(),
            "--tasks",
            "6",
            "--memory",
            "256MiB",
            "--timeout",
            "30s",
            "--wait",
            "--",
            "nap",
            "200",
        ],
        0,
    );
    assert_eq!(status["state"], "done", "{status}");
    let (_, manifest) = grid.results(status["job_id"].as_str().unwrap());
    assert!(manifest.iter().all(|t| t["node"] == "big"), "{manifest:?}");
    // Too long for the small node, fine for the big one; too large for both: refused.
    let out = grid.grid(&[
        "submit",
        guest("hostile").to_str().unwrap(),
        "--memory",
        "1000GiB",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no live node of class cpu takes a job this large")
            && stderr.contains("node small: memory 1000 GiB over its 64 MiB"),
        "{stderr}"
    );
}

/// `grid status --watch` into a pipe: a line each time the counts change, the last one the
/// job's end.
#[test]
fn status_watch_prints_changes_until_the_job_ends() {
    let grid = TestGrid::start(1, &[]);
    let job = submit(
        &grid,
        &[
            guest("hostile").to_str().unwrap(),
            "--tasks",
            "6",
            "--",
            "exit",
            "0",
        ],
    );
    let out = grid.grid(&["status", &job, "--watch"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    assert!(
        lines.iter().all(|l| l.starts_with(&format!("job {job}: "))),
        "{text}"
    );
    assert!(
        lines.last().unwrap().contains(": done — 6 of 6 succeeded"),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "{text:?}");
}

/// `grid run --from JOB --task I` reruns one task of a grid job here, exactly as it ran there:
/// same params line, seed and limits, so the same output bytes.
#[test]
fn run_from_a_job_reruns_its_task_here_with_the_same_output() {
    let grid = TestGrid::start(1, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let params = write_params(
        tmp.path(),
        (0..5).map(|i| format!(r#"{{"rows": {}, "format": "jsonl"}}"#, 10 + i)),
    );
    let job = submit(
        &grid,
        &[
            guest("synth-data").to_str().unwrap(),
            "--params",
            params.to_str().unwrap(),
            "--seed",
            "42",
            "--memory",
            "96MiB",
        ],
    );
    assert_eq!(grid.wait(&job)["state"], "done");
    let (results, _) = grid.results(&job);
    let here = tmp.path().join("here");
    let out = grid.grid(&[
        "run",
        "--from",
        &job,
        "--task",
        "3",
        "--output",
        here.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["stdout"], "wrote 13 rows to part-00003.jsonl\n");
    let ran_here = std::fs::read(here.join("part-00003.jsonl")).unwrap();
    let ran_there = std::fs::read(results.path().join("3/part-00003.jsonl")).unwrap();
    assert_eq!(ran_here, ran_there, "the same bytes as on the grid");
    // A task the job does not have, and flags that --from already decides, are refused.
    let out = grid.grid(&["run", "--from", &job, "--task", "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has 5 tasks"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = grid.grid(&["run", "--from", &job, "--memory", "1GiB"]);
    assert_eq!(out.status.code(), Some(2));
}
