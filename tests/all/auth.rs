//! Tenants and providers kept apart by NATS's own auth (every test server runs with the test
//! binary's operator setup): each denial the issue lists, seen by the user as one line, and on
//! the wire as the server's permissions violation; the grid keeps serving after each.

use crate::support::{Role, TestGrid, creds, guest, tenant_creds};
use grid_proto::{encode, names};
use std::path::Path;
use std::time::Duration;

/// A connection with `creds` that reports the server's errors (permission violations).
pub(crate) struct Watched {
    pub(crate) client: async_nats::Client,
    errors: tokio::sync::mpsc::UnboundedReceiver<String>,
}

pub(crate) async fn connect_watched(url: &str, creds: &Path) -> Watched {
    let who = grid_client::auth::Identity::of_creds_file(creds).unwrap();
    let (tx, errors) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_credentials_file(creds)
        .await
        .unwrap()
        .custom_inbox_prefix(who.inbox_prefix())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(url)
        .await
        .unwrap();
    Watched { client, errors }
}

impl Watched {
    /// Publishes to `subject` and expects the server to refuse it.
    pub(crate) async fn publish_is_denied(&mut self, subject: &str, payload: Vec<u8>) {
        self.client
            .publish(subject.to_string(), payload.into())
            .await
            .unwrap();
        self.client.flush().await.unwrap();
        self.expect_violation(subject).await;
    }

    pub(crate) async fn expect_violation(&mut self, subject: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let error = tokio::time::timeout_at(deadline, self.errors.recv())
                .await
                .unwrap_or_else(|_| panic!("the server allowed {subject}"))
                .expect("errors channel open");
            let error = error.to_lowercase();
            if error.contains("permissions violation") && error.contains(&subject.to_lowercase()) {
                return;
            }
        }
    }
}

/// Each of `subjects`, published with `creds`, is refused by the server.
fn assert_wire_denied(grid: &TestGrid, creds: &Path, subjects: &[String]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut who = connect_watched(&grid.nats.url, creds).await;
        for subject in subjects {
            who.publish_is_denied(subject, b"{}".to_vec()).await;
        }
    });
}

/// A result of task 0 of `job`, as node `node` would publish it, without a seal.
fn forged_result(job: &str, node: &str) -> grid_proto::ResultMsg {
    grid_proto::ResultMsg {
        tenant: names::DEFAULT_TENANT.into(),
        job_id: job.into(),
        index: 0,
        attempt: 0,
        replica: 0,
        node_id: node.into(),
        digest: grid_proto::result_digest(&grid_proto::Outcome::Succeeded, &[]),
        outcome: grid_proto::Outcome::Succeeded,
        usage: grid_proto::Usage::default(),
        files: vec![],
        stdout: None,
        stderr: None,
        logs_truncated: false,
        detail: None,
        seal: grid_proto::Seal::default(),
        staged: vec![],
    }
}

/// A grid with one node where tenant bob has run a job (3 tasks, with logs and outputs);
/// returns the job id.
fn grid_with_bobs_job() -> (TestGrid, String) {
    let grid = TestGrid::start(1, &[]);
    let bob = tenant_creds("bob");
    let status = grid.grid_json(
        &[
            "submit",
            "--creds",
            bob.to_str().unwrap(),
            guest("monte-carlo-pi").to_str().unwrap(),
            "--tasks",
            "3",
            "--wait",
        ],
        0,
    );
    assert_eq!(status["state"], "done", "{status}");
    (grid, status["job_id"].as_str().unwrap().to_string())
}

