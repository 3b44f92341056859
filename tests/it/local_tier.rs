//! The in-process tier (`cache.local`): hot SNs answered without a Redis read, invalidations
//! carried to every instance over Redis pub/sub, and copies that never outlive the local TTL
//! when that channel is down. Two proxy instances share one Redis and one upstream here.

use crate::support::{
    RedisServer, Reply, StubUpstream, TestApp, following_invalidations, results, wait_until,
};
use discount_proxy::app::CacheChoice;
use discount_proxy::config::Config;
use serde_json::json;
use std::time::Duration;

/// Long enough that only an invalidation can explain a copy going away during a test.
const LONG_TTL: Duration = Duration::from_secs(120);

fn local_tier(ttl: Duration) -> impl FnOnce(&mut Config) {
    move |config| {
        config.cache.local.enabled = true;
        config.cache.local.ttl = ttl;
    }
}

/// A second instance sharing `first`'s Redis (directly, not through a fault proxy), key
/// prefix and upstream. It brings a Redis and a stub of its own only because a `TestApp`
/// owns them; neither is used.
async fn sibling_of(first: &TestApp, ttl: Duration) -> TestApp {
    let unused_redis = RedisServer::start();
    let unused_upstream = StubUpstream::start().await;
    let mut config = first.config.clone();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.redis.url = first.redis.url();
    local_tier(ttl)(&mut config);
    config.validate().unwrap();
    TestApp::spawn_on(config, CacheChoice::Redis, unused_redis, unused_upstream).await
}

fn metric(app: &TestApp, sample: &str) -> f64 {
    app.metric(sample)
}

async fn following(app: &TestApp) {
    following_invalidations(app, Duration::from_secs(10)).await;
}

async fn received(app: &TestApp, at_least: f64) {
    wait_until(
        "the invalidation reached the other instance",
        Duration::from_secs(10),
        || async {
            metric(
                app,
                r#"discount_proxy_invalidation_messages_total{event="received"}"#,
            ) >= at_least
        },
    )
    .await;
}

