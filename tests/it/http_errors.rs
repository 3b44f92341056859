//! Every error of the contract's table that the lookup endpoints can produce, as JSON.

use crate::support::TestApp;
use serde_json::{Value, json};

async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status, "expected {code}");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test]
async fn a_body_that_is_not_json_is_invalid_json() {
    let app = TestApp::spawn().await;
    for body in [
        "{\"sns\": [",
        "not json",
        "",
        "\u{feff}{\"sns\":[\"A\"]}",
        "{\"sns\": [\"A\"]} trailing",
    ] {
        let response = app
            .post_raw("/v1/discounts/lookup", "application/json", body.to_owned())
            .await;
        expect_error(response, 400, "invalid_json").await;
    }
    assert_eq!(app.upstream.total_calls(), 0);
}

#[tokio::test]
async fn json_of_the_wrong_shape_is_invalid_request() {
    let app = TestApp::spawn().await;
    for body in [
        json!({}),
        json!({"sns": "C1"}),
        json!({"sns": [1, 2]}),
        json!({"sns": ["C1", null]}),
        json!({"sns": []}),
        json!(["C1"]),
        json!({"sns": null}),
    ] {
        let response = app.post_json("/v1/discounts/lookup", &body).await;
        expect_error(response, 400, "invalid_request").await;
    }
    let deep = format!("{{\"sns\": {}\"A\"{}}}", "[".repeat(300), "]".repeat(300));
    let response = app
        .post_raw("/v1/discounts/lookup", "application/json", deep)
        .await;
    expect_error(response, 400, "invalid_request").await;
    let response = app
        .post_json(
            "/v1/discounts/lookup?refresh=maybe",
            &json!({"sns": ["C1"]}),
        )
        .await;
    expect_error(response, 400, "invalid_request").await;
    assert_eq!(app.upstream.total_calls(), 0);
}

#[tokio::test]
async fn an_invalid_sn_in_the_path_is_400_invalid_sn() {
    let app = TestApp::spawn().await;
    let long = "x".repeat(129);
    for path in [
        "a%20b",
        "a%0D%0AFLUSHALL",
        "%FF%FE",
        long.as_str(),
        "nul%00",
    ] {
        let response = app.get(&format!("/v1/discounts/{path}")).await;
        expect_error(response, 400, "invalid_sn").await;
    }
    assert_eq!(app.upstream.total_calls(), 0);
}

