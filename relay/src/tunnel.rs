//! The tunnel endpoint: authenticate, upgrade to a WebSocket, agree on a session, run the mux.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_mux::{ControlHandler, Mux, MuxConfig, MuxHandle, MuxIo, Side};
use ferry_protocol::flow::{peer_window, STREAM_WINDOW};
use ferry_protocol::{
    validate_session_name, Control, ErrorCode, RespondPolicy, PROTOCOL_VERSION, SUBPROTOCOL,
    SUBPROTOCOL_PREFIX,
};
use futures_util::SinkExt;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn, Instrument};

use crate::registry::{Claim, ClaimError, LaneError};
use crate::reply::{self, RelayBody};
use crate::store::{now_ms, OfflinePolicy, RespondMode};
use crate::Relay;

/// How long a client has to send its hello after the upgrade.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Sec-WebSocket-Key` of a WebSocket opening handshake (RFC 6455 §4.2.1), or the answer
/// for a request that is not one. Checked before the protocol version, so that a browser or
/// `curl` on this URL is told what the endpoint is for.
fn websocket_key(req: &Request<Incoming>) -> Result<header::HeaderValue, Box<Response<RelayBody>>> {
    let header_is = |name: header::HeaderName, wanted: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(wanted))
    };
    let upgrade_required = |detail: &str| {
        let mut answer = reply::error(StatusCode::UPGRADE_REQUIRED, "upgrade required", detail);
        answer.headers_mut().insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        answer.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            header::HeaderValue::from_static("13"),
        );
        answer
    };
    if req.method() != hyper::Method::GET || !header_is(header::UPGRADE, "websocket") {
        return Err(Box::new(upgrade_required(
            "this endpoint takes the WebSocket of `ferry listen` (a GET with 'Upgrade: websocket'), not plain requests",
        )));
    }
    if !header_is(header::SEC_WEBSOCKET_VERSION, "13") {
        return Err(Box::new(upgrade_required(
            "only WebSocket version 13 is spoken here",
        )));
    }
    req.headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .ok_or_else(|| {
            Box::new(reply::error(
                StatusCode::BAD_REQUEST,
                "bad request",
                "expected a WebSocket upgrade (missing Sec-WebSocket-Key)",
            ))
        })
}

