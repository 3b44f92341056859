//! One shard of a cluster in trouble costs only its own keys: each master has its own
//! circuit breaker and its own command counters (`discount_proxy_redis_node_commands_total`),
//! and a replica in trouble holds up no read of another. Clusters of their own: the tests
//! pause nodes.

use crate::support::{RedisCluster, TestApp, Ttl, wait_until};
use discount_proxy::cache::{Cache, RedisCache};
use discount_proxy::config::{RedisConfig, RedisMode};
use discount_proxy::metrics::Metrics;
use std::collections::HashMap;
use std::sync::Arc;
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
    let app = TestApp::spawn_with(|config| {
        cluster.point(config);
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
async fn a_paused_replica_is_read_around_and_holds_up_no_other_connect_or_read() {
    let cluster = RedisCluster::start();
    cluster.wait_until_replicas_listed("").await;
    let masters = cluster.masters().await;
    let app = TestApp::spawn_with(|config| {
        cluster.point(config);
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

    // A cache started now, with no connection yet: the paused replica, one of its seeds,
    // must not keep it from connecting to the cluster, and its connect to the paused replica
    // hangs without holding up a read on another master's replica meanwhile.
    let config = RedisConfig {
        url: cluster.nodes()[0].clone(),
        nodes: cluster.nodes(),
        mode: RedisMode::Cluster,
        read_from_replicas: true,
        timeout: Duration::from_millis(400),
        breaker_cooldown: Duration::from_secs(60),
        ..RedisConfig::default()
    };
    let fresh = Arc::new(RedisCache::new(&config, Arc::new(Metrics::new())).unwrap());
    let mut on_paused = None;
    let mut elsewhere = None;
    for sn in &refs {
        match cluster.master_of_key(&app.key(sn)).await == masters[0] {
            true => on_paused = on_paused.or(Some(*sn)),
            false => elsewhere = elsewhere.or(Some(*sn)),
        }
    }
    let (on_paused, elsewhere) = (on_paused.unwrap(), elsewhere.unwrap());
    let other_master = cluster.master_of_key(&app.key(elsewhere)).await;
    let other_replica = cluster.replicas_of(other_master).await[0];
    // It connects though a seed hangs (the paused replica is one), and takes the slot map
    // with a DEL on the masters, leaving the replicas unconnected.
    wait_until("a fresh cache reaches the cluster", WAIT, || async {
        fresh.ping().await.is_ok()
    })
    .await;
    fresh.delete_many(&["absent"]).await.unwrap();
    // Connecting to the paused replica now: the spawned read is polled until that connect
    // waits for its answer.
    let hung = {
        let fresh = Arc::clone(&fresh);
        let sn = on_paused.to_owned();
        tokio::spawn(async move { fresh.get_many(&[sn.as_str()]).await })
    };
    tokio::task::yield_now().await;
    let before = cluster.calls_of(other_replica, "MGET").await;
    let read = fresh.get_many(&[elsewhere]).await;
    assert!(
        read.values[0].is_some(),
        "{elsewhere} is read: {:?}",
        read.failures
    );
    assert_eq!(
        cluster.calls_of(other_replica, "MGET").await,
        before + 1,
        "read on its own replica while the paused one's connect hangs"
    );
    let hung = hung.await.unwrap();
    assert!(hung.values[0].is_some(), "its master answered {on_paused}");
}
