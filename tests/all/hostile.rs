//! Hostile tenants: a tenant that lies in its own store's metadata, submits the most expensive
//! job the caps allow, or floods the queue, harms no one else. Each attack is made as the
//! attacker would, with its own credential (`grid` where that is all it needs, raw NATS where
//! it writes what our client never would); then another tenant's work must complete with the
//! right bytes, as fast as on an idle grid within a small factor.

use crate::support::*;
use async_nats::jetstream;
use grid_proto::names;
use std::time::{Duration, Instant};

/// `grid ARGS` as tenant `tenant`, parsed as `--json`; panics unless it exits with `code`.
fn as_tenant(grid: &TestGrid, tenant: &str, args: &[&str], code: i32) -> serde_json::Value {
    let creds = tenant_creds(tenant);
    let mut all = args.to_vec();
    all.splice(1..1, ["--creds", creds.to_str().unwrap()]);
    grid.grid_json(&all, code)
}

/// Submits `tasks` naps of `ms` milliseconds as `tenant` (extra `flags` before the module's
/// args); the job id.
fn submit_naps(grid: &TestGrid, tenant: &str, tasks: u64, ms: u64, flags: &[&str]) -> String {
    let hostile = guest("hostile");
    let (tasks, ms) = (tasks.to_string(), ms.to_string());
    let mut args = vec!["submit", hostile.to_str().unwrap(), "--tasks", &tasks];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "nap", &ms]);
    as_tenant(grid, tenant, &args, 0)["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits for `tenant`'s job to end; its status.
fn wait_as(grid: &TestGrid, tenant: &str, job: &str) -> serde_json::Value {
    as_tenant(grid, tenant, &["status", job, "--wait"], 0)
}

/// `grid results JOB` as `tenant`, into a new folder: the folder and how the command ended.
fn collect_as(
    grid: &TestGrid,
    tenant: &str,
    job: &str,
) -> (tempfile::TempDir, std::process::Output) {
    let creds = tenant_creds(tenant);
    let out = tempfile::tempdir().unwrap();
    let collected = grid.grid(&[
        "results",
        "--creds",
        creds.to_str().unwrap(),
        job,
        "--output",
        out.path().to_str().unwrap(),
    ]);
    (out, collected)
}

/// Bob's 10 naps, start to end, checked task by task.
fn bobs_ten(grid: &TestGrid) -> Duration {
    let started = Instant::now();
    let job = submit_naps(grid, "bob", 10, 300, &[]);
    let status = wait_as(grid, "bob", &job);
    let took = started.elapsed();
    assert_eq!(status["state"], "done", "{status}");
    let (out, collected) = collect_as(grid, "bob", &job);
    assert!(collected.status.success(), "{collected:?}");
    for index in 0..10 {
        let bytes = std::fs::read(out.path().join(index.to_string()).join("index.txt")).unwrap();
        assert_eq!(bytes, index.to_string().into_bytes(), "task {index}");
    }
    took
}

/// Rewrites the metadata of object `sha` in `tenant`'s store, as the tenant may: the size and
/// chunk count it claims become absurd.
async fn forge_size(client: &async_nats::Client, tenant: &str, sha: &grid_proto::Sha256Hex) {
    let js = jetstream::new(client.clone());
    let bucket = names::tenant_store(tenant);
    let store = js.get_object_store(&bucket).await.unwrap();
    let name = names::object_name(sha);
    let mut info = store.info(&name).await.unwrap();
    info.size = 1 << 62;
    info.chunks = 1 << 40;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    let subject = format!("$O.{bucket}.M.{}", url_safe_base64(name.as_bytes()));
    js.publish_with_headers(subject, headers, serde_json::to_vec(&info).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let forged = store.info(&name).await.unwrap();
    assert_eq!(
        forged.size,
        1 << 62,
        "the forged metadata is what readers see"
    );
}

/// Base64 with the URL-safe alphabet and padding (how object stores name metadata subjects).
fn url_safe_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| n << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn sizes_a_tenant_writes_in_its_store_size_nothing() {
    let mut grid = TestGrid::start(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let params = write_params(dir.path(), (0..4).map(|i| format!("{{\"i\":{i}}}")));
    let hostile = guest("hostile");
    let params_arg = params.to_str().unwrap();
    let submit = [
        "submit",
        hostile.to_str().unwrap(),
        "--params",
        params_arg,
        "--",
        "nap",
        "10",
    ];
    let first = as_tenant(&grid, "alice", &submit, 0)["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(wait_as(&grid, "alice", &first)["state"], "done");
    // Alice lies about her module's and her params page's sizes, with her own credential.
    let module = grid_proto::Sha256Hex::of(&std::fs::read(&hostile).unwrap());
    let page = grid_proto::Sha256Hex::of(&std::fs::read(&params).unwrap());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let alice = connect_as(&grid.nats.url, &tenant_creds("alice")).await;
        forge_size(&alice, "alice", &module).await;
        forge_size(&alice, "alice", &page).await;
    });
    // The broker reads the page (bounded by the page cap), the node the module (bounded by the
    // module cap): both are what their names say, so the job runs.
    let second = as_tenant(&grid, "alice", &submit, 0)["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(wait_as(&grid, "alice", &second)["state"], "done");
    // `grid results` and `grid run --from` read them too.
    let (_out, collected) = collect_as(&grid, "alice", &second);
    assert!(collected.status.success(), "{collected:?}");
    let alice = tenant_creds("alice");
    let rerun = grid.grid(&[
        "run",
        "--creds",
        alice.to_str().unwrap(),
        "--from",
        &second,
        "--task",
        "1",
    ]);
    assert!(rerun.status.success(), "{rerun:?}");
    assert!(!grid.broker.exited(), "the broker stays up");
    assert!(
        grid.nodes.iter_mut().all(|n| !n.exited()),
        "the node stays up"
    );
    bobs_ten(&grid);
}

#[test]
fn a_job_over_a_cap_is_refused_with_the_cap_named() {
    let grid = TestGrid::start(1, &[]);
    let hostile = guest("hostile");
    // Through raw NATS the spec could claim anything; `grid` checks the same caps first, and
    // the broker checks them again (`grid_proto::JobSpec::validate`).
    let tasks = (grid_proto::caps::TASKS + 1).to_string();
    let out = grid.grid(&[
        "submit",
        hostile.to_str().unwrap(),
        "--tasks",
        &tasks,
        "--",
        "nap",
        "10",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the number of tasks is 1000001: the most a job may have is 1000000"),
        "{stderr}"
    );
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let alice = connect_as(&grid.nats.url, &tenant_creds("alice")).await;
        let page = grid_proto::ParamsPage {
            sha256: grid_proto::Sha256Hex::of(b"{}\n"),
            lines: 1,
        };
        let spec = grid_proto::JobSpec {
            tenant: "alice".into(),
            class: names::DEFAULT_CLASS.into(),
            module_sha256: grid_proto::Sha256Hex::of(b"m"),
            module_name: "m.wasm".into(),
            args: vec![],
            env: vec![],
            limits: grid_proto::JobLimits::default(),
            seed: 0,
            retries: 0,
            replicas: 1,
            quorum: 1,
            tasks: grid_proto::TaskSource::Params {
                pages: vec![page; 3000],
                lines: 3000,
            },
            shared: vec![],
            program: None,
            priority: 0,
            name: String::new(),
        };
        let reply = alice
            .request(
                names::api_subject("alice", "submit"),
                grid_proto::encode(&grid_proto::SubmitRequest { spec }).into(),
            )
            .await
            .unwrap();
        let answer: grid_proto::Answer<grid_proto::JobRef> =
            grid_proto::decode(&reply.payload).unwrap();
        assert_eq!(
            answer,
            grid_proto::Answer::Refused(
                "the number of params pages is 3000: the most a job may have is 1024; split the params file into several jobs".into()
            )
        );
    });
}

/// While Alice submits the most expensive job the caps allow — every params page the cap
/// allows, each one a whole page, and several such submits at once — Bob's 10-task job is
/// accepted and ends about as fast as on an idle grid.
#[test]
fn the_broker_never_waits_on_one_tenants_submit() {
    let grid = TestGrid::start(1, &[]);
    let idle = bobs_ten(&grid);
    let dir = tempfile::tempdir().unwrap();
    // 64 pages of one line each (two do not fit a page), all read at submit.
    let params = write_params(
        dir.path(),
        (0..64).map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(600_000))),
    );
    let hostile = guest("hostile");
    let alice = tenant_creds("alice");
    let submit = [
        "submit",
        "--creds",
        alice.to_str().unwrap(),
        hostile.to_str().unwrap(),
        "--params",
        params.to_str().unwrap(),
        "--",
        "nap",
        "300",
    ];
    let loaded = std::thread::scope(|scope| {
        let submits: Vec<_> = (0..4).map(|_| scope.spawn(|| grid.grid(&submit))).collect();
        std::thread::sleep(Duration::from_secs(2));
        let loaded = bobs_ten(&grid);
        for submit in submits {
            let _ = submit.join();
        }
        loaded
    });
    assert!(
        loaded < idle * 5,
        "bob's job took {loaded:?} beside alice's submits, {idle:?} on an idle grid"
    );
}

