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
            // One seed for every such job: the same job run again writes the same bytes.
            "--seed",
            "1",
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
        let given = pull_tasks(&rogue, "rogue", 1).await;
        let (task, msg) = &given[0];
        msg.back().await;
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
        let (task, msg) = pull_tasks(&rogue, "rogue", 1).await.remove(0);
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
        msg.done().await;
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

/// The rogue's connection, with its stage made by the broker (as `grid-node` asks for it).
struct Rogue {
    client: async_nats::Client,
    grid: grid_client::Grid,
}

impl Rogue {
    async fn join(url: &str) -> Self {
        let client = connect_as(url, &rogue_creds()).await;
        let reply = client
            .request(
                names::provider_subject("rogue", "stage"),
                encode(&grid_proto::StageRequest {}).into(),
            )
            .await
            .expect("the broker answers");
        let answer: grid_proto::Answer<grid_proto::StoreReady> =
            grid_proto::decode(&reply.payload).unwrap();
        assert!(
            matches!(answer, grid_proto::Answer::Granted(_)),
            "{answer:?}"
        );
        let grid = grid_client::Grid::open(client.clone()).await.unwrap();
        Rogue { client, grid }
    }

    /// A heartbeat as a node of class `cpu` with two slots.
    async fn heartbeat(&self) {
        heartbeat(&self.client, "rogue").await;
    }

    async fn stage(&self, bytes: &[u8]) -> grid_proto::Staged {
        // Staged, never inline: what these tests forge is the stage's chunks.
        let mut inline = grid_client::stage::InlineBudget::none();
        self.grid
            .stage_bytes("rogue", bytes, &mut inline)
            .await
            .unwrap()
    }

    /// Publishes `subject` with a `Nats-Rollup: all` header through JetStream; true when a
    /// stream stored it.
    async fn roll_up(&self, subject: &str) -> bool {
        let js = async_nats::jetstream::new(self.client.clone());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "all");
        match js
            .publish_with_headers(subject.to_string(), headers, "x".into())
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        }
    }
}

/// What a hostile `nap` task `index` honestly writes: `index.txt` holding its index.
fn honest_files(index: u64) -> (Vec<u8>, Vec<grid_proto::OutputFile>) {
    let bytes = index.to_string().into_bytes();
    let file = grid_proto::OutputFile {
        path: "index.txt".into(),
        bytes: bytes.len() as u64,
        sha256: grid_proto::Sha256Hex::of(&bytes),
    };
    (bytes, vec![file])
}