#[tokio::test]
async fn unknown_routes_are_404_not_found() {
    let app = TestApp::spawn().await;
    for path in [
        "/",
        "/v1",
        "/v1/discounts",
        "/v1/discounts/",
        "/v2/discounts/C1",
        "/metricsx",
    ] {
        expect_error(app.get(path).await, 404, "not_found").await;
    }
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow() {
    let app = TestApp::spawn().await;
    let cases = [
        (reqwest::Method::GET, "/v1/discounts/lookup", "POST"),
        (reqwest::Method::PUT, "/v1/discounts/lookup", "POST"),
        (reqwest::Method::GET, "/v1/discounts/invalidate", "POST"),
        (reqwest::Method::POST, "/v1/discounts/C1", "GET, DELETE"),
        (reqwest::Method::PATCH, "/v1/discounts/C1", "GET, DELETE"),
        (reqwest::Method::POST, "/healthz", "GET, HEAD"),
        (reqwest::Method::DELETE, "/readyz", "GET, HEAD"),
    ];
    for (method, path, allow) in cases {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        expect_error(response, 405, "method_not_allowed").await;
    }
}

#[tokio::test]
async fn more_sns_than_max_batch_is_413_batch_too_large() {
    let app = TestApp::spawn_with(|config| config.server.max_batch = 10).await;
    let sns: Vec<String> = (0..11).map(|i| format!("C{i}")).collect();
    let response = app
        .post_json("/v1/discounts/lookup", &json!({ "sns": sns }))
        .await;
    expect_error(response, 413, "batch_too_large").await;
    assert_eq!(
        app.upstream.total_calls(),
        0,
        "no work for a rejected batch"
    );
    let response = app
        .post_json("/v1/discounts/lookup", &json!({ "sns": sns[..10] }))
        .await;
    assert_eq!(response.status(), 200, "exactly max_batch is fine");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_payload_too_large_whether_declared_or_chunked() {
    let app = TestApp::spawn_with(|config| config.server.max_body_bytes = 1024).await;
    let big =
        json!({ "sns": (0..200).map(|i| format!("C{i:05}")).collect::<Vec<_>>() }).to_string();
    assert!(big.len() > 1024);
    let declared = app
        .post_raw("/v1/discounts/lookup", "application/json", big.clone())
        .await;
    expect_error(declared, 413, "payload_too_large").await;
    // Chunked, with no Content-Length: the limit holds while reading.
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(100)
        .map(|c| Ok(String::from_utf8(c.to_vec()).unwrap()))
        .collect();
    let stream = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let chunked = app
        .post_raw("/v1/discounts/lookup", "application/json", stream)
        .await;
    expect_error(chunked, 413, "payload_too_large").await;
    assert_eq!(app.upstream.total_calls(), 0);
    // The server is still fine.
    let response = app
        .post_json("/v1/discounts/lookup", &json!({"sns": ["C1"]}))
        .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_body_that_is_not_declared_json_is_415() {
    let app = TestApp::spawn().await;
    let body = json!({"sns": ["C1"]}).to_string();
    for content_type in [
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/jsonx",
    ] {
        let response = app
            .post_raw("/v1/discounts/lookup", content_type, body.clone())
            .await;
        expect_error(response, 415, "unsupported_media_type").await;
    }
    let no_type = app
        .client
        .post(app.url("/v1/discounts/lookup"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    expect_error(no_type, 415, "unsupported_media_type").await;
    let with_charset = app
        .post_raw(
            "/v1/discounts/lookup",
            "Application/JSON; charset=utf-8",
            body,
        )
        .await;
    assert_eq!(with_charset.status(), 200);
}

#[tokio::test]
async fn with_api_tokens_v1_routes_need_a_valid_bearer_token() {
    use discount_proxy::secret::Secret;
    let app = TestApp::spawn_with(|config| {
        config.server.api_tokens = vec![Secret::new("tok-1"), Secret::new("tok-2")]
    })
    .await;
    let url = app.url("/v1/discounts/C1");
    for header in [
        None,
        Some("Bearer nope"),
        Some("tok-1"),
        Some("Bearer tok-1x"),
        Some("Basic dG9rLTE="),
    ] {
        let mut request = app.client.get(&url);
        if let Some(header) = header {
            request = request.header("authorization", header);
        }
        let body = expect_error(request.send().await.unwrap(), 401, "unauthorized").await;
        assert!(!body.to_string().contains("tok-"), "no token in the error");
    }
    // Every /v1 route, not only the single GET; and nothing is touched without a token.
    let mut redis = app.redis.client().await;
    let _: () = redis::cmd("SET")
        .arg(app.key("KEEP"))
        .arg("x")
        .arg("EX")
        .arg(60)
        .query_async(&mut redis)
        .await
        .unwrap();
    let sns = serde_json::json!({"sns": ["C1", "KEEP"]}).to_string();
    let unauthorised = [
        app.post_raw("/v1/discounts/lookup", "application/json", sns.clone())
            .await,
        app.post_raw("/v1/discounts/invalidate", "application/json", sns)
            .await,
        app.delete("/v1/discounts/KEEP").await,
    ];
    for response in unauthorised {
        expect_error(response, 401, "unauthorized").await;
    }
    assert!(
        app.redis_value("KEEP").await.is_some(),
        "no invalidation without a token"
    );
    assert_eq!(app.upstream.total_calls(), 0, "nothing is done before auth");
    let ok = app
        .client
        .get(&url)
        .header("authorization", "Bearer tok-2")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(app.get("/healthz").await.status(), 200, "health stays open");
    assert_eq!(
        app.get("/readyz").await.status(),
        200,
        "readiness stays open"
    );
}

/// Sends raw bytes on a fresh connection and returns everything the server answers.
async fn raw_exchange(app: &TestApp, request: &[u8], half_close: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    if half_close {
        stream.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await;
    assert!(
        read.is_ok(),
        "the server neither answered nor closed the connection"
    );
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_lying_content_length_is_a_clean_400_and_the_server_stays_up() {
    let app = TestApp::spawn().await;
    let body = r#"{"sns": ["C1"]}"#;
    // Claims more than it sends, then closes its side.
    let longer = format!(
        "POST /v1/discounts/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{body}"
    );
    let answer = raw_exchange(&app, longer.as_bytes(), true).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_request"), "{answer}");
    // Claims less than it sends: the JSON is cut short.
    let shorter = format!(
        "POST /v1/discounts/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{body}"
    );
    let answer = raw_exchange(&app, shorter.as_bytes(), false).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_json"), "{answer}");
    assert_eq!(app.upstream.total_calls(), 0);
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = TestApp::spawn_with(|config| {
        config.server.header_read_timeout = std::time::Duration::from_millis(300)
    })
    .await;
    // No blank line: the headers never end. The server must hang up rather than wait forever.
    let answer = raw_exchange(
        &app,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1",
        false,
    )
    .await;
    assert!(!answer.contains("200 OK"), "{answer}");
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn a_body_that_stalls_is_408_body_timeout() {
    let app = TestApp::spawn_with(|config| {
        config.server.body_read_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    let stalled = "POST /v1/discounts/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"sns\": [";
    let answer = raw_exchange(&app, stalled.as_bytes(), false).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
}

#[tokio::test]
async fn an_endless_chunked_body_is_cut_off_at_the_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(|config| config.server.max_body_bytes = 4096).await;
    let stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let head = "POST /v1/discounts/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    writer.write_all(head.as_bytes()).await.unwrap();
    // Write until the server stops us: at most 64 MiB, far past the 4 KiB limit.
    let feed = tokio::spawn(async move {
        let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
        let mut sent = 0usize;
        while sent < 64 * 1024 * 1024 && writer.write_all(chunk.as_bytes()).await.is_ok() {
            sent += 1024;
        }
        sent
    });
    let mut head = vec![0u8; 12];
    reader.read_exact(&mut head).await.unwrap();
    assert_eq!(
        &head, b"HTTP/1.1 413",
        "answered while the body was still coming"
    );
    let sent = feed.await.unwrap();
    assert!(sent < 64 * 1024 * 1024, "the server stopped reading early");
}
