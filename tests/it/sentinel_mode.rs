//! `redis.mode = sentinel` against real sentinels (a master, a replica, three sentinels):
//! the proxy caches on the master they name, and follows a failover within about a second
//! of their decision, without a client error.

use crate::support::{SentinelSet, TestApp, results, wait_until};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;

async fn proxy_on(sentinels: &SentinelSet, prefix: &str) -> TestApp {
    TestApp::spawn_with(|config| {
        sentinels.point(config);
        config.redis.key_prefix = prefix.to_owned();
    })
    .await
}

/// Whether `key` exists on the node at `port`.
async fn exists_on(sentinels: &SentinelSet, port: u16, key: &str) -> bool {
    sentinels.command(port, &["EXISTS", key]).await == redis::Value::Int(1)
}

#[tokio::test]
async fn lookups_are_cached_on_the_master_the_sentinels_name() {
    let sentinels = SentinelSet::shared();
    let app = proxy_on(&sentinels, "st-cache:").await;
    app.lookup(&["S-1", "S-2"]).await;
    let master = sentinels.master_port().await;
    let key = app.key("S-1");
    wait_until(
        "the answer is written on the master",
        Duration::from_secs(5),
        || async { exists_on(&sentinels, master, &key).await },
    )
    .await;
    let again = app.lookup(&["S-1", "S-2"]).await;
    assert_eq!(again["summary"]["cache_hits"], 2, "{again}");
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        (&ready["redis_mode"], &ready["redis"]),
        (&json!("sentinel"), &json!("ok"))
    );
}

#[tokio::test]
async fn a_sentinel_failover_is_followed_within_seconds_without_a_client_error() {
    // Fails over: a sentinel set of its own.
    let sentinels = SentinelSet::start();
    let app = proxy_on(&sentinels, "st-fail:").await;
    app.lookup(&["F-0"]).await;
    let old = sentinels.master_port().await;
    sentinels.failover().await;
    let new = sentinels
        .wait_for_new_master(old, Duration::from_secs(10))
        .await;
    let decided = Instant::now();
    // Write-backs land on the new master soon after the sentinels' decision, long before
    // the old master would turn read-only; every lookup meanwhile is answered.
    let mut n = 0;
    wait_until(
        "a write-back lands on the new master",
        Duration::from_secs(5),
        || {
            n += 1;
            let sn = format!("F-{n}");
            let app = &app;
            let sentinels = &sentinels;
            async move {
                let body = app.lookup(&[&sn]).await;
                assert_eq!(results(&body)[0]["status"], "ok", "{body}");
                exists_on(sentinels, new, &app.key(&sn)).await
            }
        },
    )
    .await;
    let followed = decided.elapsed();
    assert!(
        followed < Duration::from_secs(3),
        "followed after {followed:?}"
    );
}
