//! GPU sessions on the machine's real Vulkan device (Mesa's lavapipe on CPU-only machines):
//! kernels checked against CPU results, and hostile use contained with a named error.

use grid_gpu::{GpuDevice, GpuErrorKind, GpuLimits, GpuSession};
use grid_proto::Limit;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The one device of this test binary, like a node's. Fails (never skips) without a driver.
fn gpu() -> Arc<GpuDevice> {
    static GPU: OnceLock<Arc<GpuDevice>> = OnceLock::new();
    GPU.get_or_init(|| Arc::new(GpuDevice::open(false).unwrap_or_else(|e| panic!("{e}"))))
        .clone()
}

fn session() -> GpuSession {
    GpuSession::new(gpu(), GpuLimits::default())
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

const VECTOR_ADD: &str = r#"
@group(0) @binding(0) var<storage, read> a: array<u32>;
@group(0) @binding(1) var<storage, read> b: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&out)) { out[id.x] = a[id.x] + b[id.x]; }
}"#;

/// Runs vector-add of 0..n and 3·(0..n) in `s` and checks it.
fn vector_add(s: &mut GpuSession, n: u32) {
    let a: Vec<u32> = (0..n).collect();
    let b: Vec<u32> = (0..n).map(|i| 3 * i).collect();
    let size = u64::from(n) * 4;
    let (ha, hb, hout) = (
        s.create_buffer(size).unwrap(),
        s.create_buffer(size).unwrap(),
        s.create_buffer(size).unwrap(),
    );
    s.write(ha, 0, &bytes(&a)).unwrap();
    s.write(hb, 0, &bytes(&b)).unwrap();
    let k = s.create_kernel(VECTOR_ADD, "main").unwrap();
    s.dispatch(k, &[ha, hb, hout], [n.div_ceil(64), 1, 1])
        .unwrap();
    let out = u32s(&s.read(hout, 0, size).unwrap());
    assert_eq!(out, (0..n).map(|i| 4 * i).collect::<Vec<_>>());
}

#[test]
fn vector_add_matches_the_cpu() {
    vector_add(&mut session(), 100_000);
}

#[test]
fn a_reduction_matches_the_cpu() {
    let src = r#"
@group(0) @binding(0) var<storage, read> xs: array<u32>;
@group(0) @binding(1) var<storage, read_write> sum: atomic<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&xs)) { atomicAdd(&sum, xs[id.x]); }
}"#;
    let mut s = session();
    let n = 50_000u32;
    let xs = s.create_buffer(u64::from(n) * 4).unwrap();
    s.write(xs, 0, &bytes(&(0..n).map(|i| i % 7).collect::<Vec<_>>()))
        .unwrap();
    let sum = s.create_buffer(4).unwrap();
    let k = s.create_kernel(src, "main").unwrap();
    s.dispatch(k, &[xs, sum], [n.div_ceil(64), 1, 1]).unwrap();
    assert_eq!(
        u32s(&s.read(sum, 0, 4).unwrap())[0],
        (0..n).map(|i| i % 7).sum::<u32>()
    );
}

#[test]
fn invalid_wgsl_is_a_clean_error() {
    let mut s = session();
    for (src, entry) in [
        ("this is not wgsl", "main"),
        (
            "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }",
            "main",
        ),
        ("@compute @workgroup_size(1) fn main() {}", "other"),
        (
            "@group(1) @binding(0) var<storage, read_write> x: array<u32>;\n@compute @workgroup_size(1) fn main() { x[0] = 1u; }",
            "main",
        ),
    ] {
        let e = s.create_kernel(src, entry).unwrap_err();
        assert_eq!(e.kind, GpuErrorKind::Shader, "{src}: {e}");
        assert!(!e.message.is_empty() && !e.message.contains('\n'));
    }
    vector_add(&mut s, 1000);
}

