//! A grid on a 3-server NATS cluster with replicated (R3) streams, buckets and object stores:
//! one server dies mid-job and the job completes.

use crate::support::*;

/// `grid ARGS` against the cluster at `url`.
fn grid_at(url: &str, args: &[&str]) -> std::process::Output {
    let mut all = args.to_vec();
    all.splice(1..1, ["--nats", url]);
    grid(&all, b"")
}

/// Retries `grid ARGS --json` until it exits 0 (the cluster and broker take a moment to form),
/// and returns its last line as JSON.
fn until_ok(url: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.insert(1, "--json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let out = grid_at(url, &all);
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            return serde_json::from_str(text.lines().last().unwrap_or("")).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "grid {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

#[test]
fn a_job_completes_when_a_cluster_server_dies_mid_job() {
    let mut servers = NatsServer::start_cluster(3);
    let url = cluster_url(&servers);
    let caches = tempfile::tempdir().unwrap();
    let _broker = GridProcess::start_at(&url, &["broker", "--stream-replicas", "3"]);
    let _nodes: Vec<GridProcess> = (0..2)
        .map(|i| {
            let id = format!("n{i}");
            let cache = caches.path().join(&id);
            GridProcess::start_at(
                &url,
                &[
                    "node",
                    "--no-gpu",
                    "--id",
                    &id,
                    "--slots",
                    "2",
                    "--cache-dir",
                    cache.to_str().unwrap(),
                ],
            )
        })
        .collect();
    let hostile = guest("hostile");
    let submitted = until_ok(
        &url,
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--tasks",
            "40",
            "--",
            "nap",
            "100",
        ],
    );
    let job = submitted["job_id"].as_str().unwrap().to_string();
    // Every stream and bucket is kept by all three servers.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = connect_operator(&url).await;
        let js = async_nats::jetstream::new(client);
        for stream in [
            "GRID_TASKS",
            "GRID_RESULTS",
            "KV_grid_jobs",
            "KV_grid_tasks",
            "OBJ_grid_store_default",
        ] {
            let mut s = js.get_stream(stream).await.unwrap();
            let info = s.info().await.unwrap();
            assert_eq!(info.config.num_replicas, 3, "{stream}");
        }
    });
    // Once the job is under way, one server dies for good.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let status = until_ok(&url, &["status", &job]);
        if status["tasks"]["succeeded"].as_u64().unwrap_or(0) >= 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job never started: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    servers[0].kill();
    let status = until_ok(&url, &["status", &job, "--wait"]);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], 40, "{status}");
    assert_eq!(status["tasks"]["failed"], 0, "{status}");
}
