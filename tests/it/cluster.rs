//! `redis.mode = cluster` against a real Redis Cluster (3 masters, 3 replicas): batches read
//! and written back over every master with TTLs, invalidations on every shard, and a master
//! killed under load costing no client error.

use crate::support::{RedisCluster, TestApp, Ttl, results, sns, wait_until};
use crate::support::{delete_drops_the_copy, following_invalidations};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

async fn proxy_on(cluster: &RedisCluster, prefix: &str) -> TestApp {
    proxy_with_tier(cluster, prefix, false).await
}

async fn proxy_with_tier(cluster: &RedisCluster, prefix: &str, local_tier: bool) -> TestApp {
    let prefix = prefix.to_owned();
    TestApp::spawn_with(|config| {
        cluster.point(config);
        config.redis.key_prefix = prefix;
        // Small chunks: a batch makes many commands per slot group, as a 10,000-SN one would.
        config.redis.chunk_size = 50;
        config.cache.local.enabled = local_tier;
        config.cache.local.ttl = Duration::from_secs(60);
    })
    .await
}

/// Waits until every SN's key holds a value with a TTL, and returns the masters holding them.
async fn written_with_ttl(cluster: &RedisCluster, app: &TestApp, sns: &[String]) -> BTreeSet<u16> {
    for sn in sns {
        let key = app.key(sn);
        wait_until("the key is written with a TTL", WAIT, || async {
            matches!(cluster.ttl(&key).await, Ttl::Expires(_))
        })
        .await;
    }
    let mut masters = BTreeSet::new();
    for sn in sns {
        masters.insert(cluster.master_of_key(&app.key(sn)).await);
    }
    masters
}

#[tokio::test]
async fn a_cold_batch_on_a_cluster_is_fetched_once_and_written_to_every_master_with_a_ttl() {
    let cluster = RedisCluster::shared();
    let app = proxy_on(&cluster, "cl-batch:").await;
    let batch = sns("B", 0..300);
    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
    let first = app.lookup(&refs).await;
    assert!(
        results(&first).iter().all(|item| item["status"] == "ok"),
        "{first}"
    );
    assert_eq!(app.upstream.total_calls(), 300);
    let masters = written_with_ttl(&cluster, &app, &batch).await;
    assert_eq!(masters.len(), 3, "keys on every master: {masters:?}");

    let again = app.lookup(&refs).await;
    assert_eq!(again["summary"]["cache_hits"], 300, "{}", again["summary"]);
    assert_eq!(app.upstream.total_calls(), 300);
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        (&ready["redis_mode"], &ready["redis"]),
        (&json!("cluster"), &json!("ok"))
    );
}

#[tokio::test]
async fn deletes_and_invalidations_on_a_cluster_remove_keys_on_every_shard() {
    let cluster = RedisCluster::shared();
    let app = proxy_on(&cluster, "cl-inv:").await;
    let batch = sns("I", 0..60);
    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
    app.lookup(&refs).await;
    written_with_ttl(&cluster, &app, &batch).await;

    assert_eq!(app.delete("/v1/discounts/I-0").await.status(), 204);
    let answer: Value = app
        .post_json("/v1/discounts/invalidate", &json!({ "sns": &refs[1..] }))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["invalidated"], 59, "{answer}");
    for sn in &batch {
        assert!(
            matches!(cluster.ttl(&app.key(sn)).await, Ttl::Missing),
            "{sn} still cached"
        );
    }
}

#[tokio::test]
async fn an_invalidation_on_one_instance_drops_the_other_instances_copy_on_a_cluster() {
    let cluster = RedisCluster::shared();
    let first = proxy_with_tier(&cluster, "cl-tier:", true).await;
    let second = proxy_with_tier(&cluster, "cl-tier:", true).await;
    for app in [&first, &second] {
        following_invalidations(app, WAIT).await;
    }
    delete_drops_the_copy(&first, &second, "T-1", WAIT).await;
}

