//! Two muxes wired back to back over an in-memory pipe: flow control, cancel, heartbeats.

use std::time::Duration;

use bytes::Bytes;
use ferry_mux::{ControlHandler, Mux, MuxConfig, MuxHandle, MuxIo, Side};
use ferry_protocol::flow::{update_threshold, DEFAULT_WINDOW, STREAM_WINDOW};
use ferry_protocol::{BinaryMessage, Control, DataFrame, ResponseHead};
use futures_util::{FutureExt, SinkExt, StreamExt};
use http_body_util::BodyExt;
use tokio::io::DuplexStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

struct Ignore;
impl ControlHandler for Ignore {
    fn on_control(&self, _: &MuxHandle, _: Control) {}
}

type Socket = WebSocketStream<MuxIo<DuplexStream>>;

async fn socket_pair() -> (Socket, Socket) {
    socket_pair_with_buffer(64 * 1024).await
}

async fn socket_pair_with_buffer(buffer: usize) -> (Socket, Socket) {
    let (a, b) = tokio::io::duplex(buffer);
    let a = WebSocketStream::from_raw_socket(MuxIo::new(a, Side::Server), Role::Server, None).await;
    let b = WebSocketStream::from_raw_socket(MuxIo::new(b, Side::Client), Role::Client, None).await;
    (a, b)
}

fn config() -> MuxConfig {
    MuxConfig {
        heartbeat_timeout: Duration::from_secs(30),
        ..MuxConfig::default()
    }
}

