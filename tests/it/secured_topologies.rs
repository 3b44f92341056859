//! TLS and ACL users in cluster and sentinel mode: against a cluster and a sentinel set whose
//! nodes serve TLS only and take only ACL users, the proxy caches and follows invalidations
//! with the user and TLS its URLs carry; with a wrong password it answers from the upstream
//! and never shows it.

use crate::support::{
    PROXY_PASSWORD, PROXY_USER, Process, RedisCluster, SentinelSet, StubUpstream, TestApp, Ttl,
    http_client, results, sns, wait_until, with_user,
};
use crate::support::{delete_drops_the_copy, following_invalidations};
use discount_proxy::config::RedisMode;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// A TLS connect and an `AUTH` per node on a busy two-core machine in a debug build: more
/// than the 250 ms the other tests give Redis.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

const WRONG_PASSWORD: &str = "SEKRET-wrong-acl-pw";

/// The cluster's seeds as the proxy is configured with them: TLS, and the proxy's user.
fn seeds_as(cluster: &RedisCluster, password: &str) -> Vec<String> {
    let nodes = cluster.nodes();
    nodes
        .iter()
        .map(|url| with_user(url, PROXY_USER, password))
        .collect()
}

async fn proxy_on_cluster(cluster: &RedisCluster, prefix: &str, local_tier: bool) -> TestApp {
    let nodes = seeds_as(cluster, PROXY_PASSWORD);
    let prefix = prefix.to_owned();
    TestApp::spawn_with(move |config| {
        config.redis.mode = RedisMode::Cluster;
        config.redis.nodes = nodes;
        config.redis.key_prefix = prefix;
        config.redis.timeout = REDIS_TIMEOUT;
        config.cache.local.enabled = local_tier;
        config.cache.local.ttl = Duration::from_secs(60);
    })
    .await
}

/// Whether a client reaching `url` can run `PING` there.
async fn pings(url: &str) -> bool {
    discount_proxy::tls::install_crypto_provider();
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let connect = client.get_multiplexed_async_connection();
    let Ok(Ok(mut conn)) = tokio::time::timeout(WAIT, connect).await else {
        return false;
    };
    let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    pong.is_ok()
}

#[tokio::test]
async fn a_cluster_over_tls_with_an_acl_user_caches_batches_on_every_master_and_deletes() {
    let cluster = RedisCluster::shared_secured();
    // What the proxy gets through, nothing less does: TLS and the proxy's user are needed.
    let seed = seeds_as(&cluster, PROXY_PASSWORD).remove(0);
    assert!(pings(&seed).await, "{seed}");
    let anonymous = cluster.nodes().remove(0);
    assert!(!pings(&anonymous).await, "{anonymous} takes anyone");
    let plain = seed
        .replace("rediss://", "redis://")
        .replace("#insecure", "");
    assert!(!pings(&plain).await, "plain TCP is served");
    let app = proxy_on_cluster(&cluster, "sec-cl:", false).await;
    let batch = sns("C", 0..100);
    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
    let first = app.lookup(&refs).await;
    assert!(
        results(&first).iter().all(|item| item["status"] == "ok"),
        "{first}"
    );
    assert_eq!(app.upstream.total_calls(), 100);
    let keys: Vec<String> = batch.iter().map(|sn| app.key(sn)).collect();
    wait_until("every key is written with a TTL", WAIT, || async {
        let ttls = cluster.ttls(&keys).await;
        ttls.iter().all(|ttl| matches!(ttl, Ttl::Expires(_)))
    })
    .await;
    let counts = cluster.key_counts_by_master().await;
    assert!(
        counts.len() == 3 && counts.values().all(|&keys| keys > 0),
        "keys on every master: {counts:?}"
    );

    let again = app.lookup(&refs).await;
    assert_eq!(again["summary"]["cache_hits"], 100, "{}", again["summary"]);
    assert_eq!(app.upstream.total_calls(), 100);
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        (&ready["redis_mode"], &ready["redis"]),
        (&json!("cluster"), &json!("ok"))
    );

    assert_eq!(app.delete("/v1/discounts/C-0").await.status(), 204);
    assert_eq!(cluster.ttl(&app.key("C-0")).await, Ttl::Missing);
    assert!(matches!(
        cluster.ttl(&app.key("C-1")).await,
        Ttl::Expires(_)
    ));
}

