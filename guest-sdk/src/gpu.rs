//! GPU compute from inside the sandbox: WGSL kernels on whatever GPU the node has.
//!
//! ```no_run
//! use grid_guest::gpu::Gpu;
//! let gpu = Gpu::open().expect("this task has a GPU");
//! let a = gpu.buffer_from(&[1u32, 2, 3, 4]).unwrap();
//! let kernel = gpu.kernel(r#"
//!     @group(0) @binding(0) var<storage, read_write> xs: array<u32>;
//!     @compute @workgroup_size(64)
//!     fn main(@builtin(global_invocation_id) id: vec3<u32>) {
//!         if (id.x < arrayLength(&xs)) { xs[id.x] = xs[id.x] * 2u; }
//!     }"#, "main").unwrap();
//! kernel.dispatch(&[&a], [1, 1, 1]).unwrap();
//! assert_eq!(a.read_u32().unwrap(), [2, 4, 6, 8]);
//! ```
//!
//! # The ABI (`grid_gpu_v1`), for guests in other languages
//! All functions return an `i32` status: 0 ok, 1 bad handle, 2 bad argument (any pointer or
//! length outside guest memory, misaligned sizes, wrong binding count), 3 shader error, 4 device
//! error, 5 no GPU for this task. After a non-zero status, `last_error` gives a one-line message.
//! A hard limit (`gpu-memory`, `gpu-objects`, `gpu-dispatch`, `gpu-time`) ends the task instead of
//! returning. Handles are `u32`, private to the task. Sizes and offsets are multiples of 4.
//!
//! | function | arguments | result |
//! |---|---|---|
//! | `buffer_create` | `size: i64, out_handle: *mut u32` | a zeroed storage buffer |
//! | `buffer_write` | `handle: u32, offset: i64, ptr: *const u8, len: u32` | copies guest bytes in |
//! | `buffer_read` | `handle: u32, offset: i64, ptr: *mut u8, len: u32` | copies buffer bytes out (after all earlier work) |
//! | `kernel_create` | `src: *const u8, src_len: u32, entry: *const u8, entry_len: u32, out_handle: *mut u32` | a compute pipeline from WGSL; bindings must be `@group(0) @binding(0..n)` storage buffers |
//! | `dispatch` | `kernel: u32, handles: *const u32, count: u32, x: u32, y: u32, z: u32` | runs and waits |
//! | `destroy` | `handle: u32` | frees a buffer or kernel |
//! | `last_error` | `ptr: *mut u8, len: u32, out_len: *mut u32` | the last error's message |
//!
//! Version: `grid_gpu_v1` is version 1; an incompatible change gets a new module name.

use std::fmt;

/// The raw `grid_gpu_v1` imports, as the table above describes them. Prefer [`Gpu`]: these
/// take raw pointers and return bare statuses.
#[cfg(target_os = "wasi")]
pub mod abi {
    #[link(wasm_import_module = "grid_gpu_v1")]
    unsafe extern "C" {
        pub fn buffer_create(size: i64, out: *mut u32) -> i32;
        pub fn buffer_write(h: u32, offset: i64, ptr: *const u8, len: u32) -> i32;
        pub fn buffer_read(h: u32, offset: i64, ptr: *mut u8, len: u32) -> i32;
        pub fn kernel_create(
            src: *const u8,
            src_len: u32,
            entry: *const u8,
            entry_len: u32,
            out: *mut u32,
        ) -> i32;
        pub fn dispatch(
            kernel: u32,
            handles: *const u32,
            count: u32,
            x: u32,
            y: u32,
            z: u32,
        ) -> i32;
        pub fn destroy(h: u32) -> i32;
        pub fn last_error(ptr: *mut u8, len: u32, out: *mut u32) -> i32;
    }
}

/// Outside a Grid sandbox there is no `grid_gpu_v1`: every call answers "no GPU".
#[cfg(not(target_os = "wasi"))]
#[allow(clippy::missing_safety_doc)]
pub mod abi {
    pub unsafe fn buffer_create(_: i64, _: *mut u32) -> i32 {
        5
    }
    pub unsafe fn buffer_write(_: u32, _: i64, _: *const u8, _: u32) -> i32 {
        5
    }
    pub unsafe fn buffer_read(_: u32, _: i64, _: *mut u8, _: u32) -> i32 {
        5
    }
    pub unsafe fn kernel_create(_: *const u8, _: u32, _: *const u8, _: u32, _: *mut u32) -> i32 {
        5
    }
    pub unsafe fn dispatch(_: u32, _: *const u32, _: u32, _: u32, _: u32, _: u32) -> i32 {
        5
    }
    pub unsafe fn destroy(_: u32) -> i32 {
        5
    }
    pub unsafe fn last_error(_: *mut u8, _: u32, _: *mut u32) -> i32 {
        5
    }
}

/// A failed GPU call: its status and the host's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuError {
    pub status: i32,
    pub message: String,
}

impl GpuError {
    /// The task has no GPU (the node has none, or the job did not ask for one).
    pub fn is_unavailable(&self) -> bool {
        self.status == 5
    }
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GPU error {}: {}", self.status, self.message)
    }
}

impl std::error::Error for GpuError {}

fn check(status: i32) -> Result<(), GpuError> {
    if status == 0 {
        return Ok(());
    }
    let mut buf = vec![0u8; 1024];
    let mut len = 0u32;
    // SAFETY: buf and len are live and sized as passed.
    let message = if unsafe { abi::last_error(buf.as_mut_ptr(), buf.len() as u32, &mut len) } == 0 {
        String::from_utf8_lossy(&buf[..len as usize]).into_owned()
    } else {
        "no GPU available".into()
    };
    Err(GpuError { status, message })
}

