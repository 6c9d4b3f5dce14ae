//! A stranger as a provider. Each test acts as a rogue provider would — its own provider
//! credentials and raw NATS (async-nats), not `grid-node` — and shows that the attack fails,
//! refused by the server or dropped by the broker, and that honest work beside it completes
//! with the right bytes and the right bill.

use crate::metrics::{free_addr, scrape, value};
use crate::support::*;
use grid_proto::{ResultMsg, ResultsMsg, Usage, encode, names};

/// Publishes `results` as one results message on `node`'s subject with `client`, under a
/// message id of its own, and waits until the server has stored it.
async fn publish_results(client: &async_nats::Client, node: &str, results: Vec<ResultMsg>) {
    static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let js = async_nats::jetstream::new(client.clone());
    let job = results[0].job_id.clone();
    let msg = async_nats::jetstream::message::PublishMessage::build()
        .payload(encode(&ResultsMsg { results }).into())
        .message_id(format!("rogue-{}-{n}", grid_client::now_unix_ms()));
    js.send_publish(names::results_subject(node, &job), msg)
        .await
        .expect("published")
        .await
        .expect("stored by the server");
}

/// Each task's files of job `job`, read back with `grid results`: index → (path → bytes).
fn outputs(grid: &TestGrid, job: &str) -> Vec<Vec<(String, Vec<u8>)>> {
    let (dir, manifest) = grid.results(job);
    manifest
        .iter()
        .map(|line| {
            let index = line["index"].as_u64().unwrap();
            line["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    let path = f["path"].as_str().unwrap().to_string();
                    let bytes = std::fs::read(dir.path().join(index.to_string()).join(&path))
                        .expect("a listed file");
                    (path, bytes)
                })
                .collect()
        })
        .collect()
}

/// A job of monte-carlo-pi with `tasks` tasks, submitted without waiting; its id.
fn submit_pi(grid: &TestGrid, tasks: u32) -> String {
    let module = guest("monte-carlo-pi");
    let v = grid.grid_json(
        &[
            "submit",
            module.to_str().unwrap(),
            "--tasks",
            &tasks.to_string(),
        ],
        0,
    );
    v["job_id"].as_str().unwrap().to_string()
}

/// The providers `grid usage` says were paid for job `job`.
fn providers(grid: &TestGrid, job: &str) -> Vec<String> {
    let billed = crate::ledger::usage(grid, &["--job", job]);
    billed["providers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| p["provider"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn rogue_creds() -> std::path::PathBuf {
    creds(Role::Provider, "rogue")
}

#[test]
fn results_for_tasks_never_delivered_to_the_provider_are_dropped() {
    let metrics = free_addr();
    let grid = TestGrid::start(0, &["--metrics", &metrics]);
    let job = submit_pi(&grid, 4);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let rogue = connect_as(&grid.nats.url, &rogue_creds()).await;
        // A task it was given: its seal, then the task handed back.
        let given = pull_tasks(&rogue, 1).await;
        let (task, msg) = &given[0];
        msg.ack_with(async_nats::jetstream::AckKind::Nak(None))
            .await
            .unwrap();
        let mut forged = Vec::new();
        for index in 0..4 {
            // No seal at all, for every task.
            let mut unsealed = empty_result(task, "rogue", Usage::default());
            unsealed.index = index;
            unsealed.seal = grid_proto::Seal::default();
            forged.push(unsealed);
            // The seal of the task it was given, on another task.
            if index != task.index {
                let mut moved = empty_result(task, "rogue", Usage::default());
                moved.index = index;
                forged.push(moved);
            }
        }
        // Its own task's seal on an attempt it was never sent, with a fat bill.
        let mut retry = empty_result(
            task,
            "rogue",
            Usage {
                cpu_seconds: 600.0,
                ..Usage::default()
            },
        );
        retry.attempt = 1;
        forged.push(retry);
        for result in &forged {
            publish_results(&rogue, "rogue", vec![result.clone()]).await;
        }
    });
    // An honest node joins and does the job.
    let cache = tempfile::tempdir().unwrap();
    let _node = GridProcess::node(&grid.nats, "honest", cache.path(), 2);
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(
        providers(&grid, &job),
        ["honest"],
        "only the honest node is paid"
    );
    // The right bytes: those of the same job run again on the honest node alone.
    let again = submit_pi(&grid, 4);
    assert_eq!(grid.wait(&again)["state"], "done");
    let (ours, calm) = (outputs(&grid, &job), outputs(&grid, &again));
    assert!(ours.iter().all(|files| files.len() == 1), "{ours:?}");
    assert_eq!(ours, calm);
    // Every forgery was counted, under the rogue's name.
    let forged = value(
        &scrape(&metrics),
        "grid_results_forged_total",
        &[("node", "rogue")],
    );
    assert_eq!(forged, 4.0 + 3.0 + 1.0, "forged results counted");
}

#[test]
fn a_provider_bills_no_more_than_it_was_seen_to_run_and_nothing_after_the_job() {
    let grid = TestGrid::start(0, &[]);
    let job = submit_pi(&grid, 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = std::time::Instant::now();
    rt.block_on(async {
        let rogue = connect_as(&grid.nats.url, &rogue_creds()).await;
        let (task, msg) = pull_tasks(&rogue, 1).await.remove(0);
        // It claims the job's whole time limit, and the most memory and output it allows.
        let greedy = Usage {
            cpu_seconds: 600.0,
            wall_seconds: 600.0,
            gpu_seconds: 600.0,
            peak_memory_bytes: u64::MAX,
            bytes_in: 0,
            bytes_out: u64::MAX,
        };
        publish_results(
            &rogue,
            "rogue",
            vec![empty_result(&task, "rogue", greedy.clone())],
        )
        .await;
        msg.ack().await.unwrap();
        assert_eq!(grid.wait(&job)["state"], "done");
        // After the job ended: the same result again, and a retry's under its seal.
        publish_results(
            &rogue,
            "rogue",
            vec![empty_result(&task, "rogue", greedy.clone())],
        )
        .await;
        let mut later = empty_result(&task, "rogue", greedy);
        later.attempt = 1;
        publish_results(&rogue, "rogue", vec![later]).await;
    });
    let most = started.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let billed = crate::ledger::usage(&grid, &["--job", &job]);
    let total = &billed["total"];
    assert_eq!(total["attempts"], 1, "{billed}");
    for seconds in ["cpu_seconds", "wall_seconds", "gpu_seconds"] {
        let s = total[seconds].as_f64().unwrap();
        assert!(
            s <= most,
            "{seconds} {s} billed in a test of {most} s: {billed}"
        );
    }
}