#[tokio::test]
async fn a_master_killed_under_load_costs_no_client_error_and_caching_resumes() {
    // Kills a node: a cluster of its own.
    let cluster = RedisCluster::start();
    let app = proxy_on(&cluster, "cl-kill:").await;
    let batch = sns("K", 0..100);
    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
    app.lookup(&refs).await;
    written_with_ttl(&cluster, &app, &batch).await;

    let victim = cluster.master_of_key(&app.key("K-0")).await;
    cluster.kill_master(victim).await;
    // Lookups during the failover: every SN answered, from the upstream where its shard is
    // down, never an error.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let body = app.lookup(&refs).await;
        let items = results(&body);
        assert!(items.iter().all(|item| item["status"] == "ok"), "{body}");
    }
    cluster.wait_until_healthy(Duration::from_secs(15)).await;
    // Caching resumes on the promoted replica: a fresh SN is written back and then hit.
    wait_until("a fresh SN is cached again", WAIT, || async {
        let sn = format!("K-fresh-{}", app.upstream.total_calls());
        app.lookup(&[&sn]).await;
        wait_for_key(&cluster, &app.key(&sn)).await
            && results(&app.lookup(&[&sn]).await)[0]["source"] == "cache"
    })
    .await;
}

#[tokio::test]
async fn live_resharding_under_load_costs_no_client_error_and_loses_no_cached_key() {
    // Moves slots: a cluster of its own.
    let cluster = RedisCluster::start();
    let app = proxy_on(&cluster, "cl-move:").await;
    let batch = sns("M", 0..200);
    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
    app.lookup(&refs).await;
    written_with_ttl(&cluster, &app, &batch).await;
    let masters = cluster.masters().await;
    let (from, to) = (masters[0], masters[1]);
    let mut reshard = std::pin::pin!(cluster.reshard(from, to, 2000));
    let mut rounds = 0;
    loop {
        tokio::select! {
            () = &mut reshard => break,
            body = app.lookup(&refs) => {
                rounds += 1;
                let items = results(&body);
                assert!(items.iter().all(|item| item["status"] == "ok"), "{body}");
            }
        }
    }
    assert!(rounds > 0, "no lookup ran during the resharding");
    // Migrations slow the moving shard down, and Redis's breaker may have opened meanwhile
    // (it is one for the whole cluster): once it closes, every key is still found where the
    // cluster says it is, with its TTL.
    wait_until("every SN is a hit again", WAIT, || async {
        app.lookup(&refs).await["summary"]["cache_hits"] == 200
    })
    .await;
    assert!(cluster.keys_without_ttl().await.is_empty());
}

async fn wait_for_key(cluster: &RedisCluster, key: &str) -> bool {
    for _ in 0..50 {
        if matches!(cluster.ttl(key).await, Ttl::Expires(_)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn with_read_from_replicas_a_hit_batch_is_read_on_the_replicas() {
    let cluster = RedisCluster::shared();
    cluster.wait_until_replicas_listed("cl-replica:").await;
    let app = TestApp::spawn_with(|config| {
        cluster.point(config);
        config.redis.key_prefix = "cl-replica:".to_owned();
        config.redis.read_from_replicas = true;
    })
    .await;
    let batch = sns("RR", 0..60);
    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
    app.lookup(&refs).await;
    written_with_ttl(&cluster, &app, &batch).await;
    // Every replica has caught up with its master: the hits below must find every key.
    for master in cluster.masters().await {
        let written = repl_offset(&cluster, master).await;
        for replica in cluster.replicas_of(master).await {
            wait_until("the replica catches up", WAIT, || async {
                repl_offset(&cluster, replica).await >= written
            })
            .await;
        }
    }
    let replicas = cluster.replicas().await;
    let mut before = 0;
    for replica in &replicas {
        before += cluster.calls_of(*replica, "MGET").await;
    }

    let again = app.lookup(&refs).await;
    assert_eq!(again["summary"]["cache_hits"], 60, "{}", again["summary"]);
    let mut after = 0;
    for replica in &replicas {
        after += cluster.calls_of(*replica, "MGET").await;
    }
    assert!(
        after >= before + 3,
        "the hits were read on the replicas ({before} MGETs there before, {after} after)"
    );
}

/// How far the node on `port` is in its replication stream (`master_repl_offset`).
async fn repl_offset(cluster: &RedisCluster, port: u16) -> u64 {
    let info = cluster.command(port, &["INFO", "replication"]).await;
    let redis::Value::BulkString(info) = info else {
        panic!("INFO replies with text: {info:?}");
    };
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|line| line.strip_prefix("master_repl_offset:"))
        .map(|offset| offset.trim().parse().unwrap())
        .unwrap()
}
