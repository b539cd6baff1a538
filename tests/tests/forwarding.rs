//! Requests reach the local app byte-exactly and its answers come back to the right caller.

use bytes::Bytes;
use ferry_tests::*;
use http::Method;

async fn tunnel(behaviour: Behaviour) -> (TestRelay, TestClient, Origin) {
    let origin = Origin::start(behaviour).await;
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(&relay.url(), &origin.addr().to_string())).await;
    (relay, client, origin)
}

#[tokio::test]
async fn every_method_reaches_the_app_with_path_and_query() {
    let (_relay, client, origin) = tunnel(Behaviour::Echo).await;
    for method in [
        "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "PROPFIND",
    ] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (status, headers, _) = send(
            method.clone(),
            &format!("{}/m/{method}?q=1", client.url),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(status, 200, "{method}");
        let seen = origin.next_request().await;
        assert_eq!(seen.method, method.as_str());
        assert_eq!(seen.uri, format!("/m/{method}?q=1"));
        if method != Method::HEAD {
            assert_eq!(headers.get("x-origin-method").unwrap(), method.as_str());
        }
    }
}

#[tokio::test]
async fn bodies_of_every_size_arrive_intact() {
    let (_relay, client, origin) = tunnel(Behaviour::Echo).await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"{\"id\":\"evt_1\"}".repeat(80)[..1024].to_vec(),
        pattern(0, 5 * 1024 * 1024),
        binary,
    ];
    for body in bodies {
        let (status, _, echoed) = send(
            Method::POST,
            &format!("{}/hook", client.url),
            &[("content-type", "application/octet-stream")],
            body.clone(),
        )
        .await;
        assert_eq!(status, 200);
        let seen = origin.next_request().await;
        assert_eq!(seen.body_len, body.len() as u64);
        assert_eq!(seen.body_sha256_hex, sha256_hex(&body));
        assert_eq!(
            sha256_hex(&echoed),
            sha256_hex(&body),
            "response body intact"
        );
    }
}

#[tokio::test]
async fn each_request_event_counts_the_bytes_carried_each_way() {
    let (_relay, mut client, origin) = tunnel(Behaviour::Echo).await;
    for len in [0, 1024, 200_000] {
        let body = pattern(7, len);
        let (status, _, echoed) =
            send(Method::POST, &format!("{}/count", client.url), &[], body).await;
        assert_eq!(status, 200);
        assert_eq!(echoed.len(), len);
        assert_eq!(origin.next_request().await.body_len, len as u64);
        let event = client
            .wait_for(WAIT_TIMEOUT, |e| match e {
                ferry_client::Event::Request(r) => Some(r.clone()),
                _ => None,
            })
            .await;
        assert_eq!(event.request_bytes, len as u64, "request body of {len}");
        assert_eq!(event.response_bytes, len as u64, "response body of {len}");
    }
}

#[tokio::test]
async fn chunked_request_bodies_are_streamed_through() {
    let (_relay, client, origin) = tunnel(Behaviour::Echo).await;
    let chunks: Vec<Bytes> = (0..50)
        .map(|i| Bytes::from(vec![i as u8; 1000 + i]))
        .collect();
    let whole: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let (status, _, echoed) = try_send(
        Method::POST,
        &format!("{}/chunked", client.url),
        &[],
        chunked_body(chunks),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let seen = origin.next_request().await;
    assert_eq!(seen.body_sha256_hex, sha256_hex(&whole));
    assert_eq!(&echoed[..], &whole[..]);
}

#[tokio::test]
async fn paths_and_queries_pass_exactly_as_sent() {
    let (relay, client, origin) = tunnel(Behaviour::Echo).await;
    let session = &client.session;
    for (sent, expected) in [
        (format!("/{session}/a/b?x=1"), "/a/b?x=1"),
        (format!("/{session}"), "/"),
        (format!("/{session}?z=9&a=1&z=2"), "/?z=9&a=1&z=2"),
        (
            format!("/{session}/p%2Fq//r/%E2%9C%93/../s?sig=a%2Bb%3D&empty=&flag"),
            "/p%2Fq//r/%E2%9C%93/../s?sig=a%2Bb%3D&empty=&flag",
        ),
    ] {
        let request =
            format!("GET {sent} HTTP/1.1\r\nhost: relay.test\r\nconnection: close\r\n\r\n");
        let response = parse_response(&raw_http(relay.addr, request.as_bytes()).await).unwrap();
        assert_eq!(response.status, 200, "{sent}");
        assert_eq!(origin.next_request().await.uri, expected);
    }
}

#[tokio::test]
async fn a_target_path_prefix_is_put_in_front() {
    let origin = Origin::start(Behaviour::Echo).await;
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(
        &relay.url(),
        &format!("http://{}/webhooks", origin.addr()),
    ))
    .await;
    send(
        Method::POST,
        &format!("{}/stripe?x=1", client.url),
        &[],
        "{}",
    )
    .await;
    assert_eq!(origin.next_request().await.uri, "/webhooks/stripe?x=1");
    send(Method::POST, &client.url, &[], "{}").await;
    assert_eq!(origin.next_request().await.uri, "/webhooks");
}

