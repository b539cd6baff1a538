//! Two muxes over TLS (tokio-rustls on both ends, a certificate made for the test): the frame
//! writer's vectored writes and the client's masking go through a TLS stream as they do when a
//! client connects to an `https://` relay.

use std::sync::Arc;

use bytes::Bytes;
use ferry_mux::{ControlHandler, Mux, MuxConfig, MuxHandle, MuxIo, Side};
use ferry_protocol::Control;
use http_body_util::BodyExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

struct Ignore;
impl ControlHandler for Ignore {
    fn on_control(&self, _: &MuxHandle, _: Control) {}
}

#[tokio::test]
async fn streams_cross_a_tls_connection_byte_for_byte_both_ways() {
    let cert = rcgen::generate_simple_self_signed(vec!["relay.test".to_owned()]).unwrap();
    let cert_der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let name = ServerName::try_from("relay.test").unwrap();
    let (server_tls, client_tls) = tokio::join!(
        acceptor.accept(server_io),
        connector.connect(name, client_io)
    );
    let relay = WebSocketStream::from_raw_socket(
        MuxIo::new(server_tls.unwrap(), Side::Server),
        Role::Server,
        None,
    )
    .await;
    let client = WebSocketStream::from_raw_socket(
        MuxIo::new(client_tls.unwrap(), Side::Client),
        Role::Client,
        None,
    )
    .await;
    let (relay, _relay_task) = Mux::spawn(relay, MuxConfig::default(), Ignore);
    let (client, _client_task) = Mux::spawn(client, MuxConfig::default(), Ignore);

    // 3 MiB each way at once: many windows, frames of every size, masked one way.
    let up = Bytes::from(
        (0..3 << 20)
            .map(|i: u32| (i % 253) as u8)
            .collect::<Vec<u8>>(),
    );
    let down = Bytes::from(
        (0..3 << 20)
            .map(|i: u32| (i % 241) as u8)
            .collect::<Vec<u8>>(),
    );
    let (relay_tx, relay_rx, _, _relay_guard) = relay.open_stream(1).unwrap();
    let (client_tx, client_rx, _, _client_guard) = client.open_stream(1).unwrap();
    let send_up = tokio::spawn({
        let up = up.clone();
        async move { relay_tx.send_data(up, true).await }
    });
    let send_down = tokio::spawn({
        let down = down.clone();
        async move { client_tx.send_data(down, true).await }
    });
    let (at_client, at_relay) = tokio::join!(client_rx.collect(), relay_rx.collect());
    assert_eq!(at_client.unwrap().to_bytes(), up);
    assert_eq!(at_relay.unwrap().to_bytes(), down);
    send_up.await.unwrap().unwrap();
    send_down.await.unwrap().unwrap();
}
