//! Opening the tunnel: WebSocket handshake with the relay, then hello/welcome.

use std::time::Duration;

use ferry_protocol::{
    Control, ErrorCode, LaneJoin, OfflinePolicy, RespondPolicy, Resume, CONNECT_PATH,
    PROTOCOL_VERSION, SUBPROTOCOL,
};
use futures_util::SinkExt;
use http::{header, HeaderValue};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use ferry_mux::{MuxIo, Side, WsMessage};

use crate::tls::{OpenError, RelayTls};

/// The relay's WebSocket.
pub(crate) type RelaySocket = WebSocketStream<MuxIo<MaybeTlsStream<TcpStream>>>;

/// How long the relay has to answer the handshake and the hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// Retrying cannot help: wrong token, other protocol version, name taken…
    #[error("{0}")]
    Fatal(String),
    /// The resume secret was refused; a fresh session is needed.
    #[error("{0}")]
    ResumeRefused(String),
    /// A lane landed on a relay thread that already serves the session: another connection
    /// may land elsewhere.
    #[error("{0}")]
    LaneTaken(String),
    /// Worth another try later: relay unreachable, restarting, network down.
    #[error("{0}")]
    Transient(String),
    /// A setting does not fit the relay (its certificate refused, `https://` for a plain
    /// relay or the other way round): a setting must change, unless the relay's does (a
    /// certificate renewed after it expired, say).
    #[error("{0}")]
    Setting(String),
}

/// The session the relay granted.
#[derive(Debug, Clone)]
pub(crate) struct Welcome {
    pub(crate) session: String,
    pub(crate) url: String,
    pub(crate) resume_secret: String,
    /// The relay's receive window per stream: what each stream may send before credit returns.
    pub(crate) send_window: u32,
    /// Whether heads and window updates go both ways in binary form (the relay agreed).
    pub(crate) binary_control: bool,
    /// The key that joins extra lanes to this connection, if the relay offers them.
    pub(crate) lane_key: Option<String>,
}

/// The WebSocket URL of the relay's tunnel endpoint, from the URL the user gave.
pub fn connect_url(relay: &str) -> Result<String, String> {
    let relay = relay.trim().trim_end_matches('/');
    let (scheme, rest) = relay.split_once("://").ok_or_else(|| {
        format!("relay URL '{relay}' needs a scheme, like https://relay.example.com")
    })?;
    let ws_scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => {
            return Err(format!(
                "relay URL scheme '{other}' is not supported; use http(s)://"
            ))
        }
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("relay URL '{relay}' has no host"));
    }
    Ok(format!("{ws_scheme}://{authority}{CONNECT_PATH}"))
}

/// What a connection asks the relay for in its hello.
pub(crate) enum Ask<'a> {
    /// The session (claimed by name, resumed, or a fresh one), with its settings.
    Session {
        name: Option<&'a str>,
        resume: Option<&'a Resume>,
        offline: Option<OfflinePolicy>,
        respond: Option<&'a RespondPolicy>,
    },
    /// One more lane of a live session.
    Lane(&'a LaneJoin),
}

