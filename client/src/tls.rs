//! Connections to the relay: TCP, then TLS for `https://` relays. The relay's certificate is
//! checked against the Mozilla roots built in, plus the certificates of `--relay-ca` for a relay
//! whose certificate is self-signed or from a private CA (trusted as CAs, and accepted as they
//! are when the relay presents one of them).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up failed: {e}"))?;
        let Some(path) = extra_ca else {
            let config = builder.with_root_certificates(roots).with_no_client_auth();
            return Ok(RelayTls(Arc::new(config)));
        };
        let pinned = read_certificates(path)?;
        for cert in &pinned {
            // A certificate that cannot act as a CA (a self-signed one marked so, say) is
            // still accepted by the pin below.
            let _ = roots.add(cert.clone());
        }
        let chains =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS set-up failed: {e}"))?;
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedOrChained { chains, pinned }))
            .with_no_client_auth();
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

/// Accepts a relay whose certificate chains to a trusted root (the usual check, with the
/// `--relay-ca` certificates among the roots), or whose certificate is byte for byte one of
/// the `--relay-ca` certificates. The second is what makes a certificate from
/// `openssl req -x509` work: it is marked as a CA, which the usual check refuses to accept
/// as a server's own. Either way the relay must prove it holds the certificate's key (the
/// handshake signature is checked as always), so nobody else can present it.
#[derive(Debug)]
struct PinnedOrChained {
    chains: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for PinnedOrChained {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chained = self.chains.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match chained {
            Err(_)
                if self
                    .pinned
                    .iter()
                    .any(|pin| pin.as_ref() == end_entity.as_ref()) =>
            {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chains.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chains.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chains.supported_verify_schemes()
    }
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
