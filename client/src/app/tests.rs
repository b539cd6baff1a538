use super::*;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::Stream;
use http_body_util::{Empty, Full, StreamBody};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// An app on a loopback port that serves each connection with `serve`, and counts connections.
async fn raw_app<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(tcp));
        }
    });
    (addr, accepted)
}

/// Reads one request head (through the blank line) and returns it with any bytes after it.
async fn read_request_head(tcp: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = seen.split_off(end + 4);
            return Some((String::from_utf8_lossy(&seen).into_owned(), rest));
        }
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// An app answering every request with `answer`, closing each connection after `per_conn`
/// requests (0: never).
async fn app(per_conn: usize, answer: &'static [u8]) -> (String, Arc<AtomicUsize>) {
    raw_app(move |mut tcp| async move {
        let mut served = 0;
        while read_request_head(&mut tcp).await.is_some() {
            served += 1;
            if tcp.write_all(answer).await.is_err() || served == per_conn {
                return;
            }
        }
    })
    .await
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

fn pool(addr: String) -> Arc<AppConnections> {
    AppConnections::new(
        addr,
        None,
        8,
        Duration::from_secs(30),
        Duration::from_secs(5),
    )
}

fn request<B>(method: &str, headers: &[(&str, &[u8])], has_body: bool, body: B) -> AppRequest<B> {
    let mut head = BytesMut::new();
    let list: HeaderList = headers.iter().copied().collect();
    let framing =
        http1::write_request_head(&mut head, method, "/x", "app", &list, has_body).unwrap();
    AppRequest {
        head,
        framing,
        body,
        head_request: method == "HEAD",
    }
}

fn get() -> AppRequest<Empty<Bytes>> {
    request("GET", &[], false, Empty::new())
}

/// Sends `req`, reads the whole answer, releases the connection if it can be reused.
async fn ask<B>(pool: &AppConnections, req: AppRequest<B>) -> (u16, Bytes)
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
{
    let response = pool.send(req).await.unwrap();
    let mut body = response.body;
    let bytes = (&mut body).collect().await.unwrap().to_bytes();
    if let Some(conn) = body.into_reusable() {
        pool.release(conn);
    }
    (response.status, bytes)
}

/// A body whose chunks are sent from the test, one at a time.
type Streamed = StreamBody<Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>>;

fn streamed() -> (mpsc::Sender<Bytes>, Streamed) {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|data| (Ok(Frame::data(data)), rx))
    });
    (tx, StreamBody::new(Box::pin(stream)))
}

#[tokio::test]
async fn a_released_connection_is_reused() {
    let (addr, accepted) = app(0, OK).await;
    let pool = pool(addr);
    for _ in 0..5 {
        assert_eq!(ask(&pool, get()).await, (200, Bytes::from("ok")));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.idle_count(), 1);
}