#[tokio::test]
async fn an_invalidation_reaches_the_other_instances_tier_over_a_tls_cluster_with_an_acl_user() {
    let cluster = RedisCluster::shared_secured();
    let first = proxy_on_cluster(&cluster, "sec-tier:", true).await;
    let second = proxy_on_cluster(&cluster, "sec-tier:", true).await;
    for app in [&first, &second] {
        // The subscription is a connection of its own, with the seed's TLS and user.
        following_invalidations(app, WAIT).await;
    }
    delete_drops_the_copy(&first, &second, "T-1", WAIT).await;
}

#[tokio::test]
async fn a_wrong_acl_password_on_a_tls_cluster_degrades_to_the_upstream_and_never_shows() {
    let cluster = RedisCluster::shared_secured();
    let seeds = seeds_as(&cluster, WRONG_PASSWORD);
    let userinfo = format!("{PROXY_USER}:{WRONG_PASSWORD}");
    let upstream = StubUpstream::start().await;
    let nodes = seeds.join(",");
    let timeout = format!("{}ms", REDIS_TIMEOUT.as_millis());
    let mut proxy = Process::spawn(
        &["serve", "--listen", "127.0.0.1:0", "--redis-url", &seeds[0]],
        &[
            ("RUST_LOG", "trace"),
            ("DISCOUNT_PROXY_REDIS__MODE", "cluster"),
            ("DISCOUNT_PROXY_REDIS__NODES", &nodes),
            ("DISCOUNT_PROXY_REDIS__TIMEOUT", &timeout),
            ("DISCOUNT_PROXY_UPSTREAM__URL", &upstream.url_template()),
        ],
    );
    let base = format!("http://{}", proxy.listening_addr().await);
    let client = http_client();
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let answer = client
            .post(format!("{base}/v1/discounts/lookup"))
            .json(&json!({"sns": ["W-1", "W-2"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(results(&body)[0]["source"], "upstream", "{body}");
        bodies.push(body.to_string());
    }
    assert_eq!(upstream.calls("W-1"), 2, "nothing was cached");
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["redis_mode"], "cluster", "{ready}");
    assert_ne!(ready["redis"], "ok", "{ready}");
    bodies.push(ready.to_string());
    for (path, status) in [("/v1/discounts/bad%20sn", 400), ("/nowhere", 404)] {
        let answer = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), status, "{path}");
        bodies.push(answer.text().await.unwrap());
    }
    let deleted = client.delete(format!("{base}/v1/discounts/W-1")).send();
    bodies.push(deleted.await.unwrap().text().await.unwrap());
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
    bodies.push(metrics.text().await.unwrap());

    proxy.signal("TERM");
    assert!(proxy.wait(Duration::from_secs(20)).await.success());
    let output = proxy.output();
    assert!(output.contains(" TRACE "), "logging at trace level");
    assert!(
        output.contains("redis does not answer"),
        "the failure is logged: {output}"
    );
    for text in bodies.iter().chain([&output]) {
        assert!(
            !text.contains(WRONG_PASSWORD),
            "the password shows:\n{text}"
        );
        assert!(!text.contains(&userinfo), "the userinfo shows:\n{text}");
    }
}

#[tokio::test]
async fn sentinel_mode_caches_on_a_tls_master_that_takes_only_acl_users() {
    let sentinels = SentinelSet::shared_secured();
    let nodes = sentinels.sentinel_urls();
    assert!(nodes.iter().all(|url| url.starts_with("rediss://")));
    let master = sentinels.master_name().to_owned();
    let node_url = format!("rediss://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:1/0#insecure");
    let app = TestApp::spawn_with(move |config| {
        config.redis.mode = RedisMode::Sentinel;
        config.redis.nodes = nodes;
        config.redis.sentinel_master = Some(master);
        config.redis.key_prefix = "sec-st:".to_owned();
        config.redis.timeout = REDIS_TIMEOUT;
        // Its host and port are not used: only its TLS, user, password and database.
        config.redis.url = node_url;
    })
    .await;
    app.lookup(&["S-1", "S-2"]).await;
    let master = sentinels.master_port().await;
    let key = app.key("S-1");
    wait_until("the answer is written on the master", WAIT, || async {
        sentinels.command(master, &["PTTL", &key]).await != redis::Value::Int(-2)
    })
    .await;
    let ttl = sentinels.command(master, &["PTTL", &key]).await;
    assert!(
        matches!(ttl, redis::Value::Int(ms) if ms > 0),
        "written with a TTL: {ttl:?}"
    );
    let again = app.lookup(&["S-1", "S-2"]).await;
    assert_eq!(again["summary"]["cache_hits"], 2, "{again}");
    assert_eq!(app.upstream.total_calls(), 2);
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        (&ready["redis_mode"], &ready["redis"]),
        (&json!("sentinel"), &json!("ok"))
    );
}
