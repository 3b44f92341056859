//! DELETE, invalidate, and the health endpoints.

use crate::support::TestApp;
use serde_json::{Value, json};

#[tokio::test]
async fn delete_removes_the_entry_so_the_next_lookup_goes_upstream() {
    let app = TestApp::spawn().await;
    app.lookup(&["D1"]).await;
    assert!(app.redis_value("D1").await.is_some());
    let response = app.delete("/v1/discounts/D1").await;
    assert_eq!(response.status(), 204);
    assert_eq!(app.redis_value("D1").await, None);
    let again = app.get("/v1/discounts/D1").await;
    assert_eq!(again.headers()["x-cache"], "MISS");
    assert_eq!(app.upstream.calls("D1"), 2);
    // Deleting what is not cached is still 204.
    let response = app.delete("/v1/discounts/NEVER").await;
    assert_eq!(response.status(), 204);
    let response = app.delete("/v1/discounts/a%20b").await;
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn invalidate_counts_the_keys_that_existed() {
    let app = TestApp::spawn().await;
    app.lookup(&["I1", "I2", "I3"]).await;
    let response = app
        .post_json(
            "/v1/discounts/invalidate",
            &json!({"sns": ["I1", "I2", "NOPE", "I1"]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"invalidated": 2})
    );
    assert_eq!(app.redis_value("I1").await, None);
    assert_eq!(app.redis_value("I2").await, None);
    assert!(app.redis_value("I3").await.is_some(), "other keys stay");
}

#[tokio::test]
async fn invalidate_rejects_bad_input_without_touching_the_cache() {
    let app = TestApp::spawn().await;
    app.lookup(&["K1"]).await;
    for (body, code) in [
        (json!({"sns": ["K1", "bad sn"]}), "invalid_request"),
        (json!({"sns": []}), "invalid_request"),
        (json!({"nope": 1}), "invalid_request"),
    ] {
        let response = app.post_json("/v1/discounts/invalidate", &body).await;
        assert_eq!(response.status(), 400);
        assert_eq!(
            response.json::<Value>().await.unwrap()["error"]["code"],
            code
        );
    }
    assert!(app.redis_value("K1").await.is_some());
}

#[tokio::test]
async fn cache_control_with_redis_down_is_503_not_a_false_success() {
    let mut app = TestApp::spawn().await;
    app.redis.stop();
    let response = app.delete("/v1/discounts/D1").await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "cache_unavailable"
    );
    let response = app
        .post_json("/v1/discounts/invalidate", &json!({"sns": ["D1"]}))
        .await;
    assert_eq!(response.status(), 503);
}

#[tokio::test]
async fn healthz_is_ok_and_readyz_names_each_dependency() {
    let mut app = TestApp::spawn().await;
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({
            "status": "ok", "cache": "redis", "redis": "ok", "redis_circuit": "closed",
            "redis_mode": "standalone", "upstream": "unknown", "upstream_circuit": "closed",
            "pending_fetches": 0
        })
    );
    app.lookup(&["H1"]).await;
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["upstream"], "ok");
    app.redis.stop();
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200, "redis down is degraded, not unready");
    assert_eq!(ready.json::<Value>().await.unwrap()["redis"], "down");
    app.upstream
        .reply("H2", crate::support::Reply::Status(500, ""));
    app.lookup(&["H2"]).await;
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        (&ready["status"], &ready["redis"], &ready["upstream"]),
        (&json!("degraded"), &json!("down"), &json!("failing")),
        "{ready}"
    );
}

#[tokio::test]
async fn an_invalidation_during_a_fetch_keeps_the_older_answer_out_of_the_cache() {
    let app = TestApp::spawn().await;
    app.upstream.hold();
    let lookup = app.lookup(&["V1"]);
    let invalidate_mid_fetch = async {
        crate::support::wait_until(
            "the fetch is at the upstream",
            std::time::Duration::from_secs(5),
            || async { app.upstream.in_flight() == 1 },
        )
        .await;
        assert_eq!(app.delete("/v1/discounts/V1").await.status(), 204);
        app.upstream.release();
    };
    let (body, ()) = tokio::join!(lookup, invalidate_mid_fetch);
    assert_eq!(
        crate::support::results(&body)[0]["status"],
        "ok",
        "the request still gets its answer"
    );
    assert_eq!(
        app.redis_value("V1").await,
        None,
        "but it is not cached over the invalidation"
    );
    let next = app.get("/v1/discounts/V1").await;
    assert_eq!(
        next.headers()["x-cache"],
        "MISS",
        "the next lookup goes upstream"
    );
    assert_eq!(app.upstream.calls("V1"), 2);
}