fn submit_nap(grid: &TestGrid, tasks: u32, flags: &[&str]) -> String {
    let hostile = guest("hostile");
    let tasks = tasks.to_string();
    let mut args = vec!["submit", hostile.to_str().unwrap(), "--tasks", &tasks];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "nap", "10"]);
    grid.grid_json(&args, 0)["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Each task's `index.txt` is its index, and nothing else was written.
fn assert_honest_outputs(grid: &TestGrid, job: &str, tasks: u64) {
    let files = outputs(grid, job);
    assert_eq!(files.len() as u64, tasks);
    for (index, files) in files.iter().enumerate() {
        assert_eq!(
            files,
            &[("index.txt".to_string(), index.to_string().into_bytes())],
            "task {index}"
        );
    }
}

#[test]
fn a_provider_cannot_roll_up_purge_delete_or_overwrite_what_is_not_its_own() {
    let grid = TestGrid::start(1, &[]);
    let job = submit_nap(&grid, 3, &[]);
    assert_eq!(grid.wait(&job)["state"], "done");
    let store = names::tenant_store(names::DEFAULT_TENANT);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let rogue = Rogue::join(&grid.nats.url).await;
        let mut watched = crate::auth::connect_watched(&grid.nats.url, &rogue_creds()).await;
        // Tenants' stores, other nodes' heartbeats, the grid's streams and buckets, and the
        // JetStream API that purges, deletes or reconfigures: refused by the server.
        for subject in [
            format!("$O.{store}.M.bWFsbG9yeQ"),
            format!("$O.{store}.C.someobject"),
            format!("$KV.{}.node-0", names::NODES_BUCKET),
            format!("$KV.{}.job.0.0.rogue", names::CLAIMS_BUCKET),
            format!("$KV.{}.default.{job}", names::JOBS_BUCKET),
            format!("$JS.API.STREAM.PURGE.OBJ_{store}"),
            format!("$JS.API.STREAM.MSG.DELETE.OBJ_{store}"),
            format!("$JS.API.STREAM.PURGE.KV_{}", names::NODES_BUCKET),
            format!("$JS.API.STREAM.PURGE.{}", names::stage_stream("rogue")),
            format!("$JS.API.STREAM.MSG.DELETE.{}", names::stage_stream("rogue")),
            format!("$JS.API.STREAM.UPDATE.{}", names::stage_stream("rogue")),
            format!("$JS.API.STREAM.DELETE.{}", names::stage_stream("node-0")),
            names::stage_subject("node-0"),
            format!("$JS.API.STREAM.PURGE.{}", names::RESULTS_STREAM),
        ] {
            watched.publish_is_denied(&subject, b"{}".to_vec()).await;
        }
        // Where it may publish, a rollup is refused by the stream itself.
        for subject in [
            format!("$KV.{}.rogue", names::NODES_BUCKET),
            names::stage_subject("rogue"),
            names::results_subject("rogue", &job),
        ] {
            assert!(
                !rogue.roll_up(&subject).await,
                "a rollup on {subject} was stored"
            );
        }
        // Its stage takes chunks no larger than a chunk.
        let js = async_nats::jetstream::new(rogue.client.clone());
        let big = vec![0u8; (names::STAGE_CHUNK_BYTES as usize) + 8192];
        let stored = match js.publish(names::stage_subject("rogue"), big.into()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        assert!(!stored, "an oversized chunk was staged");
    });
    // Everything is as it was: the node's heartbeat, the job's outputs; and the grid serves.
    let nodes = grid.grid(&["nodes", "--json"]);
    assert!(
        String::from_utf8_lossy(&nodes.stdout).contains("\"node-0\""),
        "{nodes:?}"
    );
    assert_honest_outputs(&grid, &job, 3);
    let again = submit_nap(&grid, 3, &[]);
    assert_eq!(grid.wait(&again)["state"], "done");
    assert_honest_outputs(&grid, &again, 3);
}

#[test]
fn a_provider_cannot_make_forged_bytes_a_tasks_result() {
    let metrics = free_addr();
    let grid = TestGrid::start(0, &["--metrics", &metrics]);
    let job = submit_nap(&grid, 1, &["--retries", "8"]);
    let (honest, files) = honest_files(0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let rogue = Rogue::join(&grid.nats.url).await;
        let digest = grid_proto::result_digest(&grid_proto::Outcome::Succeeded, &files);
        let forged = rogue.stage(b"F").await;
        let real = rogue.stage(&honest).await;
        let variants = [
            // The honest manifest and digest, over other bytes under the honest hash.
            vec![grid_proto::Staged {
                sha256: files[0].sha256,
                ..forged.clone()
            }],
            // The honest manifest and digest, nothing staged (as if the blob were stored).
            vec![],
            // The honest bytes, staged, under a digest of something else.
            vec![real.clone()],
            // Other bytes of the honest size carried in the result, under the honest hash.
            vec![grid_proto::Staged {
                inline: vec![b'F'; honest.len()],
                chunks: Vec::new(),
                ..real.clone()
            }],
            // Both staged and carried.
            vec![grid_proto::Staged {
                inline: honest.clone(),
                ..real.clone()
            }],
            // Carried, but more than its size says.
            vec![grid_proto::Staged {
                inline: [honest.clone(), vec![0; 20 << 10]].concat(),
                chunks: Vec::new(),
                ..real.clone()
            }],
        ];
        for (i, staged) in variants.into_iter().enumerate() {
            let (task, msg) = pull_tasks(&rogue.client, "rogue", 1).await.remove(0);
            let mut result = empty_result(&task, "rogue", Usage::default());
            result.files = files.clone();
            result.digest = digest;
            result.staged = staged;
            if i == 2 {
                result.digest = grid_proto::Sha256Hex::of(b"something else");
            }
            publish_results(&rogue.client, "rogue", vec![result]).await;
            msg.done().await;
        }
    });
    // An honest node takes the next attempt.
    let cache = tempfile::tempdir().unwrap();
    let _node = GridProcess::node(&grid.nats, "honest", cache.path(), 2);
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_honest_outputs(&grid, &job, 1);
    let (_, manifest) = grid.results(&job);
    assert_eq!(manifest[0]["attempts"], 7, "{manifest:?}");
    assert_eq!(providers(&grid, &job), ["honest"]);
    let forged = value(
        &scrape(&metrics),
        "grid_results_forged_total",
        &[("node", "rogue")],
    );
    assert_eq!(forged, 6.0);
}