/// A tenant with 100,000 tasks queued delays another's new job by no more than its fair
/// share of the slots; a tenant's weight buys it more, and its own priorities order its jobs.
#[test]
fn tenants_share_the_slots_fairly() {
    let grid = TestGrid::start(1, &["--tenant-weight", "carol=3"]);
    let idle = bobs_ten(&grid);
    let flood = submit_naps(&grid, "alice", 100_000, 300, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let loaded = bobs_ten(&grid);
    assert!(
        loaded < idle * 4,
        "bob's job took {loaded:?} beside alice's 100,000 tasks, {idle:?} on an idle grid"
    );
    // Alice's own urgent job overtakes her flood.
    let started = Instant::now();
    let urgent = submit_naps(&grid, "alice", 4, 300, &["--priority", "10"]);
    assert_eq!(wait_as(&grid, "alice", &urgent)["state"], "done");
    let urgent_took = started.elapsed();
    assert!(
        urgent_took < idle * 4,
        "alice's priority job took {urgent_took:?}, {idle:?} for bob's on an idle grid"
    );
    let status = as_tenant(&grid, "alice", &["status", &flood], 0);
    assert_eq!(status["state"], "running", "{status}");
    let cancelled = as_tenant(&grid, "alice", &["cancel", &flood], 0);
    assert_eq!(cancelled["job_id"], flood.as_str());
}

/// Two tenants flooding the grid get its slots in proportion to their weights.
#[test]
fn a_tenants_weight_buys_it_its_share() {
    let grid = TestGrid::start(1, &["--tenant-weight", "carol=3"]);
    let carol = submit_naps(&grid, "carol", 2000, 200, &[]);
    let dave = submit_naps(&grid, "dave", 2000, 200, &[]);
    std::thread::sleep(Duration::from_secs(15));
    let done = |tenant: &str, job: &str| {
        as_tenant(&grid, tenant, &["status", job], 0)["tasks"]["succeeded"]
            .as_u64()
            .unwrap()
    };
    let (c, d) = (done("carol", &carol), done("dave", &dave));
    assert!(
        c >= 2 * d.max(1) && d > 0,
        "carol (weight 3) finished {c} tasks, dave (weight 1) {d}"
    );
    as_tenant(&grid, "carol", &["cancel", &carol], 0);
    as_tenant(&grid, "dave", &["cancel", &dave], 0);
}

/// A guest that hides its outputs below `PATH_MAX` fails at its output limit on a real grid;
/// one that hard-links a file within `/out` has it counted once, by the node and by the broker,
/// and every name comes back; the node serves on.
#[test]
fn hidden_and_hard_linked_outputs_are_held_to_the_output_limit() {
    let mut grid = TestGrid::start(1, &[]);
    let hostile = guest("hostile");
    let run = |args: &[&str], code: i32| {
        let mut all = vec![
            "submit",
            hostile.to_str().unwrap(),
            "--max-output",
            "16MiB",
            "--retries",
            "0",
            "--wait",
            "--",
        ];
        all.extend_from_slice(args);
        let status = as_tenant(&grid, "alice", &all, code);
        status["job_id"].as_str().unwrap().to_string()
    };
    let results = |job: &str| {
        let (out, collected) = collect_as(&grid, "alice", job);
        let manifest = std::fs::read_to_string(out.path().join("manifest.jsonl")).unwrap();
        let line: serde_json::Value =
            serde_json::from_str(manifest.lines().next().unwrap()).unwrap();
        (out, line, collected)
    };
    // 64 MiB below 30 folders of 200-byte names (6 KB paths).
    let hidden = run(&["deep-nest", "30", "200", "64"], 1);
    let (_, line, _) = results(&hidden);
    assert_eq!(line["state"], "failed", "{line}");
    assert_eq!(line["reason"], "limit: output", "{line}");
    // 4 MiB under six names and 8 MiB more: 12 MiB, within 16.
    let linked = run(&["hard-links"], 0);
    let (out, line, collected) = results(&linked);
    assert!(collected.status.success(), "{collected:?}");
    assert_eq!(line["state"], "succeeded", "{line}");
    for name in ["data.bin", "link0.bin", "link4.bin"] {
        let bytes = std::fs::read(out.path().join("0").join(name)).unwrap();
        assert_eq!(bytes, vec![3u8; 4 << 20], "{name}");
    }
    assert!(
        grid.nodes.iter_mut().all(|n| !n.exited()),
        "the node stays up"
    );
    bobs_ten(&grid);
}

/// Params lines near the largest allowed, on tasks short enough to travel several to a
/// message, still fit NATS's payload (the runs are shortened); a longer line is refused with
/// the cap named.
#[test]
fn long_params_lines_travel_in_shorter_runs_and_longer_ones_are_refused() {
    let grid = TestGrid::start(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let pad = "x".repeat(250_000);
    let params = write_params(
        dir.path(),
        (0..60).map(|i| format!("{{\"i\":{i},\"pad\":\"{pad}\"}}")),
    );
    let hostile = guest("hostile");
    let status = as_tenant(
        &grid,
        "alice",
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--params",
            params.to_str().unwrap(),
            "--wait",
            "--",
            "nap",
            "1",
        ],
        0,
    );
    assert_eq!(status["state"], "done", "{status}");
    let too_long = write_params(
        dir.path(),
        std::iter::once(format!("{{\"pad\":\"{}\"}}", "x".repeat(300_000))),
    );
    let out = grid.grid(&[
        "submit",
        hostile.to_str().unwrap(),
        "--params",
        too_long.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the most a line may have is 262144"),
        "{stderr}"
    );
}
