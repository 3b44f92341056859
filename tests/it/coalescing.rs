//! Request coalescing: at most one upstream fetch per SN in flight, shared by every lookup
//! that wants it, whoever started it and whatever became of that requester.

use crate::support::{StubUpstream, TestApp, results, wait_until};
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// These tests hold fetches at the upstream while requests pile up; on a loaded machine that
/// can take seconds, which must not run into the upstream's or the request's timeout.
async fn patient_app() -> TestApp {
    TestApp::spawn_with(|config| {
        config.upstream.timeout = Duration::from_secs(60);
        config.server.request_timeout = Duration::from_secs(60);
    })
    .await
}

#[tokio::test]
async fn a_thousand_concurrent_gets_of_one_cold_sn_make_one_upstream_call() {
    let app = patient_app().await;
    app.upstream.hold();
    let url = app.url("/v1/discounts/HOT-1");
    let requests: Vec<_> = (0..1000)
        .map(|_| {
            let request = app.client.get(&url).send();
            tokio::spawn(request)
        })
        .collect();
    wait_until("999 lookups joined the first one's fetch", WAIT, || async {
        joins(&app) == 999
    })
    .await;
    assert_eq!(app.upstream.calls("HOT-1"), 1);
    app.upstream.release();
    let expected = StubUpstream::discount_for("HOT-1");
    for request in requests {
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["x-cache"],
            "MISS",
            "joiners' source is upstream"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            (&body["source"], &body["discount"]),
            (&"upstream".into(), &expected)
        );
    }
    assert_eq!(app.upstream.calls("HOT-1"), 1);
    assert!(
        app.redis_value("HOT-1").await.is_some(),
        "written back once"
    );
}

#[tokio::test]
async fn twenty_overlapping_batches_fetch_each_sn_exactly_once() {
    let app = patient_app().await;
    let sns: Vec<String> = (0..100).map(|i| format!("OV-{i:03}")).collect();
    // Batch b asks for 50 SNs starting at 5b, wrapping: every SN is in 10 batches.
    let batches: Vec<Vec<&str>> = (0..20)
        .map(|b| (0..50).map(|i| sns[(5 * b + i) % 100].as_str()).collect())
        .collect();
    app.upstream.hold();
    let lookups: Vec<_> = batches
        .iter()
        .map(|batch| {
            let request = app
                .client
                .post(app.url("/v1/discounts/lookup"))
                .json(&serde_json::json!({ "sns": batch }))
                .send();
            tokio::spawn(request)
        })
        .collect();
    // 20 × 50 wants of 100 SNs: all but the first want of each SN join a fetch.
    wait_until(
        "every batch joined or started its fetches",
        WAIT,
        || async { joins(&app) == 900 },
    )
    .await;
    app.upstream.release();
    for (lookup, batch) in lookups.into_iter().zip(&batches) {
        let response = lookup.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        for (item, sn) in results(&body).iter().zip(batch) {
            assert_eq!(item["sn"], *sn);
            assert_eq!(item["status"], "ok", "{item}");
            assert_eq!(item["discount"], StubUpstream::discount_for(sn));
        }
        assert_eq!(body["summary"]["upstream_fetches"], 50);
    }
    for sn in &sns {
        assert_eq!(app.upstream.calls(sn), 1, "{sn}");
    }
    assert_eq!(app.upstream.total_calls(), 100);
}

#[tokio::test]
async fn a_leader_that_disconnects_does_not_fail_the_fetch_for_the_others() {
    let app = patient_app().await;
    app.upstream.hold();
    let leader = tokio::spawn(app.client.get(app.url("/v1/discounts/LEAD-1")).send());
    wait_until("the leader's fetch is at the upstream", WAIT, || async {
        app.upstream.in_flight() == 1
    })
    .await;
    let waiters: Vec<_> = (0..5)
        .map(|_| tokio::spawn(app.client.get(app.url("/v1/discounts/LEAD-1")).send()))
        .collect();
    wait_until("the waiters joined", WAIT, || async { joins(&app) == 5 }).await;
    // The leader's client goes away: its connection closes mid-request.
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    app.upstream.release();
    for waiter in waiters {
        let response = waiter.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["discount"], StubUpstream::discount_for("LEAD-1"));
    }
    wait_until("the leader's fetch is written back", WAIT, || async {
        app.redis_value("LEAD-1").await.is_some()
    })
    .await;
    assert_eq!(app.upstream.calls("LEAD-1"), 1);
}

#[tokio::test]
async fn after_an_invalidation_a_lookup_starts_its_own_fetch_instead_of_joining() {
    let app = patient_app().await;
    app.upstream.hold();
    let before = tokio::spawn(app.client.get(app.url("/v1/discounts/INV-1")).send());
    wait_until("the first fetch is at the upstream", WAIT, || async {
        app.upstream.calls("INV-1") == 1
    })
    .await;
    assert_eq!(app.delete("/v1/discounts/INV-1").await.status(), 204);
    let after = tokio::spawn(app.client.get(app.url("/v1/discounts/INV-1")).send());
    wait_until("a second fetch started", WAIT, || async {
        app.upstream.calls("INV-1") == 2
    })
    .await;
    assert_eq!(joins(&app), 0);
    app.upstream.release();
    for lookup in [before, after] {
        assert_eq!(lookup.await.unwrap().unwrap().status(), 200);
    }
}

#[tokio::test]
async fn a_lookup_right_after_a_fetch_reads_the_cache_instead_of_joining() {
    let app = patient_app().await;
    app.lookup(&["AFTER-1", "AFTER-2"]).await;
    let body = app.lookup(&["AFTER-1", "AFTER-2"]).await;
    assert_eq!(body["summary"]["cache_hits"], 2, "{body}");
    assert_eq!(
        app.state.lookup.pending_fetches(),
        0,
        "flights are gone once written"
    );
    assert_eq!(app.upstream.total_calls(), 2);
}

#[tokio::test]
async fn lookups_of_an_sn_being_fetched_join_it_without_reading_redis() {
    let app = patient_app().await;
    app.upstream.hold();
    let first = tokio::spawn(app.client.get(app.url("/v1/discounts/HERD-1")).send());
    wait_until("the first lookup's fetch is under way", WAIT, || async {
        app.upstream.in_flight() == 1
    })
    .await;
    let reads = app.redis.command_calls("mget").await;
    let herd: Vec<_> = (0..200)
        .map(|_| tokio::spawn(app.client.get(app.url("/v1/discounts/HERD-1")).send()))
        .collect();
    wait_until("the herd joined the fetch", WAIT, || async {
        joins(&app) == 200
    })
    .await;
    assert_eq!(
        app.redis.command_calls("mget").await,
        reads,
        "a lookup read Redis for an SN already being fetched"
    );
    app.upstream.release();
    for request in herd.into_iter().chain([first]) {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(app.upstream.calls("HERD-1"), 1);
}

/// Lookups that joined a fetch under way, as `discount_proxy_coalesced_joins_total` counts.
fn joins(app: &TestApp) -> u64 {
    app.metric("discount_proxy_coalesced_joins_total") as u64
}
