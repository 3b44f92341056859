//! Shutdown after the requests are done: queued fetches nobody waits for are not started,
//! and answers that could not be written back within the grace are counted, not lost
//! silently (issue 10, point 8).

use crate::support::{TestApp, results, wait_until};
use std::collections::HashMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// The samples of the metrics as `/metrics` would serve them, `name{labels}` → value. Read
/// in process: after shutdown there is no server to scrape.
fn samples(app: &TestApp) -> HashMap<String, f64> {
    app.state
        .metrics
        .encode()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (sample, value) = line.rsplit_once(' ')?;
            Some((sample.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn write_backs(app: &TestApp, outcome: &str) -> f64 {
    let sample = format!("discount_proxy_write_backs_total{{outcome=\"{outcome}\"}}");
    samples(app).get(&sample).copied().unwrap_or(0.0)
}

fn upstream_ok(app: &TestApp) -> f64 {
    samples(app)
        .get(r#"discount_proxy_upstream_requests_total{outcome="ok"}"#)
        .copied()
        .unwrap_or(0.0)
}

#[tokio::test]
async fn shutdown_starts_no_queued_fetch_that_nobody_waits_for() {
    let mut app = TestApp::spawn_with(|config| {
        config.server.request_timeout = Duration::from_millis(500);
        config.server.shutdown_grace = Duration::from_secs(1);
        config.upstream.concurrency = 2;
    })
    .await;
    app.upstream.set_latency(Duration::from_millis(200));
    let sns: Vec<String> = (0..40).map(|i| format!("QUEUED-{i}")).collect();
    let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
    // The request gives up at its deadline; its fetch task goes on with the queued SNs.
    let body = app.lookup(&sns).await;
    assert!(
        results(&body)
            .iter()
            .any(|item| item["error"]["code"] == "deadline_exceeded"),
        "{body}"
    );

    let calls_at_shutdown = app.upstream.total_calls();
    app.begin_shutdown();
    app.stopped().await;
    // At most one more round of the two slots: those that ended before the drain began.
    let started_after = app.upstream.total_calls() - calls_at_shutdown;
    assert!(
        started_after <= 4,
        "{started_after} upstream calls started after the shutdown began, of 40 queued"
    );
    assert_eq!(
        write_backs(&app, "ok") + write_backs(&app, "abandoned"),
        upstream_ok(&app),
        "every upstream answer is written back or counted as abandoned"
    );
}

#[tokio::test]
async fn answers_not_written_back_when_the_grace_runs_out_are_counted_as_abandoned() {
    let mut app = TestApp::spawn_with(|config| {
        config.server.request_timeout = Duration::from_secs(1);
        config.server.shutdown_grace = Duration::from_millis(100);
        // Longer than the drain's last chance (2 s): the write-backs outlive it.
        config.redis.timeout = Duration::from_secs(5);
    })
    .await;
    app.upstream.hold();
    let lookup = app.lookup(&["LATE-1", "LATE-2", "LATE-3"]);
    let hang_redis_then_answer = async {
        wait_until("the fetches are at the upstream", WAIT, || async {
            app.upstream.in_flight() == 3
        })
        .await;
        app.redis.signal("STOP");
        app.upstream.release();
    };
    let (body, ()) = tokio::join!(lookup, hang_redis_then_answer);
    assert!(results(&body).iter().all(|item| item["status"] == "ok"));

    app.begin_shutdown();
    app.stopped().await;
    assert_eq!(write_backs(&app, "abandoned"), 3.0);
    assert_eq!(upstream_ok(&app), 3.0);

    // Redis comes back after the drain gave up: what was counted as abandoned is not
    // counted a second time as written or failed.
    app.redis.signal("CONT");
    wait_until("the abandoned write-backs have ended", WAIT, || async {
        app.state.lookup.pending_fetches() == 0
    })
    .await;
    assert_eq!(write_backs(&app, "ok") + write_backs(&app, "failed"), 0.0);
}
