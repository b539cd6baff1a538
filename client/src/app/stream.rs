//! The byte stream to the app: plain TCP, or TLS over it for an `https://` target, split in a
//! read half and a write half either way.
//!
//! An app on this machine (`localhost`, `127.0.0.0/8`, `::1`) is reached over TLS without
//! checking its certificate: local development servers serve self-signed or mkcert
//! certificates, which no built-in root vouches for, and nothing of the connection leaves the
//! machine. An app on another host must present a certificate the Mozilla roots vouch for.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::AppError;
use crate::verify::{client_config, Trust};

/// How to open TLS to an `https://` app.
#[derive(Clone)]
pub(crate) struct AppTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl AppTls {
    /// TLS to `host` (no brackets around an IPv6 address): unchecked on this machine, checked
    /// against the built-in roots elsewhere.
    pub(crate) fn new(host: &str) -> Result<AppTls, String> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("'{host}' is not a valid TLS server name"))?;
        let trust = match is_local(host) {
            true => Trust::Any,
            false => Trust::Roots { extra: Vec::new() },
        };
        Ok(AppTls {
            connector: TlsConnector::from(Arc::new(client_config(trust)?)),
            name,
        })
    }
}

/// Whether `host` names this machine.
fn is_local(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Reading from the app.
pub(crate) enum AppRead {
    Plain(OwnedReadHalf),
    Tls {
        half: ReadHalf<TlsStream<TcpStream>>,
        /// The same socket, to look at it without reading (see [`AppRead::still_open`]).
        probe: OwnedFd,
    },
}

/// Writing to the app.
pub(crate) enum AppWrite {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

/// Splits a connected `tcp` in halves, after a TLS handshake if `tls` is set.
pub(crate) async fn split(
    tcp: TcpStream,
    tls: Option<&AppTls>,
) -> Result<(AppRead, AppWrite), AppError> {
    let Some(tls) = tls else {
        let (read, write) = tcp.into_split();
        return Ok((AppRead::Plain(read), AppWrite::Plain(write)));
    };
    let probe = tcp
        .as_fd()
        .try_clone_to_owned()
        .map_err(AppError::Connect)?;
    let stream = tls
        .connector
        .connect(tls.name.clone(), tcp)
        .await
        .map_err(handshake_error)?;
    let (half, write) = tokio::io::split(stream);
    Ok((AppRead::Tls { half, probe }, AppWrite::Tls(write)))
}

/// A failed handshake with the app, in words: most often the app serves plain HTTP.
fn handshake_error(err: io::Error) -> AppError {
    let cause = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    AppError::Tls(match cause {
        Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
            "the app did not answer in TLS: if it serves plain HTTP, use an http:// target".into()
        }
        Some(cause) => format!("TLS handshake with the app failed: {cause}"),
        None => format!("TLS handshake with the app failed: {err}"),
    })
}

impl AppRead {
    /// Whether the app has neither closed the connection nor sent anything unasked (over TLS,
    /// a close alert is something) while it sat idle. One `recv(MSG_PEEK)`: an idle
    /// connection whose close the runtime has not yet seen would otherwise take the next
    /// request and lose it.
    pub(crate) fn still_open(&self) -> bool {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        matches!(
            self.socket().peek(&mut probe),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// Acknowledges at once what has arrived, before waiting for the rest of an answer.
    ///
    /// Why: an app that writes an answer in two small writes (Python's `http.server`, and so
    /// Flask's and Django's development servers: the head, then the body) holds the second
    /// back until the first is acknowledged (Nagle's algorithm), and on a connection kept
    /// alive the kernel delays that acknowledgement by 40 ms. Every such answer took 40 ms
    /// longer through the tunnel, as it does for any keep-alive client (curl too). Linux only;
    /// elsewhere nothing is done.
    pub(crate) fn acknowledge_now(&self) {
        #[cfg(target_os = "linux")]
        let _ = self.socket().set_tcp_quickack(true);
    }

    fn socket(&self) -> socket2::SockRef<'_> {
        match self {
            AppRead::Plain(half) => {
                let tcp: &TcpStream = half.as_ref();
                socket2::SockRef::from(tcp)
            }
            AppRead::Tls { probe, .. } => socket2::SockRef::from(probe),
        }
    }
}

impl AsyncRead for AppRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AppRead::Plain(half) => Pin::new(half).poll_read(cx, buf),
            AppRead::Tls { half, .. } => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AppWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AppWrite::Plain(half) => Pin::new(half).poll_write(cx, buf),
            AppWrite::Tls(half) => Pin::new(half).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AppWrite::Plain(half) => Pin::new(half).poll_write_vectored(cx, bufs),
            AppWrite::Tls(half) => Pin::new(half).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            AppWrite::Plain(half) => half.is_write_vectored(),
            AppWrite::Tls(half) => half.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AppWrite::Plain(half) => Pin::new(half).poll_flush(cx),
            AppWrite::Tls(half) => Pin::new(half).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AppWrite::Plain(half) => Pin::new(half).poll_shutdown(cx),
            AppWrite::Tls(half) => Pin::new(half).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_local;

    #[test]
    fn only_this_machine_is_local() {
        for local in [
            "localhost",
            "LocalHost.",
            "app.localhost",
            "127.0.0.1",
            "127.8.9.1",
            "::1",
        ] {
            assert!(is_local(local), "{local}");
        }
        for remote in [
            "example.com",
            "localhost.example.com",
            "10.0.0.1",
            "::2",
            "0.0.0.0",
        ] {
            assert!(!is_local(remote), "{remote}");
        }
    }
}