#[test]
fn a_shader_source_bomb_is_refused_before_parsing() {
    let mut s = session();
    let bomb = format!(
        "@compute @workgroup_size(1) fn main() {{ {} }}",
        "let x = 1u;".repeat(100_000)
    );
    let e = s.create_kernel(&bomb, "main").unwrap_err();
    assert_eq!(e.kind, GpuErrorKind::Shader);
    assert!(e.message.contains("over the cap"), "{e}");
}

#[test]
fn out_of_bounds_indexing_is_contained() {
    // wgpu's bounds checks stay on: wild indices read and write inside the buffer (or nowhere).
    let src = r#"
@group(0) @binding(0) var<storage, read_write> xs: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    xs[id.x * 1000003u + 4000000000u] = 7u;
    xs[id.x % 4u] = xs[id.x + 99999999u] + 1u;
}"#;
    let mut s = session();
    let canary = s.create_buffer(64).unwrap();
    s.write(canary, 0, &bytes(&[42; 16])).unwrap();
    let xs = s.create_buffer(16).unwrap();
    let k = s.create_kernel(src, "main").unwrap();
    s.dispatch(k, &[xs], [64, 1, 1]).unwrap();
    assert_eq!(
        u32s(&s.read(canary, 0, 64).unwrap()),
        vec![42; 16],
        "a neighbouring buffer is untouched"
    );
    vector_add(&mut s, 1000);
}

#[test]
fn oversized_and_too_many_buffers_hit_their_limits() {
    let mut s = GpuSession::new(
        gpu(),
        GpuLimits {
            max_buffer_bytes: 1 << 20,
            max_objects: 8,
            ..GpuLimits::default()
        },
    );
    assert_eq!(
        s.create_buffer(2 << 20).unwrap_err().kind,
        GpuErrorKind::Limit(Limit::GpuMemory)
    );
    assert_eq!(
        s.create_buffer(u64::MAX - 3).unwrap_err().kind,
        GpuErrorKind::Limit(Limit::GpuMemory)
    );
    let mut made = Vec::new();
    let e = loop {
        match s.create_buffer(4) {
            Ok(h) => made.push(h),
            Err(e) => break e,
        }
    };
    assert_eq!(e.kind, GpuErrorKind::Limit(Limit::GpuObjects));
    assert_eq!(made.len(), 8);
    for h in made {
        s.destroy(h).unwrap();
    }
    vector_add(&mut s, 1000);
}

#[test]
fn a_huge_dispatch_hits_the_dispatch_limit() {
    let mut s = session();
    let xs = s.create_buffer(4).unwrap();
    let k = s
        .create_kernel("@group(0) @binding(0) var<storage, read_write> x: array<u32>;\n@compute @workgroup_size(1) fn main() { x[0] = 1u; }", "main")
        .unwrap();
    for groups in [[65_535, 65_535, 65_535], [70_000, 1, 1], [4096, 4096, 1]] {
        assert_eq!(
            s.dispatch(k, &[xs], groups).unwrap_err().kind,
            GpuErrorKind::Limit(Limit::GpuDispatch),
            "{groups:?}"
        );
    }
    vector_add(&mut s, 1000);
}

#[test]
fn gpu_work_past_the_time_limit_is_reported() {
    // Every invocation loops as long as lavapipe lets it; far more work than 100 ms.
    let src = r#"
@group(0) @binding(0) var<storage, read_write> xs: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    var acc = id.x;
    for (var i = 0u; i < 60000u; i++) { acc = acc * 1664525u + 1013904223u; }
    xs[id.x % 16u] = acc;
}"#;
    let mut s = GpuSession::new(
        gpu(),
        GpuLimits {
            gpu_time: Duration::from_millis(100),
            ..GpuLimits::default()
        },
    );
    let xs = s.create_buffer(64).unwrap();
    let k = s.create_kernel(src, "main").unwrap();
    let e = s.dispatch(k, &[xs], [2048, 1, 1]).unwrap_err();
    assert_eq!(e.kind, GpuErrorKind::Limit(Limit::GpuTime), "{e}");
    assert!(s.gpu_time_used() < Duration::from_secs(5));
}

