//! Fresh, stale, gone: stale entries are served at once and refreshed once in the
//! background, kept while the upstream fails, and dropped when too old.

use crate::support::{
    Reply, StubUpstream, TestApp, results, seed_found, seed_not_found, wait_until,
};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(60);
const STALE_TTL: Duration = Duration::from_secs(600);

async fn app() -> TestApp {
    TestApp::spawn_with(|config| {
        config.cache.ttl = TTL;
        config.cache.stale_ttl = STALE_TTL;
        config.cache.early_refresh = 0.0;
        // A refresh is held at the upstream while fifty lookups run: on a loaded machine
        // that can take seconds, which must not run into the upstream timeout.
        config.upstream.timeout = Duration::from_secs(60);
    })
    .await
}

async fn idle(app: &TestApp) {
    wait_until("no fetch is pending", WAIT, || async {
        app.state.lookup.pending_fetches() == 0
    })
    .await;
}

fn old() -> Value {
    json!({"ratio": "0.99", "was": "old"})
}

#[tokio::test]
async fn a_stale_entry_is_served_at_once_and_refreshed_once_in_the_background() {
    let app = app().await;
    seed_found(&app, "ST-1", TTL + Duration::from_secs(5), &old()).await;
    app.upstream.hold();
    // Fifty lookups while the refresh is held at the upstream: none waits for it.
    for _ in 0..50 {
        let response = app.get("/v1/discounts/ST-1").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-cache"], "STALE");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            (&body["source"], &body["discount"]),
            (&json!("stale"), &old())
        );
    }
    assert_eq!(
        app.upstream.calls("ST-1"),
        1,
        "one refresh for fifty stale hits"
    );
    app.upstream.release();
    idle(&app).await;
    let body: Value = app.get("/v1/discounts/ST-1").await.json().await.unwrap();
    assert_eq!(body["source"], "cache");
    assert_eq!(body["discount"], StubUpstream::discount_for("ST-1"));
    assert_eq!(app.upstream.calls("ST-1"), 1);
}

#[tokio::test]
async fn a_stale_entry_keeps_being_served_while_the_upstream_fails() {
    let app = app().await;
    seed_found(&app, "ST-2", TTL + Duration::from_secs(5), &old()).await;
    let stored = app.redis_value("ST-2").await;
    app.upstream.reply("ST-2", Reply::Status(500, "{}"));
    for attempt in 1..=3 {
        let body = app.lookup(&["ST-2"]).await;
        let item = &results(&body)[0];
        assert_eq!(
            (&item["status"], &item["source"], &item["discount"]),
            (&json!("ok"), &json!("stale"), &old()),
            "attempt {attempt}"
        );
        assert_eq!(body["summary"]["stale"], 1);
        assert_eq!(body["summary"]["errors"], 0);
        idle(&app).await;
        assert_eq!(
            app.upstream.calls("ST-2"),
            attempt,
            "each refresh tried once"
        );
        assert_eq!(
            app.redis_value("ST-2").await,
            stored,
            "an error never replaces it"
        );
    }
    // The upstream is back: the next stale hit's refresh replaces the entry.
    app.upstream
        .reply("ST-2", Reply::Status(200, r#"{"ratio": "0.10"}"#));
    app.lookup(&["ST-2"]).await;
    idle(&app).await;
    let body = app.lookup(&["ST-2"]).await;
    assert_eq!(results(&body)[0]["source"], "cache");
    assert_eq!(results(&body)[0]["discount"], json!({"ratio": "0.10"}));
}

#[tokio::test]
async fn entries_past_their_stale_period_are_misses() {
    let app = app().await;
    seed_found(
        &app,
        "GONE-1",
        TTL + STALE_TTL + Duration::from_secs(1),
        &old(),
    )
    .await;
    let body = app.lookup(&["GONE-1"]).await;
    let item = &results(&body)[0];
    assert_eq!(item["source"], "upstream");
    assert_eq!(item["discount"], StubUpstream::discount_for("GONE-1"));
    assert_eq!(app.upstream.calls("GONE-1"), 1);
}

#[tokio::test]
async fn negative_entries_have_no_stale_period() {
    let app = TestApp::spawn_with(|config| {
        config.cache.negative_ttl = Duration::from_secs(30);
        config.cache.stale_ttl = STALE_TTL;
    })
    .await;
    seed_not_found(&app, "NEG-1", Duration::from_secs(31)).await;
    let body = app.lookup(&["NEG-1"]).await;
    assert_eq!(
        results(&body)[0],
        json!({"sn": "NEG-1", "status": "ok", "source": "upstream", "discount": StubUpstream::discount_for("NEG-1")})
    );
}

#[tokio::test]
async fn early_refresh_renews_only_entries_close_to_expiry_and_serves_them_fresh() {
    let app = TestApp::spawn_with(|config| {
        config.cache.ttl = Duration::from_secs(100);
        config.cache.early_refresh = 0.5;
    })
    .await;
    let young: Vec<String> = (0..20).map(|i| format!("YOUNG-{i}")).collect();
    let near: Vec<String> = (0..20).map(|i| format!("NEAR-{i}")).collect();
    for sn in &young {
        seed_found(&app, sn, Duration::from_secs(40), &old()).await;
    }
    for sn in &near {
        // 95% of the TTL: each hit refreshes with a 90% chance.
        seed_found(&app, sn, Duration::from_secs(95), &old()).await;
    }
    let all: Vec<&str> = young.iter().chain(&near).map(String::as_str).collect();
    let body = app.lookup(&all).await;
    assert!(
        results(&body)
            .iter()
            .all(|item| item["source"] == "cache" && item["discount"] == old()),
        "entries refreshed early are still served as fresh hits: {body}"
    );
    idle(&app).await;
    assert!(young.iter().all(|sn| app.upstream.calls(sn) == 0));
    let refreshed: Vec<&String> = near
        .iter()
        .filter(|sn| app.upstream.calls(sn) == 1)
        .collect();
    assert!(refreshed.len() >= 10, "{} of 20 refreshed", refreshed.len());
    for sn in refreshed {
        let body: Value = app
            .get(&format!("/v1/discounts/{sn}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(body["discount"], StubUpstream::discount_for(sn), "{sn}");
    }
}