/// Runs `on_gpu` with the task's GPU, or `on_cpu` when the task has none (the job did not ask
/// for one, or the node has none) — the CPU fallback hook, so one module runs everywhere. Any
/// other GPU error is returned. A job that must not fall back checks for the CPU result itself.
///
/// ```no_run
/// let sum = grid_guest::gpu::or_cpu(
///     |gpu| {
///         let xs = gpu.buffer_from(&[1, 2, 3])?;
///         Ok(xs.read_u32()?.iter().sum::<u32>())
///     },
///     || 1 + 2 + 3,
/// )
/// .expect("no GPU error");
/// ```
pub fn or_cpu<T>(
    on_gpu: impl FnOnce(&Gpu) -> Result<T, GpuError>,
    on_cpu: impl FnOnce() -> T,
) -> Result<T, GpuError> {
    match Gpu::open() {
        Ok(gpu) => on_gpu(&gpu),
        Err(e) if e.is_unavailable() => Ok(on_cpu()),
        Err(e) => Err(e),
    }
}

/// The task's GPU.
#[derive(Debug)]
pub struct Gpu(());

impl Gpu {
    /// The GPU, if this task has one; `Err` with [`GpuError::is_unavailable`] otherwise — the
    /// place to fall back to a CPU path.
    pub fn open() -> Result<Self, GpuError> {
        // A zero-size request is always refused; "no GPU" is told apart by its status.
        let mut h = 0;
        // SAFETY: h is live.
        match check(unsafe { abi::buffer_create(0, &mut h) }) {
            Err(e) if e.is_unavailable() => Err(e),
            _ => Ok(Self(())),
        }
    }

    /// A zeroed buffer of `size` bytes (a multiple of 4).
    pub fn buffer(&self, size: u64) -> Result<Buffer, GpuError> {
        let mut h = 0;
        // SAFETY: h is live.
        check(unsafe { abi::buffer_create(size as i64, &mut h) })?;
        Ok(Buffer { handle: h, size })
    }

    /// A buffer holding `values` (WGSL `array<u32>`).
    pub fn buffer_from(&self, values: &[u32]) -> Result<Buffer, GpuError> {
        let buffer = self.buffer(values.len() as u64 * 4)?;
        buffer.write_u32(0, values)?;
        Ok(buffer)
    }

    /// A buffer holding `values` (WGSL `array<f32>`).
    pub fn buffer_from_f32(&self, values: &[f32]) -> Result<Buffer, GpuError> {
        let bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        self.buffer_from(&bits)
    }

    /// A compute kernel from WGSL source and the name of its `@compute` entry point.
    pub fn kernel(&self, wgsl: &str, entry: &str) -> Result<Kernel, GpuError> {
        let mut h = 0;
        // SAFETY: pointers and lengths come from live &str values; h is live.
        check(unsafe {
            abi::kernel_create(
                wgsl.as_ptr(),
                wgsl.len() as u32,
                entry.as_ptr(),
                entry.len() as u32,
                &mut h,
            )
        })?;
        Ok(Kernel { handle: h })
    }
}

/// A GPU storage buffer; freed when dropped.
#[derive(Debug)]
pub struct Buffer {
    handle: u32,
    size: u64,
}

impl Buffer {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), GpuError> {
        // SAFETY: the slice is live for the call.
        check(unsafe {
            abi::buffer_write(
                self.handle,
                offset as i64,
                bytes.as_ptr(),
                bytes.len() as u32,
            )
        })
    }

    /// The whole buffer's bytes.
    pub fn read(&self) -> Result<Vec<u8>, GpuError> {
        let mut bytes = vec![0u8; self.size as usize];
        // SAFETY: the vector is live and as long as passed.
        check(unsafe { abi::buffer_read(self.handle, 0, bytes.as_mut_ptr(), bytes.len() as u32) })?;
        Ok(bytes)
    }

    /// Writes `values` at byte `offset` (a multiple of 4).
    pub fn write_u32(&self, offset: u64, values: &[u32]) -> Result<(), GpuError> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.write(offset, &bytes)
    }

    /// The whole buffer as `f32`s.
    pub fn read_f32(&self) -> Result<Vec<f32>, GpuError> {
        Ok(self.read_u32()?.into_iter().map(f32::from_bits).collect())
    }

    /// The whole buffer as `u32`s, read straight into the vector.
    pub fn read_u32(&self) -> Result<Vec<u32>, GpuError> {
        let mut values = vec![0u32; (self.size / 4) as usize];
        // SAFETY: the vector is live and holds `values.len() * 4` bytes; wasm is little-endian,
        // as the GPU buffer's contents are.
        check(unsafe {
            abi::buffer_read(
                self.handle,
                0,
                values.as_mut_ptr().cast::<u8>(),
                (values.len() * 4) as u32,
            )
        })?;
        Ok(values)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: no pointers.
        unsafe { abi::destroy(self.handle) };
    }
}

/// A compute kernel; freed when dropped.
#[derive(Debug)]
pub struct Kernel {
    handle: u32,
}

impl Kernel {
    /// Runs the kernel over `groups` workgroups with `buffers` at `@binding(0..)`, and waits.
    pub fn dispatch(&self, buffers: &[&Buffer], groups: [u32; 3]) -> Result<(), GpuError> {
        let handles: Vec<u32> = buffers.iter().map(|b| b.handle).collect();
        // SAFETY: the handle list is live for the call.
        check(unsafe {
            abi::dispatch(
                self.handle,
                handles.as_ptr(),
                handles.len() as u32,
                groups[0],
                groups[1],
                groups[2],
            )
        })
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // SAFETY: no pointers.
        unsafe { abi::destroy(self.handle) };
    }
}
