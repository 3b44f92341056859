//! Upstream failures are per-SN errors, never cached, and never fail the other SNs.

use crate::support::{Reply, TestApp, results, wait_until};
use serde_json::Value;
use std::time::Duration;

async fn app_with_faults() -> TestApp {
    let app = TestApp::spawn_with(|config| {
        config.upstream.timeout = Duration::from_millis(1500);
        config.upstream.max_body_bytes = 64 * 1024;
    })
    .await;
    app.upstream.reply("E500", Reply::Status(500, "boom"));
    app.upstream.reply("E503", Reply::Status(503, "{}"));
    app.upstream.reply("E429", Reply::Status(429, "{}"));
    app.upstream
        .reply("HTML", Reply::Status(200, "<html>oops</html>"));
    app.upstream
        .reply("TRUNC", Reply::Status(200, r#"{"ratio": "0."#));
    app.upstream.reply("HUGE", Reply::ChunkedBody(1024 * 1024));
    app.upstream.reply("SIZED", Reply::SizedBody(1024 * 1024));
    // Had the proxy buffered the body whole, this would end in upstream_timeout.
    app.upstream.reply("ENDLESS", Reply::EndlessBody);
    app.upstream
        .reply("REDIR", Reply::Redirect("/contract/?sn=TARGET"));
    app.upstream.reply("E418", Reply::Status(418, "{}"));
    app.upstream.reply("SLOW", Reply::Hang);
    app
}

#[tokio::test]
async fn upstream_failures_are_item_errors_and_the_rest_of_the_batch_succeeds() {
    let app = app_with_faults().await;
    let sns = [
        "OK1", "E500", "E503", "E429", "HTML", "TRUNC", "HUGE", "SIZED", "ENDLESS", "REDIR",
        "E418", "SLOW", "OK2",
    ];
    let body = app.lookup(&sns).await;
    let items = results(&body);
    let code = |i: usize| {
        items[i]["error"]["code"]
            .as_str()
            .unwrap_or("none")
            .to_owned()
    };
    let last = sns.len() - 1;
    assert_eq!(items[0]["status"], "ok");
    assert_eq!(items[last]["status"], "ok");
    for i in 1..last - 1 {
        assert_eq!(items[i]["status"], "error", "{}", sns[i]);
        assert_eq!(code(i), "upstream_error", "{}", sns[i]);
    }
    assert_eq!(items[last - 1]["status"], "error");
    assert_eq!(code(last - 1), "upstream_timeout");
    assert_eq!(body["summary"]["errors"], last - 1);
    for sn in &sns[1..last] {
        assert_eq!(
            app.redis_value(sn).await,
            None,
            "{sn}: an upstream error is never cached"
        );
    }
    assert!(app.redis_value("OK1").await.is_some());
    assert_eq!(
        app.upstream.calls("TARGET"),
        0,
        "redirects are not followed"
    );
}

#[tokio::test]
async fn a_failed_sn_is_fetched_again_on_the_next_lookup() {
    let app = app_with_faults().await;
    app.lookup(&["E500"]).await;
    app.lookup(&["E500"]).await;
    assert_eq!(app.upstream.calls("E500"), 2, "errors are not remembered");
}

#[tokio::test]
async fn single_gets_map_upstream_failures_to_502_and_504() {
    let app = app_with_faults().await;
    for (sn, status, code) in [
        ("E500", 502, "upstream_error"),
        ("E429", 502, "upstream_error"),
        ("HTML", 502, "upstream_error"),
        ("HUGE", 502, "upstream_error"),
        ("SLOW", 504, "upstream_timeout"),
    ] {
        let response = app.get(&format!("/v1/discounts/{sn}")).await;
        assert_eq!(response.status(), status, "{sn}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{sn}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_an_upstream_error() {
    let (_refusing, port) = crate::support::refusing_port();
    let app = TestApp::spawn_with(|config| {
        config.upstream.url = format!("http://127.0.0.1:{port}/contract/?sn={{sn}}");
    })
    .await;
    let response = app.get("/v1/discounts/C1").await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error");
    assert_eq!(app.redis_value("C1").await, None);
}

#[tokio::test]
async fn the_upstream_token_is_sent_and_never_leaks_into_responses() {
    let app = TestApp::spawn_with(|config| {
        config.upstream.token = Some(discount_proxy::secret::Secret::new("s3cr3t-upstream"));
    })
    .await;
    app.upstream
        .reply("E500", Reply::Status(500, "s3cr3t-upstream"));
    let body = app.lookup(&["C1", "E500"]).await;
    assert_eq!(
        app.upstream.authorizations(),
        vec![Some("Token s3cr3t-upstream".to_owned()); 2]
    );
    assert!(!body.to_string().contains("s3cr3t"), "{body}");
}

#[tokio::test]
async fn past_the_deadline_unresolved_sns_are_deadline_exceeded_and_still_written_back() {
    let app = TestApp::spawn_with(|config| {
        config.server.request_timeout = Duration::from_millis(1000);
        config.upstream.timeout = Duration::from_secs(5);
    })
    .await;
    app.upstream
        .set_latency_for("LATE", Duration::from_millis(2500));
    let body = app.lookup(&["FAST", "LATE"]).await;
    let items = results(&body);
    assert_eq!(items[0]["status"], "ok");
    assert_eq!(items[1]["status"], "error");
    assert_eq!(items[1]["error"]["code"], "deadline_exceeded");
    // What resolved is already cached, without waiting for the slow SN of its batch.
    assert_eq!(app.upstream.in_flight(), 1, "LATE is still being fetched");
    assert!(
        app.redis_value("FAST").await.is_some(),
        "FAST was written back before LATE ended"
    );
    // The fetch goes on in the background and is written back.
    wait_until("LATE is written back", Duration::from_secs(5), || async {
        app.redis_value("LATE").await.is_some()
    })
    .await;
    let again = app.lookup(&["FAST", "LATE"]).await;
    assert_eq!(again["summary"]["cache_hits"], 2);
    assert_eq!(app.upstream.calls("LATE"), 1);
}

#[tokio::test]
async fn the_deadline_counts_from_arrival_so_a_slow_body_uses_it_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(|config| {
        config.server.request_timeout = Duration::from_millis(1500);
        config.upstream.timeout = Duration::from_secs(5);
    })
    .await;
    app.upstream.set_latency(Duration::from_millis(1000));
    let body = r#"{"sns": ["SLOWBODY"]}"#;
    let head = format!(
        "POST /v1/discounts/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    // The slow client is the scenario: its body comes 1 s after its headers. Counted from
    // arrival, 0.5 s are left for a 1 s fetch; counted from the body, 1.5 s would be.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("deadline_exceeded"), "{answer}");
}
