//! Retries: transient upstream failures are tried again, with backoff, honouring
//! `Retry-After`, never past the deadline, and never for answers that would not change.

use crate::support::{Reply, StubUpstream, TestApp, results, wait_until};
use discount_proxy::config::Config;
use serde_json::{Value, json};
use std::time::Duration;

fn retrying(retries: u32) -> impl FnOnce(&mut Config) {
    move |config| {
        config.upstream.retries = retries;
        config.upstream.retry_backoff = Duration::from_millis(10);
        config.upstream.retry_backoff_max = Duration::from_millis(50);
    }
}

fn item(body: &Value) -> &Value {
    &results(body)[0]
}

#[tokio::test]
async fn timeouts_connection_errors_5xx_and_429_are_retried_until_an_answer() {
    let app = TestApp::spawn_with(retrying(3)).await;
    app.upstream.queue_replies(
        "FLAKY-1",
        vec![
            Reply::Status(500, "{}"),
            Reply::Status(503, "{}"),
            Reply::Status(429, "{}"),
        ],
    );
    let body = app.lookup(&["FLAKY-1"]).await;
    assert_eq!(
        *item(&body),
        json!({"sn": "FLAKY-1", "status": "ok", "source": "upstream", "discount": StubUpstream::discount_for("FLAKY-1")})
    );
    assert_eq!(
        app.upstream.calls("FLAKY-1"),
        4,
        "three failures, then the answer"
    );
    assert!(app.redis_value("FLAKY-1").await.is_some());
}

#[tokio::test]
async fn retries_are_bounded_and_the_last_error_is_reported() {
    let app = TestApp::spawn_with(retrying(2)).await;
    app.upstream.reply("DOWN-1", Reply::Status(502, "{}"));
    let body = app.lookup(&["DOWN-1"]).await;
    assert_eq!(item(&body)["error"]["code"], "upstream_error");
    assert_eq!(
        app.upstream.calls("DOWN-1"),
        3,
        "one attempt and two retries"
    );
    assert_eq!(
        app.redis_value("DOWN-1").await,
        None,
        "errors are never cached"
    );
}

#[tokio::test]
async fn timeouts_are_retried() {
    let app = TestApp::spawn_with(|config| {
        retrying(1)(config);
        config.upstream.timeout = Duration::from_millis(200);
    })
    .await;
    app.upstream.reply("SLOW-1", Reply::Hang);
    let body = app.lookup(&["SLOW-1"]).await;
    assert_eq!(item(&body)["error"]["code"], "upstream_timeout");
    assert_eq!(app.upstream.calls("SLOW-1"), 2);
}

#[tokio::test]
async fn not_found_and_bad_bodies_are_never_retried() {
    let app = TestApp::spawn_with(retrying(3)).await;
    app.upstream.reply("NF-1", Reply::Status(404, "{}"));
    app.upstream.reply("BAD-1", Reply::Status(200, "<html>"));
    app.upstream
        .reply("HUGE-1", Reply::SizedBody(2 * 1024 * 1024));
    let body = app.lookup(&["NF-1", "BAD-1", "HUGE-1"]).await;
    let items = results(&body);
    assert_eq!(items[0]["status"], "not_found");
    assert_eq!(items[1]["error"]["code"], "upstream_error");
    assert_eq!(items[2]["error"]["code"], "upstream_error");
    for sn in ["NF-1", "BAD-1", "HUGE-1"] {
        assert_eq!(app.upstream.calls(sn), 1, "{sn}");
    }
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let app = TestApp::spawn_with(retrying(1)).await;
    app.upstream
        .queue_replies("LATER-1", vec![Reply::RetryAfter(429, "1".to_owned())]);
    let body = app.lookup(&["LATER-1"]).await;
    assert_eq!(item(&body)["status"], "ok");
    let times = app.upstream.call_times("LATER-1");
    assert_eq!(times.len(), 2);
    let waited = times[1] - times[0];
    assert!(
        waited >= Duration::from_secs(1),
        "the retry came {waited:?} after a Retry-After of 1 s"
    );
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    let app = TestApp::spawn_with(retrying(1)).await;
    // Two seconds ahead, in the date form: the header has whole seconds, so at least one.
    let then = std::time::SystemTime::now() + Duration::from_secs(2);
    app.upstream.queue_replies(
        "LATER-DATE",
        vec![Reply::RetryAfter(503, httpdate::fmt_http_date(then))],
    );
    let body = app.lookup(&["LATER-DATE"]).await;
    assert_eq!(item(&body)["status"], "ok");
    let times = app.upstream.call_times("LATER-DATE");
    assert_eq!(times.len(), 2);
    let waited = times[1] - times[0];
    assert!(
        waited >= Duration::from_secs(1),
        "the retry came {waited:?} after a Retry-After date 2 s ahead"
    );
}

#[tokio::test]
async fn no_retry_starts_past_the_deadline() {
    let app = TestApp::spawn_with(|config| {
        retrying(3)(config);
        config.server.request_timeout = Duration::from_secs(2);
    })
    .await;
    // The upstream asks for 30 s: retrying would land far past the 2 s deadline.
    app.upstream
        .queue_replies("LATER-2", vec![Reply::RetryAfter(503, "30".to_owned())]);
    let body = app.lookup(&["LATER-2"]).await;
    assert_eq!(item(&body)["error"]["code"], "upstream_error");
    assert_eq!(app.upstream.calls("LATER-2"), 1);
}

#[tokio::test]
async fn retries_stop_at_the_deadline_however_many_are_allowed() {
    let app = TestApp::spawn_with(|config| {
        config.upstream.retries = 20;
        config.upstream.retry_backoff = Duration::from_millis(300);
        config.upstream.retry_backoff_max = Duration::from_millis(300);
        config.server.request_timeout = Duration::from_secs(1);
    })
    .await;
    app.upstream.reply("DOWN-2", Reply::Status(500, "{}"));
    let sent = tokio::time::Instant::now();
    let body = app.lookup(&["DOWN-2"]).await;
    assert_eq!(item(&body)["status"], "error");
    // The fetch may outlive the response; wait for it to end, then look at every call.
    wait_until("the fetch is over", Duration::from_secs(15), || async {
        app.state.lookup.pending_fetches() == 0
    })
    .await;
    let calls = app.upstream.call_times("DOWN-2");
    assert!(calls.len() >= 2, "{} calls", calls.len());
    // 20 retries with waits averaging 150 ms would take about 3 s.
    let last = *calls.last().unwrap() - sent;
    assert!(
        last < Duration::from_millis(1200),
        "a retry started {last:?} after the request, past its 1 s deadline"
    );
}

#[tokio::test]
async fn an_absurd_retry_after_is_no_reason_to_fail_the_rest_of_the_batch() {
    let app = TestApp::spawn_with(retrying(2)).await;
    app.upstream.reply(
        "FOREVER-1",
        Reply::RetryAfter(503, "18446744073709551615".to_owned()),
    );
    let body = app.lookup(&["OK-1", "FOREVER-1", "OK-2"]).await;
    let statuses: Vec<&Value> = results(&body).iter().map(|item| &item["status"]).collect();
    assert_eq!(
        statuses,
        [&json!("ok"), &json!("error"), &json!("ok")],
        "{body}"
    );
    assert_eq!(item(&body)["discount"], StubUpstream::discount_for("OK-1"));
    assert_eq!(results(&body)[1]["error"]["code"], "upstream_error");
    assert_eq!(app.upstream.calls("FOREVER-1"), 1);
}
