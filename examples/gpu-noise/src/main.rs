//! gpu-noise: procedural noise textures for synthetic training data, drawn on the GPU.
//!
//! Each task draws `images` grayscale textures of `size`² pixels (fractal value noise: `octaves`
//! layers, the coarsest with cells of `cell` pixels) and writes `/out/noise-<task>-<i>.pgm`. The
//! seed comes from the task (`GRID_SEED`), so every task draws different images and a rerun
//! draws the same ones.
//!
//! On a task with a GPU (`grid run --gpu`, `grid submit --gpu`) the kernel in `noise.wgsl` runs
//! through `grid_gpu_v1`, one dispatch per image. Without one it falls back to the CPU reference,
//! which gives the same bytes — unless the params say `"require_gpu": true`. `"cpu": true` forces
//! the CPU path.
//!
//! Run one task:  `grid run --gpu target/wasm32-wasip1/guest/gpu-noise.wasm <<< '{"images": 4}'`

use gpu_noise::{Noise, cpu_image, pgm};
use grid_guest::Task;
use grid_guest::gpu::{self, Gpu, GpuError};

#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Params {
    images: u32,
    size: u32,
    octaves: u32,
    cell: u32,
    /// Fail instead of falling back to the CPU when the task has no GPU.
    require_gpu: bool,
    /// Draw on the CPU even when there is a GPU (for comparisons).
    cpu: bool,
    /// Write the images to /out; without, only their statistics are printed.
    save: bool,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            images: 8,
            size: 256,
            octaves: 5,
            cell: 64,
            require_gpu: false,
            cpu: false,
            save: true,
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("gpu-noise: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let task = Task::current();
    let p: Params = task.params_or_default()?;
    let noise = Noise {
        size: p.size,
        octaves: p.octaves,
        cell: p.cell,
        seed: (task.seed ^ (task.seed >> 32)) as u32,
    };
    noise.check()?;
    if !(1..=4096).contains(&p.images) {
        return Err(format!("images must be 1..=4096, got {}", p.images).into());
    }
    let cpu = || {
        (0..p.images)
            .flat_map(|i| cpu_image(&noise, i))
            .collect::<Vec<u32>>()
    };
    let (images, on) = if p.cpu {
        (cpu(), "CPU")
    } else {
        match gpu::or_cpu(|gpu| draw_on_gpu(gpu, &noise, p.images).map(Some), || None)? {
            Some(images) => (images, "GPU"),
            None if p.require_gpu => {
                return Err(
                    "this task has no GPU and the params say require_gpu: submit with --gpu".into(),
                );
            }
            None => (cpu(), "CPU (no GPU for this task)"),
        }
    };
    for (i, values) in images.chunks(noise.pixels()).enumerate().filter(|_| p.save) {
        let name = format!("noise-{:05}-{i:02}.pgm", task.index);
        std::fs::write(grid_guest::output_dir().join(name), pgm(noise.size, values))?;
    }
    let mean =
        images.iter().map(|v| u64::from(*v)).sum::<u64>() as f64 / images.len().max(1) as f64;
    println!(
        "gpu-noise: {} images of {}x{} on the {on}, mean gray {mean:.2}",
        p.images, noise.size, noise.size
    );
    Ok(())
}

/// All images on the GPU, one after another in one vector: one params write and one dispatch per
/// image, one read at the end.
fn draw_on_gpu(gpu: &Gpu, noise: &Noise, images: u32) -> Result<Vec<u32>, GpuError> {
    let params = gpu.buffer(20)?;
    let pixels = gpu.buffer(u64::from(images) * noise.pixels() as u64 * 4)?;
    let kernel = gpu.kernel(gpu_noise::WGSL, "main")?;
    for image in 0..images {
        params.write_u32(0, &noise.params(image))?;
        kernel.dispatch(&[&params, &pixels], noise.groups())?;
    }
    pixels.read_u32()
}
