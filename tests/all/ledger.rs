//! The usage ledger: every attempt that ran is billed once, and `grid usage` sums match the
//! tasks' own figures. (Replicas and duplicate deliveries are checked in `replicas.rs` and
//! `grid.rs`, beside the tests that make them.)

use crate::support::*;
use serde_json::Value;

/// `grid usage --json ARGS…` (`grid_json` adds the flag).
/// `grid usage ARGS --json` as the operator (who sees every tenant's and provider's usage).
pub fn usage(grid: &TestGrid, args: &[&str]) -> Value {
    let creds = operator_creds();
    let mut all = vec!["usage", "--creds", creds.to_str().unwrap()];
    all.extend_from_slice(args);
    grid.grid_json(&all, 0)
}

fn close(a: &Value, b: f64) -> bool {
    (a.as_f64().unwrap() - b).abs() < 1e-6
}

#[test]
fn usage_of_a_known_job_is_the_sum_of_its_tasks_and_retries_are_billed() {
    let grid = TestGrid::start(2, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..12)
        .map(|i| format!(r#"{{"rows": {}}}"#, 100 + i))
        .collect();
    let params = write_params(tmp.path(), lines.iter().cloned());
    let synth = guest("synth-data");
    let status = grid.grid_json(
        &[
            "submit",
            synth.to_str().unwrap(),
            "--params",
            params.to_str().unwrap(),
            "--memory",
            "64MiB",
            "--wait",
        ],
        0,
    );
    let job = status["job_id"].as_str().unwrap().to_string();
    let (_out, tasks) = grid.results(&job);
    assert_eq!(tasks.len(), 12);

    let billed = usage(&grid, &["--job", &job]);
    let total = &billed["total"];
    assert_eq!(total["attempts"], 12, "one attempt per task: {billed}");
    let sum = |key: &str| tasks.iter().map(|t| t[key].as_f64().unwrap()).sum::<f64>();
    assert!(close(&total["cpu_seconds"], sum("cpu_seconds")), "{billed}");
    assert!(
        close(&total["wall_seconds"], sum("wall_seconds")),
        "{billed}"
    );
    let bytes_out: u64 = tasks
        .iter()
        .flat_map(|t| t["files"].as_array().unwrap())
        .map(|f| f["bytes"].as_u64().unwrap())
        .sum();
    assert!(bytes_out > 0);
    assert_eq!(total["bytes_out"], bytes_out, "{billed}");
    let bytes_in: usize = lines.iter().map(String::len).sum();
    assert_eq!(total["bytes_in"], bytes_in as u64, "stdin params: {billed}");
    let peak = total["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak > 0 && peak <= 64 << 20, "{billed}");
    // The job, its tenant and the providers all sum to the same.
    assert_eq!(billed["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(billed["jobs"][0]["tenant"], "default");
    assert_eq!(billed["tenants"][0]["attempts"], 12);
    let by_provider: u64 = billed["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["attempts"].as_u64().unwrap())
        .sum();
    assert_eq!(by_provider, 12, "{billed}");
    let ran_on: std::collections::BTreeSet<&str> =
        tasks.iter().map(|t| t["node"].as_str().unwrap()).collect();
    for provider in ran_on {
        let mine = usage(&grid, &["--job", &job, "--provider", provider]);
        let ran = tasks.iter().filter(|t| t["node"] == provider).count();
        assert_eq!(mine["total"]["attempts"], ran as u64, "{provider}: {mine}");
    }

    // A task that fails twice and then succeeds: three attempts, each billed.
    let hostile = guest("hostile");
    let flaky = grid.grid_json(
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
    let flaky = flaky["job_id"].as_str().unwrap();
    assert_eq!(usage(&grid, &["--job", flaky])["total"]["attempts"], 3);

    // Both jobs together, and the time filter.
    let all = usage(&grid, &[]);
    assert_eq!(all["total"]["attempts"], 15, "{all}");
    assert_eq!(all["jobs"].as_array().unwrap().len(), 2, "{all}");
    assert_eq!(usage(&grid, &["--since", "1h"])["total"]["attempts"], 15);
    assert_eq!(
        usage(&grid, &["--since", "2100-01-01T00:00:00Z"])["total"]["attempts"],
        0
    );
    assert_eq!(
        usage(&grid, &["--tenant", "nobody"])["total"]["attempts"],
        0
    );
    // Bad input is one line and exit 2.
    let bad = grid.grid(&["usage", "--since", "yesterday-ish"]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.starts_with("grid: --since"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    // The table for people names the job.
    let table = grid.grid(&["usage"]);
    assert!(table.status.success());
    assert!(String::from_utf8_lossy(&table.stdout).contains(&job));
}

#[test]
fn usage_of_a_job_takes_its_name_and_says_when_there_is_none() {
    let grid = TestGrid::start(1, &[]);
    let pi = guest("monte-carlo-pi");
    grid.grid_json(
        &[
            "submit",
            pi.to_str().unwrap(),
            "--tasks",
            "2",
            "--name",
            "pi-run",
            "--wait",
        ],
        0,
    );
    // As the tenant: the name finds the job, as in every command taking JOB.
    let named = grid.grid_json(&["usage", "--job", "pi-run"], 0);
    assert_eq!(named["total"]["attempts"], 2, "{named}");
    let out = grid.grid(&["usage", "--job", "no-such-job"]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("grid: no usage recorded for job no-such-job"),
        "{said}"
    );
}
