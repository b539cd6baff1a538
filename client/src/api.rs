//! A small client of the relay's history API (`/_ferry/v1/sessions/{session}/requests…`),
//! used by `ferry history`, `ferry show` and `ferry replay`.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::tls::{OpenError, RelayTls};

/// How long one API call may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Talks to one session's history on one relay, over HTTP/1.1 (with TLS for `https://`).
pub struct HistoryApi {
    base: String,
    token: String,
    session: String,
    /// How the relay's certificate is checked, for `https://`.
    tls: Option<RelayTls>,
    host: String,
    port: u16,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Percent-encodes a query value or path segment (everything but unreserved characters).
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl HistoryApi {
    /// A client of `relay` (its base URL) for `session`, authenticated with `token`;
    /// `relay_ca` is a PEM file of certificates trusted besides the built-in roots.
    pub fn new(
        relay: &str,
        token: &str,
        session: &str,
        relay_ca: Option<&Path>,
    ) -> Result<Self, String> {
        let base = relay.trim().trim_end_matches('/').to_owned();
        let (scheme, rest) = base.split_once("://").ok_or_else(|| {
            format!("relay URL '{base}' needs a scheme, like http://relay.example.com")
        })?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            other => {
                return Err(format!(
                    "relay URL scheme '{other}' is not supported; use http(s)://"
                ))
            }
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let authority: http::uri::Authority = authority
            .parse()
            .map_err(|_| format!("relay URL '{base}' has no valid host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(format!("relay URL '{base}' has no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tls = match tls {
            true => Some(RelayTls::new(relay_ca).map_err(|e| format!("--relay-ca: {e}"))?),
            false => None,
        };
        Ok(HistoryApi {
            base,
            token: token.to_owned(),
            session: session.to_owned(),
            tls,
            host,
            port,
        })
    }

    /// The relay's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The session.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// `GET …/requests?query` (query already encoded, without `?`).
    pub async fn list(&self, query: &str) -> Result<Value, String> {
        let mut path = "requests".to_owned();
        if !query.is_empty() {
            path.push('?');
            path.push_str(query);
        }
        self.call(Method::GET, &path).await
    }

    /// `GET …/requests/{id}`.
    pub async fn show(&self, id: &str) -> Result<Value, String> {
        self.call(Method::GET, &format!("requests/{}", encode_component(id)))
            .await
    }

    /// `POST …/requests/{id}/replay`.
    pub async fn replay(&self, id: &str) -> Result<Value, String> {
        self.call(
            Method::POST,
            &format!("requests/{}/replay", encode_component(id)),
        )
        .await
    }

    /// Opens a connection to the relay: TCP, then TLS for `https://`.
    async fn connect(&self) -> Result<Box<dyn Io>, String> {
        let stream = crate::tls::open(&self.host, self.port, self.tls.as_ref())
            .await
            .map_err(|e| match e {
                OpenError::Tcp(e) => format!("cannot reach the relay at {}: {e}", self.base),
                OpenError::Setting(e) | OpenError::Tls(e) => {
                    format!("{e} (relay {})", self.base)
                }
            })?;
        Ok(Box::new(stream))
    }

    async fn call(&self, method: Method, rest: &str) -> Result<Value, String> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_once(method, rest))
            .await
            .map_err(|_| {
                format!(
                    "the relay at {} did not answer within {}s",
                    self.base,
                    CALL_TIMEOUT.as_secs()
                )
            })?
    }

    async fn call_once(&self, method: Method, rest: &str) -> Result<Value, String> {
        let path = format!(
            "/_ferry/v1/sessions/{}/{rest}",
            encode_component(&self.session)
        );
        let default_port = if self.tls.is_some() { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let host = if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        };
        let request = Request::builder()
            .method(method)
            .uri(&path)
            .header(header::HOST, host)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("invalid request to {path}: {e}"))?;
        let io = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("cannot talk to the relay at {}: {e}", self.base))?;
        let driver = tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(|e| {
            let hint = if e.is_parse() && self.tls.is_none() {
                "; it did not answer in HTTP: if it serves HTTPS, use an https:// relay URL"
            } else {
                ""
            };
            format!(
                "cannot reach the relay at {}: {}{hint}",
                self.base,
                innermost(&e)
            )
        })?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("the relay's answer broke off: {e}"))?
            .to_bytes();
        driver.abort();
        let value: Option<Value> = serde_json::from_slice(&body).ok();
        if status.is_success() {
            return value
                .ok_or_else(|| "the relay answered with something that is not JSON".into());
        }
        let detail = value
            .as_ref()
            .and_then(|v| v.get("detail").and_then(Value::as_str))
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        Err(match status {
            StatusCode::UNAUTHORIZED => format!(
                "the relay refused the token (401): {detail}; use the token of the session's owner"
            ),
            StatusCode::NOT_FOUND => format!("not found (404): {detail}"),
            StatusCode::NOT_IMPLEMENTED => format!("this relay has no history API (501): {detail}"),
            other => format!("the relay answered {other}: {detail}"),
        })
    }
}

fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text = inner.to_string();
        source = inner.source();
    }
    text
}
