//! Closing connections that carry no bytes at all for a long time.
//!
//! hyper closes an HTTP/1 connection that sends no request head within `HEAD_TIMEOUT`, but an
//! HTTP/2 connection with no stream open stays with it for ever: a caller could hold every
//! connection slot with connections that only ever sent a preface. [`IdleIo`] notes when bytes
//! last moved either way; [`Activity::idle`] completes once none have for a given time, and
//! the connection is then dropped. Any traffic at all (a request, a body chunk, a ping) counts.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When bytes last moved on one connection.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last read or write that moved bytes.
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `limit`.
    pub(crate) async fn idle(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.start + last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
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
        let started = Instant::now();
        // Traffic every 40 s for two minutes keeps it from completing.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            far.write_all(b"x").await.unwrap();
            let _ = io.read(&mut [0u8; 8]).await.unwrap();
            assert!(
                tokio::time::timeout(Duration::from_secs(1), activity.idle(limit))
                    .await
                    .is_err(),
                "idle while bytes moved"
            );
        }
        io.write_all(b"y").await.unwrap();
        let wrote = Instant::now();
        activity.idle(limit).await;
        assert_eq!(wrote.elapsed(), limit);
        assert!(started.elapsed() >= Duration::from_secs(180));
    }
}
