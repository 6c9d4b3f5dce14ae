// Fractal value noise in integer arithmetic, so that every GPU and the CPU reference
// (src/lib.rs) give the same bytes. One invocation per pixel of one image.
//
// params: [size, octaves, cell, seed, image]; pixels: size*size words per image, each 0..=255.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read_write> pixels: array<u32>;

fn hash(x: u32, y: u32, seed: u32, octave: u32) -> u32 {
    var h = x * 374761393u + y * 668265263u + seed * 2246822519u + octave * 3266489917u;
    h = (h ^ (h >> 13u)) * 1274126177u;
    return (h ^ (h >> 16u)) & 0xffffu;
}

// 3w² − 2w³ on 0..=255, in 1/256ths.
fn ease(w: i32) -> i32 {
    return (w * w * (768 - 2 * w)) / 65536;
}

fn lerp(a: i32, b: i32, t: i32) -> i32 {
    return a + ((b - a) * t) / 256;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let size = params[0];
    let octaves = params[1];
    let cell0 = params[2];
    let image = params[4];
    let seed = params[3] + image * 2654435761u;
    let pixel = id.x;
    if (pixel >= size * size) {
        return;
    }
    let x = pixel % size;
    let y = pixel / size;
    var total = 0u;
    var most = 0u;
    for (var o = 0u; o < octaves; o++) {
        let cell = max(cell0 >> o, 1u);
        let cx = x / cell;
        let cy = y / cell;
        let wx = ease(i32(((x % cell) * 256u) / cell));
        let wy = ease(i32(((y % cell) * 256u) / cell));
        let top = lerp(i32(hash(cx, cy, seed, o)), i32(hash(cx + 1u, cy, seed, o)), wx);
        let bottom = lerp(i32(hash(cx, cy + 1u, seed, o)), i32(hash(cx + 1u, cy + 1u, seed, o)), wx);
        total += u32(lerp(top, bottom, wy)) >> o;
        most += 65535u >> o;
    }
    pixels[image * size * size + pixel] = (total * 255u) / max(most, 1u);
}
