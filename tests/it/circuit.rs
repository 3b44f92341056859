//! The upstream's circuit breaker: it opens on repeated failures, then fails fast (serving
//! stale values where there are some) without calling the upstream, probes after a
//! cool-down, and closes when the probes succeed.

use crate::support::{Reply, TestApp, results, seed_found, sns, wait_until};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

async fn app() -> TestApp {
    TestApp::spawn_with(|config| {
        config.cache.ttl = Duration::from_secs(60);
        config.cache.stale_ttl = Duration::from_secs(600);
        let circuit = &mut config.upstream.circuit;
        circuit.consecutive_failures = 5;
        circuit.min_requests = 1000;
        circuit.cooldown = Duration::from_secs(2);
        circuit.probes = 2;
    })
    .await
}

async fn readyz(app: &TestApp) -> Value {
    app.get("/readyz").await.json().await.unwrap()
}

async fn lookup_all(app: &TestApp, sns: &[String]) -> Value {
    let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
    app.lookup(&sns).await
}

fn codes(body: &Value) -> Vec<String> {
    results(body)
        .iter()
        .map(|item| {
            item["error"]["code"]
                .as_str()
                .unwrap_or(item["status"].as_str().unwrap())
                .to_owned()
        })
        .collect()
}

async fn open_the_circuit(app: &TestApp) {
    app.upstream
        .set_default_reply(Some(Reply::Status(500, "{}")));
    let body = lookup_all(app, &sns("FAIL", 0..5)).await;
    assert_eq!(codes(&body), vec!["upstream_error"; 5]);
    let ready = readyz(app).await;
    assert_eq!(
        (
            &ready["upstream_circuit"],
            &ready["upstream"],
            &ready["status"]
        ),
        (&json!("open"), &json!("unavailable"), &json!("degraded")),
        "{ready}"
    );
}

#[tokio::test]
async fn an_open_circuit_fails_fast_serves_stale_then_probes_and_closes() {
    let app = app().await;
    seed_found(
        &app,
        "KEPT-1",
        Duration::from_secs(120),
        &json!({"ratio": "0.5"}),
    )
    .await;
    open_the_circuit(&app).await;
    assert_eq!(app.upstream.total_calls(), 5);

    // Open: cold SNs fail at once, stale ones are served, and the upstream is not called.
    let mut wanted = sns("COLD", 0..10);
    wanted.push("KEPT-1".to_owned());
    let body = lookup_all(&app, &wanted).await;
    let mut expected = vec!["upstream_unavailable"; 10];
    expected.push("ok");
    assert_eq!(codes(&body), expected);
    assert_eq!(results(&body)[10]["source"], "stale");
    let single = app.get("/v1/discounts/COLD-X").await;
    assert_eq!(single.status(), 503);
    let single: Value = single.json().await.unwrap();
    assert_eq!(single["error"]["code"], "upstream_unavailable");
    assert_eq!(
        app.upstream.total_calls(),
        5,
        "an open circuit makes no calls"
    );

    // The upstream heals; after the cool-down, probes go through and close the circuit.
    app.upstream.set_default_reply(None);
    wait_until("the cool-down is over", WAIT, || async {
        readyz(&app).await["upstream_circuit"] == "half_open"
    })
    .await;
    let body = lookup_all(&app, &sns("PROBE", 0..2)).await;
    assert_eq!(codes(&body), vec!["ok"; 2]);
    let ready = readyz(&app).await;
    assert_eq!(
        (&ready["upstream_circuit"], &ready["upstream"]),
        (&json!("closed"), &json!("ok"))
    );
    let body = lookup_all(&app, &sns("AFTER", 0..10)).await;
    assert_eq!(codes(&body), vec!["ok"; 10]);
    assert_eq!(app.upstream.total_calls(), 5 + 2 + 10);
}

#[tokio::test]
async fn half_open_lets_only_the_probes_through_and_a_failed_probe_reopens_it() {
    let app = app().await;
    open_the_circuit(&app).await;
    wait_until("the cool-down is over", WAIT, || async {
        readyz(&app).await["upstream_circuit"] == "half_open"
    })
    .await;
    // Still failing: of a batch of 6, two probe; one failure re-opens the circuit.
    let body = lookup_all(&app, &sns("HALF", 0..6)).await;
    let codes = codes(&body);
    assert_eq!(
        codes
            .iter()
            .filter(|code| *code == "upstream_error")
            .count(),
        2,
        "{codes:?}"
    );
    assert_eq!(
        codes
            .iter()
            .filter(|code| *code == "upstream_unavailable")
            .count(),
        4,
        "{codes:?}"
    );
    assert_eq!(app.upstream.total_calls(), 5 + 2);
    assert_eq!(readyz(&app).await["upstream_circuit"], "open");
}

#[tokio::test]
async fn a_failure_ratio_over_the_window_opens_it() {
    let app = TestApp::spawn_with(|config| {
        let circuit = &mut config.upstream.circuit;
        circuit.consecutive_failures = 1000;
        circuit.failure_ratio = 0.5;
        circuit.min_requests = 20;
        circuit.window = Duration::from_secs(60);
        circuit.cooldown = Duration::from_secs(60);
    })
    .await;
    // Alternating answers never make a streak, but half of 20 failed.
    for i in 0..10 {
        app.upstream
            .reply(&format!("MIX-{i}"), Reply::Status(503, "{}"));
    }
    for i in 0..10 {
        app.lookup(&[&format!("OKAY-{i}")]).await;
        app.lookup(&[&format!("MIX-{i}")]).await;
    }
    assert_eq!(readyz(&app).await["upstream_circuit"], "open");
    let body = app.lookup(&["NEXT-1"]).await;
    assert_eq!(codes(&body), ["upstream_unavailable"]);
    assert_eq!(app.upstream.total_calls(), 20);
}

#[tokio::test]
async fn fetches_queued_before_the_circuit_opened_do_not_call_the_upstream_after() {
    let app = TestApp::spawn_with(|config| {
        config.upstream.concurrency = 1;
        config.upstream.circuit.consecutive_failures = 1;
        config.upstream.circuit.cooldown = Duration::from_secs(60);
    })
    .await;
    app.upstream
        .set_default_reply(Some(Reply::Status(500, "{}")));
    app.upstream.hold();
    let lookups: Vec<_> = (0..10)
        .map(|i| {
            tokio::spawn(
                app.client
                    .get(app.url(&format!("/v1/discounts/Q-{i}")))
                    .send(),
            )
        })
        .collect();
    wait_until("ten fetches are queued", WAIT, || async {
        app.state.lookup.pending_fetches() == 10
    })
    .await;
    app.upstream.release();
    let mut statuses = Vec::new();
    for lookup in lookups {
        statuses.push(lookup.await.unwrap().unwrap().status().as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [502, 503, 503, 503, 503, 503, 503, 503, 503, 503]);
    assert_eq!(
        app.upstream.total_calls(),
        1,
        "the first failure opened the circuit"
    );
}