#[test]
fn one_provider_cannot_win_a_vote_with_forged_bytes() {
    let grid = TestGrid::start(0, &[]);
    let a = tempfile::tempdir().unwrap();
    let _a = GridProcess::node(&grid.nats, "honest-a", a.path(), 1);
    grid.wait_for_nodes(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rogue = rt.block_on(async {
        let rogue = Rogue::join(&grid.nats.url).await;
        rogue.heartbeat().await;
        rogue
    });
    grid.wait_for_nodes(2);
    let job = submit_nap(
        &grid,
        1,
        &["--replicas", "2", "--quorum", "2", "--retries", "3"],
    );
    let (_, files) = honest_files(0);
    rt.block_on(async {
        // It takes a replica and answers with the honest digest over forged bytes.
        let (task, msg) = pull_tasks(&rogue.client, "rogue", 1).await.remove(0);
        let forged = rogue.stage(b"F").await;
        let mut result = empty_result(&task, "rogue", Usage::default());
        result.files = files.clone();
        result.digest = grid_proto::result_digest(&grid_proto::Outcome::Succeeded, &files);
        result.staged = vec![grid_proto::Staged {
            sha256: files[0].sha256,
            ..forged
        }];
        publish_results(&rogue.client, "rogue", vec![result]).await;
        msg.done().await;
    });
    // Its replica runs again, on a second honest node (the first runs the other replica).
    let b = tempfile::tempdir().unwrap();
    let _b = GridProcess::node(&grid.nats, "honest-b", b.path(), 1);
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_honest_outputs(&grid, &job, 1);
    let (_, manifest) = grid.results(&job);
    let mut voters: Vec<&str> = manifest[0]["votes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["node"].as_str().unwrap())
        .collect();
    voters.sort();
    assert_eq!(voters, ["honest-a", "honest-b"], "{manifest:?}");
    let mut paid = providers(&grid, &job);
    paid.sort();
    assert_eq!(paid, ["honest-a", "honest-b"]);
}

/// Asks the broker for `max` tasks as the rogue; the number handed out.
async fn take(client: &async_nats::Client, max: u32) -> Vec<u64> {
    let take = grid_proto::TakeRequest {
        class: "cpu".into(),
        max,
    };
    let reply = client
        .request(
            names::provider_subject("rogue", "take"),
            encode(&take).into(),
        )
        .await
        .unwrap();
    match grid_proto::decode(&reply.payload).unwrap() {
        grid_proto::Answer::<grid_proto::Deliveries>::Granted(d) => {
            d.deliveries.iter().map(|d| d.id).collect()
        }
        grid_proto::Answer::Refused(why) => panic!("{why}"),
    }
}

/// Reports `report` as the rogue; the ids the broker says it does not hold for it.
async fn report(client: &async_nats::Client, report: grid_proto::DeliveryReport) -> Vec<u64> {
    let reply = client
        .request(
            names::provider_subject("rogue", "report"),
            encode(&report).into(),
        )
        .await
        .unwrap();
    match grid_proto::decode(&reply.payload).unwrap() {
        grid_proto::Answer::<grid_proto::Reported>::Granted(r) => r.unknown,
        grid_proto::Answer::Refused(why) => panic!("{why}"),
    }
}

/// A heartbeat that claims thousands of runtimes (as many as its 64 KiB allow; the broker
/// checks the list against its pool on every take) counts for the runtimes the grid knows: the
/// rogue's takes are answered, and an honest node's job completes with its outputs.
#[test]
fn a_provider_claiming_thousands_of_runtimes_is_served_and_honest_work_completes() {
    let grid = TestGrid::start(1, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = submit_nap(&grid, 6, &[]);
    rt.block_on(async {
        let rogue = Rogue::join(&grid.nats.url).await;
        let mut claimed: Vec<String> = (0..6_000).map(|i| format!("rt{i}")).collect();
        claimed.push("python".into());
        heartbeat_ready(&rogue.client, "rogue", claimed).await;
        for _ in 0..5 {
            // Whatever it got goes straight back.
            let held = take(&rogue.client, 8).await;
            report(
                &rogue.client,
                grid_proto::DeliveryReport {
                    done: Vec::new(),
                    back: held,
                    back_delay_ms: 0,
                    holding: Vec::new(),
                    running: Vec::new(),
                },
            )
            .await;
        }
    });
    assert_eq!(grid.wait(&job)["state"], "done");
    assert_honest_outputs(&grid, &job, 6);
}

#[test]
fn a_provider_cannot_hoard_tasks_or_settle_another_nodes() {
    let metrics = free_addr();
    let grid = TestGrid::start(0, &["--metrics", &metrics, "--take-back-grace", "1s"]);
    let honest_cache = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = submit_nap(&grid, 20, &["--timeout", "2s"]);
    let (held, guessed) = rt.block_on(async {
        let rogue = Rogue::join(&grid.nats.url).await;
        let mut watched = crate::auth::connect_watched(&grid.nats.url, &rogue_creds()).await;
        // The work queue itself is the broker's: no pulls, no acks, naks or progress of its own.
        for subject in [
            format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.nodes-cpu",
                names::TASKS_STREAM
            ),
            format!("$JS.API.CONSUMER.INFO.{}.nodes-cpu", names::TASKS_STREAM),
            format!("$JS.API.CONSUMER.CREATE.{}.mine", names::TASKS_STREAM),
            format!("$JS.ACK.{}.nodes-cpu.1.1.1.0.0", names::TASKS_STREAM),
        ] {
            watched.publish_is_denied(&subject, b"+ACK".to_vec()).await;
        }
        // A heartbeat of two slots: eight tasks held at most, however many it asks for.
        rogue.heartbeat().await;
        let mut held = take(&rogue.client, 1000).await;
        held.extend(take(&rogue.client, 1000).await);
        // Ids near its own are other nodes' (or none): settling them does nothing.
        let guessed: Vec<u64> = (1..=50).map(|d| held[0] + 100 + d).collect();
        let unknown = report(
            &rogue.client,
            grid_proto::DeliveryReport {
                done: guessed.clone(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(unknown, guessed);
        // It says it holds them for longer than their time limit and the grace.
        for _ in 0..8 {
            rogue.heartbeat().await;
            let unknown = report(
                &rogue.client,
                grid_proto::DeliveryReport {
                    holding: held.clone(),
                    ..Default::default()
                },
            )
            .await;
            if unknown.len() == held.len() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        (held, guessed)
    });
    assert_eq!(held.len(), 8, "two slots' worth: {held:?}");
    assert!(!guessed.is_empty());
    // Taken back, the tasks run on an honest node; the rogue's reports come too late.
    let _node = GridProcess::node(&grid.nats, "honest", honest_cache.path(), 2);
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_honest_outputs(&grid, &job, 20);
    assert_eq!(providers(&grid, &job), ["honest"]);
    let taken_back = value(
        &scrape(&metrics),
        "grid_deliveries_taken_back_total",
        &[("node", "rogue")],
    );
    assert_eq!(taken_back, 8.0);
}

/// Asks the broker for object `sha` as the rogue, for delivery `delivery`: its bytes, or the
/// refusal.
async fn fetch(
    client: &async_nats::Client,
    delivery: u64,
    sha: grid_proto::Sha256Hex,
) -> Result<Vec<u8>, String> {
    let req = grid_proto::FetchRequest {
        delivery,
        sha256: sha,
        after_seq: 0,
    };
    let mut bytes = Vec::new();
    let mut req = req;
    loop {
        let reply = client
            .request(
                names::provider_subject("rogue", "fetch"),
                encode(&req).into(),
            )
            .await
            .unwrap();
        match grid_proto::decode(&reply.payload).unwrap() {
            grid_proto::Answer::<grid_proto::Fetched>::Granted(f) => {
                if f.data.is_empty() {
                    return Ok(bytes);
                }
                f.data.iter().for_each(|c| bytes.extend_from_slice(c));
                if bytes.len() as u64 >= f.size {
                    return Ok(bytes);
                }
                req.after_seq = f.last_seq;
            }
            grid_proto::Answer::Refused(why) => return Err(why),
        }
    }
}

#[test]
fn a_provider_reads_only_what_the_tasks_it_holds_need() {
    let grid = TestGrid::start(0, &[]);
    let (nap, pi) = (guest("hostile"), guest("monte-carlo-pi"));
    let nap_job = submit_nap(&grid, 1, &[]);
    let pi_job = submit_pi(&grid, 1);
    let modules = [std::fs::read(&nap).unwrap(), std::fs::read(&pi).unwrap()];
    let shas = modules.clone().map(|m| grid_proto::Sha256Hex::of(&m));
    let store = names::tenant_store(names::DEFAULT_TENANT);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut watched = crate::auth::connect_watched(&grid.nats.url, &rogue_creds()).await;
        // No store, stage or stream of anybody's is readable on the wire.
        for subject in [
            format!("$JS.API.DIRECT.GET.OBJ_{store}"),
            format!("$JS.API.DIRECT.GET.OBJ_{store}.$O.{store}.M.x"),
            format!("$JS.API.STREAM.INFO.OBJ_{store}"),
            format!("$JS.API.CONSUMER.CREATE.OBJ_{store}.x.$O.{store}.C.x"),
            format!("$JS.API.DIRECT.GET.{}", names::stage_stream("node-0")),
            "$JS.API.STREAM.NAMES".to_string(),
        ] {
            watched.publish_is_denied(&subject, b"{}".to_vec()).await;
        }
        let rogue = Rogue::join(&grid.nats.url).await;
        let (task, held) = pull_tasks(&rogue.client, "rogue", 1).await.remove(0);
        let mine = usize::from(task.spec.module_sha256 != shas[0]);
        // Through the broker: its own task's module, and nothing else.
        let id = held.id;
        assert_eq!(
            fetch(&rogue.client, id, shas[mine]).await.as_deref(),
            Ok(&modules[mine][..])
        );
        let other = fetch(&rogue.client, id, shas[1 - mine]).await;
        assert!(other.unwrap_err().contains("does not name"));
        let not_held = fetch(&rogue.client, id + 1_000_000, shas[mine]).await;
        assert!(not_held.unwrap_err().contains("holds no delivery"));
        held.back().await;
        // Handed back, it reads nothing more.
        assert!(fetch(&rogue.client, id, shas[mine]).await.is_err());
    });
    let cache = tempfile::tempdir().unwrap();
    let _node = GridProcess::node(&grid.nats, "honest", cache.path(), 2);
    assert_eq!(grid.wait(&nap_job)["state"], "done");
    assert_eq!(grid.wait(&pi_job)["state"], "done");
}

#[test]
fn malformed_output_paths_are_refused_and_grid_results_never_aborts_on_one() {
    let grid = TestGrid::start(0, &[]);
    let job = submit_nap(&grid, 2, &["--retries", "0"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (other_index, _) = rt.block_on(async {
        // A rogue's result naming a file that is also a folder: taken as lost.
        let rogue = Rogue::join(&grid.nats.url).await;
        let (task, held) = pull_tasks(&rogue.client, "rogue", 1).await.remove(0);
        let staged = rogue.stage(b"ok").await;
        let file = |path: &str| grid_proto::OutputFile {
            path: path.into(),
            bytes: 2,
            sha256: staged.sha256,
        };
        let mut result = empty_result(&task, "rogue", Usage::default());
        result.files = vec![file("ok.txt"), file("ok.txt/inner")];
        result.digest = grid_proto::result_digest(&result.outcome, &result.files);
        result.staged = vec![staged.clone()];
        publish_results(&rogue.client, "rogue", vec![result]).await;
        held.done().await;
        // The other task, reported plainly by the test as node `test`.
        let operator = connect_operator(&grid.nats.url).await;
        let (other, taken) = pull_tasks(&operator, "test", 1).await.remove(0);
        publish_results(
            &operator,
            "test",
            vec![empty_result(&other, "test", Usage::default())],
        )
        .await;
        taken.done().await;
        (other.index, staged.sha256)
    });
    let status = grid.wait(&job);
    assert_eq!(status["state"], "failed", "{status}");
    rt.block_on(async {
        // A record that names such paths anyway (written by the operator, as a broker before
        // these checks could have): `grid results` skips what it cannot write and goes on.
        let tenant = connect_as(&grid.nats.url, &tenant_creds(names::DEFAULT_TENANT)).await;
        let tenant = grid_client::Grid::open(tenant).await.unwrap();
        let (ok, _) = tenant
            .put_object(names::DEFAULT_TENANT, b"ok")
            .await
            .unwrap();
        let file = |path: &str, bytes: u64, sha256| grid_proto::OutputFile {
            path: path.into(),
            bytes,
            sha256,
        };
        let operator = connect_operator(&grid.nats.url).await;
        let js = async_nats::jetstream::new(operator);
        let tasks = js.get_key_value(names::TASKS_BUCKET).await.unwrap();
        let key = names::task_key(names::DEFAULT_TENANT, &job, other_index);
        let stored = tasks.get(&key).await.unwrap().expect("its record");
        let mut record: grid_proto::TaskRecord = grid_proto::decode(&stored).unwrap();
        record.result.files = vec![
            file("ok.txt", 2, ok),
            file("ok.txt/inner", 2, ok),
            file("../escape", 2, ok),
            file("missing.txt", 5, grid_proto::Sha256Hex::of(b"never stored")),
        ];
        tasks.put(&key, encode(&record).into()).await.unwrap();
    });

    let dir = tempfile::tempdir().unwrap();
    let out = grid.grid(&["results", &job, "-o", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let manifest: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.path().join("manifest.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(manifest.len(), 2);
    let lost = manifest.iter().find(|t| t["state"] == "failed").unwrap();
    assert_eq!(lost["reason"], "lost", "{lost}");
    assert_eq!(lost["files"].as_array().unwrap().len(), 0);
    let written = manifest.iter().find(|t| t["state"] == "succeeded").unwrap();
    let index = written["index"].as_u64().unwrap().to_string();
    assert_eq!(
        std::fs::read(dir.path().join(&index).join("ok.txt")).unwrap(),
        b"ok"
    );
    assert_eq!(written["skipped"].as_array().unwrap().len(), 3, "{written}");
    assert!(stderr.contains("skipping output"), "{stderr}");
    assert!(!dir.path().join("escape").exists());
}

#[test]
fn a_provider_that_fills_its_stage_stops_itself_only() {
    let grid = TestGrid::start(1, &["--stage-quota", "1MiB"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let rogue = Rogue::join(&grid.nats.url).await;
        let js = async_nats::jetstream::new(rogue.client.clone());
        let chunk = vec![7u8; names::STAGE_CHUNK_BYTES as usize];
        let mut stored = 0;
        for _ in 0..8 {
            let ack = match js
                .publish(names::stage_subject("rogue"), chunk.clone().into())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match ack {
                Ok(_) => stored += 1,
                Err(e) => {
                    assert!(
                        e.to_string().to_lowercase().contains("maximum messages"),
                        "{e}"
                    );
                    break;
                }
            }
        }
        assert!(stored < 8, "a 1 MiB stage took {stored} chunks of 256 KiB");
    });
    // Everyone else's outputs still go through their own stages.
    let job = submit_nap(&grid, 4, &[]);
    assert_eq!(grid.wait(&job)["state"], "done");
    assert_honest_outputs(&grid, &job, 4);
}

/// A provider site's leaf node (`grid site init`) carries a node to the grid, and adds reach,
/// not rights: a provider speaking raw NATS through the leaf, logged in to its own account
/// there with its own credentials, gets through on its own subjects only. It cannot forge
/// another provider's results or heartbeat, nor purge the task stream; the honest node behind
/// the same leaf completes the job with exact outputs.
#[test]
fn a_site_leaf_carries_a_node_and_gives_a_provider_no_more_than_its_credentials() {
    let (nats, leaf_port) = NatsServer::start_with_leafnodes();
    let grid = TestGrid::start_on(nats, 0, |nats| GridProcess::broker(nats, &[]));
    let site = tempfile::tempdir().unwrap();
    let dir = site.path().join("site");
    let listen = free_addr();
    let honest = creds(Role::Provider, "site-honest");
    let rogue = creds(Role::Provider, "site-rogue");
    let hub = format!("nats-leaf://127.0.0.1:{leaf_port}");
    let out = crate::support::grid(
        &[
            "site",
            "init",
            dir.to_str().unwrap(),
            "--hub",
            &hub,
            "--creds",
            honest.to_str().unwrap(),
            "--creds",
            rogue.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leaf = KillOnDrop(
        std::process::Command::new(grid_client::find_nats_server().unwrap())
            .arg("-c")
            .arg(dir.join("leaf.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let cache = site.path().join("cache");
    let _node = GridProcess::start(&[
        "node",
        "--config",
        dir.join("node-site-honest.toml").to_str().unwrap(),
        "--no-gpu",
        "--slots",
        "2",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    grid.wait_for_nodes(1);
    let job = submit_nap(&grid, 12, &[]);
    // The rogue's URL on the leaf: its own account's login, from its node config.
    let config = std::fs::read_to_string(dir.join("node-site-rogue.toml")).unwrap();
    let url = config
        .lines()
        .find_map(|l| l.strip_prefix("nats = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use futures::StreamExt;
        let operator = connect_operator(&grid.nats.url).await;
        let mut results = operator
            .subscribe("grid.results.site-honest.>")
            .await
            .unwrap();
        let mut heartbeats = operator
            .subscribe("$KV.grid_nodes.site-honest")
            .await
            .unwrap();
        operator.flush().await.unwrap();
        let rogue = connect_as(&url, &rogue).await;
        // Its own subjects cross: the broker answers its stage request through the leaf.
        let reply = rogue
            .request(
                names::provider_subject("site-rogue", "stage"),
                encode(&grid_proto::StageRequest {}).into(),
            )
            .await
            .expect("the broker answers the rogue's own request through the leaf");
        let answer: grid_proto::Answer<grid_proto::StoreReady> =
            grid_proto::decode(&reply.payload).unwrap();
        assert!(
            matches!(answer, grid_proto::Answer::Granted(_)),
            "{answer:?}"
        );
        // Another provider's results and heartbeat, and the task stream's purge, do not.
        rogue
            .publish("grid.results.site-honest.forged", "forged".into())
            .await
            .unwrap();
        rogue
            .publish("$KV.grid_nodes.site-honest", "forged".into())
            .await
            .unwrap();
        let purge = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            rogue.request("$JS.API.STREAM.PURGE.GRID_TASKS", "".into()),
        )
        .await;
        assert!(
            !matches!(purge, Ok(Ok(_))),
            "the task stream's purge was answered"
        );
        rogue.flush().await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, results.next()).await {
            assert_ne!(
                &msg.payload[..],
                b"forged",
                "a forged result crossed the leaf"
            );
        }
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, heartbeats.next()).await {
            assert_ne!(
                &msg.payload[..],
                b"forged",
                "a forged heartbeat crossed the leaf"
            );
        }
    });
    assert_eq!(grid.wait(&job)["state"], "done");
    assert_honest_outputs(&grid, &job, 12);
    let (_dir, manifest) = grid.results(&job);
    assert!(manifest.iter().all(|t| t["node"] == "site-honest"));
    drop(leaf);
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
