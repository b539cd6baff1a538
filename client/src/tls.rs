//! Connections to the relay: TCP, then TLS for `https://` relays, with the Mozilla roots built in.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::MaybeTlsStream;

/// Why a connection to the relay could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The TCP connection failed (relay down, wrong port, no network).
    #[error(transparent)]
    Tcp(std::io::Error),
    /// The TLS handshake failed (or could not be set up).
    #[error("{0}")]
    Tls(String),
}

/// Opens a connection to `host:port` (a bare host, no brackets), with `TCP_NODELAY`, and runs
/// a TLS handshake over it when `tls` is set.
pub(crate) async fn open(
    host: &str,
    port: u16,
    tls: bool,
) -> Result<MaybeTlsStream<TcpStream>, OpenError> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(OpenError::Tcp)?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return Ok(MaybeTlsStream::Plain(tcp));
    }
    let stream = handshake(host, tcp).await.map_err(OpenError::Tls)?;
    Ok(MaybeTlsStream::Rustls(stream))
}

/// Runs a TLS handshake with `host` over `tcp`, checking its certificate against the built-in
/// roots.
async fn handshake(host: &str, tcp: TcpStream) -> Result<TlsStream<TcpStream>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|_| format!("'{host}' is not a valid TLS server name"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host} failed: {e}"))
}
