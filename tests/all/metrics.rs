//! Prometheus metrics (`--metrics ADDR`) of the broker and a node: after jobs with successes,
//! a limit hit and retries, both endpoints count what `grid status` counts.

use crate::support::*;
use std::time::{Duration, Instant};

/// An address with a port free right now.
pub(crate) fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// The text at `http://addr/metrics` (waiting for the endpoint to come up).
pub(crate) fn scrape(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((head, body)) = http_get(&format!("http://{addr}/metrics")) {
            assert!(head.contains(" 200 "), "{head}");
            return body;
        }
        assert!(Instant::now() < deadline, "no metrics at {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
pub(crate) fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, sample) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| sample.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[test]
fn broker_and_node_metrics_count_what_the_grid_did() {
    let (broker_addr, node_addr) = (free_addr(), free_addr());
    let grid = TestGrid::start(0, &["--metrics", &broker_addr]);
    let cache = tempfile::tempdir().unwrap();
    let _node = GridProcess::node_with(
        &grid.nats,
        "node-metrics",
        cache.path(),
        2,
        &["--no-gpu", "--metrics", &node_addr],
    );
    grid.wait_for_nodes(1);
    let hostile = guest("hostile");
    let ok = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--tasks",
            "6",
            "--wait",
            "--",
            "exit",
            "0",
        ],
        0,
    );
    assert_eq!(ok["tasks"]["succeeded"], 6);
    // Two tasks over their memory limit: not retried (it would fail the same way again).
    let bombs = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--tasks",
            "2",
            "--memory",
            "64MiB",
            "--retries",
            "1",
            "--wait",
            "--",
            "memory-bomb",
        ],
        1,
    );
    assert_eq!(bombs["tasks"]["failed"], 2);
    // A task that runs past its time limit twice, then succeeds: retried twice.
    let flaky = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--timeout",
            "1s",
            "--wait",
            "--",
            "flaky",
        ],
        0,
    );
    assert_eq!(flaky["tasks"]["succeeded"], 1);

    let broker = scrape(&broker_addr);
    let counted = |state: &str| value(&broker, "grid_tasks_counted_total", &[("state", state)]);
    assert_eq!(counted("succeeded"), 7.0, "{broker}");
    assert_eq!(counted("failed"), 2.0, "{broker}");
    assert_eq!(
        value(
            &broker,
            "grid_tasks_counted_total",
            &[("state", "failed"), ("reason", "limit: memory")]
        ),
        2.0
    );
    let memory_failures = [("reason", "limit: memory")];
    assert_eq!(
        value(&broker, "grid_attempts_failed_total", &memory_failures),
        2.0,
        "{broker}"
    );
    assert_eq!(
        value(
            &broker,
            "grid_attempts_failed_total",
            &[("reason", "limit: time")]
        ),
        2.0,
        "{broker}"
    );
    assert_eq!(
        value(&broker, "grid_task_retries_total", &[]),
        2.0,
        "{broker}"
    );
    assert_eq!(
        value(&broker, "grid_task_seconds_count", &[]),
        9.0,
        "{broker}"
    );
    assert!(
        broker.contains("# HELP grid_tasks_counted_total"),
        "{broker}"
    );
    // Both jobs ended: nothing running, queued or in flight (the gauges follow each save).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let broker = scrape(&broker_addr);
        let idle = value(&broker, "grid_jobs_running", &[]) == 0.0
            && value(&broker, "grid_tasks", &[("state", "in_flight")]) == 0.0
            && value(&broker, "grid_tasks", &[("state", "queued")]) == 0.0;
        if idle {
            break;
        }
        assert!(Instant::now() < deadline, "{broker}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let node = scrape(&node_addr);
    assert_eq!(value(&node, "grid_node_slots", &[]), 2.0, "{node}");
    assert_eq!(value(&node, "grid_node_slots_busy", &[]), 0.0, "{node}");
    assert_eq!(
        value(&node, "grid_node_tasks_total", &[("outcome", "succeeded")]),
        7.0,
        "{node}"
    );
    assert_eq!(
        value(
            &node,
            "grid_node_tasks_total",
            &[("outcome", "limit: memory")]
        ),
        2.0,
        "{node}"
    );
    assert_eq!(
        value(&node, "grid_limit_hits_total", &[("limit", "memory")]),
        2.0,
        "{node}"
    );
    assert_eq!(
        value(&node, "grid_node_task_seconds_count", &[]),
        11.0,
        "{node}"
    );
    assert_eq!(
        value(&node, "grid_task_queue_wait_seconds_count", &[]),
        11.0,
        "{node}"
    );
    // One module: compiled for the first job (whose other tasks reuse it), then found in
    // memory by each later job's first task.
    let loads = |from: &str| value(&node, "grid_module_loads_total", &[("from", from)]);
    assert!(loads("compiled") + loads("disk") >= 1.0, "{node}");
    assert!(loads("memory") >= 1.0, "{node}");
}

#[test]
fn nodes_sharing_a_compiled_dir_compile_a_module_once() {
    let grid = TestGrid::start(0, &[]);
    let (shared, caches) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let addrs = [free_addr(), free_addr()];
    let mut nodes: Vec<GridProcess> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            GridProcess::node_with(
                &grid.nats,
                &format!("node-{i}"),
                &caches.path().join(format!("node-{i}")),
                2,
                &[
                    "--no-gpu",
                    "--metrics",
                    addr,
                    "--compiled-dir",
                    shared.path().to_str().unwrap(),
                ],
            )
        })
        .collect();
    grid.wait_for_nodes(2);
    // Eight tasks of half a second on four slots: both nodes load the module at once.
    let hostile = guest("hostile");
    let done = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--tasks",
            "8",
            "--wait",
            "--",
            "nap",
            "500",
        ],
        0,
    );
    assert_eq!(done["tasks"]["succeeded"], 8);
    let loads = |from: &str| -> f64 {
        addrs
            .iter()
            .map(|a| value(&scrape(a), "grid_module_loads_total", &[("from", from)]))
            .sum()
    };
    assert_eq!(loads("compiled"), 1.0, "compiled once for the two nodes");
    // The node that did not compile, alone now: it uses the other's artifact, whether or not
    // it ran a task above.
    let compiled = |addr: &str| {
        value(
            &scrape(addr),
            "grid_module_loads_total",
            &[("from", "compiled")],
        )
    };
    let compiler = if compiled(&addrs[0]) == 1.0 { 0 } else { 1 };
    let other = 1 - compiler;
    nodes[compiler].kill();
    grid.wait_for_nodes(1);
    let done = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--tasks",
            "2",
            "--wait",
            "--",
            "nap",
            "10",
        ],
        0,
    );
    assert_eq!(done["tasks"]["succeeded"], 2);
    let alone = scrape(&addrs[other]);
    let from = |from: &str| value(&alone, "grid_module_loads_total", &[("from", from)]);
    assert_eq!(from("compiled"), 0.0, "the other node compiled nothing");
    assert!(from("disk") >= 1.0, "{alone}");
}
