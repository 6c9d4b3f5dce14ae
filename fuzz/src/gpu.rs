//! The `gpu` target: scripts of `grid_gpu_v1` calls made by a real guest through the node's
//! GPU worker (lavapipe on CPU-only machines).
//!
//! The guest (`DRIVER`) reads a script from stdin — a count, then 32-byte records `op, a, b
//! (i64), c, d, e, f` — makes each call with exactly those values (wild ones included), and
//! prints one status byte per call. A handle argument with its top bit set is read from guest
//! memory instead (slot `a & 0x3fc`), which is where `buffer_create` and `kernel_create` were
//! told to write theirs: that is how a script uses handles it cannot know in advance. The
//! script is shaped from the fuzz input here, so most calls are plausible and some are not.

use crate::Verdict;
use arbitrary::Unstructured;
use grid_proto::Outcome;
use grid_sandbox::{
    GpuWorker, Limits, LoadedModule, Sandbox, SandboxConfig, TaskSpec, WorkerCommand,
};
use std::time::{Duration, Instant};

/// Where things live in the driver's memory.
const SLOTS: u32 = 256; // handles written by create calls: 16 slots of 4 bytes
const STATUS: u32 = 2048; // one status byte per call
const DATA: u32 = 4096; // buffer contents to write, and room to read into (16 KiB)
const CORPUS: u32 = 20480; // WGSL sources and the entry name
const SCRIPT: u32 = 65536; // stdin: the count, the records, then any mangled WGSL
const MEMORY_BYTES: u32 = 4 * 65536;

const VECTOR_ADD: &str = "@group(0) @binding(0) var<storage, read> a: array<u32>;
@group(0) @binding(1) var<storage, read> b: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&out)) { out[id.x] = a[id.x] + b[id.x]; }
}";

/// Kernels scripts may use (and mangle): the good, the looping, the out-of-bounds, the invalid.
const KERNELS: &[&str] = &[
    VECTOR_ADD,
    "@group(0) @binding(0) var<storage, read_write> x: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) { x[id.x * 1000u] = id.x; }",
    "@group(0) @binding(0) var<storage, read_write> x: array<u32>;
@compute @workgroup_size(8)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    var s = 0u;
    for (var i = 0u; i < 5000u; i++) { s += i * id.x; }
    x[id.x % arrayLength(&x)] = s;
}",
    "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }",
    "@group(2) @binding(7) var<uniform> u: vec4<f32>;
@compute @workgroup_size(300, 300) fn main() { }",
];

/// The corpus as laid out in the driver's memory at `CORPUS`.
struct Corpus {
    bytes: Vec<u8>,
    /// (offset, length) of each of `KERNELS`.
    kernels: Vec<(u32, u32)>,
    /// (offset, length) of the entry point's name, `main`.
    main: (u32, u32),
}

fn corpus() -> Corpus {
    let mut bytes = Vec::new();
    let mut kernels = Vec::new();
    for k in KERNELS {
        kernels.push((CORPUS + bytes.len() as u32, k.len() as u32));
        bytes.extend_from_slice(k.as_bytes());
    }
    let main = (CORPUS + bytes.len() as u32, 4);
    bytes.extend_from_slice(b"main");
    Corpus {
        bytes,
        kernels,
        main,
    }
}

