//! `/metrics`: after known traffic, the counters moved by exactly the right amounts.

use crate::support::{Reply, TestApp, wait_until};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

/// The samples of a scrape, `name{labels}` → value.
async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (sample, value) = line.rsplit_once(' ').unwrap();
            (sample.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn value(samples: &HashMap<String, f64>, sample: &str) -> f64 {
    *samples
        .get(sample)
        .unwrap_or_else(|| panic!("{sample} is not in the scrape: {samples:#?}"))
}

#[tokio::test]
async fn counters_move_by_exactly_the_traffic_sent() {
    let app = TestApp::spawn().await;
    app.upstream.reply("NF-1", Reply::Status(404, "{}"));
    app.lookup(&["A", "B", "NF-1", "bad sn", "A"]).await;
    app.lookup(&["A", "B"]).await;
    assert_eq!(app.get("/v1/discounts/A").await.status(), 200);
    let m = scrape(&app).await;

    for (sample, expected) in [
        (
            r#"discount_proxy_lookups_total{endpoint="batch",status="200"}"#,
            2.0,
        ),
        (
            r#"discount_proxy_lookups_total{endpoint="single",status="200"}"#,
            1.0,
        ),
        (
            r#"discount_proxy_request_duration_seconds_count{endpoint="batch"}"#,
            2.0,
        ),
        (r#"discount_proxy_sns_total{outcome="miss"}"#, 2.0),
        (r#"discount_proxy_sns_total{outcome="hit"}"#, 3.0),
        (r#"discount_proxy_sns_total{outcome="not_found"}"#, 1.0),
        (r#"discount_proxy_sns_total{outcome="invalid"}"#, 1.0),
        (
            r#"discount_proxy_upstream_requests_total{outcome="ok"}"#,
            2.0,
        ),
        (
            r#"discount_proxy_upstream_requests_total{outcome="not_found"}"#,
            1.0,
        ),
        (
            "discount_proxy_upstream_request_duration_seconds_count",
            3.0,
        ),
        ("discount_proxy_upstream_in_flight", 0.0),
        (
            r#"discount_proxy_redis_commands_total{command="MGET",outcome="ok"}"#,
            3.0,
        ),
        (r#"discount_proxy_write_backs_total{outcome="ok"}"#, 3.0),
        ("discount_proxy_pending_fetches", 0.0),
        (
            r#"discount_proxy_circuit_state{dependency="upstream"}"#,
            0.0,
        ),
        (r#"discount_proxy_circuit_state{dependency="redis"}"#, 0.0),
    ] {
        assert_eq!(value(&m, sample), expected, "{sample}");
    }
    // Written back by the fenced script (`coalesce.distributed`, the default), after claims.
    assert!(
        value(
            &m,
            r#"discount_proxy_redis_commands_total{command="EVALSHA set",outcome="ok"}"#
        ) >= 1.0
    );
    assert_eq!(
        value(&m, r#"discount_proxy_claims_total{result="won"}"#),
        3.0
    );
    assert!(
        value(
            &m,
            r#"discount_proxy_redis_command_duration_seconds_count{command="MGET"}"#
        ) == 3.0
    );
    assert!(value(&m, r#"discount_proxy_redis_pool_connections{state="size"}"#) >= 1.0);
    assert!(
        !m.keys().any(|sample| sample.contains("outcome=\"error\"")),
        "no errors: {m:#?}"
    );
}

#[tokio::test]
async fn joins_sheds_and_upstream_errors_are_counted() {
    let app = TestApp::spawn_with(|config| config.server.max_in_flight = 2).await;
    app.upstream.reply("E500", Reply::Status(500, "{}"));
    app.upstream.hold();
    let first = tokio::spawn(app.client.get(app.url("/v1/discounts/J1")).send());
    let second = tokio::spawn(app.client.get(app.url("/v1/discounts/J1")).send());
    wait_until(
        "the second lookup joined the first's fetch",
        Duration::from_secs(10),
        || async { app.metric("discount_proxy_coalesced_joins_total") == 1.0 },
    )
    .await;
    assert_eq!(app.get("/v1/discounts/SHED").await.status(), 503);
    app.upstream.release();
    for lookup in [first, second] {
        assert_eq!(lookup.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(app.get("/v1/discounts/E500").await.status(), 502);
    let m = scrape(&app).await;
    for (sample, expected) in [
        ("discount_proxy_coalesced_joins_total", 1.0),
        (r#"discount_proxy_load_shed_total{reason="in_flight"}"#, 1.0),
        (
            r#"discount_proxy_lookups_total{endpoint="single",status="503"}"#,
            1.0,
        ),
        (
            r#"discount_proxy_lookups_total{endpoint="single",status="502"}"#,
            1.0,
        ),
        (
            r#"discount_proxy_lookups_total{endpoint="single",status="200"}"#,
            2.0,
        ),
        (
            r#"discount_proxy_upstream_requests_total{outcome="ok"}"#,
            1.0,
        ),
        (
            r#"discount_proxy_upstream_requests_total{outcome="error"}"#,
            1.0,
        ),
        (r#"discount_proxy_sns_total{outcome="miss"}"#, 2.0),
        (r#"discount_proxy_sns_total{outcome="error"}"#, 1.0),
    ] {
        assert_eq!(value(&m, sample), expected, "{sample}");
    }
}

#[tokio::test]
async fn metrics_stay_open_and_never_show_a_token() {
    let app = TestApp::spawn_with(|config| {
        config.server.api_tokens = vec![discount_proxy::secret::Secret::new("client-s3cr3t")];
        config.upstream.token = Some(discount_proxy::secret::Secret::new("upstream-s3cr3t"));
    })
    .await;
    let response = app
        .client
        .post(app.url("/v1/discounts/lookup"))
        .header("authorization", "Bearer client-s3cr3t")
        .json(&json!({"sns": ["T1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(app.get("/v1/discounts/T1").await.status(), 401);
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(!text.contains("s3cr3t"), "{text}");
    assert!(text.contains(r#"discount_proxy_lookups_total{endpoint="single",status="401"} 1"#));
}
