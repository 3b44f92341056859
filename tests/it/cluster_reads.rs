//! Which read strategy for a big batch on a cluster: measured, not run in the normal suite.
//!
//! `cargo test --release --test it cluster_read_strategies -- --ignored --nocapture`
//!
//! 10,000 keys, all present, read on a local 3-master cluster three ways, against one
//! chunked `MGET` read of the same keys on one standalone Redis, in the same run: one `MGET`
//! per hash slot (what `RedisCache` does), one `GET` per key (the cluster connection
//! pipelines them per node), and one `MGET` of the whole batch left to redis-rs to split.
//! Then what the proxy does, through its own `RedisCache` on both: on the cluster, one
//! pipeline per master (chunked) with one `MGET` per slot in it.

use crate::support::{RedisCluster, RedisServer};
use discount_proxy::cache::{Cache, RedisCache};
use discount_proxy::config::{RedisConfig, RedisMode};
use discount_proxy::metrics::Metrics;
use futures_util::future::join_all;
use redis::cluster_routing::Slot;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEYS: usize = 10_000;
const ROUNDS: usize = 5;

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("discount:v1:R-{i}")).collect()
}

async fn fill(conn: &mut impl redis::aio::ConnectionLike, keys: &[String]) {
    for chunk in keys.chunks(500) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("SET")
                .arg(key)
                .arg("dp1+0000000000000 {\"rate\":0.1}")
                .ignore();
        }
        let () = pipe.query_async(conn).await.unwrap();
    }
}

/// The best of [`ROUNDS`] reads, each checked to have found every key.
async fn best<F, Fut>(mut read: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let mut best = Duration::MAX;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        assert_eq!(read().await, KEYS, "every key found");
        best = best.min(started.elapsed());
    }
    best
}

fn found(values: Vec<Option<Vec<u8>>>) -> usize {
    values.into_iter().flatten().count()
}

#[tokio::test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn cluster_read_strategies() {
    let keys = keys();
    let standalone = RedisServer::start();
    let mut one = standalone.client().await;
    fill(&mut one, &keys).await;
    let cluster = RedisCluster::shared();
    let client = redis::cluster::ClusterClient::new(cluster.nodes()).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    for key in &keys {
        let () = redis::cmd("SET")
            .arg(key)
            .arg("dp1+0000000000000 {\"rate\":0.1}")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    let standalone_mget = best(|| {
        let one = one.clone();
        let keys = &keys;
        async move {
            let reads = keys.chunks(500).map(|chunk| {
                let mut one = one.clone();
                async move {
                    let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                        .arg(chunk)
                        .query_async(&mut one)
                        .await
                        .unwrap();
                    found(values)
                }
            });
            join_all(reads).await.into_iter().sum()
        }
    })
    .await;

    let mut by_slot: HashMap<Slot, Vec<&String>> = HashMap::new();
    for key in &keys {
        by_slot.entry(Slot::for_key(key)).or_default().push(key);
    }
    let per_slot = best(|| {
        let conn = conn.clone();
        let by_slot = &by_slot;
        async move {
            let reads = by_slot.values().map(|group| {
                let mut conn = conn.clone();
                async move {
                    let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                        .arg(group)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    found(values)
                }
            });
            join_all(reads).await.into_iter().sum()
        }
    })
    .await;

    let per_key = best(|| {
        let conn = conn.clone();
        let keys = &keys;
        async move {
            let reads = keys.iter().map(|key| {
                let mut conn = conn.clone();
                async move {
                    let value: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(key)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    usize::from(value.is_some())
                }
            });
            join_all(reads).await.into_iter().sum()
        }
    })
    .await;

    let split_by_library = best(|| {
        let mut conn = conn.clone();
        let keys = &keys;
        async move {
            let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
            found(values)
        }
    })
    .await;

    let sns: Vec<String> = (0..KEYS).map(|i| format!("R-{i}")).collect();
    let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
    let proxy_standalone = proxy_cache(RedisConfig {
        url: standalone.url(),
        ..RedisConfig::default()
    });
    let proxy_cluster = proxy_cache(RedisConfig {
        mode: RedisMode::Cluster,
        nodes: cluster.nodes(),
        ..RedisConfig::default()
    });
    let through_proxy_standalone = best(|| read_all(&proxy_standalone, &sns)).await;
    let through_proxy_cluster = best(|| read_all(&proxy_cluster, &sns)).await;

    println!(
        "{KEYS} keys, best of {ROUNDS}: standalone MGET×500 {standalone_mget:?}; cluster: MGET per slot ({} slots) {per_slot:?}, GET per key {per_key:?}, one MGET split by redis-rs {split_by_library:?}; the proxy's RedisCache: standalone {through_proxy_standalone:?}, cluster (a pipeline per master) {through_proxy_cluster:?}",
        by_slot.len()
    );
}

fn proxy_cache(config: RedisConfig) -> RedisCache {
    RedisCache::new(&config, Arc::new(Metrics::default())).unwrap()
}

async fn read_all(cache: &RedisCache, sns: &[&str]) -> usize {
    let values = cache.get_many(sns).await;
    assert!(values.failures.is_empty(), "{:?}", values.failures);
    values.values.into_iter().flatten().count()
}