fn driver_wat() -> String {
    let data: String = corpus()
        .bytes
        .iter()
        .map(|b| format!("\\{b:02x}"))
        .collect();
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "grid_gpu_v1" "buffer_create" (func $buffer_create (param i64 i32) (result i32)))
  (import "grid_gpu_v1" "buffer_write" (func $buffer_write (param i32 i64 i32 i32) (result i32)))
  (import "grid_gpu_v1" "buffer_read" (func $buffer_read (param i32 i64 i32 i32) (result i32)))
  (import "grid_gpu_v1" "kernel_create" (func $kernel_create (param i32 i32 i32 i32 i32) (result i32)))
  (import "grid_gpu_v1" "dispatch" (func $dispatch (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "grid_gpu_v1" "destroy" (func $destroy (param i32) (result i32)))
  (import "grid_gpu_v1" "last_error" (func $last_error (param i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (data (i32.const {CORPUS}) "{data}")
  (func $h (param $x i32) (result i32)
    (if (result i32) (i32.lt_s (local.get $x) (i32.const 0))
      (then (i32.load (i32.and (local.get $x) (i32.const 0x3fc))))
      (else (local.get $x))))
  (func (export "_start")
    (local $end i32) (local $n i32) (local $p i32) (local $op i32) (local $i i32) (local $s i32)
    (local.set $end (i32.const {SCRIPT}))
    (block $done (loop $read
      (i32.store (i32.const 0) (local.get $end))
      (i32.store (i32.const 4) (i32.sub (i32.const {MEMORY_BYTES}) (local.get $end)))
      (br_if $done (i32.eqz (i32.load (i32.const 4))))
      (br_if $done (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br_if $done (i32.eqz (i32.load (i32.const 8))))
      (local.set $end (i32.add (local.get $end) (i32.load (i32.const 8))))
      (br $read)))
    (local.set $n (i32.load (i32.const {SCRIPT})))
    (local.set $p (i32.const {first}))
    (block $out (loop $each
      (br_if $out (i32.ge_u (local.get $i) (local.get $n)))
      (br_if $out (i32.ge_u (local.get $i) (i32.const 1024)))
      (br_if $out (i32.gt_u (i32.add (local.get $p) (i32.const 32)) (local.get $end)))
      (local.set $op (i32.load (local.get $p)))
      (local.set $s (i32.const 255))
      (if (i32.eq (local.get $op) (i32.const 0)) (then (local.set $s
        (call $buffer_create (i64.load offset=8 (local.get $p)) (i32.load offset=4 (local.get $p)))))) 
      (if (i32.eq (local.get $op) (i32.const 1)) (then (local.set $s
        (call $buffer_write (call $h (i32.load offset=4 (local.get $p))) (i64.load offset=8 (local.get $p))
          (i32.load offset=16 (local.get $p)) (i32.load offset=20 (local.get $p)))))) 
      (if (i32.eq (local.get $op) (i32.const 2)) (then (local.set $s
        (call $buffer_read (call $h (i32.load offset=4 (local.get $p))) (i64.load offset=8 (local.get $p))
          (i32.load offset=16 (local.get $p)) (i32.load offset=20 (local.get $p)))))) 
      (if (i32.eq (local.get $op) (i32.const 3)) (then (local.set $s
        (call $kernel_create (i32.load offset=16 (local.get $p)) (i32.load offset=20 (local.get $p))
          (i32.load offset=24 (local.get $p)) (i32.load offset=28 (local.get $p)) (i32.load offset=4 (local.get $p)))))) 
      (if (i32.eq (local.get $op) (i32.const 4)) (then (local.set $s
        (call $dispatch (call $h (i32.load offset=4 (local.get $p))) (i32.load offset=16 (local.get $p))
          (i32.load offset=20 (local.get $p)) (i32.load offset=24 (local.get $p)) (i32.load offset=28 (local.get $p))
          (i32.wrap_i64 (i64.load offset=8 (local.get $p))))))) 
      (if (i32.eq (local.get $op) (i32.const 5)) (then (local.set $s
        (call $destroy (call $h (i32.load offset=4 (local.get $p))))))) 
      (if (i32.eq (local.get $op) (i32.const 6)) (then (local.set $s
        (call $last_error (i32.load offset=16 (local.get $p)) (i32.load offset=20 (local.get $p))
          (i32.load offset=4 (local.get $p)))))) 
      (i32.store8 (i32.add (i32.const {STATUS}) (local.get $i)) (local.get $s))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (local.set $p (i32.add (local.get $p) (i32.const 32)))
      (br $each)))
    (i32.store (i32.const 16) (i32.const {STATUS}))
    (i32.store (i32.const 20) (local.get $i))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))"#,
        first = SCRIPT + 4,
    )
}

/// One call of a script.
#[derive(Default, Clone, Copy)]
struct Call {
    op: i32,
    a: i32,
    b: i64,
    c: i32,
    d: i32,
    e: i32,
    f: i32,
}

/// A handle argument read from slot `k`.
fn slot(k: u32) -> i32 {
    (0x8000_0000u32 | (SLOTS + 4 * (k % 16))) as i32
}

/// Encodes calls (and WGSL placed after them) as the driver's stdin.
fn script(calls: &[Call], extra: &[u8]) -> Vec<u8> {
    let mut bytes = (calls.len() as u32).to_le_bytes().to_vec();
    for c in calls {
        bytes.extend_from_slice(&c.op.to_le_bytes());
        bytes.extend_from_slice(&c.a.to_le_bytes());
        bytes.extend_from_slice(&c.b.to_le_bytes());
        for v in [c.c, c.d, c.e, c.f] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    bytes.extend_from_slice(extra);
    bytes
}

/// Shapes a script from fuzz bytes: mostly plausible calls, one in eight with a wild value.
fn shape(input: &[u8]) -> arbitrary::Result<Vec<u8>> {
    let mut u = Unstructured::new(input);
    let Corpus {
        kernels: spans,
        main,
        ..
    } = corpus();
    let n: u32 = u.int_in_range(1..=40)?;
    let extra_at = SCRIPT + 4 + 32 * n;
    let mut extra = Vec::new();
    // Half the scripts start from three buffers and a kernel, so that later calls often find
    // live handles to misuse.
    let mut calls = if u.ratio(1u8, 2)? {
        setup_calls()
    } else {
        Vec::new()
    };
    let extra_at = extra_at + 32 * calls.len() as u32;
    for _ in 0..n {
        let wild = u.ratio(1u8, 8)?;
        let mut c = Call {
            op: u.int_in_range(0..=6)?,
            a: slot(u.int_in_range(0..=15)?),
            ..Call::default()
        };
        let (ptr, len) = if wild {
            (u.arbitrary()?, u.arbitrary()?)
        } else {
            (DATA as i32, u.int_in_range(0..=4096)?)
        };
        match c.op {
            0 => {
                c.b = if wild {
                    u.arbitrary()?
                } else {
                    u.int_in_range(0..=65536)?
                };
                if wild {
                    c.a = u.arbitrary()?;
                }
            }
            1 | 2 => {
                c.b = if wild {
                    u.arbitrary()?
                } else {
                    u.int_in_range(0..=8192)?
                };
                (c.c, c.d) = (ptr, len);
                if wild {
                    c.a = u.arbitrary()?;
                }
            }
            3 => {
                let (at, len) = spans[u.choose_index(spans.len())?];
                if u.ratio(1u8, 4)? {
                    // A mangled copy of a corpus kernel, after the records.
                    let k = KERNELS[u.choose_index(KERNELS.len())?].as_bytes();
                    let mut text = k.to_vec();
                    for _ in 0..u.int_in_range(1..=8)? {
                        let i = u.choose_index(text.len())?;
                        text[i] = u.arbitrary()?;
                    }
                    c.c = (extra_at + extra.len() as u32) as i32;
                    c.d = text.len() as i32;
                    extra.extend_from_slice(&text);
                } else {
                    (c.c, c.d) = (at as i32, len as i32);
                }
                (c.e, c.f) = (main.0 as i32, main.1 as i32);
                if wild {
                    (c.c, c.d, c.e, c.f) = (
                        u.arbitrary()?,
                        u.arbitrary()?,
                        u.arbitrary()?,
                        u.arbitrary()?,
                    );
                }
            }
            4 => {
                if u.ratio(1u8, 2)? {
                    c.a = slot(3); // the set-up kernel
                }
                // A list of handles from the slots.
                c.c = (SLOTS + 4 * u.int_in_range(0..=12)?) as i32;
                c.d = u.int_in_range(0..=4)?;
                c.e = u.int_in_range(0..=64)?;
                (c.f, c.b) = (1, 1);
                if wild {
                    (c.c, c.d, c.e, c.f, c.b) = (
                        u.arbitrary()?,
                        u.arbitrary()?,
                        u.arbitrary()?,
                        u.arbitrary()?,
                        u.arbitrary()?,
                    );
                }
            }
            5 => {
                if wild {
                    c.a = u.arbitrary()?;
                }
            }
            _ => {
                (c.c, c.d) = (ptr, len.min(1024));
                c.a = (STATUS - 8) as i32;
                if wild {
                    c.a = u.arbitrary()?;
                }
            }
        }
        // Create calls write their handle into slot `k`: the address, not a handle.
        if matches!(c.op, 0 | 3) && !wild {
            c.a = (SLOTS + 4 * (calls.len() as u32 % 16)) as i32;
        }
        calls.push(c);
    }
    Ok(script(&calls, &extra))
}

/// Three buffers of 256 bytes filled from `DATA` (slots 0–2) and the vector-add kernel (slot 3).
fn setup_calls() -> Vec<Call> {
    let Corpus {
        kernels: spans,
        main,
        ..
    } = corpus();
    let at = |k: u32| (SLOTS + 4 * k) as i32;
    let mut calls = Vec::new();
    for k in 0..3 {
        calls.push(Call {
            op: 0,
            a: at(k),
            b: 256,
            ..Call::default()
        });
        calls.push(Call {
            op: 1,
            a: slot(k),
            b: 0,
            c: DATA as i32,
            d: 256,
            ..Call::default()
        });
    }
    calls.push(Call {
        op: 3,
        a: at(3),
        c: spans[0].0 as i32,
        d: spans[0].1 as i32,
        e: main.0 as i32,
        f: main.1 as i32,
        ..Call::default()
    });
    calls
}

/// The good task: vector add of 64 values in three fresh buffers; every status must be 0.
fn good_script() -> Vec<u8> {
    let at = |k: u32| (SLOTS + 4 * k) as i32;
    let mut calls = setup_calls();
    calls.push(Call {
        op: 4,
        a: slot(3),
        b: 1,
        c: at(0),
        d: 3,
        e: 1,
        f: 1,
    });
    calls.push(Call {
        op: 2,
        a: slot(2),
        b: 0,
        c: DATA as i32,
        d: 256,
        ..Call::default()
    });
    for k in 0..4 {
        calls.push(Call {
            op: 5,
            a: slot(k),
            ..Call::default()
        });
    }
    script(&calls, &[])
}

pub struct Fuzzer {
    sandbox: Sandbox,
    driver: LoadedModule,
}

impl Fuzzer {
    pub async fn new() -> anyhow::Result<Self> {
        let worker = GpuWorker::start(WorkerCommand::current_exe()?)
            .await
            .map_err(|e| anyhow::anyhow!("the GPU target needs a GPU: {e}"))?;
        let sandbox = Sandbox::new(SandboxConfig {
            gpu: Some(worker),
            ..SandboxConfig::default()
        })?;
        let driver = sandbox
            .load(&wat::parse_str(driver_wat())?, &Limits::default())
            .await
            .map_err(|r| anyhow::anyhow!("the GPU driver guest was refused: {r}"))?;
        Ok(Self { sandbox, driver })
    }

    async fn run(&self, stdin: Vec<u8>) -> (grid_sandbox::TaskReport, Duration) {
        let out = tempfile::tempdir().expect("temp dir");
        let mut spec = TaskSpec::new(out.path());
        spec.gpu = true;
        spec.stdin = stdin;
        spec.limits = Limits {
            memory_bytes: 16 << 20,
            timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        spec.limits.gpu.max_buffer_bytes = 4 << 20;
        spec.limits.gpu.max_objects = 12;
        spec.limits.gpu.max_workgroups_per_dispatch = 1 << 12;
        spec.limits.gpu.max_dispatches = 16;
        spec.limits.gpu.gpu_time = Duration::from_secs(2);
        let started = Instant::now();
        let report = self.sandbox.run(&self.driver, spec).await;
        (report, started.elapsed())
    }

    pub async fn case(&self, input: &[u8]) -> Verdict {
        let Ok(stdin) = shape(input) else {
            return Ok("too little input".into());
        };
        let (report, took) = self.run(stdin).await;
        // The worker may be killed and restarted on an overrun: allow for that, not for a hang.
        if took > Duration::from_secs(20) {
            return Err(format!(
                "the task took {took:?} under a 5 s limit ({:?})",
                report.outcome
            ));
        }
        let label = crate::sandbox::label(&report);
        if std::env::var_os("GRID_FUZZ_VERBOSE").is_some() {
            let mut by_status = [0u32; 8];
            for s in &report.stdout {
                by_status[usize::from(*s).min(7)] += 1;
            }
            return Ok(format!("{label} statuses {by_status:?}"));
        }
        Ok(label)
    }

    /// A good GPU task succeeds, with every call answering 0.
    pub async fn good_task_succeeds(&self) -> Result<(), String> {
        let (report, _) = self.run(good_script()).await;
        if report.outcome != Outcome::Succeeded
            || report.stdout.iter().any(|s| *s != 0)
            || report.stdout.len() != 13
        {
            return Err(format!(
                "a good GPU task failed afterwards: {:?}, statuses {:?}, stderr {}",
                report.outcome,
                report.stdout,
                String::from_utf8_lossy(&report.stderr)
            ));
        }
        Ok(())
    }
}