/// Handles `GET /_ferry/v1/connect`.
pub(crate) fn connect(relay: &Arc<Relay>, mut req: Request<Incoming>) -> Response<RelayBody> {
    let Some(token) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return reply::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing 'Authorization: Bearer <token>'; pass --token or set FERRY_TOKEN",
        );
    };
    let Some(owner) = relay.tokens.verify(token.trim()) else {
        return reply::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid token; check --token / FERRY_TOKEN against the relay's tokens",
        );
    };
    let key = match websocket_key(&req) {
        Ok(key) => key,
        Err(refused) => return *refused,
    };
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    if !offered.iter().any(|p| p == SUBPROTOCOL) {
        let theirs = offered.iter().find(|p| p.starts_with(SUBPROTOCOL_PREFIX));
        warn!(
            client = theirs.map_or("none", String::as_str),
            relay = SUBPROTOCOL,
            "refused a client speaking another protocol version"
        );
        let detail = match theirs {
            Some(theirs) => format!("client speaks protocol {theirs}, this relay speaks {SUBPROTOCOL}; install the same Ferry version on both sides"),
            None => format!("the WebSocket offered no Ferry protocol (Sec-WebSocket-Protocol); this relay speaks {SUBPROTOCOL}: connect with `ferry listen`"),
        };
        return reply::error(
            StatusCode::BAD_REQUEST,
            "protocol version mismatch",
            &detail,
        );
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let relay = relay.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    MuxIo::new(TokioIo::new(upgraded), Side::Server),
                    Role::Server,
                    Some(ferry_mux::websocket_config()),
                )
                .await;
                serve(relay, owner, ws).await;
            }
            Err(err) => warn!(%err, "tunnel upgrade failed"),
        }
    });
    let mut response = Response::new(reply::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .expect("base64 is a valid header"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    response
}

/// Relay-side handler: the client sends no new streams, only heads for ours (handled by the mux).
struct RelayHandler;

impl ControlHandler for RelayHandler {
    fn on_control(&self, mux: &MuxHandle, msg: Control) {
        if let Control::Error { code, message } = msg {
            warn!(?code, %message, "client reported an error");
            mux.close(&message);
        }
    }
}

async fn refuse<S>(ws: &mut WebSocketStream<S>, code: ErrorCode, message: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let msg = Control::Error {
        code,
        message: message.to_owned(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        ws.send(Message::text(msg.encode())).await?;
        ws.close(None).await
    })
    .await;
}

async fn serve<S>(relay: Arc<Relay>, owner: crate::auth::TokenId, mut ws: WebSocketStream<MuxIo<S>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The message is dropped once decoded: its bytes share the reader's buffer.
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, ws.get_mut().read_message()).await {
        Ok(Ok(Some(msg))) => msg.as_text().map(Control::decode),
        _ => None,
    };
    let Some(Ok(Control::Hello {
        version,
        name,
        resume,
        offline,
        respond,
        window: client_window,
        binary_control,
        lanes,
        lane,
        ..
    })) = hello
    else {
        refuse(
            &mut ws,
            ErrorCode::ProtocolError,
            "expected a hello message",
        )
        .await;
        return;
    };
    if version != PROTOCOL_VERSION {
        let message = format!(
            "client speaks protocol version {version}, this relay speaks {PROTOCOL_VERSION}; install the same Ferry version on both sides"
        );
        refuse(&mut ws, ErrorCode::ProtocolError, &message).await;
        return;
    }
    if let Some(RespondPolicy::Now {
        status: Some(status),
        ..
    }) = &respond
    {
        if !(200..=599).contains(status) {
            let message = format!("--respond-status {status} is not a final status (200-599)");
            refuse(&mut ws, ErrorCode::ProtocolError, &message).await;
            return;
        }
    }
    // Heads in binary form when the client reads them (finding 25 in BENCHMARKS.md).
    let binary_control = binary_control == Some(true);
    let lanes = lanes == Some(true);
    if let Some(join) = lane {
        return serve_lane(relay, owner, ws, join, client_window, binary_control).await;
    }
    let claim = if let Some(name) = name.as_deref() {
        if let Err(err) = validate_session_name(name) {
            refuse(
                &mut ws,
                ErrorCode::InvalidName,
                &format!("invalid --name '{name}': {err}"),
            )
            .await;
            return;
        }
        Claim::Named(name)
    } else if let Some(resume) = resume.as_ref() {
        Claim::Resume {
            session: &resume.session,
            secret: &resume.secret,
        }
    } else {
        Claim::Random
    };
    if relay.shutdown.is_cancelled() {
        refuse(
            &mut ws,
            ErrorCode::ShuttingDown,
            "the relay is shutting down",
        )
        .await;
        return;
    }

    let granted = match relay.registry.claim(owner, claim) {
        Ok(granted) => granted,
        Err(err) => {
            let code = match err {
                ClaimError::Taken(_) => ErrorCode::NameTaken,
                ClaimError::BadSecret(_) | ClaimError::BadId(_) => ErrorCode::ResumeFailed,
                ClaimError::Full(_) => ErrorCode::Overloaded,
            };
            refuse(&mut ws, code, &err.to_string()).await;
            return;
        }
    };
    let session = granted.session.clone();
    session.set_offline_policy(match offline.unwrap_or_default() {
        ferry_protocol::OfflinePolicy::Reject => OfflinePolicy::Reject,
        ferry_protocol::OfflinePolicy::Queue => OfflinePolicy::Queue,
    });
    session.set_respond_mode(match respond.unwrap_or_default() {
        RespondPolicy::Pass => RespondMode::Pass,
        RespondPolicy::Now { status, body } => RespondMode::Now {
            status,
            body: body.map(Bytes::from),
        },
        RespondPolicy::Deadline { millis } => RespondMode::Deadline { millis },
    });
    if let Some(store) = &relay.config.store {
        // The session (and its resume secret's digest) is on disk before the client learns
        // its URL, so the URL survives a relay restart.
        if let Err(err) = store.upsert_session(session.record(now_ms())).await {
            warn!(session = %session.id, %err, "cannot store the session");
            refuse(
                &mut ws,
                ErrorCode::Overloaded,
                &format!("the relay cannot store the session: {err}"),
            )
            .await;
            return;
        }
    }
    if let Some(old) = granted.replaced {
        info!(session = %session.id, "taking over the session from an older connection");
        let mux = old.mux;
        tokio::spawn(async move {
            mux.close_with_error(
                ErrorCode::TakenOver,
                "another client with the same token took over this session",
            )
            .await;
        });
    }
    // The welcome is the first message the mux writes, ahead of any request head, and the
    // session is routable before the mux starts: a client that says "ready" can be called
    // at once.
    let lane_key = (lanes && relay.threads > 1).then_some(granted.lane_key);
    let welcome = Control::Welcome {
        session: session.id.clone(),
        url: format!("{}/{}", relay.config.public_url, session.id),
        resume_secret: granted.resume_secret,
        agent: concat!("ferry-relay/", env!("CARGO_PKG_VERSION")).to_owned(),
        window: Some(STREAM_WINDOW),
        binary_control: binary_control.then_some(true),
        lane_key: lane_key.clone(),
    };
    let mux_config = mux_config(&relay, client_window, binary_control);
    let (mux, pending) = Mux::prepare(ws, mux_config, RelayHandler, Some(welcome));
    let routable = relay.registry.go_live(
        &session,
        granted.generation,
        mux.clone(),
        crate::lanes::home(),
        lane_key.as_deref(),
    );
    let task = pending.start();
    if routable {
        if let Some(live) = session
            .live()
            .filter(|l| l.generation == granted.generation)
        {
            // Only a session with a backlog needs its queue read; a request queued from now
            // on starts a delivery task itself (`delivery::nudge`).
            if session.queue.lock().expect("queue lock").backlog {
                crate::delivery::start(relay.clone(), session.clone(), live);
            }
        }
    } else {
        mux.close_with_error(
            ErrorCode::TakenOver,
            "another client with the same token took over this session",
        )
        .await;
    }
    let span = tracing::info_span!("tunnel", session = %session.id);
    async move {
        info!("client connected");
        let reason = task
            .await
            .unwrap_or_else(|err| format!("tunnel task failed: {err}"));
        relay.registry.disconnect(&session, granted.generation);
        info!(%reason, "client disconnected");
    }
    .instrument(span)
    .await;
}

