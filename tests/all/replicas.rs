//! Replicas and quorum: each task on distinct nodes, results compared, liars outvoted, and
//! disagreements that never reach a quorum marked `disputed`. Nodes started with the test-only
//! `--test-corrupt-outputs` add a file of their own to every result: they never agree with anyone.

use crate::support::*;

/// A node of this test grid; `liar` corrupts its outputs.
fn node(grid: &TestGrid, id: &str, liar: bool) -> GridProcess {
    let mut flags = vec!["--no-gpu"];
    if liar {
        flags.push("--test-corrupt-outputs");
    }
    GridProcess::node_with(&grid.nats, id, &grid.caches.path().join(id), 2, &flags)
}

fn grid_of(nodes: &[(&str, bool)]) -> TestGrid {
    grid_with(nodes, &[])
}

/// A grid of `nodes` whose broker has `env` (test-only fault injection).
fn grid_with(nodes: &[(&str, bool)], env: &[(&str, &str)]) -> TestGrid {
    let mut grid = TestGrid::start_with(0, |nats| GridProcess::broker_with_env(nats, env));
    for (id, liar) in nodes {
        grid.nodes.push(node(&grid, id, *liar));
    }
    grid.wait_for_nodes(nodes.len());
    grid
}

fn submit_nap(grid: &TestGrid, tasks: &str, flags: &[&str]) -> String {
    let hostile = guest("hostile");
    let mut args = vec!["submit", hostile.to_str().unwrap(), "--tasks", tasks];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "nap", "10"]);
    grid.grid_json(&args, 0)["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until `grid nodes` shows `node` with `agreed` and `lost` votes.
fn wait_for_tally(grid: &TestGrid, node: &str, agreed: u64, lost: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = grid.grid(&["nodes", "--json"]);
        let found = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|n| n["id"] == node);
        if let Some(n) = &found
            && n["votes_agreed"] == agreed
            && n["votes_lost"] == lost
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tally of {node}: {found:?}, expected {agreed} agreed and {lost} lost"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Waits until `grid_votes` holds `n` votes for `job`.
fn wait_for_votes(grid: &TestGrid, job: &str, n: usize) {
    use futures::StreamExt;
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = connect_operator(&grid.nats.url).await;
        let open = grid_client::Grid::open(client).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let keys: Vec<String> = match open.votes().await.unwrap().keys().await {
                Ok(keys) => keys.filter_map(|k| async { k.ok() }).collect().await,
                Err(_) => Vec::new(), // no vote yet
            };
            let votes = keys.iter().filter(|k| k.starts_with(job)).count();
            if votes >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{votes} of {n} votes stored for job {job}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn replicas_run_on_distinct_nodes_and_agree() {
    let grid = grid_of(&[("a", false), ("b", false), ("c", false)]);
    let job = submit_nap(&grid, "6", &["--replicas", "3", "--quorum", "3"]);
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], 6);
    let (dir, manifest) = grid.results(&job);
    for task in &manifest {
        let votes = task["votes"].as_array().unwrap();
        assert_eq!(votes.len(), 3, "{task}");
        let mut nodes: Vec<&str> = votes.iter().map(|v| v["node"].as_str().unwrap()).collect();
        nodes.sort();
        assert_eq!(nodes, ["a", "b", "c"], "one replica on each node: {task}");
        assert!(votes.iter().all(|v| v["agreed"] == true), "{task}");
        let index = task["index"].as_u64().unwrap();
        let written = std::fs::read_to_string(dir.path().join(index.to_string()).join("index.txt"));
        assert_eq!(written.unwrap(), index.to_string());
    }
    for node in ["a", "b", "c"] {
        wait_for_tally(&grid, node, 6, 0);
    }
    // Each replica is an attempt that ran: billed to the tenant, paid to the node that ran it.
    let billed = crate::ledger::usage(&grid, &["--job", &job]);
    assert_eq!(billed["total"]["attempts"], 18, "{billed}");
    for provider in billed["providers"].as_array().unwrap() {
        assert_eq!(provider["attempts"], 6, "{billed}");
        assert_eq!(provider["withheld"], 0, "all agreed, all paid: {billed}");
    }
}

