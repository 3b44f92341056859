//! `redis.mode = sentinel` against real sentinels (a master, a replica, three sentinels):
//! the proxy caches on the master they name, follows a failover within about a second of
//! their decision without a client error, and with `redis.read_from_replicas` reads on the
//! replica, its master answering when the replica cannot.

use crate::support::{SentinelSet, TestApp, results, wait_until};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;

/// How long a replica read may take before its master is asked: long, so that a lookup that
/// waited for it shows by its time alone.
const REPLICA_BOUND: Duration = Duration::from_secs(1);

/// A proxy on `sentinels` with `redis.read_from_replicas`, a replica read bounded by
/// [`REPLICA_BOUND`] (half of `redis.timeout`), a failed replica left alone for a minute.
async fn replica_reader_on(sentinels: &SentinelSet, prefix: &str) -> TestApp {
    TestApp::spawn_with(|config| {
        sentinels.point(config);
        config.redis.key_prefix = prefix.to_owned();
        config.redis.read_from_replicas = true;
        config.redis.timeout = 2 * REPLICA_BOUND;
        config.redis.breaker_cooldown = Duration::from_secs(60);
    })
    .await
}

/// Looks `sns` up (all cold) and waits until the replica holds every one of their keys.
async fn cached_on_the_replica(sentinels: &SentinelSet, app: &TestApp, sns: &[&str]) -> u16 {
    let body = app.lookup(sns).await;
    assert_eq!(body["summary"]["upstream_fetches"], sns.len(), "{body}");
    let replica = sentinels.replica_port().await;
    let keys: Vec<String> = sns.iter().map(|sn| app.key(sn)).collect();
    let mut exists = vec!["EXISTS"];
    exists.extend(keys.iter().map(String::as_str));
    let all = redis::Value::Int(i64::try_from(sns.len()).unwrap());
    wait_until(
        "the replica holds every key",
        Duration::from_secs(5),
        || async { sentinels.command(replica, &exists).await == all },
    )
    .await;
    replica
}

/// Whether `key` exists on the node at `port`.
async fn exists_on(sentinels: &SentinelSet, port: u16, key: &str) -> bool {
    sentinels.command(port, &["EXISTS", key]).await == redis::Value::Int(1)
}

#[tokio::test]
async fn lookups_are_cached_on_the_master_the_sentinels_name() {
    let sentinels = SentinelSet::shared();
    let app = sentinels.proxy("st-cache:").await;
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
async fn with_read_from_replicas_hits_are_read_on_the_replica_not_the_master() {
    let sentinels = SentinelSet::shared();
    let app = replica_reader_on(&sentinels, "st-replica:").await;
    let sns = ["R-1", "R-2", "R-3"];
    let replica = cached_on_the_replica(&sentinels, &app, &sns).await;
    let before = sentinels.calls_of(replica, "MGET").await;

    let again = app.lookup(&sns).await;
    assert_eq!(again["summary"]["cache_hits"], 3, "{again}");
    let after = sentinels.calls_of(replica, "MGET").await;
    assert!(
        after > before,
        "the hits were read on the replica ({before} MGETs there before, {after} after)"
    );
}

#[tokio::test]
async fn a_paused_replica_is_read_around_its_master_answering_its_reads() {
    // Pauses the replica: a sentinel set of its own.
    let sentinels = SentinelSet::start();
    let app = replica_reader_on(&sentinels, "st-paused:").await;
    let sns = ["P-1", "P-2", "P-3"];
    let replica = cached_on_the_replica(&sentinels, &app, &sns).await;
    sentinels
        .command(replica, &["CLIENT", "PAUSE", "20000", "ALL"])
        .await;
    let calls = app.upstream.total_calls();
    for round in 0..3 {
        let body = app.lookup(&sns).await;
        assert_eq!(
            body["summary"]["cache_hits"], 3,
            "the paused replica's reads were answered by the master: {}",
            body["summary"]
        );
        // After the first read it failed, the replica is left alone: no lookup waits for it.
        let waited = Duration::from_millis(body["summary"]["elapsed_ms"].as_u64().unwrap());
        assert!(
            round == 0 || waited < REPLICA_BOUND,
            "lookup {round} waited {waited:?} for the paused replica"
        );
    }
    assert_eq!(app.upstream.total_calls(), calls, "nothing fetched again");
}

#[tokio::test]
async fn a_sentinel_failover_is_followed_within_seconds_without_a_client_error() {
    // Fails over: a sentinel set of its own.
    let sentinels = SentinelSet::start();
    let app = sentinels.proxy("st-fail:").await;
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

#[tokio::test]
async fn with_read_from_replicas_reads_follow_a_failover_to_the_new_replica() {
    // Fails over: a sentinel set of its own.
    let sentinels = SentinelSet::start();
    let app = replica_reader_on(&sentinels, "st-replica-fail:").await;
    let sns = ["RF-1", "RF-2", "RF-3"];
    let replica = cached_on_the_replica(&sentinels, &app, &sns).await;
    let old = sentinels.master_port().await;
    sentinels.failover().await;
    let new = sentinels
        .wait_for_new_master(old, Duration::from_secs(10))
        .await;
    assert_eq!(new, replica, "the replica was promoted");
    // The replica connections pointed at the node now promoted: they are dropped with the
    // master's, and made again to the new replica, the old master. Every lookup meanwhile is
    // answered.
    wait_until(
        "hits are read on the old master, now the replica",
        Duration::from_secs(10),
        || async {
            let before = sentinels.calls_of(old, "MGET").await;
            let body = app.lookup(&sns).await;
            assert!(
                results(&body).iter().all(|result| result["status"] == "ok"),
                "{body}"
            );
            body["summary"]["cache_hits"] == 3 && sentinels.calls_of(old, "MGET").await > before
        },
    )
    .await;
}