/// `grid ARGS` as tenant alice: the exit code and stderr.
fn as_alice(grid: &TestGrid, args: &[&str]) -> (Option<i32>, String) {
    let alice = tenant_creds("alice");
    let mut all = args.to_vec();
    all.splice(1..1, ["--creds", alice.to_str().unwrap()]);
    let out = grid.grid(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_denied((code, stderr): (Option<i32>, String), line: &str) {
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim(), format!("grid: {line}"));
}

/// Bob's job and alice's own grid still work after a denial.
fn assert_still_serving(grid: &TestGrid, job: &str) {
    let bob = tenant_creds("bob");
    let status = grid.grid_json(&["status", "--creds", bob.to_str().unwrap(), job], 0);
    assert_eq!(status["state"], "done");
    let alice = tenant_creds("alice");
    let mine = grid.grid_json(
        &[
            "submit",
            "--creds",
            alice.to_str().unwrap(),
            guest("monte-carlo-pi").to_str().unwrap(),
            "--wait",
        ],
        0,
    );
    assert_eq!(mine["state"], "done", "{mine}");
}

#[test]
fn a_connection_without_credentials_is_refused() {
    let grid = TestGrid::start(0, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = rt.block_on(async {
        async_nats::ConnectOptions::new()
            .connect(grid.nats.url.as_str())
            .await
            .is_err()
    });
    assert!(refused, "an anonymous client connected");
}

#[test]
fn a_tenant_cannot_submit_as_another_tenant() {
    let (grid, job) = grid_with_bobs_job();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut alice = connect_watched(&grid.nats.url, &tenant_creds("alice")).await;
        // On the wire: only its own `grid.api.alice.>` reaches the broker.
        alice
            .publish_is_denied(&names::api_subject("bob", "submit"), b"job".to_vec())
            .await;
        // Through its own subject, naming bob in the spec: the broker refuses.
        let status = grid.grid_json(
            &[
                "status",
                "--creds",
                tenant_creds("bob").to_str().unwrap(),
                &job,
            ],
            0,
        );
        assert_eq!(status["state"], "done");
        let bytes = std::fs::read(guest("monte-carlo-pi")).unwrap();
        let sha = grid_proto::Sha256Hex::of(&bytes);
        let spec = grid_proto::JobSpec {
            tenant: "bob".into(),
            class: names::DEFAULT_CLASS.into(),
            module_sha256: sha,
            module_name: "monte-carlo-pi.wasm".into(),
            args: vec![],
            env: vec![],
            limits: grid_proto::JobLimits {
                memory_bytes: 64 << 20,
                timeout_ms: 60_000,
                max_output_bytes: 1 << 20,
                gpu_memory_bytes: 0,
                gpu_time_ms: 0,
            },
            seed: 0,
            retries: 0,
            replicas: 1,
            quorum: 1,
            tasks: grid_proto::TaskSource::Count(1),
            shared: vec![],
            program: None,
            priority: 0,
            name: String::new(),
        };
        let reply = alice
            .client
            .request(
                names::api_subject("alice", "submit"),
                encode(&grid_proto::SubmitRequest { spec }).into(),
            )
            .await
            .unwrap();
        assert_eq!(
            grid_proto::decode::<grid_proto::Answer<grid_proto::JobRef>>(&reply.payload).unwrap(),
            grid_proto::Answer::Refused(
                "permission denied: tenant alice cannot submit as tenant bob".into()
            )
        );
    });
    assert_still_serving(&grid, &job);
}

#[test]
fn a_tenant_cannot_read_another_tenants_job_status() {
    let (grid, job) = grid_with_bobs_job();
    assert_denied(
        as_alice(&grid, &["status", &job]),
        &format!("permission denied: tenant alice cannot read job {job} of tenant bob"),
    );
    // On the wire: not its record, and listing jobs reads its own keys only.
    assert_wire_denied(
        &grid,
        &tenant_creds("alice"),
        &[
            format!("$JS.API.DIRECT.GET.KV_grid_jobs.$KV.grid_jobs.bob.{job}"),
            "$JS.API.CONSUMER.CREATE.KV_grid_jobs.x.$KV.grid_jobs.>".into(),
        ],
    );
    let (code, _) = as_alice(&grid, &["jobs"]);
    assert_eq!(code, Some(0));
    assert_still_serving(&grid, &job);
}

#[test]
fn a_tenant_cannot_read_another_tenants_logs() {
    let (grid, job) = grid_with_bobs_job();
    assert_denied(
        as_alice(&grid, &["logs", &job]),
        &format!("permission denied: tenant alice cannot read job {job} of tenant bob"),
    );
    assert_wire_denied(
        &grid,
        &tenant_creds("alice"),
        &[format!(
            "$JS.API.DIRECT.GET.KV_grid_tasks.$KV.grid_tasks.bob.{job}.0"
        )],
    );
    assert_still_serving(&grid, &job);
}