async fn source_of(app: &TestApp, sn: &str) -> String {
    let body = app.lookup(&[sn]).await;
    results(&body)[0]["source"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn hot_sns_are_answered_from_memory_without_a_redis_read() {
    let app = TestApp::spawn_with(local_tier(LONG_TTL)).await;
    assert_eq!(source_of(&app, "HOT1").await, "upstream");
    let reads = app.redis.command_calls("mget").await;
    for _ in 0..5 {
        assert_eq!(source_of(&app, "HOT1").await, "cache");
    }
    assert_eq!(
        app.redis.command_calls("mget").await,
        reads,
        "Redis was read for a hot SN"
    );
    assert_eq!(app.upstream.calls("HOT1"), 1);
    assert_eq!(
        metric(
            &app,
            r#"discount_proxy_local_cache_lookups_total{result="hit"}"#
        ),
        5.0
    );
    // The copy is the value Redis holds: what the upstream said, byte for byte.
    let body = app.lookup(&["HOT1"]).await;
    assert_eq!(
        results(&body)[0]["discount"],
        StubUpstream::discount_for("HOT1")
    );
    let scraped = app.get("/metrics").await.text().await.unwrap();
    let bytes: f64 = scraped
        .lines()
        .find_map(|line| line.strip_prefix("discount_proxy_local_cache_bytes "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(bytes > 0.0, "{scraped}");
}

#[tokio::test]
async fn a_delete_on_one_instance_drops_the_copy_held_by_the_other() {
    let first = TestApp::spawn_with(local_tier(LONG_TTL)).await;
    let second = sibling_of(&first, LONG_TTL).await;
    following(&first).await;
    following(&second).await;
    assert_eq!(source_of(&first, "SHARED").await, "upstream");
    // The second instance copies it from Redis, then answers from its copy.
    assert_eq!(source_of(&second, "SHARED").await, "cache");
    let reads = first.redis.command_calls("mget").await;
    assert_eq!(source_of(&second, "SHARED").await, "cache");
    assert_eq!(
        first.redis.command_calls("mget").await,
        reads,
        "no copy was made"
    );

    let deleted = first.delete("/v1/discounts/SHARED").await;
    assert!(deleted.status().is_success(), "{}", deleted.status());
    received(&second, 1.0).await;

    assert_eq!(source_of(&second, "SHARED").await, "upstream");
    assert_eq!(first.upstream.calls("SHARED"), 2);
}

#[tokio::test]
async fn a_batch_invalidation_reaches_every_instance_including_the_one_that_sent_it() {
    let first = TestApp::spawn_with(local_tier(LONG_TTL)).await;
    let second = sibling_of(&first, LONG_TTL).await;
    following(&first).await;
    following(&second).await;
    first.lookup(&["B1", "B2", "B3"]).await;
    second.lookup(&["B1", "B2", "B3"]).await;
    let response = second
        .post_json("/v1/discounts/invalidate", &json!({ "sns": ["B1", "B3"] }))
        .await;
    assert!(response.status().is_success(), "{}", response.status());
    received(&first, 1.0).await;

    let body = first.lookup(&["B1", "B2", "B3"]).await;
    let sources: Vec<&str> = results(&body)
        .iter()
        .map(|item| item["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["upstream", "cache", "upstream"]);
    let body = second.lookup(&["B1", "B2", "B3"]).await;
    let sources: Vec<&str> = results(&body)
        .iter()
        .map(|item| item["source"].as_str().unwrap())
        .collect();
    // Fetched again by the first instance and written back: the second reads it from Redis.
    assert_eq!(sources, ["cache", "cache", "cache"]);
    assert_eq!(first.upstream.calls("B1"), 2);
    assert_eq!(first.upstream.calls("B2"), 1);
}

#[tokio::test]
async fn with_the_channel_down_a_copy_lives_no_longer_than_the_local_ttl() {
    let local_ttl = Duration::from_millis(500);
    // The second instance reaches Redis through a fault proxy: its subscription goes silent.
    let second = TestApp::spawn_with_faulty_redis(local_tier(local_ttl)).await;
    let first = sibling_of(&second, LONG_TTL).await;
    following(&second).await;
    assert_eq!(source_of(&second, "GONE").await, "upstream");
    second
        .redis_proxy()
        .set_mode(crate::support::Fault::Blackhole);

    let deleted = first.delete("/v1/discounts/GONE").await;
    assert!(deleted.status().is_success(), "{}", deleted.status());
    // The copy may still be served for a while, but not past the local TTL: then the second
    // instance cannot read Redis either, and asks the upstream.
    wait_until(
        "the second instance stops serving its copy",
        Duration::from_secs(10),
        || async { source_of(&second, "GONE").await == "upstream" },
    )
    .await;
    assert_eq!(
        metric(
            &second,
            r#"discount_proxy_invalidation_messages_total{event="received"}"#
        ),
        0.0,
        "the invalidation was delivered: the test proved nothing about the TTL"
    );
}

#[tokio::test]
async fn the_subscription_comes_back_after_redis_drops_it() {
    let first = TestApp::spawn_with(local_tier(LONG_TTL)).await;
    let second = sibling_of(&first, LONG_TTL).await;
    following(&second).await;
    second.lookup(&["BACK"]).await;
    assert_eq!(source_of(&second, "BACK").await, "cache");

    let killed = first
        .redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .await;
    assert_eq!(
        killed,
        redis::Value::Int(4),
        "both instances follow invalidations and announced answers"
    );
    wait_until(
        "the second instance notices",
        Duration::from_secs(10),
        || async { metric(&second, "discount_proxy_invalidation_channel_up") == 0.0 },
    )
    .await;
    following(&second).await;

    first.delete("/v1/discounts/BACK").await;
    received(&second, 1.0).await;
    assert_eq!(source_of(&second, "BACK").await, "upstream");
}

#[tokio::test]
async fn an_unreadable_message_on_the_channel_drops_every_copy_and_nothing_else() {
    let app = TestApp::spawn_with(local_tier(LONG_TTL)).await;
    following(&app).await;
    app.lookup(&["U1", "U2"]).await;
    let channel = format!("{}invalidations", app.config.redis.key_prefix);
    let mut redis = app.redis.client().await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(&[0xff_u8, 0xfe, b'U'][..])
        .query_async(&mut redis)
        .await
        .unwrap();
    received(&app, 1.0).await;

    let reads = app.redis.command_calls("mget").await;
    let body = app.lookup(&["U1", "U2"]).await;
    // Read from Redis again (one MGET), still cached there: nothing was deleted.
    assert_eq!(app.redis.command_calls("mget").await, reads + 1);
    assert!(
        results(&body).iter().all(|item| item["source"] == "cache"),
        "{body}"
    );
    assert_eq!(app.upstream.calls("U1"), 1);
}

#[tokio::test]
async fn with_the_tier_single_gets_keep_their_cache_headers_and_errors_are_never_copied() {
    let app = TestApp::spawn_with(local_tier(LONG_TTL)).await;
    app.upstream
        .queue_replies("FLAKY", vec![Reply::Status(503, r#"{"detail":"busy"}"#)]);
    let failed = app.get("/v1/discounts/FLAKY").await;
    assert_eq!(failed.status(), 502);
    // The failure was not copied: the next GET asks the upstream again, and gets the value.
    let fetched = app.get("/v1/discounts/FLAKY").await;
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.headers()["x-cache"], "MISS");
    let hit = app.get("/v1/discounts/FLAKY").await;
    assert_eq!(hit.headers()["x-cache"], "HIT");
    let reads = app.redis.command_calls("mget").await;
    let again = app.get("/v1/discounts/FLAKY").await;
    assert_eq!(again.headers()["x-cache"], "HIT");
    assert_eq!(
        app.redis.command_calls("mget").await,
        reads,
        "served by the tier"
    );
    assert_eq!(app.upstream.calls("FLAKY"), 2);

    // A not-found answer is copied too, and still a 404 with its header.
    app.upstream
        .reply("NF-LOCAL", Reply::Status(404, r#"{"detail":"not found"}"#));
    for expected in ["MISS", "HIT", "HIT"] {
        let missing = app.get("/v1/discounts/NF-LOCAL").await;
        assert_eq!(missing.status(), 404);
        assert_eq!(missing.headers()["x-cache"], expected);
    }
    assert_eq!(app.upstream.calls("NF-LOCAL"), 1);
}
