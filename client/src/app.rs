//! Connections to the local app: HTTP/1.1 over TCP, kept alive and reused.
//!
//! hyper's connection API does the HTTP; this module only keeps the connections. It replaces
//! hyper-util's general-purpose pool, which for a single, fixed app cost the client a spawned
//! task per request (to wait for the connection to be ready again), a keyed pool lookup and
//! URI rewriting (docs/BENCHMARKS.md, finding 23). A forwarding task checks a connection out
//! with the request it sends, keeps it while it streams the answer back, and returns it with
//! [`AppConnections::release`] once the answer's body has been read to its end.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

/// Why the app could not be asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    /// No TCP connection (refused, unresolvable host, timed out).
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// The connection failed during the exchange (closed, malformed answer).
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl AppError {
    /// The innermost cause, in words, with a hint when the app does not seem to run.
    pub(crate) fn describe(&self) -> String {
        match self {
            AppError::Connect(err) => format!("{err} (is the app running?)"),
            AppError::Http(err) => {
                let mut text = err.to_string();
                let mut source = std::error::Error::source(err);
                while let Some(inner) = source {
                    text = inner.to_string();
                    source = inner.source();
                }
                text
            }
        }
    }
}

/// An idle connection and since when it has been idle.
struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

/// The pool of connections to one app (`host:port`), shared by every forwarded request.
pub(crate) struct AppConnections<B> {
    authority: String,
    /// Idle connections, the most recently used last.
    idle: Mutex<Vec<Idle<B>>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

impl<B> AppConnections<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A pool for the app at `authority` that keeps at most `max_idle` idle connections, each
    /// for at most `idle_timeout`. Must be called within a tokio runtime: a task closes
    /// connections idle for longer (it ends with the pool).
    pub(crate) fn new(
        authority: String,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        let pool = Arc::new(AppConnections {
            authority,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            connect_timeout,
        });
        tokio::spawn(close_idle(Arc::downgrade(&pool), idle_timeout));
        pool
    }

    /// Sends `request` on an idle connection, or on a new one. A request an idle connection
    /// could not take (the app had closed it) is sent again on another. Returns the response and
    /// the connection, to [`release`](Self::release) once the response's body is read.
    pub(crate) async fn send(
        &self,
        mut request: Request<B>,
    ) -> Result<(Response<Incoming>, SendRequest<B>), AppError> {
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            if let Err(err) = sender.ready().await {
                if reused {
                    continue; // closed while idle
                }
                return Err(err.into());
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, sender)),
                Err(mut err) => match err.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(err.into_error().into()),
                },
            }
        }
    }

    /// Takes back a connection whose last response has been read to its end.
    pub(crate) fn release(&self, sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("app pool lock");
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Idle connections right now.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().expect("app pool lock").len()
    }

    fn take_idle(&self) -> Option<SendRequest<B>> {
        let mut idle = self.idle.lock().expect("app pool lock");
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < self.idle_timeout {
                return Some(conn.sender);
            }
        }
        None
    }

    fn close_expired(&self) {
        let mut idle = self.idle.lock().expect("app pool lock");
        let expired = idle
            .iter()
            .take_while(|conn| conn.since.elapsed() >= self.idle_timeout)
            .count();
        idle.drain(..expired);
        idle.retain(|conn| !conn.sender.is_closed());
    }

    async fn connect(&self) -> Result<SendRequest<B>, AppError> {
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.authority.as_str()),
        )
        .await
        .map_err(|_| {
            AppError::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {}s", self.connect_timeout.as_secs()),
            ))
        })?
        .map_err(AppError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = http1::Builder::new().handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(%err, "connection to the app ended");
            }
        });
        Ok(sender)
    }
}

/// Closes connections idle for longer than `every`, until the pool is gone.
async fn close_idle<B>(pool: Weak<AppConnections<B>>, every: Duration)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.close_expired();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::server::conn::http1 as server;
    use hyper::service::service_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// An app answering `200 ok` that counts its connections and closes each after `per_conn`
    /// requests (0: never).
    async fn app(per_conn: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let served = Arc::new(AtomicUsize::new(0));
                    let service = service_fn(move |_req| {
                        let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                        let mut response =
                            Response::new(http_body_util::Full::new(Bytes::from("ok")));
                        if per_conn > 0 && n >= per_conn {
                            response
                                .headers_mut()
                                .insert(http::header::CONNECTION, "close".parse().unwrap());
                        }
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let _ = server::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn pool(addr: String) -> Arc<AppConnections<Empty<Bytes>>> {
        AppConnections::new(addr, 8, Duration::from_secs(30), Duration::from_secs(5))
    }

    fn get() -> Request<Empty<Bytes>> {
        Request::builder()
            .uri("/x")
            .header("host", "app")
            .body(Empty::new())
            .unwrap()
    }

    async fn ask(pool: &AppConnections<Empty<Bytes>>) -> Bytes {
        let (response, sender) = pool.send(get()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        pool.release(sender);
        body
    }

    #[tokio::test]
    async fn a_released_connection_is_reused() {
        let (addr, accepted) = app(0).await;
        let pool = pool(addr);
        for _ in 0..5 {
            assert_eq!(&ask(&pool).await[..], b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_replaced() {
        // The app closes every connection after one answer: each request needs a new one, and
        // none fails for finding the old one closed.
        let (addr, accepted) = app(1).await;
        let pool = pool(addr);
        for _ in 0..4 {
            assert_eq!(&ask(&pool).await[..], b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_connection_the_app_dropped_while_idle_is_replaced() {
        // Like an app whose keep-alive timeout passed: it closes an idle connection without a
        // word. The next request, sent before the pool has noticed, comes back unsent from the
        // closed connection and goes out on a new one instead of failing.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::sync::{mpsc, oneshot};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        // Each message closes the connection that answered last, then acknowledges.
        let (close_tx, mut close_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                if let Some(done) = close_rx.recv().await {
                    drop(tcp);
                    let _ = done.send(());
                }
            }
        });
        let pool = pool(addr);
        for _ in 0..3 {
            assert_eq!(&ask(&pool).await[..], b"ok");
            let (done_tx, done_rx) = oneshot::channel();
            close_tx.send(done_tx).await.unwrap();
            done_rx.await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn connections_idle_too_long_are_not_used() {
        let (addr, accepted) = app(0).await;
        let pool = AppConnections::new(addr, 8, Duration::ZERO, Duration::from_secs(5));
        ask(&pool).await;
        ask(&pool).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_app_that_is_not_running_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = pool(addr).send(get()).await.unwrap_err();
        assert!(matches!(err, AppError::Connect(_)), "{err:?}");
        assert!(
            err.describe().contains("is the app running?"),
            "{}",
            err.describe()
        );
    }
}
