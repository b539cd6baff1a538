//! How the client checks the certificate of a server it speaks TLS to: the relay's (for an
//! `https://` relay) and the app's (for an `https://` target).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Which certificates a server may present.
pub(crate) enum Trust {
    /// One that chains to the Mozilla roots built in or to one of `extra`, or that is byte for
    /// byte one of `extra`.
    Roots {
        /// Certificates the user gave (`--relay-ca`).
        extra: Vec<CertificateDer<'static>>,
    },
    /// Any: for an app on this machine, whose self-signed or mkcert certificate no root
    /// vouches for, and whose traffic never leaves the machine.
    Any,
}

/// A TLS client configuration that checks certificates as `trust` says. Whatever it accepts,
/// the server must still prove it holds the certificate's key (the handshake's signature).
pub(crate) fn client_config(trust: Trust) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let verifier = match trust {
        Trust::Roots { extra } if extra.is_empty() => {
            return Ok(builder.with_root_certificates(roots).with_no_client_auth());
        }
        Trust::Roots { extra } => {
            for cert in &extra {
                // One that cannot act as a CA (a self-signed certificate marked as one, as
                // `openssl req -x509` makes them, say) is still accepted by its pin.
                let _ = roots.add(cert.clone());
            }
            let chains = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS set-up failed: {e}"))?;
            Verifier {
                chains: Some(chains),
                pinned: extra,
                algorithms,
            }
        }
        Trust::Any => Verifier {
            chains: None,
            pinned: Vec::new(),
            algorithms,
        },
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Accepts a certificate that chains to a trusted root (the usual check), or that is one of
/// the pinned ones; or any certificate, without `chains`. The usual check refuses a
/// certificate marked as a CA as a server's own, which is what makes the pin needed for the
/// certificates `openssl req -x509` makes.
#[derive(Debug)]
struct Verifier {
    /// The usual check; `None` accepts any certificate.
    chains: Option<Arc<WebPkiServerVerifier>>,
    pinned: Vec<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chains) = &self.chains else {
            return Ok(ServerCertVerified::assertion());
        };
        match chains.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(_)
                if self
                    .pinned
                    .iter()
                    .any(|pin| pin.as_ref() == end_entity.as_ref()) =>
            {
                Ok(ServerCertVerified::assertion())
            }
            checked => checked,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