#[test]
fn a_lying_node_is_outvoted_and_its_outputs_never_count() {
    let grid = grid_of(&[("honest-1", false), ("honest-2", false), ("liar", true)]);
    let job = submit_nap(&grid, "4", &["--replicas", "3", "--quorum", "2"]);
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    let (dir, manifest) = grid.results(&job);
    for task in &manifest {
        assert_ne!(task["node"], "liar", "{task}");
        let index = task["index"].as_u64().unwrap();
        let files: Vec<String> = std::fs::read_dir(dir.path().join(index.to_string()))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, ["index.txt"], "only the agreed outputs: {task}");
    }
    // Every task ran on all three nodes: the liar lost every vote (some after the decision).
    wait_for_tally(&grid, "liar", 0, 4);
    // The tenant is billed for every replica that reported while the job ran (a replica that
    // reports after the job ended is not billed); the liar is paid for none of them.
    let billed = crate::ledger::usage(&grid, &["--job", &job]);
    let liar = crate::ledger::usage(&grid, &["--job", &job, "--provider", "liar"]);
    let liars = liar["total"]["attempts"].as_u64().unwrap();
    assert!(liars <= 4, "{liar}");
    assert_eq!(billed["total"]["attempts"], 8 + liars, "{billed}");
    assert_eq!(billed["total"]["withheld"], liars, "{billed}");
    assert_eq!(liar["total"]["withheld"], liars, "{liar}");
    assert_eq!(liar["total"]["paid_cpu_seconds"], 0.0, "{liar}");
    let honest = crate::ledger::usage(&grid, &["--job", &job, "--provider", "honest-1"]);
    assert_eq!(honest["total"]["withheld"], 0, "{honest}");
}

#[test]
fn a_disagreement_gets_another_replica_which_breaks_the_tie() {
    // Two nodes, one lying: every task's two replicas disagree; a third node joins and takes
    // the extra replica of each, which agrees with the honest one.
    let mut grid = grid_of(&[("honest-1", false), ("liar", true)]);
    let job = submit_nap(&grid, "3", &["--replicas", "2", "--quorum", "2"]);
    // Only once both first replicas of every task voted: then each task's third replica can
    // only go to the newcomer.
    wait_for_votes(&grid, &job, 6);
    grid.nodes.push(node(&grid, "honest-2", false));
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    let (_dir, manifest) = grid.results(&job);
    for task in &manifest {
        let votes = task["votes"].as_array().unwrap();
        assert_eq!(votes.len(), 3, "an extra replica: {task}");
        for v in votes {
            assert_eq!(v["agreed"], v["node"] != "liar", "{task}");
        }
    }
    wait_for_tally(&grid, "liar", 0, 3);
}

#[test]
fn replicas_that_never_agree_leave_the_task_disputed() {
    let grid = grid_of(&[
        ("liar-1", true),
        ("liar-2", true),
        ("liar-3", true),
        ("liar-4", true),
    ]);
    let job = submit_nap(&grid, "1", &["--replicas", "2", "--quorum", "2"]);
    let status = grid.wait(&job);
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(status["reason"], "task 0 disputed");
    assert_eq!(status["tasks"]["disputed"], 1);
    let (_dir, manifest) = grid.results(&job);
    assert_eq!(manifest[0]["state"], "disputed");
    let votes = manifest[0]["votes"].as_array().unwrap();
    assert_eq!(votes.len(), 4, "two replicas and two extra: {votes:?}");
    assert!(votes.iter().all(|v| v["agreed"] == false));
}

