//! GPU compute for Grid tasks, on wgpu.
//!
//! One [`GpuDevice`] per node; each task gets a [`GpuSession`] over it: its own table of buffers
//! and kernels under integer handles, its own accounting, and hard [`GpuLimits`]. A session frees
//! everything it created when it is dropped, however the task ended. A handle means nothing
//! outside its session, so a task cannot reach another task's objects.
//!
//! WGSL is parsed and validated by naga (with a size cap) before wgpu sees it, and wgpu's own
//! validation runs inside error scopes, so a bad shader or call is an error value, never a panic.
//! wgpu's bounds checks stay on (`create_shader_module`, never the `trusted` variant).
//!
//! **What this crate does not do:** stop GPU work that overruns. wgpu cannot cancel a
//! submission; [`GpuSession::dispatch`] waits at most the remaining GPU time and then reports
//! `limit: gpu-time` with the device left busy. The node therefore runs this code in a separate
//! GPU worker process that it kills and restarts on such an overrun (see ARCHITECTURE.md).

mod device;
mod session;

pub use device::{GpuDevice, GpuInfo};
pub use session::{GpuError, GpuErrorKind, GpuLimits, GpuSession, Handle};

/// Drives a wgpu future to completion. On native backends wgpu's futures are ready at once.
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}
