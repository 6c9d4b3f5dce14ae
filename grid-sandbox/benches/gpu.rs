//! The GPU benchmark (`cargo xtask bench gpu` builds its inputs and runs it).
//!
//! Side by side, in one run, on the same GPU: the gpu-noise example (a) as a wasm task in the
//! sandbox, its GPU calls going through `grid_gpu_v1` to the node's GPU worker process, and (b)
//! as a native host program driving the same WGSL through `grid-gpu` (wgpu) in its own process —
//! the same calls (one params write and one dispatch per image, one read), the same PGM files.
//! Then the per-dispatch overhead: many tiny images, where the GPU work is negligible and the
//! difference per image is what the binding, the worker pipe and wasm add.

use gpu_noise::{Noise, cpu_image, pgm};
use grid_gpu::{GpuDevice, GpuLimits, GpuSession};
use grid_sandbox::{GpuWorker, Limits, Sandbox, SandboxConfig, TaskSpec, WorkerCommand};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{median, target_dir};

/// The example's job natively: the same GPU calls and the same files.
fn native(
    gpu: &Arc<GpuDevice>,
    noise: &Noise,
    images: u32,
    out: Option<&Path>,
) -> anyhow::Result<f64> {
    let mut s = GpuSession::new(gpu.clone(), GpuLimits::default());
    let params = s.create_buffer(20)?;
    let pixels = s.create_buffer(u64::from(images) * noise.pixels() as u64 * 4)?;
    let kernel = s.create_kernel(gpu_noise::WGSL, "main")?;
    for image in 0..images {
        let words: Vec<u8> = noise
            .params(image)
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        s.write(params, 0, &words)?;
        s.dispatch(kernel, &[params, pixels], noise.groups())?;
    }
    let bytes = s.read(pixels, 0, u64::from(images) * noise.pixels() as u64 * 4)?;
    let all: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(out) = out {
        for (i, values) in all.chunks(noise.pixels()).enumerate() {
            std::fs::write(
                out.join(format!("noise-{i:02}.pgm")),
                pgm(noise.size, values),
            )?;
        }
    }
    Ok(all.iter().map(|v| f64::from(*v)).sum::<f64>() / all.len() as f64)
}

struct Case {
    name: &'static str,
    /// Write the PGM files (both sides), or only compute the statistics.
    save: bool,
    images: u32,
    size: u32,
    octaves: u32,
    cell: u32,
    reps: usize,
}

fn main() -> anyhow::Result<()> {
    // The bench's own executable is its GPU worker (logging nothing, like the bench itself).
    grid_sandbox::gpu_worker::serve_if_asked(|| {});
    let wasm_path = target_dir().join("wasm32-wasip1/guest/gpu-noise.wasm");
    let wasm = std::fs::read(&wasm_path).map_err(|e| {
        anyhow::anyhow!("{}: {e}; run `cargo xtask bench gpu`", wasm_path.display())
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let worker = rt
        .block_on(GpuWorker::start(WorkerCommand::current_exe()?))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("GPU: {}", worker.info());
    let worker_handle = worker.clone();
    let sandbox = Sandbox::new(SandboxConfig {
        gpu: Some(worker),
        ..Default::default()
    })?;
    let module = rt
        .block_on(sandbox.load(&wasm, &Limits::default()))
        .map_err(|r| anyhow::anyhow!("{r}"))?;
    let gpu = Arc::new(GpuDevice::open(false).map_err(|e| anyhow::anyhow!("{e}"))?);

    let cases = [
        Case {
            name: "example",
            save: true,
            images: 16,
            size: 1024,
            octaves: 8,
            cell: 256,
            reps: 9,
        },
        Case {
            name: "tiny",
            save: false,
            images: 2000,
            size: 8,
            octaves: 1,
            cell: 4,
            reps: 5,
        },
    ];
    let mut per_image = (Duration::ZERO, Duration::ZERO);
    for case in &cases {
        let seed = grid_proto::task_seed(0, 0);
        let noise = Noise {
            size: case.size,
            octaves: case.octaves,
            cell: case.cell,
            seed: (seed ^ (seed >> 32)) as u32,
        };
        let params = format!(
            r#"{{"images": {}, "size": {}, "octaves": {}, "cell": {}, "save": {}, "require_gpu": true}}"#,
            case.images, case.size, case.octaves, case.cell, case.save
        );
        let (mut in_wasm, mut natively) = (Vec::new(), Vec::new());
        // Alternate, after a warm-up of each, so that both see the same machine.
        for rep in 0..=case.reps {
            let out = tempfile::tempdir()?;
            let mut spec = TaskSpec::new(out.path());
            spec.stdin = params.clone().into_bytes();
            spec.gpu = true;
            let started = Instant::now();
            let report = rt.block_on(sandbox.run(&module, spec));
            let took = started.elapsed();
            anyhow::ensure!(
                report.outcome.reason().is_none(),
                "the wasm task failed: {:?} {}",
                report.outcome,
                String::from_utf8_lossy(&report.stderr)
            );
            if rep == 0 && case.save {
                // Once: the wasm task's images are the CPU reference's.
                let first = std::fs::read(out.path().join("noise-00000-00.pgm"))?;
                anyhow::ensure!(first == pgm(noise.size, &cpu_image(&noise, 0)), "GPU ≠ CPU");
            } else {
                in_wasm.push(took);
            }
            let out = tempfile::tempdir()?;
            let started = Instant::now();
            native(&gpu, &noise, case.images, case.save.then_some(out.path()))?;
            if rep > 0 {
                natively.push(started.elapsed());
            }
        }
        // Each wasm run is paired with the native run right after it: the median of the pairs'
        // ratios is steadier on a noisy machine than the ratio of medians.
        let mut ratios: Vec<f64> = in_wasm
            .iter()
            .zip(&natively)
            .map(|(w, n)| w.as_secs_f64() / n.as_secs_f64())
            .collect();
        ratios.sort_by(f64::total_cmp);
        let ratio = ratios[ratios.len() / 2];
        let (w, n) = (median(in_wasm), median(natively));
        println!(
            "{:8} {} images of {}², {} octaves: wasm through the binding {:8.2} ms, native {:8.2} ms → {:.3}× (median of paired runs)",
            case.name,
            case.images,
            case.size,
            case.octaves,
            w.as_secs_f64() * 1e3,
            n.as_secs_f64() * 1e3,
            ratio
        );
        if case.name == "tiny" {
            per_image = (w / case.images, n / case.images);
        }
    }
    // The worker pipe alone: a call the worker answers without touching the GPU.
    let mut session = worker_handle.session(
        GpuLimits::default(),
        Instant::now() + Duration::from_secs(600),
    );
    let calls = 2000u32;
    let started = Instant::now();
    for _ in 0..calls {
        let r =
            rt.block_on(session.call(grid_sandbox::gpu_worker::GpuCall::Destroy { handle: 999 }));
        anyhow::ensure!(r.is_err(), "handle 999 does not exist");
    }
    println!(
        "worker round trip without GPU work: {:.1} µs per call",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(calls)
    );
    println!(
        "per image (one params write + one dispatch, tiny kernel): wasm {:.1} µs, native {:.1} µs → overhead {:.1} µs per image",
        per_image.0.as_secs_f64() * 1e6,
        per_image.1.as_secs_f64() * 1e6,
        (per_image.0.as_secs_f64() - per_image.1.as_secs_f64()) * 1e6
    );
    Ok(())
}