#[test]
fn a_disputed_task_retried_gets_new_replicas_on_the_same_nodes() {
    // Four liars dispute the task; the retry's replicas are claimed and voted in a round of
    // their own, or no node would take one (each holds a claim on the task already) and the
    // job would wait forever.
    let grid = grid_of(&[
        ("liar-1", true),
        ("liar-2", true),
        ("liar-3", true),
        ("liar-4", true),
    ]);
    let job = submit_nap(&grid, "1", &["--replicas", "2", "--quorum", "2"]);
    assert_eq!(grid.wait(&job)["tasks"]["disputed"], 1);
    let status = grid.grid_json(&["retry", &job, "--failed", "--wait"], 1);
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(status["retried"], 1, "{status}");
    assert_eq!(status["tasks"]["disputed"], 1, "{status}");
    let (_dir, manifest) = grid.results(&job);
    let votes = manifest[0]["votes"].as_array().unwrap();
    assert_eq!(votes.len(), 4, "the retry's own four replicas: {votes:?}");
    // Both rounds' replicas are billed and none is paid, and each liar lost a vote in each.
    let billed = crate::ledger::usage(&grid, &["--job", &job]);
    assert_eq!(billed["total"]["attempts"], 8, "{billed}");
    assert_eq!(billed["total"]["withheld"], 8, "{billed}");
    for liar in ["liar-1", "liar-2", "liar-3", "liar-4"] {
        wait_for_tally(&grid, liar, 0, 2);
    }
}

#[test]
fn a_retried_task_keeps_what_its_earlier_round_paid() {
    // Odd tasks fail on their first attempt, on both replicas alike: a decided failure, whose
    // replicas agreed and are paid. The retry's replicas succeed; the first round's stay paid.
    let grid = grid_of(&[("a", false), ("b", false)]);
    let hostile = guest("hostile");
    let args = [
        "submit",
        hostile.to_str().unwrap(),
        "--tasks",
        "4",
        "--replicas",
        "2",
        "--quorum",
        "2",
        "--retries",
        "0",
        "--wait",
        "--",
        "odd-fail-first",
    ];
    let status = grid.grid_json(&args, 1);
    assert_eq!(status["tasks"]["failed"], 2, "{status}");
    let job = status["job_id"].as_str().unwrap().to_string();
    let status = grid.grid_json(&["retry", &job, "--failed", "--wait"], 0);
    assert_eq!(status["tasks"]["succeeded"], 4, "{status}");
    let billed = crate::ledger::usage(&grid, &["--job", &job]);
    assert_eq!(billed["total"]["attempts"], 12, "{billed}");
    assert_eq!(billed["total"]["withheld"], 0, "{billed}");
    let (_dir, manifest) = grid.results(&job);
    for task in &manifest {
        let odd = task["index"].as_u64().unwrap() % 2 == 1;
        assert_eq!(task["attempts"], if odd { 2 } else { 1 }, "{task}");
        assert_eq!(task["votes"].as_array().unwrap().len(), 2, "{task}");
    }
}

#[test]
fn more_replicas_than_nodes_is_refused_at_once() {
    let grid = grid_of(&[("a", false), ("b", false)]);
    let hostile = guest("hostile");
    let out = grid.grid(&["submit", hostile.to_str().unwrap(), "--replicas", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--replicas 3 needs 3 nodes of class cpu; 2 online"),
        "{stderr}"
    );
}

#[test]
fn votes_and_decisions_stored_but_unacknowledged_by_the_server_count_once() {
    // The broker takes the first store of every vote and every task record for a failure, as
    // when the server dies between storing and replying.
    let grid = grid_with(
        &[("a", false), ("b", false)],
        &[("GRID_TEST_LOSE_REPLIES", "1")],
    );
    let job = submit_nap(&grid, "5", &["--replicas", "2", "--quorum", "2"]);
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], 5, "{status}");
    let (_dir, manifest) = grid.results(&job);
    for task in &manifest {
        assert_eq!(task["votes"].as_array().unwrap().len(), 2, "{task}");
    }
    for node in ["a", "b"] {
        wait_for_tally(&grid, node, 5, 0);
    }
}