#[test]
fn handles_are_private_and_die_with_destroy() {
    let mut mine = session();
    let mut theirs = session();
    let h = theirs.create_buffer(16).unwrap();
    assert_eq!(
        mine.read(h, 0, 16).unwrap_err().kind,
        GpuErrorKind::BadHandle,
        "another task's handle"
    );
    assert_eq!(mine.destroy(h).unwrap_err().kind, GpuErrorKind::BadHandle);
    theirs.destroy(h).unwrap();
    assert_eq!(
        theirs.read(h, 0, 16).unwrap_err().kind,
        GpuErrorKind::BadHandle,
        "use after destroy"
    );
    assert_eq!(
        theirs.write(h, 0, &[0; 4]).unwrap_err().kind,
        GpuErrorKind::BadHandle
    );
    let b = theirs.create_buffer(16).unwrap();
    assert_eq!(
        theirs.read(b, 8, 16).unwrap_err().kind,
        GpuErrorKind::BadArgument,
        "range past the end"
    );
    assert_eq!(
        theirs.write(b, 2, &[0; 4]).unwrap_err().kind,
        GpuErrorKind::BadArgument,
        "misaligned"
    );
    assert_eq!(
        theirs.read(b, u64::MAX - 3, 4).unwrap_err().kind,
        GpuErrorKind::BadArgument,
        "overflowing range"
    );
    assert_eq!(
        theirs.dispatch(b, &[], [1, 1, 1]).unwrap_err().kind,
        GpuErrorKind::BadHandle,
        "a buffer is not a kernel"
    );
    vector_add(&mut mine, 1000);
}

/// The runtime of the GPU sandbox tests: the GPU worker's pipes live on the runtime that started
/// it, as they do on a node, so every test runs its tasks here.
fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// A sandbox whose tasks may use the GPU through its own GPU worker process (`grid`'s), like a
/// node's.
fn new_gpu_sandbox() -> grid_sandbox::Sandbox {
    // Started from a thread of its own, so that this may be called inside `rt().block_on`.
    let worker = std::thread::spawn(|| {
        rt().block_on(grid_sandbox::GpuWorker::start(
            grid_sandbox::WorkerCommand::of(env!("CARGO_BIN_EXE_grid")),
        ))
    })
    .join()
    .expect("starting the GPU worker")
    .unwrap_or_else(|e| panic!("{e}"));
    grid_sandbox::Sandbox::new(grid_sandbox::SandboxConfig {
        gpu: Some(worker),
        ..Default::default()
    })
    .expect("sandbox")
}

/// The sandbox of the well-behaved GPU tests. Tests that bring a worker down use their own, so
/// that they cannot take these tests' GPU objects with them.
fn gpu_sandbox() -> &'static grid_sandbox::Sandbox {
    static SANDBOX: OnceLock<grid_sandbox::Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(new_gpu_sandbox)
}

/// Runs the hostile guest with `args` in `sandbox`, with `/in` and `/out` under `dirs`.
async fn gpu_task_in(
    sandbox: &grid_sandbox::Sandbox,
    dirs: &crate::support::TaskDirs,
    args: &[&str],
    with_gpu: bool,
    gpu_limits: GpuLimits,
) -> grid_sandbox::TaskReport {
    let module = sandbox
        .load(
            &crate::support::guest_bytes("hostile"),
            &grid_sandbox::Limits::default(),
        )
        .await
        .unwrap();
    let mut spec = grid_sandbox::TaskSpec::new(&dirs.output());
    spec.input_dir = Some(dirs.input());
    spec.args = args.iter().map(|a| a.to_string()).collect();
    spec.gpu = with_gpu;
    spec.deterministic = false;
    spec.limits.gpu = gpu_limits;
    sandbox.run(&module, spec).await
}

