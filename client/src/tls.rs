//! Connections to the relay: TCP, then TLS for `https://` relays. The relay's certificate is
//! checked against the Mozilla roots built in, plus the certificates of `--relay-ca` for a relay
//! whose certificate is self-signed or from a private CA (trusted as CAs, and accepted as they
//! are when the relay presents one of them).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::MaybeTlsStream;

/// How a connection to the relay checks the relay's certificate.
#[derive(Debug, Clone)]
pub(crate) struct RelayTls(Arc<rustls::ClientConfig>);

impl RelayTls {
    /// The built-in roots, plus every certificate in the PEM file `extra_ca` if given: each is
    /// trusted as a CA, and a relay presenting exactly one of them is accepted as it is.
    pub(crate) fn new(extra_ca: Option<&Path>) -> Result<RelayTls, String> {
        let extra = match extra_ca {
            Some(path) => read_certificates(path)?,
            None => Vec::new(),
        };
        let config = crate::verify::client_config(crate::verify::Trust::Roots { extra })?;
        Ok(RelayTls(Arc::new(config)))
    }
}

/// Every certificate in the PEM file at `path`; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown} is not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{shown} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok(certs)
}

/// Why a connection to the relay could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The TCP connection failed (relay down, wrong port, no network).
    #[error(transparent)]
    Tcp(std::io::Error),
    /// The relay's certificate was refused, or the relay does not speak TLS at all: retrying
    /// will not change that, a setting must (or the relay's).
    #[error("{0}")]
    Setting(String),
    /// The TLS handshake failed otherwise (the connection dropped during it, say).
    #[error("{0}")]
    Tls(String),
}

/// Opens a connection to `host:port` (a bare host, no brackets), with `TCP_NODELAY`, and runs
/// a TLS handshake over it when `tls` is set.
pub(crate) async fn open(
    host: &str,
    port: u16,
    tls: Option<&RelayTls>,
) -> Result<MaybeTlsStream<TcpStream>, OpenError> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(OpenError::Tcp)?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(MaybeTlsStream::Plain(tcp));
    };
    let stream = handshake(tls, host, tcp).await?;
    Ok(MaybeTlsStream::Rustls(stream))
}

/// Runs a TLS handshake with `host` over `tcp`.
async fn handshake(
    tls: &RelayTls,
    host: &str,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, OpenError> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| OpenError::Setting(format!("'{host}' is not a valid TLS server name")))?;
    tokio_rustls::TlsConnector::from(tls.0.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| classify(host, e))
}

/// Tells a refused certificate (with what to do about it) or a server that does not speak TLS
/// from a handshake that broke off.
fn classify(host: &str, err: std::io::Error) -> OpenError {
    let cause = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match cause {
        Some(cause @ rustls::Error::InvalidCertificate(_)) => OpenError::Setting(format!(
            "the certificate of {host} was not accepted ({cause}); if the relay's certificate \
             is self-signed or from a private CA, pass that certificate (PEM) with \
             --relay-ca FILE"
        )),
        Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
            OpenError::Setting(format!(
                "{host} did not answer in TLS: if the relay serves plain HTTP, use an http:// \
                 relay URL"
            ))
        }
        _ => OpenError::Tls(format!("TLS handshake with {host} failed: {err}")),
    }
}
