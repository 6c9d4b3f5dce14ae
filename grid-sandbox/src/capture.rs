//! Captured stdout and stderr, kept up to a cap.
//!
//! Bytes past the cap are dropped and the capture is marked truncated; the guest is told every
//! write succeeded, so a chatty task goes on instead of failing on a full pipe (wasmtime-wasi's
//! `MemoryOutputPipe` traps instead, which would turn a log flood into a failed task).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// One captured stream; clones share the same buffer.
#[derive(Clone)]
pub struct CappedPipe {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl CappedPipe {
    pub fn new(cap: u64) -> Self {
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        Self {
            inner: Arc::new(Mutex::new(Captured {
                cap,
                ..Captured::default()
            })),
        }
    }

    /// The captured bytes and whether any were dropped.
    pub fn take(&self) -> (Vec<u8>, bool) {
        let mut c = self
            .inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        (std::mem::take(&mut c.bytes), c.truncated)
    }

    fn push(&self, buf: &[u8]) {
        let mut c = self
            .inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let room = c.cap.saturating_sub(c.bytes.len());
        let keep = buf.len().min(room);
        c.bytes.extend_from_slice(&buf[..keep]);
        if keep < buf.len() {
            c.truncated = true;
        }
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