/// Connects, authenticates and agrees on a session (or joins one as a lane).
pub(crate) async fn connect(
    url: &str,
    tls: &RelayTls,
    token: &str,
    ask: Ask<'_>,
) -> Result<(RelaySocket, Welcome), ConnectError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ConnectError::Fatal(format!("invalid relay URL {url}: {e}")))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        ConnectError::Fatal("the token contains characters not allowed in a header".into())
    })?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );

    let secure = request.uri().scheme_str() == Some("wss");
    let handshake = async {
        let stream = open_stream(request.uri(), tls).await?;
        tokio_tungstenite::client_async_with_config(
            request,
            MuxIo::new(stream, Side::Client),
            Some(ferry_mux::websocket_config()),
        )
        .await
        .map_err(|err| classify(err, secure))
    };
    let (mut ws, _response) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Err(_) => {
            return Err(ConnectError::Transient(
                "the relay did not answer the handshake in time".into(),
            ))
        }
        Ok(Err(err)) => return Err(err),
        Ok(Ok(ok)) => ok,
    };

    let (name, resume, offline, respond, lane) = match ask {
        Ask::Session {
            name,
            resume,
            offline,
            respond,
        } => (
            name.map(str::to_owned),
            // A name is claimed again, never resumed.
            resume.filter(|_| name.is_none()).cloned(),
            offline,
            respond.cloned(),
            None,
        ),
        Ask::Lane(join) => (None, None, None, None, Some(join.clone())),
    };
    let hello = Control::Hello {
        version: PROTOCOL_VERSION,
        agent: concat!("ferry/", env!("CARGO_PKG_VERSION")).to_owned(),
        name,
        resume,
        offline,
        respond,
        window: Some(ferry_protocol::flow::STREAM_WINDOW),
        binary_control: Some(true),
        lanes: Some(true),
        lane,
    };
    let exchange = async {
        ws.send(Message::text(hello.encode()))
            .await
            .map_err(|err| err.to_string())?;
        loop {
            match ws.get_mut().read_message().await {
                Ok(Some(WsMessage::Ping | WsMessage::Pong)) => continue,
                Ok(Some(msg @ WsMessage::Text(_))) => return Ok(Some(msg)),
                Ok(Some(_) | None) => return Ok(None),
                Err(err) => return Err(err.to_string()),
            }
        }
    };
    let text = match tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await {
        Err(_) => {
            return Err(ConnectError::Transient(
                "the relay did not welcome us in time".into(),
            ))
        }
        Ok(Err(err)) => {
            return Err(ConnectError::Transient(format!(
                "connection lost during hello: {err}"
            )))
        }
        Ok(Ok(None)) => {
            return Err(ConnectError::Transient(
                "the relay closed the connection during hello".into(),
            ))
        }
        Ok(Ok(Some(msg))) => msg,
    };
    let Some(text) = text.as_text() else {
        return Err(ConnectError::Fatal(
            "the relay sent a welcome that is not UTF-8".into(),
        ));
    };
    match Control::decode(text) {
        Ok(Control::Welcome {
            session,
            url,
            resume_secret,
            window,
            binary_control,
            lane_key,
            ..
        }) => Ok((
            ws,
            Welcome {
                session,
                url,
                resume_secret,
                send_window: ferry_protocol::flow::peer_window(window),
                binary_control: binary_control == Some(true),
                lane_key,
            },
        )),
        Ok(Control::Error { code, message }) => Err(match code {
            ErrorCode::ResumeFailed => ConnectError::ResumeRefused(message),
            ErrorCode::LaneTaken => ConnectError::LaneTaken(message),
            ErrorCode::ShuttingDown | ErrorCode::Overloaded => ConnectError::Transient(message),
            _ => ConnectError::Fatal(message),
        }),
        Ok(_) => Err(ConnectError::Fatal(
            "the relay answered hello with an unexpected message".into(),
        )),
        Err(err) => Err(ConnectError::Fatal(format!(
            "the relay sent a malformed welcome: {err}"
        ))),
    }
}

/// TCP to the relay, then TLS for `wss://`.
async fn open_stream(
    uri: &http::Uri,
    tls: &RelayTls,
) -> Result<MaybeTlsStream<TcpStream>, ConnectError> {
    let host = uri
        .host()
        .ok_or_else(|| ConnectError::Fatal(format!("relay URL {uri} has no host")))?;
    let tls = (uri.scheme_str() == Some("wss")).then_some(tls);
    let port = uri
        .port_u16()
        .unwrap_or(if tls.is_some() { 443 } else { 80 });
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    crate::tls::open(bare_host, port, tls)
        .await
        .map_err(|e| match e {
            OpenError::Tcp(e) => ConnectError::Transient(format!("IO error: {e}")),
            OpenError::Setting(e) => ConnectError::Setting(e),
            OpenError::Tls(e) => ConnectError::Transient(e),
        })
}

/// What a failed WebSocket handshake means for the user; `secure` when it went over TLS.
fn classify(err: tungstenite::Error, secure: bool) -> ConnectError {
    use tungstenite::error::ProtocolError;
    match err {
        tungstenite::Error::Http(response) => {
            let status = response.status();
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let detail = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
                .unwrap_or(body);
            if status == http::StatusCode::UNAUTHORIZED {
                ConnectError::Fatal(format!("the relay refused the token (401): {detail}"))
            } else if status.is_server_error() {
                ConnectError::Transient(format!("the relay answered {status}: {detail}"))
            } else {
                ConnectError::Fatal(format!("the relay answered {status}: {detail}"))
            }
        }
        tungstenite::Error::Protocol(tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(_)) => {
            ConnectError::Fatal(format!(
                "the server did not agree to protocol {SUBPROTOCOL}: is it a Ferry relay of the same version?"
            ))
        }
        tungstenite::Error::Url(err) => ConnectError::Fatal(format!("invalid relay URL: {err}")),
        // What came back is not HTTP at all; over plain TCP that is most often a TLS server.
        tungstenite::Error::Protocol(ProtocolError::HttparseError(err)) if !secure => {
            ConnectError::Setting(format!(
                "the relay did not answer in HTTP ({err}): if it serves HTTPS, use an https:// \
                 relay URL"
            ))
        }
        other => ConnectError::Transient(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::connect_url;

    #[test]
    fn builds_connect_urls() {
        assert_eq!(
            connect_url("http://r:8080").unwrap(),
            "ws://r:8080/_ferry/v1/connect"
        );
        assert_eq!(
            connect_url("https://r.example/").unwrap(),
            "wss://r.example/_ferry/v1/connect"
        );
        assert!(connect_url("r.example").is_err());
        assert!(connect_url("ftp://r").is_err());
    }
}
