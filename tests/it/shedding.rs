//! Load shedding and fairness: past its bounds the proxy answers `503 overloaded` at once,
//! while health checks, cached lookups and small lookups still get through.

use crate::support::{TestApp, wait_until};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

async fn assert_overloaded(response: reqwest::Response) {
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
}

#[tokio::test]
async fn past_max_in_flight_new_requests_are_shed_and_health_checks_still_answer() {
    let app = TestApp::spawn_with(|config| config.server.max_in_flight = 3).await;
    app.upstream.hold();
    let admitted: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(
                app.client
                    .get(app.url(&format!("/v1/discounts/A{i}")))
                    .send(),
            )
        })
        .collect();
    wait_until("three lookups are at the upstream", WAIT, || async {
        app.upstream.in_flight() == 3
    })
    .await;
    assert_overloaded(app.get("/v1/discounts/SHED-1").await).await;
    assert_overloaded(
        app.post_json("/v1/discounts/lookup", &json!({"sns": ["SHED-2"]}))
            .await,
    )
    .await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
    assert_eq!(
        app.upstream.total_calls(),
        3,
        "no work was done for shed requests"
    );
    app.upstream.release();
    for lookup in admitted {
        assert_eq!(lookup.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(
        app.get("/v1/discounts/SHED-1").await.status(),
        200,
        "capacity is back"
    );
}

#[tokio::test]
async fn past_max_pending_cold_lookups_are_shed_while_cached_ones_get_through() {
    let app = TestApp::spawn_with(|config| {
        config.server.max_batch = 10;
        config.upstream.max_pending = 10;
    })
    .await;
    app.lookup(&["CACHED-1"]).await;
    app.upstream.hold();
    let cold: Vec<String> = (0..10).map(|i| format!("COLD-{i}")).collect();
    let big = tokio::spawn(
        app.client
            .post(app.url("/v1/discounts/lookup"))
            .json(&json!({ "sns": cold }))
            .send(),
    );
    wait_until("ten fetches are pending", WAIT, || async {
        app.state.lookup.pending_fetches() == 10
    })
    .await;
    assert_overloaded(app.get("/v1/discounts/MORE-1").await).await;
    assert_overloaded(
        app.post_json(
            "/v1/discounts/lookup",
            &json!({"sns": ["CACHED-1", "MORE-2"]}),
        )
        .await,
    )
    .await;
    // A lookup the cache answers, or one that joins a pending fetch, needs no new fetch.
    let probe = app.get("/v1/discounts/CACHED-1").await;
    assert_eq!(probe.status(), 200);
    assert_eq!(probe.headers()["x-cache"], "HIT");
    let joining = tokio::spawn(app.client.get(app.url("/v1/discounts/COLD-0")).send());
    app.upstream.release();
    let body: Value = big.await.unwrap().unwrap().json().await.unwrap();
    assert!(
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|item| item["status"] == "ok")
    );
    assert_eq!(joining.await.unwrap().unwrap().status(), 200);
    assert_eq!(
        app.upstream.calls("MORE-1") + app.upstream.calls("MORE-2"),
        0
    );
    assert_eq!(
        app.upstream.total_calls(),
        11,
        "CACHED-1 once, COLD-* once each"
    );
}

/// Starts a 40-SN export (`<prefix>-0` to `<prefix>-39`, 100 ms each at the upstream) and
/// returns once it holds both upstream slots of an app with `upstream.concurrency = 2`.
async fn start_export(
    app: &TestApp,
    prefix: &str,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    app.upstream.set_latency(Duration::from_millis(100));
    let export: Vec<String> = (0..40).map(|i| format!("{prefix}-{i}")).collect();
    let export_lookup = tokio::spawn(
        app.client
            .post(app.url("/v1/discounts/lookup"))
            .json(&json!({ "sns": export }))
            .send(),
    );
    wait_until("the export holds both upstream slots", WAIT, || async {
        app.upstream.in_flight() == 2
    })
    .await;
    export_lookup
}

#[tokio::test]
async fn a_single_sn_lookup_is_not_starved_by_a_big_export() {
    let app = TestApp::spawn_with(|config| config.upstream.concurrency = 2).await;
    app.upstream.set_latency_for("CURL-1", Duration::ZERO);
    let export_lookup = start_export(&app, "EXPORT").await;
    let single = app.get("/v1/discounts/CURL-1").await;
    assert_eq!(single.status(), 200);
    let export_calls_so_far = app.upstream.total_calls() - 1;
    // Fair: the single lookup waited for one free slot, not for the export's 40 fetches.
    assert!(
        export_calls_so_far <= 6,
        "the export had made {export_calls_so_far} of its 40 calls before the single lookup's"
    );
    let body: Value = export_lookup.await.unwrap().unwrap().json().await.unwrap();
    assert_eq!(body["summary"]["upstream_fetches"], 40);
    assert_eq!(app.upstream.peak_in_flight(), 2, "the global limit held");
}

#[tokio::test]
async fn an_sn_queued_deep_in_an_export_is_fetched_at_once_when_asked_for_alone() {
    let app = TestApp::spawn_with(|config| config.upstream.concurrency = 2).await;
    let export_lookup = start_export(&app, "QUEUED").await;
    // The last SN of the export: joining its queued fetch must not mean waiting for the 39
    // before it.
    let single = app.get("/v1/discounts/QUEUED-39").await;
    assert_eq!(single.status(), 200);
    let calls_so_far = app.upstream.total_calls();
    assert!(
        calls_so_far <= 6,
        "{calls_so_far} of the export's 40 calls were made before its last SN was answered"
    );
    let body: Value = export_lookup.await.unwrap().unwrap().json().await.unwrap();
    assert!(
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|item| item["status"] == "ok")
    );
    assert_eq!(
        app.upstream.calls("QUEUED-39"),
        1,
        "fetched once, by whoever got to it"
    );
    assert_eq!(app.upstream.total_calls(), 40);
}
