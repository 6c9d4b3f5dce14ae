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

/// A sandbox whose tasks may use the test binary's GPU.
fn gpu_sandbox() -> &'static grid_node::Sandbox {
    static SANDBOX: OnceLock<grid_node::Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        grid_node::Sandbox::new(grid_node::SandboxConfig {
            gpu: Some(gpu()),
            ..Default::default()
        })
        .expect("sandbox")
    })
}

async fn gpu_task(mode: &str, with_gpu: bool) -> grid_node::TaskReport {
    let out = tempfile::tempdir().unwrap();
    let sandbox = gpu_sandbox();
    let module = sandbox
        .load(
            &crate::support::guest_bytes("hostile"),
            &grid_node::Limits::default(),
        )
        .await
        .unwrap();
    let mut spec = grid_node::TaskSpec::new(out.path());
    spec.args = vec![mode.to_string()];
    spec.gpu = with_gpu;
    sandbox.run(&module, spec).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_computes_on_the_gpu_through_the_binding() {
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
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_gpu_the_same_module_falls_back_to_the_cpu() {
    let r = gpu_task("gpu-double", false).await;
    assert_eq!(
        String::from_utf8(r.stdout).unwrap(),
        format!(
            "cpu fallback: {}\n",
            (0..4096u64).map(|v| 2 * v).sum::<u64>()
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wild_pointers_bad_handles_and_bad_wgsl_get_clean_statuses() {
    let r = gpu_task("gpu-bad-calls", true).await;
    assert_eq!(
        crate::support::reason(&r),
        "succeeded",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.stdout, b"all refused\n");
    assert_eq!(
        crate::support::reason(&gpu_task("gpu-double", true).await),
        "succeeded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_buffer_bomb_ends_the_task_with_limit_gpu_objects() {
    let r = gpu_task("gpu-objects-bomb", true).await;
    assert_eq!(crate::support::reason(&r), "limit: gpu-objects");
    assert_eq!(
        crate::support::reason(&gpu_task("gpu-double", true).await),
        "succeeded"
    );
}