/// The mux settings of a tunnel connection (a session's main one or a lane).
fn mux_config(relay: &Relay, client_window: Option<u32>, binary_control: bool) -> MuxConfig {
    MuxConfig {
        recv_window: STREAM_WINDOW,
        send_window: peer_window(client_window),
        binary_control,
        heartbeat_timeout: relay.config.heartbeat_timeout,
        stats: relay.config.stats.clone(),
        ..MuxConfig::default()
    }
}

/// Serves a connection that joins a live session as an extra lane: it carries requests of
/// callers on this relay thread, and ends with the session's connection.
async fn serve_lane<S>(
    relay: Arc<Relay>,
    owner: crate::auth::TokenId,
    mut ws: WebSocketStream<MuxIo<S>>,
    join: ferry_protocol::LaneJoin,
    client_window: Option<u32>,
    binary_control: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let home = crate::lanes::home();
    let refusal = |err: &LaneError| match err {
        LaneError::Refused(_) => ErrorCode::LaneRefused,
        LaneError::Taken(_) => ErrorCode::LaneTaken,
    };
    let session = match relay
        .registry
        .check_lane(owner, &join.session, &join.key, home)
    {
        Ok(session) => session,
        Err(err) => {
            refuse(&mut ws, refusal(&err), &err.to_string()).await;
            return;
        }
    };
    let welcome = Control::Welcome {
        session: session.id.clone(),
        url: format!("{}/{}", relay.config.public_url, session.id),
        resume_secret: String::new(),
        agent: concat!("ferry-relay/", env!("CARGO_PKG_VERSION")).to_owned(),
        window: Some(STREAM_WINDOW),
        binary_control: binary_control.then_some(true),
        lane_key: None,
    };
    let config = mux_config(&relay, client_window, binary_control);
    let (mux, pending) = Mux::prepare(ws, config, RelayHandler, Some(welcome));
    let joined = relay
        .registry
        .join_lane(&session, owner, &join.key, mux.clone(), home);
    let task = pending.start();
    let lane = match joined {
        Ok(lane) => lane,
        Err(err) => {
            mux.close_with_error(refusal(&err), &err.to_string()).await;
            let _ = task.await;
            return;
        }
    };
    let span = tracing::debug_span!("lane", session = %session.id, thread = home);
    async move {
        debug!("lane joined");
        let reason = task
            .await
            .unwrap_or_else(|err| format!("lane task failed: {err}"));
        relay.registry.leave_lane(&session, &lane);
        debug!(%reason, "lane closed");
    }
    .instrument(span)
    .await;
}