#[test]
fn a_tenant_cannot_read_another_tenants_results() {
    let (grid, job) = grid_with_bobs_job();
    let out = tempfile::tempdir().unwrap();
    assert_denied(
        as_alice(
            &grid,
            &["results", &job, "-o", out.path().to_str().unwrap()],
        ),
        &format!("permission denied: tenant alice cannot read job {job} of tenant bob"),
    );
    // Nor bob's store, where the outputs are.
    assert_wire_denied(
        &grid,
        &tenant_creds("alice"),
        &["$JS.API.DIRECT.GET.OBJ_grid_store_bob".into()],
    );
    assert_still_serving(&grid, &job);
}

#[test]
fn a_tenant_cannot_read_another_tenants_modules() {
    let (grid, job) = grid_with_bobs_job();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut alice = connect_watched(&grid.nats.url, &tenant_creds("alice")).await;
        for subject in [
            "$JS.API.STREAM.INFO.OBJ_grid_store_bob",
            "$JS.API.DIRECT.GET.OBJ_grid_store_bob",
            "$JS.API.CONSUMER.CREATE.OBJ_grid_store_bob",
            "$O.grid_store_bob.M.x",
        ] {
            alice.publish_is_denied(subject, b"{}".to_vec()).await;
        }
        // Through the library, the same read is an error (not bob's bytes).
        let grid_as_alice = grid_client::Grid::open(alice.client.clone()).await.unwrap();
        let sha = grid_proto::Sha256Hex::of(&std::fs::read(guest("monte-carlo-pi")).unwrap());
        let read = tokio::time::timeout(
            Duration::from_secs(30),
            grid_as_alice.get_object("bob", &sha, 1 << 30),
        )
        .await;
        assert!(!matches!(read, Ok(Ok(_))), "alice read bob's module");
    });
    assert_still_serving(&grid, &job);
}

#[test]
fn a_tenant_cannot_cancel_or_retry_another_tenants_job() {
    let grid = TestGrid::start(1, &[]);
    let bob = tenant_creds("bob");
    let submitted = grid.grid_json(
        &[
            "submit",
            "--creds",
            bob.to_str().unwrap(),
            guest("hostile").to_str().unwrap(),
            "--tasks",
            "4",
            "--",
            "nap",
            "300",
        ],
        0,
    );
    let job = submitted["job_id"].as_str().unwrap().to_string();
    assert_denied(
        as_alice(&grid, &["cancel", &job]),
        &format!("permission denied: tenant alice cannot cancel job {job} of tenant bob"),
    );
    let status = grid.grid_json(
        &["status", "--creds", bob.to_str().unwrap(), &job, "--wait"],
        0,
    );
    assert_eq!(status["state"], "done", "the cancel went through: {status}");
    assert_denied(
        as_alice(&grid, &["retry", &job, "--failed"]),
        &format!("permission denied: tenant alice cannot retry job {job} of tenant bob"),
    );
    assert_still_serving(&grid, &job);
}

#[test]
fn a_provider_cannot_submit_jobs() {
    let (grid, job) = grid_with_bobs_job();
    let provider = creds(Role::Provider, "node-0");
    let out = grid.grid(&[
        "submit",
        "--creds",
        provider.to_str().unwrap(),
        guest("monte-carlo-pi").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "grid: permission denied: provider node-0 cannot use `grid submit` (a tenant's command: pass a tenant's --creds)"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut node = connect_watched(&grid.nats.url, &provider).await;
        for tenant in ["default", "bob"] {
            node.publish_is_denied(&names::api_subject(tenant, "submit"), b"job".to_vec())
                .await;
        }
        node.publish_is_denied(
            &names::api_subject("bob", "cancel"),
            job.clone().into_bytes(),
        )
        .await;
    });
    assert_still_serving(&grid, &job);
}

#[test]
fn a_provider_cannot_read_results_of_tasks_it_did_not_run() {
    let (grid, job) = grid_with_bobs_job();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A provider that ran nothing of bob's (the grid's node is node-0).
        let mut stranger =
            connect_watched(&grid.nats.url, &creds(Role::Provider, "stranger")).await;
        for subject in [
            format!("$JS.API.DIRECT.GET.KV_grid_tasks.$KV.grid_tasks.bob.{job}.0"),
            "$JS.API.DIRECT.GET.KV_grid_tasks".to_string(),
            "$JS.API.STREAM.INFO.KV_grid_tasks".to_string(),
            format!("$JS.API.DIRECT.GET.KV_grid_jobs.$KV.grid_jobs.bob.{job}"),
            "$JS.API.DIRECT.GET.KV_grid_usage".to_string(),
            "$JS.API.DIRECT.GET.KV_grid_votes".to_string(),
            // The broker's sealing key.
            "$JS.API.DIRECT.GET.KV_grid_secrets.$KV.grid_secrets.seal".to_string(),
            "$JS.API.STREAM.INFO.KV_grid_secrets".to_string(),
            "$JS.API.STREAM.INFO.GRID_RESULTS".to_string(),
            "$JS.API.CONSUMER.CREATE.GRID_RESULTS".to_string(),
        ] {
            stranger.publish_is_denied(&subject, b"{}".to_vec()).await;
        }
        // Nor hear results as they pass.
        let _sub = stranger.client.subscribe("grid.results.>").await.unwrap();
        stranger.client.flush().await.unwrap();
        stranger.expect_violation("grid.results.>").await;
    });
    assert_still_serving(&grid, &job);
}

