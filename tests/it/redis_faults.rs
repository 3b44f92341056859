//! Redis is optional at run time: down, dying mid-lookup, hung. Lookups stay correct.

use crate::support::{StubUpstream, TestApp, results, wait_until};
use std::time::Duration;

#[tokio::test]
async fn with_redis_down_from_the_start_lookups_come_from_the_upstream() {
    let mut app = TestApp::spawn().await;
    app.redis.stop();
    let body = app.lookup(&["A", "B", "A"]).await;
    let items = results(&body);
    assert!(
        items
            .iter()
            .all(|item| item["status"] == "ok" && item["source"] == "upstream")
    );
    assert_eq!(items[1]["discount"], StubUpstream::discount_for("B"));
    let single = app.get("/v1/discounts/A").await;
    assert_eq!(single.status(), 200);
    assert_eq!(single.headers()["x-cache"], "MISS");
    assert!(
        app.state.health.redis_errors() >= 2,
        "the failures are counted, not silent"
    );
}

#[tokio::test]
async fn redis_dying_during_a_lookup_still_gives_a_correct_200() {
    let mut app = TestApp::spawn().await;
    app.upstream.hold();
    let lookup = app.lookup(&["M1", "M2"]);
    let stop_redis_mid_fetch = async {
        wait_until(
            "both fetches are at the upstream",
            Duration::from_secs(5),
            || async { app.upstream.in_flight() == 2 },
        )
        .await;
        // The read is done; now the write-back will find Redis gone.
        let errors_before = app.state.health.redis_errors();
        std::process::Command::new("kill")
            .arg("-9")
            .arg(app.redis.pid().to_string())
            .status()
            .unwrap();
        app.upstream.release();
        errors_before
    };
    let (body, errors_before) = tokio::join!(lookup, stop_redis_mid_fetch);
    assert_eq!(
        results(&body)[0]["discount"],
        StubUpstream::discount_for("M1")
    );
    assert_eq!(results(&body)[1]["status"], "ok");
    assert!(
        app.state.health.redis_errors() > errors_before,
        "the failed write-back is counted"
    );
    app.redis.stop();
}

#[tokio::test]
async fn caching_resumes_by_itself_when_redis_comes_back() {
    let mut app = TestApp::spawn().await;
    app.lookup(&["R1"]).await;
    app.redis.stop();
    app.lookup(&["R1"]).await;
    assert_eq!(
        app.upstream.calls("R1"),
        2,
        "no Redis, so the upstream answers"
    );
    app.redis.restart();
    // The pool reconnects on its own; the first lookup after the restart may still meet a
    // dead connection, after which the key is written.
    wait_until(
        "the proxy writes to the restarted Redis",
        Duration::from_secs(10),
        || async {
            app.lookup(&["R1"]).await;
            app.redis_value("R1").await.is_some()
        },
    )
    .await;
    let calls = app.upstream.calls("R1");
    let body = app.lookup(&["R1"]).await;
    assert_eq!(results(&body)[0]["source"], "cache");
    assert_eq!(app.upstream.calls("R1"), calls);
}

#[tokio::test]
async fn a_hung_redis_costs_its_timeout_not_the_request() {
    let app = TestApp::spawn_with(|config| {
        config.redis.timeout = Duration::from_millis(200);
        config.server.request_timeout = Duration::from_secs(5);
    })
    .await;
    app.lookup(&["P1"]).await;
    app.redis.signal("STOP");
    let errors_before = app.state.health.redis_errors();
    let body = app.lookup(&["P1", "P2"]).await;
    let single = app.get("/v1/discounts/P1").await;
    app.redis.signal("CONT");
    // Had the read waited on the hang, the deadline would have turned these into errors.
    let items = results(&body);
    assert!(
        items
            .iter()
            .all(|item| item["status"] == "ok" && item["source"] == "upstream"),
        "{body}"
    );
    assert_eq!(single.status(), 200);
    assert!(
        app.state.health.redis_errors() >= errors_before + 2,
        "read and write-back timed out"
    );
}

#[tokio::test]
async fn a_tls_redis_is_used_through_rediss() {
    let redis = crate::support::RedisServer::start_tls();
    let upstream = StubUpstream::start().await;
    let config = TestApp::config_for(&redis, &upstream);
    assert!(config.redis.url.starts_with("rediss://"));
    let app = TestApp::spawn_on(
        config,
        discount_proxy::app::CacheChoice::Redis,
        redis,
        upstream,
    )
    .await;
    app.lookup(&["TLS1"]).await;
    let again = app.lookup(&["TLS1"]).await;
    assert_eq!(results(&again)[0]["source"], "cache");
    assert_eq!(app.upstream.calls("TLS1"), 1);
    assert!(app.redis_value("TLS1").await.is_some(), "written over TLS");
    assert_eq!(app.state.health.redis_errors(), 0);
}