/// Sends `total` bytes from a mux with `sender` settings to one with `receiver` settings while
/// nobody reads them; checks that the receiver buffered between half of `window` and `window`,
/// then reads everything and checks it arrived byte for byte, the connection intact.
async fn unread_stream_holds_the_sender_to(
    sender: MuxConfig,
    receiver: MuxConfig,
    window: u32,
    total: usize,
) {
    let (a, b) = socket_pair().await;
    let (mux_a, _task_a) = Mux::spawn(a, sender, Ignore);
    let stats_b = std::sync::Arc::new(ferry_mux::MuxStats::default());
    let (mux_b, _task_b) = Mux::spawn(
        b,
        MuxConfig {
            stats: stats_b.clone(),
            ..receiver
        },
        Ignore,
    );
    let (stream, _, _, _guard_a) = mux_a.open_stream(1).unwrap();
    let (_, body, _, _guard_b) = mux_b.open_stream(1).unwrap();

    let payload = Bytes::from(vec![7u8; total]);
    let send = tokio::spawn({
        let stream = stream.clone();
        let payload = payload.clone();
        async move { stream.send_data(payload, true).await }
    });
    // Nobody reads `body`: once every task is idle, paused time jumps ahead and this fires.
    let stuck = tokio::time::timeout(Duration::from_secs(5), async {
        while !send.is_finished() {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(stuck.is_err(), "the sender must block on an unread stream");
    let buffered = stats_b.peak_buffered();
    assert!(buffered <= window as usize, "buffered {buffered} > window");
    assert!(buffered >= (window / 2) as usize, "window used: {buffered}");

    // Reading lets the rest through, byte for byte.
    let received = body.collect().await.unwrap().to_bytes();
    assert_eq!(received.len(), total);
    assert_eq!(received, payload);
    send.await.unwrap().unwrap();
    assert!(stats_b.peak_buffered() <= window as usize);
    assert!(!mux_b.is_closed(), "{}", mux_b.close_reason());
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_does_not_read_holds_the_sender_to_one_window() {
    unread_stream_holds_the_sender_to(config(), config(), STREAM_WINDOW, 8 * 1024 * 1024).await;
}

/// A peer that advertised a smaller window (an older build, which enforces 256 KiB) gets no
/// more than that, and the transfer still completes.
#[tokio::test(start_paused = true)]
async fn the_window_a_peer_advertised_bounds_what_is_sent_to_it() {
    let sender = MuxConfig {
        send_window: DEFAULT_WINDOW,
        ..config()
    };
    let receiver = MuxConfig {
        recv_window: DEFAULT_WINDOW,
        ..config()
    };
    unread_stream_holds_the_sender_to(sender, receiver, DEFAULT_WINDOW, 2 * 1024 * 1024).await;
}

#[tokio::test]
async fn a_peer_exceeding_the_window_is_cut_off_with_a_protocol_error() {
    // A pipe roomy enough that the misbehaving peer's writes never block: it must be able to
    // read the error afterwards, with nothing of its own left unflushed.
    let (a, mut raw) = socket_pair_with_buffer(2 * STREAM_WINDOW as usize).await;
    let (mux, task) = Mux::spawn(a, config(), Ignore);
    let (_, _body, _, _guard) = mux.open_stream(1).unwrap();
    let chunk = vec![1u8; 60 * 1024];
    for _ in 0..=STREAM_WINDOW as usize / chunk.len() {
        // One 60 KiB frame more than the window holds
        let frame = DataFrame::encode(1, false, &chunk);
        raw.send(Message::Binary(frame)).await.unwrap();
    }
    let reason = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("connection closed")
        .unwrap();
    assert!(reason.contains("flow-control window"), "{reason}");
    // The peer is told why before the close.
    let mut told = false;
    while let Some(Ok(msg)) = raw.next().await {
        if let Message::Text(text) = msg {
            if let Ok(Control::Error { message, .. }) = Control::decode(text.as_str()) {
                told = message.contains("flow-control window");
            }
        }
    }
    assert!(told);
}

#[tokio::test]
async fn malformed_frames_close_the_connection_without_panicking() {
    for garbage in [
        Message::Binary(Bytes::from_static(&[0, 0])),
        Message::Binary(Bytes::from_static(&[0, 0, 0, 1, 0xff])),
        Message::text("{not json"),
        Message::text(r#"{"type":"window","stream":1,"increment":4294967295}"#),
        // A binary control message of an unknown kind, and a truncated window update.
        Message::Binary(Bytes::from_static(&[0, 0, 0, 1, 0x80, 9])),
        Message::Binary(Bytes::from_static(&[0, 0, 0, 1, 0x80, 3, 0, 0])),
    ] {
        let (a, mut raw) = socket_pair().await;
        let (mux, task) = Mux::spawn(a, config(), Ignore);
        let _stream = mux.open_stream(1).unwrap();
        raw.send(garbage.clone()).await.unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("connection closed")
            .unwrap();
        assert!(reason.contains("protocol error"), "{garbage:?}: {reason}");
    }
}

/// Heads leave in binary form only for a peer that asked for it (`binary_control`), and a head
/// is read in either form whatever this side sends.
#[tokio::test]
async fn heads_go_in_binary_form_only_to_a_peer_that_reads_them() {
    for binary_control in [false, true] {
        let (a, mut raw) = socket_pair().await;
        let config = MuxConfig {
            binary_control,
            ..config()
        };
        let (mux, _task) = Mux::spawn(a, config, Ignore);
        let (sender, _, head_rx, _guard) = mux.open_stream(1).unwrap();
        let head = Control::ResponseHead(ResponseHead {
            stream: 1,
            status: 201,
            headers: [("x-a", &b"\xff"[..]), ("x-a", b"2")].into_iter().collect(),
            has_body: false,
        });
        sender.send_control(head.clone()).await.unwrap();
        let sent = match raw.next().await.unwrap().unwrap() {
            Message::Binary(bytes) if binary_control => match BinaryMessage::decode(bytes) {
                Ok(BinaryMessage::Control(control)) => control,
                other => panic!("expected a binary head, got {other:?}"),
            },
            Message::Text(text) if !binary_control => Control::decode(text.as_str()).unwrap(),
            other => panic!("binary_control {binary_control}: got {other:?}"),
        };
        assert_eq!(sent, head);
        raw.send(Message::Binary(head.encode_binary().unwrap()))
            .await
            .unwrap();
        let received = tokio::time::timeout(Duration::from_secs(5), head_rx)
            .await
            .expect("the head arrives")
            .unwrap();
        assert_eq!(received, head);
    }
}

#[tokio::test]
async fn cancel_aborts_one_stream_and_leaves_the_others() {
    let (a, b) = socket_pair().await;
    let (mux_a, _ta) = Mux::spawn(a, config(), Ignore);
    let (mux_b, _tb) = Mux::spawn(b, config(), Ignore);
    let (send1, _, _, guard1) = mux_a.open_stream(1).unwrap();
    let (send3, _, _, _guard3) = mux_a.open_stream(3).unwrap();
    let (_, body1, _, _g1) = mux_b.open_stream(1).unwrap();
    let (_, body3, _, _g3) = mux_b.open_stream(3).unwrap();

    send1
        .send_data(Bytes::from_static(b"partial"), false)
        .await
        .unwrap();
    guard1.cancel("caller went away");
    let err = body1.collect().await.expect_err("stream 1 aborted");
    assert!(err.to_string().contains("caller went away"), "{err}");
    assert!(send1
        .send_data(Bytes::from_static(b"more"), true)
        .await
        .is_err());

    send3
        .send_data(Bytes::from_static(b"whole body"), true)
        .await
        .unwrap();
    let body = body3.collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"whole body");
    assert!(!mux_a.is_closed() && !mux_b.is_closed());
}

/// Opens `streams` streams, makes every one ready to send a small frame at once (one task
/// spawns all the senders, as when one readiness event of the relay's poller brings many
/// requests), and returns how many writes carried the frames.
async fn writes_for_a_burst(streams: u32) -> u64 {
    let (a, b) = socket_pair().await;
    let (mux_a, _ta) = Mux::spawn(a, config(), Ignore);
    let (mux_b, _tb) = Mux::spawn(b, config(), Ignore);
    let mut senders = Vec::new();
    let mut bodies = Vec::new();
    for id in 1..=streams {
        let (sender, _, _, guard) = mux_a.open_stream(id).unwrap();
        senders.push((sender, guard));
        let (_, body, _, guard) = mux_b.open_stream(id).unwrap();
        bodies.push((body, guard));
    }
    let before = mux_a.stats().writes();
    tokio::spawn(async move {
        for (sender, guard) in senders {
            tokio::spawn(async move {
                let _guard = guard;
                sender.send_data(Bytes::from_static(b"{}"), true).await
            });
        }
    });
    for (body, _guard) in bodies {
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"{}");
    }
    mux_a.stats().writes() - before
}

/// The relay's runtime (one worker) runs a task woken by the one running next (tokio's "LIFO
/// slot"): without care the writer would wake after each stream's frame and write it alone.
/// Frames that many busy streams queue at once must share writes (and the peer's wake-ups).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn frames_of_many_busy_streams_share_writes() {
    const STREAMS: u32 = 32;
    let writes = writes_for_a_burst(STREAMS).await;
    assert!(
        writes <= u64::from(STREAMS) / 4,
        "{STREAMS} frames ready together took {writes} writes"
    );
}

/// 128 streams ready at once: the writer does not wait for all of them to queue before the
/// first write (the peer would sit idle meanwhile), nor write each alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_burst_of_ready_streams_leaves_in_several_batches() {
    const STREAMS: u32 = 128;
    let writes = writes_for_a_burst(STREAMS).await;
    // A write at least every 16 queued frames (the writer's batch trigger; without it, the
    // writer waited for the runtime's I/O poll between batches: 4 writes here).
    assert!(
        (u64::from(STREAMS) / 16..=u64::from(STREAMS) / 4).contains(&writes),
        "{STREAMS} frames ready together took {writes} writes"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_declared_dead_within_the_heartbeat_timeout() {
    let (a, _silent) = socket_pair().await; // `_silent` never reads nor writes
    let started = tokio::time::Instant::now();
    let (_mux, task) = Mux::spawn(
        a,
        MuxConfig {
            heartbeat_timeout: Duration::from_secs(30),
            ..MuxConfig::default()
        },
        Ignore,
    );
    let reason = task.await.unwrap();
    let took = started.elapsed();
    assert!(reason.contains("heartbeat timeout"), "{reason}");
    assert!(took <= Duration::from_secs(30), "took {took:?}");
    assert!(took >= Duration::from_secs(20), "too eager: {took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_live_peer_is_never_declared_dead() {
    let (a, b) = socket_pair().await;
    let (mux_a, _ta) = Mux::spawn(a, config(), Ignore);
    let (_mux_b, _tb) = Mux::spawn(b, config(), Ignore);
    tokio::time::sleep(Duration::from_secs(300)).await; // paused clock: ten heartbeat timeouts
    assert!(!mux_a.is_closed(), "{}", mux_a.close_reason());
}

#[test]
fn window_updates_are_sent_before_the_window_runs_dry() {
    const { assert!(update_threshold(STREAM_WINDOW) < STREAM_WINDOW) };
    const { assert!(update_threshold(DEFAULT_WINDOW) < DEFAULT_WINDOW) };
}

#[tokio::test]
async fn a_body_dropped_early_does_not_break_the_connection() {
    let (a, b) = socket_pair().await;
    let (mux_a, _ta) = Mux::spawn(a, config(), Ignore);
    let (mux_b, _tb) = Mux::spawn(b, config(), Ignore);
    let (send, _, _, _ga) = mux_a.open_stream(1).unwrap();
    let (_, body, _, _gb) = mux_b.open_stream(1).unwrap();
    drop(body); // the local app answered without reading the rest
    send.send_data(Bytes::from_static(b"late"), false)
        .await
        .unwrap();
    send.send_data(Bytes::new(), true).await.unwrap();
    // The connection still carries other streams.
    let (send3, _, _, _ga3) = mux_a.open_stream(3).unwrap();
    let (_, body3, _, _gb3) = mux_b.open_stream(3).unwrap();
    send3
        .send_data(Bytes::from_static(b"fine"), true)
        .await
        .unwrap();
    assert_eq!(&body3.collect().await.unwrap().to_bytes()[..], b"fine");
    assert!(!mux_a.is_closed() && !mux_b.is_closed());
}

#[tokio::test]
async fn a_body_read_to_its_length_finishes_the_stream_without_a_cancel() {
    let (a, b) = socket_pair().await;
    let (mux_a, _ta) = Mux::spawn(a, config(), Ignore);
    let (mux_b, _tb) = Mux::spawn(b, config(), Ignore);
    let (_, body_a, _, guard_a) = mux_a.open_stream(1).unwrap();
    let (send_b, _, _, guard_b) = mux_b.open_stream(1).unwrap();
    send_b
        .send_data(Bytes::from_static(b"12345"), true)
        .await
        .unwrap();
    // Read exactly one chunk, as hyper does when Content-Length is satisfied, then drop.
    let mut body_a = body_a.with_guard(guard_a);
    let chunk = body_a.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&chunk[..], b"12345");
    drop(body_a);
    // Messages are ordered: once stream 3's data is through, a cancel for 1 would have been too.
    let (send3, _, _, _g3) = mux_a.open_stream(3).unwrap();
    let (_, body3, _, _g3b) = mux_b.open_stream(3).unwrap();
    send3
        .send_data(Bytes::from_static(b"x"), true)
        .await
        .unwrap();
    body3.collect().await.unwrap();
    assert!(
        guard_b.cancelled().now_or_never().is_none(),
        "peer was told to cancel a finished exchange: {}",
        guard_b.cancel_reason()
    );
}

/// Records what a [`BodyTap`] is told, in order.
#[derive(Clone, Default)]
struct TapLog(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl TapLog {
    fn events(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl ferry_mux::BodyTap for TapLog {
    fn data(&mut self, bytes: &Bytes) {
        self.0.lock().unwrap().push(format!("data {}", bytes.len()));
    }
    fn end(self: Box<Self>, complete: bool) {
        self.0.lock().unwrap().push(format!("end {complete}"));
    }
}

/// Everything a test must keep alive while it reads a body: dropping a stream's guard or
/// sender would cancel it.
type Keep = Vec<Box<dyn std::any::Any + Send>>;

/// Opens stream 1 on both sides, sends `data` from b (with its end if `end`), and returns a's
/// body, tapped by `tap`, once all of it is queued there (stream 3's data, sent after it, is
/// through).
async fn tapped_body(data: &'static [u8], end: bool, tap: TapLog) -> (ferry_mux::TunnelBody, Keep) {
    let (a, b) = socket_pair().await;
    let (mux_a, task_a) = Mux::spawn(a, config(), Ignore);
    let (mux_b, task_b) = Mux::spawn(b, config(), Ignore);
    let (_, body_a, _, guard_a) = mux_a.open_stream(1).unwrap();
    let (send_b, _, _, guard_b) = mux_b.open_stream(1).unwrap();
    send_b
        .send_data(Bytes::from_static(data), end)
        .await
        .unwrap();
    let (_, body3, _, guard3_a) = mux_a.open_stream(3).unwrap();
    let (send3, _, _, guard3_b) = mux_b.open_stream(3).unwrap();
    send3
        .send_data(Bytes::from_static(b"x"), true)
        .await
        .unwrap();
    body3.collect().await.unwrap();
    let body = body_a.with_guard(guard_a).with_tap(Box::new(tap));
    let keep: Keep = vec![
        Box::new(mux_a),
        Box::new(mux_b),
        Box::new(task_a),
        Box::new(task_b),
        Box::new(send_b),
        Box::new(guard_b),
        Box::new(send3),
        Box::new(guard3_a),
        Box::new(guard3_b),
    ];
    (body, keep)
}

#[tokio::test]
async fn the_tap_hears_of_the_end_after_the_last_chunk_was_handed_out() {
    let tap = TapLog::default();
    let (mut body, _keep) = tapped_body(b"12345", true, tap.clone()).await;
    let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&chunk[..], b"12345");
    assert!(
        http_body::Body::is_end_stream(&body),
        "the end behind it was seen"
    );
    // The caller writes the chunk out now; the tap's end work must not come before that.
    assert_eq!(tap.events(), ["data 5"]);
    assert!(body.frame().await.is_none());
    assert_eq!(tap.events(), ["data 5", "end true"]);
    drop(body);
    assert_eq!(tap.events(), ["data 5", "end true"], "told once");
}

#[tokio::test]
async fn a_body_dropped_after_its_last_chunk_tells_the_tap_it_was_complete() {
    // As hyper does with a Content-Length answer: it stops polling after the last byte.
    let tap = TapLog::default();
    let (mut body, _keep) = tapped_body(b"12345", true, tap.clone()).await;
    body.frame().await.unwrap().unwrap();
    assert_eq!(tap.events(), ["data 5"]);
    drop(body);
    assert_eq!(tap.events(), ["data 5", "end true"]);
}

#[tokio::test]
async fn a_body_dropped_before_its_end_tells_the_tap_it_broke_off() {
    let tap = TapLog::default();
    let (mut body, _keep) = tapped_body(b"123", false, tap.clone()).await;
    body.frame().await.unwrap().unwrap();
    drop(body);
    assert_eq!(tap.events(), ["data 3", "end false"]);
}