#[tokio::test]
async fn a_connection_the_app_closes_is_replaced() {
    // The app closes every connection after one answer, saying so or not: each request needs
    // a new one, and none fails for finding the old one closed.
    for answer in [
        OK,
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
    ] {
        let (addr, accepted) = app(1, answer).await;
        let pool = pool(addr);
        for _ in 0..4 {
            assert_eq!(ask(&pool, get()).await, (200, Bytes::from("ok")));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }
}

#[tokio::test]
async fn a_connection_the_app_dropped_while_idle_is_replaced() {
    // Like an app whose keep-alive timeout passed: it closes an idle connection without a
    // word, and the next request is sent before the runtime has seen the close. The pool's
    // check finds it closed, and the request goes out on a new connection instead of failing.
    let (close_tx, close_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
    let close_rx = Arc::new(tokio::sync::Mutex::new(close_rx));
    let (addr, accepted) = raw_app(move |mut tcp| {
        let close_rx = close_rx.clone();
        async move {
            if read_request_head(&mut tcp).await.is_none() {
                return;
            }
            let _ = tcp.write_all(OK).await;
            if let Some(done) = close_rx.lock().await.recv().await {
                drop(tcp);
                let _ = done.send(());
            }
        }
    })
    .await;
    let pool = pool(addr);
    for _ in 0..3 {
        assert_eq!(ask(&pool, get()).await, (200, Bytes::from("ok")));
        let (done_tx, done_rx) = oneshot::channel();
        close_tx.send(done_tx).await.unwrap();
        done_rx.await.unwrap();
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn connections_idle_too_long_are_not_used() {
    let (addr, accepted) = app(0, OK).await;
    let pool = AppConnections::new(addr, None, 8, Duration::ZERO, Duration::from_secs(5));
    ask(&pool, get()).await;
    ask(&pool, get()).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_app_that_is_not_running_is_named() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = pool(addr).send(get()).await.err().unwrap();
    assert!(matches!(err, AppError::Connect(_)), "{err:?}");
    assert!(
        err.describe(false).contains("is the app running?"),
        "{}",
        err.describe(false)
    );
}

/// An app that records the raw bytes of one request (head and `body_len` bytes after it,
/// or up to the end of a chunked body) and answers `answer`.
async fn recording_app(answer: &'static [u8]) -> (String, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel(4);
    let (addr, _) = raw_app(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let Some((head, mut seen)) = read_request_head(&mut tcp).await else {
                return;
            };
            let done = |seen: &[u8]| {
                if head.contains("transfer-encoding: chunked") {
                    seen.ends_with(b"0\r\n\r\n")
                } else {
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                    seen.len() >= len
                }
            };
            let mut buf = [0u8; 65536];
            while !done(&seen) {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let mut all = head.into_bytes();
            all.extend_from_slice(&seen);
            let _ = tx.send(all).await;
            let _ = tcp.write_all(answer).await;
        }
    })
    .await;
    (addr, rx)
}

#[tokio::test]
async fn a_body_of_known_length_goes_as_it_is_and_one_of_unknown_length_chunked() {
    let (addr, mut seen) = recording_app(OK).await;
    let pool = pool(addr);
    let body = Full::new(Bytes::from_static(b"{\"a\":1}"));
    let req = request("POST", &[("content-length", b"7")], true, body);
    assert_eq!(ask(&pool, req).await.0, 200);
    assert_eq!(
        seen.recv().await.unwrap(),
        b"POST /x HTTP/1.1\r\nhost: app\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
    );

    // Streamed: the first chunk is there at once, the rest comes while the app waits.
    let (tx, body) = streamed();
    tx.send(Bytes::from_static(b"hello ")).await.unwrap();
    let feeder = tokio::spawn(async move {
        tx.send(Bytes::from(vec![b'x'; 100_000])).await.unwrap();
        tx.send(Bytes::from_static(b"!")).await.unwrap();
    });
    let req = request("POST", &[], true, body);
    assert_eq!(ask(&pool, req).await.0, 200);
    feeder.await.unwrap();
    let wire = seen.recv().await.unwrap();
    let mut expected =
        b"POST /x HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    expected.extend_from_slice(b"6\r\nhello \r\n186a0\r\n");
    expected.extend_from_slice(&vec![b'x'; 100_000]);
    expected.extend_from_slice(b"\r\n1\r\n!\r\n0\r\n\r\n");
    assert_eq!(wire.len(), expected.len());
    assert!(wire == expected, "the chunked request differs");
}

#[tokio::test]
async fn a_body_that_breaks_its_content_length_is_refused() {
    let (addr, _) = app(0, OK).await;
    let pool = pool(addr);
    let long = request(
        "POST",
        &[("content-length", b"2")],
        true,
        Full::new(Bytes::from("abc")),
    );
    let err = pool.send(long).await.err().unwrap();
    assert!(err.to_string().contains("longer than the 2 bytes"), "{err}");
    let short = request(
        "POST",
        &[("content-length", b"9")],
        true,
        Full::new(Bytes::from("abc")),
    );
    let err = pool.send(short).await.err().unwrap();
    assert!(
        err.to_string().contains("ended after 3 of the 9 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn an_answer_before_the_body_is_sent_comes_back_and_the_connection_is_not_reused() {
    // The app refuses the upload from its head alone, as apps do with `413`.
    let (addr, accepted) = raw_app(|mut tcp| async move {
        if read_request_head(&mut tcp).await.is_some() {
            let _ = tcp
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig")
                .await;
            // Keep reading (and dropping) whatever comes, until the client hangs up.
            let mut buf = [0u8; 4096];
            while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
        }
    })
    .await;
    let pool = pool(addr);
    let (tx, body) = streamed();
    let req = request("POST", &[("content-length", b"1000000")], true, body);
    let (status, answer) = ask(&pool, req).await;
    assert_eq!((status, &answer[..]), (413, &b"big"[..]));
    drop(tx);
    assert_eq!(
        pool.idle_count(),
        0,
        "a connection mid-request is not reused"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn answers_are_read_whatever_their_framing() {
    let cases: [(&'static [u8], &[u8], bool); 5] = [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", b"hello", true),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3;x=1\r\nllo\r\n0\r\nx-t: 1\r\n\r\n",
            b"hello",
            true,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", b"", true),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", b"until the end", false),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nhi", b"hi", false),
    ];
    for (answer, body, reused) in cases {
        let (addr, accepted) = app(1, answer).await;
        let pool = pool(addr);
        let (status, got) = ask(&pool, get()).await;
        assert_eq!(&got[..], body, "{}", String::from_utf8_lossy(answer));
        assert!(status == 200 || status == 204);
        assert_eq!(
            pool.idle_count(),
            usize::from(reused),
            "{}",
            String::from_utf8_lossy(answer)
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn an_answer_to_head_has_no_body_whatever_it_announces() {
    let (addr, accepted) = app(0, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n").await;
    let pool = pool(addr);
    for _ in 0..2 {
        let (status, got) = ask(&pool, request("HEAD", &[], false, Empty::new())).await;
        assert_eq!((status, got.len()), (200, 0));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_app_that_breaks_off_is_an_error_not_a_short_answer() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
    ] {
        let (addr, _) = app(1, answer).await;
        let pool = pool(addr);
        let response = pool.send(get()).await.unwrap();
        let err = response.body.collect().await.err().unwrap();
        assert!(
            err.to_string()
                .contains("in the middle of its response body"),
            "{err}"
        );
    }
    for (answer, expected) in [
        (&b""[..], "closed the connection without answering"),
        (b"HTTP/1.1 200 O", "in the middle of its response head"),
        (
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            "malformed response head",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "switched protocols",
        ),
    ] {
        let (addr, _) = app(1, answer).await;
        let err = pool(addr).send(get()).await.err().unwrap();
        assert!(
            err.describe(false).contains(expected),
            "{}",
            err.describe(false)
        );
    }
}

#[tokio::test]
async fn a_large_answer_comes_in_bounded_slices() {
    static BIG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let big = BIG.get_or_init(|| {
        let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n".to_vec();
        answer.extend((0..1_000_000u32).map(|i| (i % 251) as u8));
        answer
    });
    let (addr, _) = app(0, big).await;
    let response = pool(addr).send(get()).await.unwrap();
    let mut body = response.body;
    let mut got = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        assert!(data.len() <= CHUNK, "{}", data.len());
        got.extend_from_slice(&data);
    }
    assert_eq!(got.len(), 1_000_000);
    assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    assert!(body.into_reusable().is_some());
}

#[tokio::test]
async fn an_app_that_answers_while_it_reads_gets_the_whole_body() {
    // An echo: the answer's head goes out first, then each piece of the request body as it
    // arrives. The request body must keep flowing while the answer is read.
    let (addr, _) = raw_app(|mut tcp| async move {
        let Some((head, first)) = read_request_head(&mut tcp).await else {
            return;
        };
        assert!(head.contains("content-length: 1000000"), "{head}");
        let mut left = 1_000_000 - first.len();
        let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n".to_vec();
        out.extend_from_slice(&first);
        tcp.write_all(&out).await.unwrap();
        let mut buf = vec![0u8; 65536];
        while left > 0 {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request body stopped");
            tcp.write_all(&buf[..n]).await.unwrap();
            left -= n;
        }
    })
    .await;
    let pool = pool(addr);
    let (tx, body) = streamed();
    let feeder = tokio::spawn(async move {
        for i in 0..100u8 {
            tx.send(Bytes::from(vec![i; 10_000])).await.unwrap();
        }
    });
    let req = request("POST", &[("content-length", b"1000000")], true, body);
    let asked = tokio::time::timeout(Duration::from_secs(20), ask(&pool, req));
    let (status, echoed) = asked.await.expect("the exchange stalled");
    feeder.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(echoed.len(), 1_000_000);
    assert!(echoed
        .chunks(10_000)
        .enumerate()
        .all(|(i, c)| c.iter().all(|b| *b == i as u8)));
    assert_eq!(
        pool.idle_count(),
        1,
        "both directions done: the connection is kept"
    );
}

/// A sink that records each write it is given.
#[derive(Default)]
struct CountingSink {
    writes: usize,
    bytes: Vec<u8>,
}

impl AsyncWrite for CountingSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes += 1;
        self.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.writes += 1;
        let mut n = 0;
        for buf in bufs {
            self.bytes.extend_from_slice(buf);
            n += buf.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn pieces_of_an_upload_that_are_ready_together_leave_in_one_write() {
    let pieces =
        || (0..32u8).map(|i| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![i; 10_000]))));
    for framing in [RequestFraming::Length(320_000), RequestFraming::Chunked] {
        let body = StreamBody::new(futures_util::stream::iter(pieces()));
        let mut writer = BodyWriter::new(body, framing);
        let mut sink = CountingSink::default();
        writer.write_rest(&mut sink).await.unwrap();
        assert!(writer.done);
        // Unbatched, 32 writes or more. Chunked, each piece is three (size line, data, line
        // break): 96 of them leave in two writes of BATCH_PIECES, then the last chunk.
        let most = if framing == RequestFraming::Chunked {
            3
        } else {
            1
        };
        assert!(sink.writes <= most, "{framing:?}: {} writes", sink.writes);
        let mut expected = Vec::new();
        for i in 0..32u8 {
            if framing == RequestFraming::Chunked {
                expected.extend_from_slice(b"2710\r\n");
            }
            expected.extend_from_slice(&[i; 10_000]);
            if framing == RequestFraming::Chunked {
                expected.extend_from_slice(b"\r\n");
            }
        }
        if framing == RequestFraming::Chunked {
            expected.extend_from_slice(b"0\r\n\r\n");
        }
        assert!(sink.bytes == expected, "{framing:?}: the bytes differ");
    }
}

#[tokio::test]
async fn a_chunked_body_whose_end_comes_apart_from_its_data_is_ended() {
    // The body's end arrives as a frame of its own, right after its data, or alone (an empty
    // body): either way the app must get the last chunk, or it waits for more.
    let (addr, mut seen) = recording_app(OK).await;
    let pool = pool(addr);
    let pieces: [&[&'static [u8]]; 2] = [&[b"hello"], &[]];
    for data in pieces {
        let frames = data
            .iter()
            .map(|d| Ok::<_, Infallible>(Frame::data(Bytes::from_static(d))))
            .collect::<Vec<_>>();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let req = request("POST", &[], true, body);
        let asked = tokio::time::timeout(Duration::from_secs(10), ask(&pool, req));
        assert_eq!(asked.await.expect("the app waited for more").0, 200);
        let wire = seen.recv().await.unwrap();
        let expected: &[u8] = if data.is_empty() {
            b"0\r\n\r\n"
        } else {
            b"5\r\nhello\r\n0\r\n\r\n"
        };
        assert!(
            wire.ends_with(expected),
            "{}",
            String::from_utf8_lossy(&wire)
        );
    }
}

#[test]
fn a_reset_or_a_close_without_an_answer_suggests_https_for_a_plain_target() {
    for kind in [io::ErrorKind::ConnectionReset, io::ErrorKind::UnexpectedEof] {
        let err = AppError::Io(io::Error::from(kind));
        assert!(
            err.describe(false).contains("use an https:// target"),
            "{kind:?}"
        );
        assert!(!err.describe(true).contains("https://"), "{kind:?}");
    }
    let refused = AppError::Io(io::Error::from(io::ErrorKind::InvalidData));
    assert!(!refused.describe(false).contains("https://"));
}