async fn gpu_task_with(
    args: &[&str],
    with_gpu: bool,
    gpu_limits: GpuLimits,
) -> grid_sandbox::TaskReport {
    let dirs = crate::support::TaskDirs::new();
    gpu_task_in(gpu_sandbox(), &dirs, args, with_gpu, gpu_limits).await
}

async fn gpu_task(mode: &str, with_gpu: bool) -> grid_sandbox::TaskReport {
    gpu_task_with(&[mode], with_gpu, GpuLimits::default()).await
}

/// A guest's GPU task succeeds: the GPU (and its worker) still serve.
async fn assert_a_gpu_task_runs() {
    let r = gpu_task("gpu-double", true).await;
    assert_eq!(
        crate::support::reason(&r),
        "succeeded",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("gpu: "));
}

#[test]
fn a_guest_computes_on_the_gpu_through_the_binding() {
    rt().block_on(async {
        let r = gpu_task("gpu-double", true).await;
        assert_eq!(
            crate::support::reason(&r),
            "succeeded",
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert_eq!(
            String::from_utf8(r.stdout).unwrap(),
            format!("gpu: {}\n", (0..4096u64).map(|v| 2 * v).sum::<u64>())
        );
        assert!(r.gpu_seconds > 0.0, "GPU time is accounted");
    });
}

#[test]
fn without_a_gpu_the_same_module_falls_back_to_the_cpu() {
    rt().block_on(async {
        let r = gpu_task("gpu-double", false).await;
        assert_eq!(
            String::from_utf8(r.stdout).unwrap(),
            format!(
                "cpu fallback: {}\n",
                (0..4096u64).map(|v| 2 * v).sum::<u64>()
            )
        );
    });
}

#[test]
fn wild_pointers_bad_handles_and_bad_wgsl_get_clean_statuses() {
    rt().block_on(async {
        let r = gpu_task("gpu-bad-calls", true).await;
        assert_eq!(
            crate::support::reason(&r),
            "succeeded",
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert_eq!(r.stdout, b"all refused\n");
        assert_a_gpu_task_runs().await;
    });
}

#[test]
fn a_buffer_bomb_ends_the_task_with_limit_gpu_objects() {
    rt().block_on(async {
        let r = gpu_task("gpu-objects-bomb", true).await;
        assert_eq!(crate::support::reason(&r), "limit: gpu-objects");
        assert_a_gpu_task_runs().await;
    });
}

#[test]
fn gpu_memory_past_the_tasks_limit_ends_it() {
    rt().block_on(async {
        // gpu-double needs 16 KiB of buffer.
        let tight = GpuLimits {
            max_buffer_bytes: 1024,
            ..GpuLimits::default()
        };
        let r = gpu_task_with(&["gpu-double"], true, tight).await;
        assert_eq!(crate::support::reason(&r), "limit: gpu-memory");
        assert_a_gpu_task_runs().await;
    });
}

/// A GPU task in `sandbox` succeeds: its GPU worker serves.
async fn assert_a_gpu_task_runs_in(sandbox: &grid_sandbox::Sandbox) {
    let dirs = crate::support::TaskDirs::new();
    let r = gpu_task_in(sandbox, &dirs, &["gpu-double"], true, GpuLimits::default()).await;
    assert_eq!(
        crate::support::reason(&r),
        "succeeded",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// The GPU-time limit holds for GPU work that would run for hours: the node kills its GPU worker,
/// the task ends with `limit: gpu-time`, and the next GPU task runs on a fresh worker.
#[test]
fn gpu_work_that_never_ends_is_stopped_and_the_gpu_serves_again() {
    let sandbox = new_gpu_sandbox();
    rt().block_on(async {
        let worker = sandbox.gpu_worker().expect("a GPU");
        let limits = GpuLimits {
            gpu_time: Duration::from_secs(1),
            ..GpuLimits::default()
        };
        let dirs = crate::support::TaskDirs::new();
        let r = gpu_task_in(&sandbox, &dirs, &["gpu-spin"], true, limits).await;
        assert_eq!(
            crate::support::reason(&r),
            "limit: gpu-time",
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(!String::from_utf8_lossy(&r.stdout).contains("finished"));
        assert_eq!(worker.restarts(), 1, "the worker was killed");
        assert_a_gpu_task_runs_in(&sandbox).await;
        assert_eq!(worker.restarts(), 1);
    });
}

/// The GPU worker dies mid-call (as in a driver crash; here SIGKILL from outside): the task of
/// that call fails with a trap, the node's sandbox goes on, and the next GPU task gets a new worker.
#[test]
fn a_gpu_worker_that_dies_mid_call_fails_that_call_only() {
    let sandbox = Arc::new(new_gpu_sandbox());
    rt().block_on(async {
        let dirs = Arc::new(crate::support::TaskDirs::new());
        let spinner = tokio::spawn({
            let (sandbox, dirs) = (sandbox.clone(), dirs.clone());
            async move {
                gpu_task_in(&sandbox, &dirs, &["gpu-spin"], true, GpuLimits::default()).await
            }
        });
        while !dirs.output().join("dispatching").exists() {
            assert!(!spinner.is_finished(), "the spinner ended early");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let worker = sandbox.gpu_worker().expect("a GPU");
        let pid = worker.pid();
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        let r = spinner.await.unwrap();
        let reason = crate::support::reason(&r);
        assert!(
            reason.starts_with("trap: the GPU worker died"),
            "{reason}"
        );
        assert_a_gpu_task_runs_in(&sandbox).await;
        assert_eq!(worker.restarts(), 1);
    });
}

/// Runs a holder (`gpu-hold` with `hold_args`) while a spinner brings the GPU worker down, and
/// returns the holder's report.
async fn hold_through_a_restart(hold_args: &[&'static str]) -> grid_sandbox::TaskReport {
    let sandbox = Arc::new(new_gpu_sandbox());
    let holder_dirs = Arc::new(crate::support::TaskDirs::new());
    let holder = tokio::spawn({
        let (sandbox, dirs) = (sandbox.clone(), holder_dirs.clone());
        let args: Vec<&'static str> = [&["gpu-hold"], hold_args].concat();
        async move { gpu_task_in(&sandbox, &dirs, &args, true, GpuLimits::default()).await }
    });
    // Once the holder is set, a spinner brings the worker down.
    while !holder_dirs.output().join("holding").exists() {
        assert!(!holder.is_finished(), "the holder ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let limits = GpuLimits {
        gpu_time: Duration::from_millis(500),
        ..GpuLimits::default()
    };
    let dirs = crate::support::TaskDirs::new();
    let spinner = gpu_task_in(&sandbox, &dirs, &["gpu-spin"], true, limits).await;
    assert_eq!(crate::support::reason(&spinner), "limit: gpu-time");
    std::fs::write(holder_dirs.input().join("release"), b"").unwrap();
    let held = holder.await.unwrap();
    assert_a_gpu_task_runs_in(&sandbox).await;
    held
}

/// A task whose GPU objects died with a restarted worker is `lost` (a node hands it back to run
/// again, uncharged), not failed; the task that overran is the one charged.
#[test]
fn a_task_caught_in_a_gpu_worker_restart_is_lost_not_failed() {
    let held = rt().block_on(hold_through_a_restart(&[]));
    assert_eq!(
        crate::support::reason(&held),
        "lost",
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
}

/// A task that holds no GPU objects when the worker restarts (it freed them) goes on in the
/// new worker.
#[test]
fn a_task_holding_no_gpu_objects_survives_a_restart() {
    let held = rt().block_on(hold_through_a_restart(&["none"]));
    assert_eq!(
        crate::support::reason(&held),
        "succeeded",
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&held.stdout), "read [1, 2, 3, 4]\n");
}

#[test]
fn kernels_bind_every_declared_buffer_whatever_the_entry_point_uses() {
    // Two entry points over three bindings; `only_b` uses one of them, `none` uses none.
    let src = r#"
@group(0) @binding(0) var<storage, read> a: array<u32>;
@group(0) @binding(1) var<storage, read_write> b: array<u32>;
@group(0) @binding(2) var<storage, read_write> c: array<u32>;
@compute @workgroup_size(1) fn both(@builtin(global_invocation_id) id: vec3<u32>) { c[id.x] = a[id.x] + b[id.x]; }
@compute @workgroup_size(1) fn only_b(@builtin(global_invocation_id) id: vec3<u32>) { b[id.x] = 7u; }
"#;
    let mut s = session();
    let (a, b, c) = (
        s.create_buffer(16).unwrap(),
        s.create_buffer(16).unwrap(),
        s.create_buffer(16).unwrap(),
    );
    s.write(a, 0, &bytes(&[1, 2, 3, 4])).unwrap();
    let only_b = s.create_kernel(src, "only_b").unwrap();
    s.dispatch(only_b, &[a, b, c], [4, 1, 1]).unwrap();
    let both = s.create_kernel(src, "both").unwrap();
    s.dispatch(both, &[a, b, c], [4, 1, 1]).unwrap();
    assert_eq!(u32s(&s.read(c, 0, 16).unwrap()), [8, 9, 10, 11]);
    let none = s
        .create_kernel("@compute @workgroup_size(1) fn main() {}", "main")
        .unwrap();
    s.dispatch(none, &[], [1, 1, 1]).unwrap();
}

// ---- GPU jobs through the grid ----

use crate::support::{GridProcess, TestGrid, guest};

/// A grid with one CPU-only node and one node that serves the `gpu` class on this machine's GPU.
fn grid_with_a_gpu_node(gpu_slots: &str) -> TestGrid {
    grid_with_a_gpu_node_with(&["--gpu-slots", gpu_slots])
}

/// The same, the GPU node started with `flags`.
fn grid_with_a_gpu_node_with(flags: &[&str]) -> TestGrid {
    let mut grid = TestGrid::start(1, &[]);
    grid.nodes.push(GridProcess::node_with(
        &grid.nats,
        "gpu-node",
        &grid.caches.path().join("gpu-node"),
        2,
        flags,
    ));
    grid.wait_for_nodes(2);
    grid
}

#[test]
fn a_gpu_job_runs_through_the_grid_on_the_gpu_node() {
    let grid = grid_with_a_gpu_node("1");
    let out = grid.grid(&["nodes", "--json"]);
    let nodes: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let gpu_node = nodes.iter().find(|n| n["id"] == "gpu-node").unwrap();
    assert_eq!(gpu_node["classes"], serde_json::json!(["cpu", "gpu"]));
    assert!(
        gpu_node["gpu"].as_str().unwrap().contains("vulkan"),
        "{gpu_node}"
    );
    let cpu_node = nodes.iter().find(|n| n["id"] == "node-0").unwrap();
    assert_eq!(cpu_node["classes"], serde_json::json!(["cpu"]));
    assert!(cpu_node["gpu"].is_null());

    let status = grid.grid_json(
        &[
            "submit",
            guest("hostile").to_str().unwrap(),
            "--gpu",
            "--tasks",
            "4",
            "--wait",
            "--",
            "gpu-double",
        ],
        0,
    );
    assert_eq!(status["state"], "done", "{status}");
    let job = status["job_id"].as_str().unwrap();
    let logs = grid.grid(&["logs", job]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    let expected = format!("gpu: {}", (0..4096u64).map(|v| 2 * v).sum::<u64>());
    assert_eq!(logs.matches(&expected).count(), 4, "{logs}");
    assert!(!logs.contains("cpu fallback"), "{logs}");
    let (_dir, manifest) = grid.results(job);
    assert!(
        manifest.iter().all(|t| t["node"] == "gpu-node"),
        "{manifest:?}"
    );
    // The ledger bills the GPU time the tasks' calls held the GPU, to the GPU node.
    let billed = crate::ledger::usage(&grid, &["--job", job]);
    let gpu_seconds: f64 = manifest
        .iter()
        .map(|t| t["gpu_seconds"].as_f64().unwrap())
        .sum();
    assert!(gpu_seconds > 0.0, "{manifest:?}");
    let billed_gpu = billed["total"]["gpu_seconds"].as_f64().unwrap();
    assert!((billed_gpu - gpu_seconds).abs() < 1e-6, "{billed}");
    assert_eq!(billed["providers"][0]["provider"], "gpu-node", "{billed}");
}

#[test]
fn a_gpu_job_on_a_grid_without_a_gpu_is_refused_at_once() {
    let grid = TestGrid::start(1, &[]);
    let out = grid.grid(&[
        "submit",
        guest("hostile").to_str().unwrap(),
        "--gpu",
        "--wait",
        "--",
        "gpu-double",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no node of this grid has a GPU"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// One job's GPU work runs past its GPU time while another job's GPU tasks run on the same node:
/// the overrun fails alone; tasks caught in the GPU worker's restart run again uncharged.
#[test]
fn a_gpu_overrun_on_a_node_fails_only_its_task() {
    let grid = grid_with_a_gpu_node("3");
    let hostile = guest("hostile");
    let good = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--gpu",
            "--tasks",
            "6",
            "--",
            "gpu-double",
        ],
        0,
    );
    let spin = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--gpu",
            "--gpu-time",
            "1s",
            "--retries",
            "0",
            "--",
            "gpu-spin",
        ],
        0,
    );
    let spin = grid.wait(spin["job_id"].as_str().unwrap());
    assert_eq!(spin["state"], "failed", "{spin}");
    assert_eq!(spin["reason"], "task 0 failed: limit: gpu-time", "{spin}");
    let good_job = good["job_id"].as_str().unwrap();
    let good = grid.wait(good_job);
    assert_eq!(good["state"], "done", "{good}");
    let (_dir, manifest) = grid.results(good_job);
    assert!(
        manifest.iter().all(|t| t["attempts"] == 1),
        "no retry was charged: {manifest:?}"
    );
    // And the node serves GPU work after the overrun.
    let after = grid.grid_json(
        &[
            "submit",
            hostile.to_str().unwrap(),
            "--gpu",
            "--wait",
            "--",
            "gpu-double",
        ],
        0,
    );
    assert_eq!(after["state"], "done", "{after}");
}

#[test]
fn a_gpu_job_whose_gpu_node_died_says_it_waits_for_one() {
    let mut grid = grid_with_a_gpu_node("1");
    let job = grid.grid_json(
        &[
            "submit",
            guest("hostile").to_str().unwrap(),
            "--gpu",
            "--",
            "nap",
            "60000",
        ],
        0,
    );
    let job = job["job_id"].as_str().unwrap();
    grid.nodes[1].kill();
    // The dead node's heartbeat expires with the bucket's TTL; until then it counts as online.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = grid.grid(&["status", job]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("no node of class gpu is online") {
            assert!(out.status.success(), "{stderr}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no note: {stderr}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_node_caps_what_a_gpu_job_asks_for() {
    // The job asks for 1 GiB of GPU memory; this provider takes jobs of 1 KiB at most.
    let grid = grid_with_a_gpu_node_with(&["--max-gpu-memory", "1KiB"]);
    let out = grid.grid(&[
        "submit",
        guest("hostile").to_str().unwrap(),
        "--gpu",
        "--gpu-memory",
        "1GiB",
        "--",
        "gpu-double",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no live node of class gpu takes a job this large")
            && stderr.contains("gpu memory 1 GiB over its 1 KiB"),
        "{stderr}"
    );
}
