//! Per-task CPU time on a multi-thread runtime.
//!
//! A task's future may be polled on any worker thread; all of its wasm and WASI work happens
//! inside `poll`. Summing the calling thread's CPU clock around every poll therefore measures
//! exactly this task, whatever else the runtime is doing.

use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pin_project! {
    pub struct CpuTimed<F> {
        #[pin]
        inner: F,
        spent: Duration,
    }
}

impl<F> CpuTimed<F> {
    pub fn new(inner: F) -> Self {
        Self {
            inner,
            spent: Duration::ZERO,
        }
    }
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

impl<F: Future> Future for CpuTimed<F> {
    type Output = (F::Output, Duration);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let before = thread_cpu();
        let polled = this.inner.poll(cx);
        *this.spent += thread_cpu().saturating_sub(before);
        polled.map(|out| (out, *this.spent))
    }
}
