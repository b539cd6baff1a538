//! A relay serving HTTPS itself (`--tls-cert`, `--tls-key`): callers reach the app over TLS with
//! HTTP/1.1 or HTTP/2 (ALPN), the client connects with `wss://`, trusting the relay's
//! self-signed certificate through `--relay-ca`; a client that does not trust it stops and says
//! what to pass; a caller that opens a connection and never finishes its handshake is dropped; a
//! TLS relay on two threads gets its lane over wss too.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_client::ClientError;
use ferry_tests::*;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// A self-signed certificate for 127.0.0.1, its PEM files in a temporary directory.
struct TestCert {
    der: CertificateDer<'static>,
    cert_pem: PathBuf,
    key_pem: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCert {
    fn new() -> TestCert {
        Self::made(false)
    }

    /// Marked as a CA (`basicConstraints CA:TRUE`), as `openssl req -x509` makes them.
    fn marked_as_ca() -> TestCert {
        Self::made(true)
    }

    fn made(ca: bool) -> TestCert {
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert_pem = dir.path().join("cert.pem");
        let key_pem = dir.path().join("key.pem");
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        std::fs::write(&key_pem, key.serialize_pem()).unwrap();
        TestCert {
            der: cert.der().clone(),
            cert_pem,
            key_pem,
            _dir: dir,
        }
    }

    /// A relay serving HTTPS with this certificate, loaded from its PEM files.
    async fn relay(&self) -> TestRelay {
        let serve_tls = self.serve_tls();
        TestRelay::start_with(serve_tls).await
    }

    /// What makes a test relay's configuration serve HTTPS with this certificate.
    fn serve_tls(&self) -> impl FnOnce(&mut ferry_relay::RelayConfig) {
        let tls = ferry_relay::tls::server_config(&self.cert_pem, &self.key_pem).unwrap();
        move |config| {
            config.public_url = config.public_url.replace("http://", "https://");
            config.public_scheme = "https".to_owned();
            config.tls = Some(tls);
        }
    }

    /// POSTs `body` to `path` of the relay at `addr` over a TLS connection of its own speaking
    /// HTTP/1.1; returns the status and body of the answer.
    async fn post_h1(
        &self,
        addr: std::net::SocketAddr,
        path: &str,
        body: &'static str,
    ) -> (http::StatusCode, Bytes) {
        let io = self.connect(addr, b"http/1.1").await;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let mut request = post(path, body);
        let host = addr.to_string().parse().unwrap();
        request.headers_mut().insert(http::header::HOST, host);
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    /// An echoing origin, a relay serving HTTPS with this certificate, and a client connected
    /// to it over wss that trusts the certificate through `--relay-ca`.
    async fn tunnel(&self) -> (Origin, TestRelay, TestClient) {
        let origin = Origin::start(Behaviour::Echo).await;
        let relay = self.relay().await;
        let config = https_client_config(&relay, &origin.addr().to_string(), self);
        let client = TestClient::start(config).await;
        (origin, relay, client)
    }

    /// A caller's TLS connection to `addr`, offering `alpn`.
    async fn connect(
        &self,
        addr: std::net::SocketAddr,
        alpn: &[u8],
    ) -> TokioIo<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        TokioIo::new(tls)
    }
}

fn https_client_config(
    relay: &TestRelay,
    target: &str,
    cert: &TestCert,
) -> ferry_client::ClientConfig {
    let mut config = client_config(&format!("https://{}", relay.addr), target);
    config.relay_ca = Some(cert.cert_pem.clone());
    config
}

/// POSTs `{}` through `client`'s public URL, expects a 502 and returns its body.
async fn bad_gateway_detail(client: &TestClient) -> String {
    let url = format!("{}/x", client.url);
    let (status, _, body) = send(http::Method::POST, &url, &[], Bytes::from_static(b"{}")).await;
    assert_eq!(status, 502);
    String::from_utf8_lossy(&body).into_owned()
}

fn post(uri: &str, body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::post(uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test]
async fn https_callers_reach_the_app_over_http1_and_http2_through_a_tls_relay() {
    let cert = TestCert::new();
    let (origin, relay, client) = cert.tunnel().await;
    assert!(client.url.starts_with("https://"), "{}", client.url);

    // HTTP/1.1 over TLS.
    let uri = format!("/{}/hook?over=h1", client.session);
    let (status, body) = cert.post_h1(relay.addr, &uri, "{\"over\":\"h1\"}").await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"{\"over\":\"h1\"}");
    let seen = origin.next_request().await;
    assert_eq!(seen.uri, "/hook?over=h1");
    assert_eq!(seen.header_str("x-forwarded-proto"), Some("https"));

    // HTTP/2 over TLS, as browsers and most providers speak it.
    let io = cert.connect(relay.addr, b"h2").await;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(connection);
    let uri = format!(
        "https://127.0.0.1:{}/{}/hook?over=h2",
        relay.addr.port(),
        client.session
    );
    let response = sender
        .send_request(post(&uri, "{\"over\":\"h2\"}"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"{\"over\":\"h2\"}");
    assert_eq!(origin.next_request().await.uri, "/hook?over=h2");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_relays_certificate_stops_and_says_what_to_pass() {
    let cert = TestCert::new();
    let relay = cert.relay().await;
    let mut config = https_client_config(&relay, "127.0.0.1:9", &cert);
    config.relay_ca = None;
    let Err(ClientError::Refused(message)) = TestClient::spawn(config).finished().await else {
        panic!("the client should stop, refused");
    };
    assert!(message.contains("certificate"), "{message}");
    assert!(message.contains("--relay-ca"), "{message}");
}

#[tokio::test]
async fn a_self_signed_certificate_marked_as_a_ca_is_accepted_as_given_with_relay_ca() {
    // The usual check refuses a CA certificate as a server's own; given with --relay-ca, the
    // very certificate the relay presents is accepted.
    let cert = TestCert::marked_as_ca();
    let (origin, relay, client) = cert.tunnel().await;
    // Ready: the WebSocket handshake and the hello went over TLS with this certificate.
    assert!(client.url.starts_with("https://"), "{}", client.url);

    // Another certificate of the same kind in --relay-ca does not let this relay through.
    let other = TestCert::marked_as_ca();
    let mut config = https_client_config(&relay, &origin.addr().to_string(), &other);
    config.relay_ca = Some(other.cert_pem.clone());
    let Err(ClientError::Refused(message)) = TestClient::spawn(config).finished().await else {
        panic!("a relay presenting a certificate nobody trusts must be refused");
    };
    assert!(message.contains("certificate"), "{message}");
}

#[tokio::test]
async fn a_relay_ca_file_that_is_not_a_certificate_is_named() {
    let cert = TestCert::new();
    let relay = cert.relay().await;
    let mut config = https_client_config(&relay, "127.0.0.1:9", &cert);
    config.relay_ca = Some(cert.key_pem.clone());
    let Err(ClientError::Config(message)) = TestClient::spawn(config).finished().await else {
        panic!("the client should stop at its configuration");
    };
    assert!(message.contains("--relay-ca"), "{message}");
    assert!(message.contains("key.pem"), "{message}");
    assert!(message.contains("no certificate"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_never_finishes_its_tls_handshake_is_dropped() {
    let cert = TestCert::new();
    let relay = cert.relay().await;
    for sent in [&b""[..], b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"] {
        let mut caller = TcpStream::connect(relay.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut caller, sent)
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        // The clock is paused: it moves on only while every task waits, so this returns when
        // the relay gives up on the handshake, at the head timeout.
        let read = tokio::time::timeout(Duration::from_secs(60), caller.read(&mut [0u8; 64]))
            .await
            .expect("the relay still held the connection after a minute");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the relay answered a handshake that never finished: {read:?}"
        );
        assert!(started.elapsed() >= Duration::from_secs(10));
    }
}

#[tokio::test]
async fn the_wrong_scheme_for_the_relay_is_named_with_the_right_one() {
    let cert = TestCert::new();
    let tls_relay = cert.relay().await;
    let plain_relay = TestRelay::start().await;

    // http:// to a relay that serves HTTPS.
    let config = client_config(&format!("http://{}", tls_relay.addr), "127.0.0.1:9");
    let Err(ClientError::Refused(message)) = TestClient::spawn(config).finished().await else {
        panic!("the client should stop");
    };
    assert!(message.contains("use an https://"), "{message}");
    let api =
        ferry_client::api::HistoryApi::new(&format!("http://{}", tls_relay.addr), TOKEN, "s", None)
            .unwrap();
    let message = api.list("").await.unwrap_err();
    assert!(message.contains("use an https://"), "{message}");

    // https:// to a relay that serves plain HTTP.
    let mut config = client_config(&format!("https://{}", plain_relay.addr), "127.0.0.1:9");
    config.relay_ca = Some(cert.cert_pem.clone());
    let Err(ClientError::Refused(message)) = TestClient::spawn(config).finished().await else {
        panic!("the client should stop");
    };
    assert!(message.contains("use an http://"), "{message}");
    let api = ferry_client::api::HistoryApi::new(
        &format!("https://{}", plain_relay.addr),
        TOKEN,
        "s",
        None,
    )
    .unwrap();
    let message = api.list("").await.unwrap_err();
    assert!(message.contains("use an http://"), "{message}");
}

/// An HTTPS app on 127.0.0.1 with `cert`: echoes each request's body, with its path in
/// `x-path`; counts the TLS connections it accepted.
async fn https_app(cert: &TestCert) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let config = ferry_relay::tls::server_config(&cert.cert_pem, &cert.key_pem).unwrap();
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let path = req.uri().to_string();
                        let body = req.into_body().collect().await?.to_bytes();
                        let response = http::Response::builder()
                            .header("x-path", path)
                            .body(Full::new(body))
                            .unwrap();
                        Ok::<_, hyper::Error>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn an_https_app_on_this_machine_is_reached_over_tls_and_its_connections_reused() {
    // A self-signed certificate marked as a CA, as local dev servers have: not checked for an
    // app on this machine.
    let cert = TestCert::marked_as_ca();
    let (app, connections) = https_app(&cert).await;
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(
        &relay.url(),
        &format!("https://127.0.0.1:{}/hooks", app.port()),
    ))
    .await;
    let big = Bytes::from(pattern(0, 3 << 20));
    for (path, body) in [
        ("/a?x=1", Bytes::from_static(b"{\"first\":true}")),
        ("/b", big.clone()),
        ("/c", Bytes::from_static(b"third")),
    ] {
        let (status, headers, echoed) = send(
            http::Method::POST,
            &format!("{}{path}", client.url),
            &[],
            body.clone(),
        )
        .await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(headers["x-path"], format!("/hooks{path}"));
        assert_eq!(echoed.len(), body.len(), "{path}");
        assert!(echoed == body, "{path}: the body came back changed");
    }
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one TLS connection, kept alive and reused"
    );
}

#[tokio::test]
async fn an_https_app_that_fails_the_handshake_gives_502_naming_it() {
    // A plain-HTTP app given as an https:// target.
    let origin = Origin::start(Behaviour::Echo).await;
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(
        &relay.url(),
        &format!("https://127.0.0.1:{}", origin.addr().port()),
    ))
    .await;
    let detail = bad_gateway_detail(&client).await;
    assert!(detail.contains("https://127.0.0.1"), "{detail}");
    assert!(detail.contains("did not answer in TLS"), "{detail}");
    assert!(detail.contains("use an http:// target"), "{detail}");
}

#[tokio::test]
async fn an_http_target_that_serves_https_gets_a_502_with_the_hint() {
    let cert = TestCert::new();
    let (app, _) = https_app(&cert).await;
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(&relay.url(), &app.to_string())).await;
    let detail = bad_gateway_detail(&client).await;
    assert!(detail.contains("use an https:// target"), "{detail}");
}

#[tokio::test]
async fn a_tls_relay_on_two_threads_gets_a_lane_over_wss_and_callers_reach_the_app() {
    let cert = TestCert::new();
    let serve_tls = cert.serve_tls();
    let relay_stats = Arc::new(ferry_mux::MuxStats::default());
    let stats = relay_stats.clone();
    let relay = TestRelay::start_threads(2, move |config| {
        serve_tls(config);
        config.stats = stats;
    })
    .await;
    let origin = Origin::start(Behaviour::Echo).await;
    let client = TestClient::start(https_client_config(
        &relay,
        &origin.addr().to_string(),
        &cert,
    ))
    .await;
    // Callers on TLS connections of their own land on both threads: the relay asks for a lane,
    // which the client opens over wss with the same trusted certificate.
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    let mut sent = 0;
    while relay_stats.connections() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no lane after {sent} callers"
        );
        let path = format!("/{}/hook", client.session);
        let (status, body) = cert.post_h1(relay.addr, &path, "{\"lane\":true}").await;
        assert_eq!(status, 200);
        assert_eq!(&body[..], b"{\"lane\":true}");
        sent += 1;
    }
}