#[tokio::test]
async fn repeated_and_non_utf8_header_values_arrive_intact() {
    let (relay, client, origin) = tunnel(Behaviour::Echo).await;
    let mut request = format!("POST /{}/h HTTP/1.1\r\nHost: relay.test\r\nX-Dup: one\r\nStripe-Signature: t=1700000000,v1=abc,v1=def\r\nX-Dup: two\r\n", client.session).into_bytes();
    request.extend_from_slice(b"X-Latin: caf\xe9 \xff\r\nX-Spaces: a  b\t c\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbody");
    let response = parse_response(&raw_http(relay.addr, &request).await).unwrap();
    assert_eq!(response.status, 200);
    let seen = origin.next_request().await;
    assert_eq!(seen.header_all("x-dup"), vec![&b"one"[..], b"two"]);
    assert_eq!(seen.header("x-latin").unwrap(), b"caf\xe9 \xff");
    assert_eq!(seen.header("x-spaces").unwrap(), b"a  b\t c");
    assert_eq!(
        seen.header("stripe-signature").unwrap(),
        b"t=1700000000,v1=abc,v1=def"
    );
}

#[tokio::test]
async fn forwarding_headers_are_added_and_hop_by_hop_ones_removed() {
    let (relay, client, origin) = tunnel(Behaviour::Echo).await;
    let request = format!(
        "POST /{}/x HTTP/1.1\r\nHost: hooks.example.com\r\nX-Forwarded-For: 203.0.113.9\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nContent-Length: 2\r\n\r\n{{}}",
        client.session
    );
    let response = parse_response(&raw_http(relay.addr, request.as_bytes()).await).unwrap();
    assert_eq!(response.status, 200);
    let seen = origin.next_request().await;
    assert_eq!(
        seen.header_str("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(seen.header_str("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen.header_str("x-forwarded-host"),
        Some("hooks.example.com")
    );
    assert_eq!(
        seen.header_str("x-forwarded-prefix"),
        Some(format!("/{}", client.session).as_str())
    );
    assert_eq!(
        seen.header_str("host"),
        Some(origin.addr().to_string().as_str())
    );
    for hop in ["x-hop", "keep-alive", "te"] {
        assert!(seen.header(hop).is_none(), "{hop} must be stripped");
    }
}

#[tokio::test]
async fn the_apps_status_headers_and_body_come_back() {
    let response = FixedResponse::new(418, "short and stout")
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2")
        .header("x-app", "teapot");
    let (_relay, client, _origin) = tunnel(Behaviour::Fixed(response)).await;
    let (status, headers, body) =
        send(Method::POST, &format!("{}/brew", client.url), &[], "{}").await;
    assert_eq!(status, 418);
    let cookies: Vec<_> = headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(headers.get("x-app").unwrap(), "teapot");
    assert_eq!(&body[..], b"short and stout");
}

#[tokio::test]
async fn the_apps_own_errors_are_relayed_not_masked() {
    let (_relay, client, _origin) = tunnel(Behaviour::Fixed(
        FixedResponse::new(500, "app exploded").header("x-trace", "t1"),
    ))
    .await;
    let (status, headers, body) =
        send(Method::POST, &format!("{}/hook", client.url), &[], "{}").await;
    assert_eq!(status, 500);
    assert_eq!(headers.get("x-trace").unwrap(), "t1");
    assert_eq!(&body[..], b"app exploded");
}

#[tokio::test]
async fn a_hundred_concurrent_requests_each_reach_the_app_once_and_answer_their_caller() {
    let (_relay, client, origin) = tunnel(Behaviour::Echo).await;
    let http = http_client();
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let http = http.clone();
        let url = format!("{}/n/{i}", client.url);
        tasks.push(tokio::spawn(async move {
            let body = format!(
                "{{\"request\":{i},\"pad\":\"{}\"}}",
                "x".repeat(i as usize * 37)
            );
            let (status, _, echoed) =
                send_with(&http, Method::POST, &url, &[], full_body(body.clone()))
                    .await
                    .unwrap();
            assert_eq!(status, 200);
            assert_eq!(
                echoed,
                body.as_bytes(),
                "request {i} got someone else's answer"
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut seen: Vec<String> = origin.requests().into_iter().map(|r| r.uri).collect();
    seen.sort();
    let mut expected: Vec<String> = (0..100).map(|i| format!("/n/{i}")).collect();
    expected.sort();
    assert_eq!(seen, expected, "each delivered exactly once");
}

#[tokio::test]
async fn http2_callers_are_served() {
    let (_relay, client, origin) = tunnel(Behaviour::Echo).await;
    let http2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let (status, _, body) = send_with(
        &http2,
        Method::POST,
        &format!("{}/h2?v=2", client.url),
        &[("x-sig", "abc")],
        full_body("over h2"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"over h2");
    let seen = origin.next_request().await;
    assert_eq!(seen.uri, "/h2?v=2");
    assert_eq!(seen.header_str("x-sig"), Some("abc"));
}

#[tokio::test]
async fn absolute_form_requests_and_foreign_hosts_cannot_redirect_the_client() {
    let (relay, client, origin) = tunnel(Behaviour::Echo).await;
    let request = format!(
        "POST http://evil.example:81/{}/x?y=1 HTTP/1.1\r\nHost: evil.example:81\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        client.session
    );
    let response = parse_response(&raw_http(relay.addr, request.as_bytes()).await).unwrap();
    assert_eq!(response.status, 200);
    let seen = origin.next_request().await;
    assert_eq!(seen.uri, "/x?y=1");
    assert_eq!(
        seen.header_str("host"),
        Some(origin.addr().to_string().as_str())
    );
    assert_eq!(seen.header_str("x-forwarded-host"), Some("evil.example:81"));
}

#[tokio::test]
async fn response_header_values_that_are_not_utf8_come_back_intact() {
    let (relay, client, _origin) = tunnel(Behaviour::Fixed(
        FixedResponse::new(200, "ok")
            .header("x-latin", b"caf\xe9".as_slice())
            .header("x-dup", "1")
            .header("x-dup", "2"),
    ))
    .await;
    let request = format!(
        "GET /{}/ HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n",
        client.session
    );
    let response = parse_response(&raw_http(relay.addr, request.as_bytes()).await).unwrap();
    assert_eq!(response.header("x-latin").unwrap(), b"caf\xe9");
    assert_eq!(response.header_all("x-dup"), vec![&b"1"[..], b"2"]);
    assert_eq!(response.body, b"ok");
}

#[tokio::test]
async fn connections_to_the_app_are_kept_for_a_burst_larger_than_64() {
    // 100 webhooks at once need 100 connections to the app; a second burst must reuse them
    // all rather than close and reopen some (churn that costs a third of the throughput).
    const BURST: u64 = 100;
    let gate = ReadGate::new();
    let (_relay, client, origin) = tunnel(Behaviour::SlowReader(gate.clone())).await;
    let url = format!("{}/burst", client.url);
    for round in 1..=2 {
        let calls: Vec<_> = (0..BURST)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { send(Method::POST, &url, &[], "x").await })
            })
            .collect();
        // Every request is at the app at once (one read each, the gate closed): one
        // connection each.
        gate.wait_reads_asked(BURST * round).await;
        gate.allow(BURST as usize);
        for call in calls {
            assert_eq!(call.await.unwrap().0, 200);
        }
        assert_eq!(
            origin.connections(),
            BURST,
            "connections after round {round}"
        );
    }
}