#[test]
fn a_provider_cannot_impersonate_another_node() {
    // No nodes: mallory is the only provider, and plays one on the wire.
    let grid = TestGrid::start(0, &[]);
    let submitted = grid.grid_json(
        &[
            "submit",
            guest("monte-carlo-pi").to_str().unwrap(),
            "--tasks",
            "1",
        ],
        0,
    );
    let job = submitted["job_id"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut mallory = connect_watched(&grid.nats.url, &creds(Role::Provider, "mallory")).await;
        let result = |node: &str| grid_proto::ResultsMsg {
            results: vec![forged_result(&job, node)],
        };
        // Another node's subject, heartbeat or claim: refused by the server.
        mallory
            .publish_is_denied(
                &names::results_subject("node-0", &job),
                encode(&result("node-0")),
            )
            .await;
        mallory
            .publish_is_denied("$KV.grid_nodes.node-0", b"alive".to_vec())
            .await;
        mallory
            .publish_is_denied(
                &format!("$KV.grid_claims.{}", names::claim_key(&job, 0, 0, "node-0")),
                vec![],
            )
            .await;
        // Its own subject, naming another node: the broker drops it uncounted.
        let js = async_nats::jetstream::new(mallory.client.clone());
        js.publish(
            names::results_subject("mallory", &job),
            encode(&result("node-0")).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    });
    std::thread::sleep(Duration::from_secs(2));
    let status = grid.grid_json(&["status", &job], 0);
    assert_eq!(
        status["tasks"]["succeeded"], 0,
        "a forged result counted: {status}"
    );
    // Under its own name, with numbers the broker never sent out (an attempt past the job's
    // last, a replica of a job without replicas): refused, not counted, not billed.
    rt.block_on(async {
        let client =
            crate::support::connect_as(&grid.nats.url, &creds(Role::Provider, "mallory")).await;
        let js = async_nats::jetstream::new(client);
        for (attempt, replica) in [(1000, 0), (0, 5)] {
            let result = grid_proto::ResultsMsg {
                results: vec![grid_proto::ResultMsg {
                    attempt,
                    replica,
                    ..forged_result(&job, "mallory")
                }],
            };
            js.publish(
                names::results_subject("mallory", &job),
                encode(&result).into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let status = grid.grid_json(&["status", &job], 0);
    assert_eq!(status["tasks"]["succeeded"], 0, "{status}");
    let billed = crate::ledger::usage(&grid, &["--job", &job]);
    assert_eq!(billed["total"]["attempts"], 0, "{billed}");
    // Under its own name, for a task it was given, a result is counted (as mallory's).
    rt.block_on(async {
        let client =
            crate::support::connect_as(&grid.nats.url, &creds(Role::Provider, "mallory")).await;
        let tasks = crate::support::pull_tasks(&client, "mallory", 1).await;
        let result = grid_proto::ResultsMsg {
            results: vec![crate::support::empty_result(
                &tasks[0].0,
                "mallory",
                grid_proto::Usage::default(),
            )],
        };
        let js = async_nats::jetstream::new(client);
        js.publish(
            names::results_subject("mallory", &job),
            encode(&result).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    });
    assert_eq!(grid.wait(&job)["state"], "done");
}

#[test]
fn a_node_runs_only_as_the_provider_its_credentials_name() {
    let grid = TestGrid::start(0, &[]);
    let out = grid.grid(&[
        "node",
        "--creds",
        creds(Role::Provider, "alpha").to_str().unwrap(),
        "--id",
        "beta",
        "--no-gpu",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not the provider of the credentials"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
