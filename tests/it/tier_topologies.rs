//! The in-process tier on a cluster and behind Sentinel: the invalidation subscription finds
//! a node that answers (a cluster seed that is down is passed over) and follows the master
//! the sentinels name after a failover, so an invalidation on one instance still drops the
//! copy the other holds.

use crate::support::{RedisCluster, SentinelSet, TestApp, refusing_port, wait_until};
use crate::support::{delete_drops_the_copy, following_invalidations};
use discount_proxy::config::{Config, RedisMode};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// Long enough that only an invalidation can explain a copy going away during a test.
const LONG_TTL: Duration = Duration::from_secs(120);

fn with_tier(config: &mut Config, prefix: &str) {
    config.redis.key_prefix = prefix.to_owned();
    config.cache.local.enabled = true;
    config.cache.local.ttl = LONG_TTL;
}

async fn following(app: &TestApp) {
    following_invalidations(app, WAIT).await;
}

#[tokio::test]
async fn on_a_cluster_whose_first_seed_is_down_an_invalidation_still_reaches_the_other_tier() {
    let cluster = RedisCluster::shared();
    let (_held, dead) = refusing_port();
    let mut nodes = vec![format!("redis://127.0.0.1:{dead}")];
    nodes.extend(cluster.nodes());
    let spawn = || {
        let nodes = nodes.clone();
        TestApp::spawn_with(move |config| {
            config.redis.mode = RedisMode::Cluster;
            config.redis.nodes = nodes;
            with_tier(config, "tt-seed:");
        })
    };
    let first = spawn().await;
    let second = spawn().await;
    following(&first).await;
    following(&second).await;
    delete_drops_the_copy(&first, &second, "DS-1", WAIT).await;
}

/// Subscriptions to `channel` on the running nodes of `cluster` (each node counts its own).
async fn subscribers_on(cluster: &RedisCluster, ports: &[u16], channel: &str) -> i64 {
    let mut total = 0;
    for &port in ports {
        let reply = cluster.command(port, &["PUBSUB", "NUMSUB", channel]).await;
        if let redis::Value::Array(reply) = reply
            && let Some(redis::Value::Int(count)) = reply.get(1)
        {
            total += count;
        }
    }
    total
}

#[tokio::test]
async fn on_a_cluster_the_subscription_moves_to_another_seed_when_its_node_dies() {
    // Kills a node: a cluster of its own.
    let cluster = RedisCluster::start();
    let replica = cluster.replicas().await[0];
    let first_seed = format!("redis://127.0.0.1:{replica}");
    let mut nodes = vec![first_seed.clone()];
    nodes.extend(
        cluster
            .nodes()
            .into_iter()
            .filter(|node| *node != first_seed),
    );
    let spawn = || {
        let nodes = nodes.clone();
        TestApp::spawn_with(move |config| {
            config.redis.mode = RedisMode::Cluster;
            config.redis.nodes = nodes;
            with_tier(config, "tt-moves:");
        })
    };
    let first = spawn().await;
    let second = spawn().await;
    let channel = "tt-moves:invalidations";
    wait_until(
        "both instances subscribe on the first seed",
        WAIT,
        || async { subscribers_on(&cluster, &[replica], channel).await == 2 },
    )
    .await;

    cluster.kill_replica(replica).await;
    let others: Vec<u16> = cluster
        .masters()
        .await
        .into_iter()
        .chain(cluster.replicas().await)
        .filter(|&port| port != replica)
        .collect();
    wait_until("both instances subscribe on another node", WAIT, || async {
        subscribers_on(&cluster, &others, channel).await == 2
    })
    .await;
    following(&first).await;
    following(&second).await;
    delete_drops_the_copy(&first, &second, "MS-1", WAIT).await;
}

/// An instance in sentinel mode whose `redis.url` host is a port nothing listens on: only
/// the master the sentinels name can serve it.
async fn proxy_on(sentinels: &SentinelSet, prefix: &str) -> TestApp {
    TestApp::spawn_with(|config| {
        sentinels.point(config);
        with_tier(config, prefix);
    })
    .await
}

/// Waits until both instances subscribe on the node at `master` (and have emptied their
/// tiers on the way, which happens before the channel is reported up).
async fn both_follow_on(sentinels: &SentinelSet, master: u16, apps: [&TestApp; 2]) {
    let channel = format!("{}invalidations", apps[0].config.redis.key_prefix);
    let what = format!("both instances subscribe on the master, :{master}");
    wait_until(&what, WAIT, || async {
        let numsub = sentinels
            .command(master, &["PUBSUB", "NUMSUB", &channel])
            .await;
        matches!(&numsub, redis::Value::Array(reply) if reply.get(1) == Some(&redis::Value::Int(2)))
    })
    .await;
    for app in apps {
        following(app).await;
    }
}

#[tokio::test]
async fn behind_sentinel_an_invalidation_reaches_the_other_tier_before_and_after_a_failover() {
    // Fails over and kills a node: a sentinel set of its own.
    let sentinels = SentinelSet::start();
    let first = proxy_on(&sentinels, "tt-sentinel:").await;
    let second = proxy_on(&sentinels, "tt-sentinel:").await;
    let old = sentinels.master_port().await;
    both_follow_on(&sentinels, old, [&first, &second]).await;
    delete_drops_the_copy(&first, &second, "SF-1", WAIT).await;

    sentinels.failover().await;
    let new = sentinels.wait_for_new_master(old, WAIT).await;
    // Demoted, the old master would still pass on what the new one publishes (a replica
    // receives its master's PUBLISH): dead, it cannot, so only following the sentinels works.
    sentinels.kill_data_node(old);
    // The first instance's write-backs land on the new master: its DELETE will too.
    let mut n = 0;
    wait_until("a write-back lands on the new master", WAIT, || {
        n += 1;
        let sn = format!("SF-W{n}");
        let (first, sentinels) = (&first, &sentinels);
        async move {
            first.lookup(&[&sn]).await;
            let key = first.key(&sn);
            sentinels.command(new, &["EXISTS", &key]).await == redis::Value::Int(1)
        }
    })
    .await;
    both_follow_on(&sentinels, new, [&first, &second]).await;
    delete_drops_the_copy(&first, &second, "SF-2", WAIT).await;
}
