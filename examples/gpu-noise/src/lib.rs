//! gpu-noise's kernel and its CPU reference: fractal value noise in integer arithmetic.
//!
//! The WGSL kernel ([`WGSL`]) and [`cpu_image`] compute the same function with the same integer
//! operations (wrapping `u32` products, `i32` division truncating toward zero), so a GPU and the
//! CPU give identical bytes; the example's test checks exactly that. This library has no
//! dependencies, so the benchmark can drive the same kernel from a native host program.

/// The kernel: one invocation per pixel of one image. Bindings: `params`, `pixels`.
pub const WGSL: &str = include_str!("noise.wgsl");
/// Invocations per workgroup (`@workgroup_size` in [`WGSL`]).
pub const WORKGROUP: u32 = 64;
/// Largest image side: one dispatch has at most 65,535 workgroups per dimension.
pub const MAX_SIZE: u32 = 2048;

/// What to draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Noise {
    /// Image side in pixels.
    pub size: u32,
    /// Layers of detail, each half the cell size and half the weight of the last.
    pub octaves: u32,
    /// Cell size of the coarsest octave, in pixels.
    pub cell: u32,
    /// Seed of image 0; image `i` derives its own.
    pub seed: u32,
}

impl Noise {
    /// Checks the parameters; the message names the bad one.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=MAX_SIZE).contains(&self.size) {
            return Err(format!("size must be 1..={MAX_SIZE}, got {}", self.size));
        }
        if !(1..=16).contains(&self.octaves) {
            return Err(format!("octaves must be 1..=16, got {}", self.octaves));
        }
        if self.cell == 0 {
            return Err("cell must be at least 1".into());
        }
        Ok(())
    }

    /// The kernel's `params` buffer for `image`.
    pub fn params(&self, image: u32) -> [u32; 5] {
        [self.size, self.octaves, self.cell, self.seed, image]
    }

    /// Workgroups of one image's dispatch.
    pub fn groups(&self) -> [u32; 3] {
        [(self.size * self.size).div_ceil(WORKGROUP), 1, 1]
    }

    /// Pixels of one image.
    pub fn pixels(&self) -> usize {
        self.size as usize * self.size as usize
    }
}

fn hash(x: u32, y: u32, seed: u32, octave: u32) -> u32 {
    let mut h = x
        .wrapping_mul(374_761_393)
        .wrapping_add(y.wrapping_mul(668_265_263))
        .wrapping_add(seed.wrapping_mul(2_246_822_519))
        .wrapping_add(octave.wrapping_mul(3_266_489_917));
    h = (h ^ (h >> 13)).wrapping_mul(1_274_126_177);
    (h ^ (h >> 16)) & 0xffff
}

fn ease(w: i32) -> i32 {
    (w * w * (768 - 2 * w)) / 65536
}

fn lerp(a: i32, b: i32, t: i32) -> i32 {
    a + ((b - a) * t) / 256
}

/// Image `image` on the CPU: `size²` values in 0..=255, row by row — what the kernel computes.
pub fn cpu_image(noise: &Noise, image: u32) -> Vec<u32> {
    let seed = noise.seed.wrapping_add(image.wrapping_mul(2_654_435_761));
    let mut out = Vec::with_capacity(noise.pixels());
    for y in 0..noise.size {
        for x in 0..noise.size {
            let (mut total, mut most) = (0u32, 0u32);
            for o in 0..noise.octaves {
                let cell = (noise.cell >> o).max(1);
                let (cx, cy) = (x / cell, y / cell);
                let wx = ease((((x % cell) * 256) / cell) as i32);
                let wy = ease((((y % cell) * 256) / cell) as i32);
                let h = |dx: u32, dy: u32| {
                    hash(cx.wrapping_add(dx), cy.wrapping_add(dy), seed, o) as i32
                };
                let top = lerp(h(0, 0), h(1, 0), wx);
                let bottom = lerp(h(0, 1), h(1, 1), wx);
                total += (lerp(top, bottom, wy) as u32) >> o;
                most += 65535 >> o;
            }
            out.push((total * 255) / most.max(1));
        }
    }
    out
}

/// A binary PGM (P5) of 8-bit gray values.
pub fn pgm(size: u32, values: &[u32]) -> Vec<u8> {
    let mut out = format!("P5\n{size} {size}\n255\n").into_bytes();
    out.extend(values.iter().map(|v| (*v).min(255) as u8));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_differ_and_span_the_gray_range() {
        let noise = Noise {
            size: 64,
            octaves: 4,
            cell: 16,
            seed: 7,
        };
        let (a, b) = (cpu_image(&noise, 0), cpu_image(&noise, 1));
        assert_ne!(a, b);
        assert!(a.iter().all(|v| *v <= 255));
        let (lo, hi) = (a.iter().min().unwrap(), a.iter().max().unwrap());
        assert!(hi - lo > 100, "{lo}..{hi}");
    }
}
