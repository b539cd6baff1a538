//! Closing connections that carry no bytes at all for a long time.
//!
//! hyper closes an HTTP/1 connection that sends no request head within `HEAD_TIMEOUT`, but an
//! HTTP/2 connection with no stream open stays with it for ever: a caller could hold every
//! connection slot with connections that only ever sent a preface. [`IdleIo`] notes when bytes
//! moved either way; [`Activity::idle`] completes once none have for a given time, and the
//! connection is then dropped. Any traffic at all (a request, a body chunk, a ping) counts. The
//! same watch ends an exchange that stalls with its connection: a caller that stops reading
//! its answer, or an app that stops in the middle of one, would otherwise hold the connection
//! and the tunnel's stream for ever.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Whether bytes moved on one connection since its watch last looked.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Set by every read or write that moves bytes (a plain store: this is on every
    /// request's path), cleared by [`Activity::idle`] when it looks.
    moved: AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::default()
    }

    fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `limit`, noticed within a quarter of it: it
    /// looks every `limit / 4`, so it completes between `limit` and `limit * 5 / 4` after the
    /// last byte.
    pub(crate) async fn idle(&self, limit: Duration) {
        let step = limit / 4;
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(step).await;
            if self.moved.swap(false, Ordering::Relaxed) {
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= limit {
                return;
            }
        }
    }
}

/// A connection's stream that records its [`Activity`].
#[derive(Debug)]
pub(crate) struct IdleIo<S> {
    io: S,
    activity: Arc<Activity>,
}

impl<S> IdleIo<S> {
    pub(crate) fn new(io: S, activity: Arc<Activity>) -> Self {
        IdleIo { io, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test(start_paused = true)]
    async fn idle_completes_only_after_the_limit_without_traffic() {
        let (near, mut far) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = IdleIo::new(near, activity.clone());
        let limit = Duration::from_secs(60);
        let watch = tokio::spawn({
            let activity = activity.clone();
            async move {
                activity.idle(limit).await;
                Instant::now()
            }
        });
        // A byte each way every 40 s, for over three times the limit: not idle.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            far.write_all(b"x").await.unwrap();
            let _ = io.read(&mut [0u8; 8]).await.unwrap();
            io.write_all(b"y").await.unwrap();
            assert!(!watch.is_finished(), "idle while bytes moved");
        }
        let last = Instant::now();
        let done = watch.await.unwrap();
        assert!(done - last >= limit, "{:?}", done - last);
        assert!(done - last <= limit * 5 / 4, "{:?}", done - last);
    }
}
