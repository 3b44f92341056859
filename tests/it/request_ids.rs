//! Request ids: taken from `X-Request-Id` or generated, echoed, and on every log line of the
//! request, the upstream fetches and write-backs it starts included.

use crate::support::{Process, RedisServer, Reply, StubUpstream, TestApp, wait_until};
use serde_json::Value;
use std::time::Duration;

async fn id_of(app: &TestApp, sent: Option<&str>) -> String {
    let mut request = app.client.get(app.url("/v1/discounts/R1"));
    if let Some(id) = sent {
        request = request.header("x-request-id", id);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_sent_id_is_echoed_and_a_missing_or_unsafe_one_is_generated() {
    let app = TestApp::spawn().await;
    assert_eq!(
        id_of(&app, Some("export-2026-11-22/7")).await,
        "export-2026-11-22/7"
    );
    let generated = id_of(&app, None).await;
    assert_eq!(generated.len(), 16);
    assert!(
        generated.bytes().all(|b| b.is_ascii_hexdigit()),
        "{generated}"
    );
    assert_ne!(
        generated,
        id_of(&app, None).await,
        "each request gets its own"
    );
    for unsafe_id in ["with space", &"x".repeat(129)] {
        let replaced = id_of(&app, Some(unsafe_id)).await;
        assert_ne!(replaced, unsafe_id);
        assert_eq!(replaced.len(), 16);
    }
    // Errors carry it too.
    let response = app
        .client
        .get(app.url("/nope"))
        .header("x-request-id", "e-1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            response.status().as_u16(),
            &response.headers()["x-request-id"]
        ),
        (404, &"e-1".parse::<reqwest::header::HeaderValue>().unwrap())
    );
}

#[tokio::test]
async fn json_logs_carry_the_request_id_into_the_upstream_fetch() {
    let redis = RedisServer::start();
    let upstream = StubUpstream::start().await;
    upstream.reply("FAILS", Reply::Status(500, "{}"));
    let proxy = Process::spawn(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            &redis.url(),
        ],
        &[
            ("RUST_LOG", "info"),
            ("DISCOUNT_PROXY_LOG__FORMAT", "json"),
            ("DISCOUNT_PROXY_UPSTREAM__RETRIES", "0"),
            ("DISCOUNT_PROXY_UPSTREAM__URL", &upstream.url_template()),
        ],
    );
    // Port 0: the address is in the JSON `listening` line.
    let listening = proxy
        .wait_for_line(r#""message":"listening""#, Duration::from_secs(20))
        .await;
    let listening: Value = serde_json::from_str(&listening).unwrap();
    let listen = listening["fields"]["addr"].as_str().unwrap().to_owned();
    let client = crate::support::http_client();
    let url = format!("http://{listen}/v1/discounts/FAILS");
    let response = client
        .get(&url)
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let failure = proxy
        .wait_for_line("upstream fetch failed", Duration::from_secs(10))
        .await;
    let failure: Value = serde_json::from_str(&failure).unwrap();
    assert_eq!(failure["level"], "WARN");
    let spans = failure["spans"].as_array().unwrap();
    assert_eq!(spans[0]["name"], "request");
    assert_eq!(spans[0]["id"], "trace-me-42");
    assert_eq!(spans[1]["name"], "upstream_fetch");
    let request_line = || {
        proxy.output().lines().find_map(|line| {
            let line: Value = serde_json::from_str(line).ok()?;
            (line["fields"]["message"] == "request" && line["span"]["id"] == "trace-me-42")
                .then_some(line)
        })
    };
    wait_until(
        "the request's own log line",
        Duration::from_secs(10),
        || async { request_line().is_some() },
    )
    .await;
    let request_line = request_line().unwrap();
    assert_eq!(request_line["span"]["id"], "trace-me-42");
    assert_eq!(request_line["fields"]["status"], 502);
}
