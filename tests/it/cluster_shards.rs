//! One shard of a cluster in trouble costs only its own keys: each master has its own
//! circuit breaker and its own command counters (`discount_proxy_redis_node_commands_total`).
//! A cluster of its own: the test pauses a master.

use crate::support::{RedisCluster, TestApp, Ttl, wait_until};
use discount_proxy::config::RedisMode;
use std::collections::HashMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// How long the paused master stays paused: longer than the test needs it.
const PAUSE_MS: u64 = 20_000;

/// Pauses every client of the node at `port` (the cluster stops it at the end of the test).
async fn pause(port: u16, millis: u64) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(millis)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_paused_master_turns_only_its_own_keys_into_misses_and_is_named_in_the_metrics() {
    let cluster = RedisCluster::start();
    let nodes = cluster.nodes();
    let app = TestApp::spawn_with(move |config| {
        config.redis.mode = RedisMode::Cluster;
        config.redis.nodes = nodes;
        config.redis.timeout = Duration::from_millis(200);
        config.redis.breaker_failures = 2;
        config.redis.breaker_cooldown = Duration::from_secs(60);
    })
    .await;
    let sns: Vec<String> = (0..300).map(|i| format!("SH-{i}")).collect();
    let refs: Vec<&str> = sns.iter().map(String::as_str).collect();
    app.lookup(&refs).await;
    let mut master_of: HashMap<&str, u16> = HashMap::new();
    for sn in &refs {
        let key = app.key(sn);
        wait_until("the key is written", WAIT, || async {
            matches!(cluster.ttl(&key).await, Ttl::Expires(_))
        })
        .await;
        master_of.insert(sn, cluster.master_of_key(&key).await);
    }
    let masters = cluster.masters().await;
    for master in &masters {
        let sample = format!(
            r#"discount_proxy_redis_node_commands_total{{node="127.0.0.1:{master}",outcome="ok"}}"#
        );
        assert!(app.scraped(&sample).await > 0.0, "{sample}");
    }

    let paused = masters[0];
    pause(paused, PAUSE_MS).await;
    let skipped = format!(
        r#"discount_proxy_redis_node_commands_total{{node="127.0.0.1:{paused}",outcome="skipped"}}"#
    );
    wait_until("the paused master's circuit opens", WAIT, || async {
        app.lookup(&refs).await;
        app.scraped(&skipped).await > 0.0
    })
    .await;

    let calls_before = app.upstream.total_calls();
    let body = app.lookup(&refs).await;
    let elsewhere = master_of.values().filter(|&&m| m != paused).count();
    assert_eq!(
        body["summary"]["cache_hits"], elsewhere,
        "every key of the other masters is still a hit: {}",
        body["summary"]
    );
    assert_eq!(
        app.upstream.total_calls() - calls_before,
        refs.len() - elsewhere,
        "only the paused master's SNs went to the upstream"
    );
}

#[tokio::test]
async fn a_paused_replica_is_read_around_its_master_answering_its_reads() {
    let cluster = RedisCluster::start();
    cluster.wait_until_replicas_listed("").await;
    let masters = cluster.masters().await;
    let nodes = cluster.nodes();
    let app = TestApp::spawn_with(move |config| {
        config.redis.mode = RedisMode::Cluster;
        config.redis.nodes = nodes;
        config.redis.read_from_replicas = true;
        config.redis.timeout = Duration::from_millis(400);
        config.redis.breaker_cooldown = Duration::from_secs(60);
    })
    .await;
    let sns: Vec<String> = (0..90).map(|i| format!("RP-{i}")).collect();
    let refs: Vec<&str> = sns.iter().map(String::as_str).collect();
    app.lookup(&refs).await;
    for sn in &refs {
        let key = app.key(sn);
        wait_until("the key is written", WAIT, || async {
            matches!(cluster.ttl(&key).await, Ttl::Expires(_))
        })
        .await;
    }
    // Every replica holds what its master wrote before the proxy reads there.
    for master in &masters {
        for replica in cluster.replicas_of(*master).await {
            wait_until("the replica catches up", WAIT, || async {
                cluster.command(replica, &["DBSIZE"]).await
                    == cluster.command(*master, &["DBSIZE"]).await
            })
            .await;
        }
    }
    let replica = cluster.replicas_of(masters[0]).await[0];
    pause(replica, PAUSE_MS).await;
    let calls = app.upstream.total_calls();
    for _ in 0..3 {
        let body = app.lookup(&refs).await;
        assert_eq!(
            body["summary"]["cache_hits"], 90,
            "the paused replica's keys came from its master: {}",
            body["summary"]
        );
    }
    assert_eq!(app.upstream.total_calls(), calls, "nothing fetched again");
}
