//! Proxies sharing one Redis (three processes on one Redis and on the local cluster, two
//! in-process instances behind Sentinel) behave as one (`coalesce.distributed`): one upstream call per SN between
//! them, however the lookups are spread; an invalidation on one fences a fetch on another; a
//! holder killed mid-fetch is taken over within its lease; a pure-hit batch sends no claim.

use crate::support::{
    Process, RedisCluster, RedisServer, Reply, StubUpstream, http_client, sample_in, sns,
};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

/// Proxies on one Redis, one stub upstream counting every call between them.
struct Instances {
    upstream: StubUpstream,
    procs: Vec<Process>,
    addrs: Vec<SocketAddr>,
    client: reqwest::Client,
    prefix: String,
}

/// Where the proxies' Redis is.
#[derive(Clone, Copy)]
enum Shared<'a> {
    One(&'a RedisServer),
    Cluster(&'a RedisCluster),
}

impl Instances {
    async fn start(redis: Shared<'_>, count: usize, prefix: &str, extra: &[(&str, &str)]) -> Self {
        let upstream = StubUpstream::start().await;
        let url = upstream.url_template();
        let (redis_url, nodes) = match redis {
            Shared::One(server) => (server.url(), None),
            Shared::Cluster(cluster) => {
                (cluster.nodes()[0].clone(), Some(cluster.nodes().join(",")))
            }
        };
        let mut envs = vec![
            ("DISCOUNT_PROXY_UPSTREAM__URL", url.as_str()),
            ("DISCOUNT_PROXY_UPSTREAM__RETRIES", "0"),
            ("DISCOUNT_PROXY_REDIS__KEY_PREFIX", prefix),
        ];
        if let Some(nodes) = &nodes {
            envs.push(("DISCOUNT_PROXY_REDIS__MODE", "cluster"));
            envs.push(("DISCOUNT_PROXY_REDIS__NODES", nodes));
        }
        envs.extend_from_slice(extra);
        let procs: Vec<Process> = (0..count)
            .map(|_| Process::serve(&redis_url, &envs))
            .collect();
        let mut addrs = Vec::new();
        for proc in &procs {
            addrs.push(proc.listening_addr().await);
        }
        Self {
            upstream,
            procs,
            addrs,
            client: http_client(),
            prefix: prefix.to_owned(),
        }
    }

    /// `POST /v1/discounts/lookup` on instance `at`; the results, asserting `200`.
    async fn lookup(&self, at: usize, sns: &[String]) -> Vec<Value> {
        let url = format!("http://{}/v1/discounts/lookup", self.addrs[at]);
        let response = self
            .client
            .post(url)
            .json(&json!({ "sns": sns }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["results"].as_array().unwrap().clone()
    }

    /// `GET /v1/discounts/{sn}` on instance `at`: the status and body.
    async fn get(&self, at: usize, sn: &str) -> (u16, Value) {
        let url = format!("http://{}/v1/discounts/{sn}", self.addrs[at]);
        let response = self.client.get(url).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// One sample of instance `at`'s `/metrics`.
    async fn metric(&self, at: usize, sample: &str) -> f64 {
        let url = format!("http://{}/metrics", self.addrs[at]);
        let text = self.client.get(url).send().await.unwrap().text().await;
        sample_in(&text.unwrap(), sample)
    }

    fn key(&self, sn: &str) -> String {
        format!("{}{sn}", self.prefix)
    }

    /// The coalescing counters of every instance, for a failure's message.
    async fn counters(&self) -> String {
        let mut all = String::new();
        for addr in &self.addrs {
            let text = self
                .client
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let wanted = [
                "claims_total",
                "waits_total",
                "leases_total",
                "refused_writes_total",
            ];
            for line in text
                .lines()
                .filter(|line| wanted.iter().any(|w| line.contains(w)) && !line.starts_with('#'))
            {
                all.push_str(line);
                all.push('\n');
            }
            all.push_str("---\n");
        }
        all
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(Process::output)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

fn all_ok(results: &[Value]) -> bool {
    results.iter().all(|item| item["status"] == "ok")
}

async fn same_cold_batch_on_three_instances(instances: &Instances) {
    instances.upstream.set_latency(Duration::from_millis(100));
    let batch = sns("SAME", 0..300);
    let lookups = (0..3).map(|at| instances.lookup(at, &batch));
    for results in futures_util::future::join_all(lookups).await {
        assert_eq!(results.len(), 300);
        assert!(all_ok(&results), "{}", instances.logs());
    }
    let calls = instances.upstream.total_calls();
    println!("same 300 cold SNs on three instances: {calls} upstream calls");
    assert_eq!(calls, 300, "{}", instances.logs());
}

async fn stampede_on_three_instances(instances: &Instances) {
    instances.upstream.set_latency(Duration::from_millis(200));
    let gets = (0..300).map(|i| instances.get(i % 3, "STAMPEDE"));
    for (status, body) in futures_util::future::join_all(gets).await {
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["source"], "upstream",
            "answered with the one fetch's value"
        );
    }
    let calls = instances.upstream.calls("STAMPEDE");
    println!("3 x 100 GETs of one cold SN: {calls} upstream call(s)");
    assert_eq!(calls, 1, "{}", instances.logs());
}

async fn overlapping_exports_on_three_instances(instances: &Instances) {
    instances.upstream.set_latency(Duration::from_millis(20));
    let exports = [0..1000, 500..1500, 1000..2000].map(|range| sns("EXP", range));
    let lookups = exports
        .iter()
        .enumerate()
        .map(|(at, batch)| instances.lookup(at, batch));
    for results in futures_util::future::join_all(lookups).await {
        assert!(all_ok(&results), "{}", instances.logs());
    }
    let calls = instances.upstream.total_calls();
    println!("overlapping exports 0-999, 500-1499, 1000-1999: {calls} upstream calls");
    assert_eq!(calls, 2000, "{}", instances.counters().await);
}

#[tokio::test]
async fn three_instances_fetch_the_same_cold_batch_once() {
    let redis = RedisServer::start();
    let instances = Instances::start(Shared::One(&redis), 3, "same:", &[]).await;
    same_cold_batch_on_three_instances(&instances).await;
}

#[tokio::test]
async fn three_instances_on_a_cluster_fetch_the_same_cold_batch_once() {
    let cluster = RedisCluster::shared();
    let instances = Instances::start(Shared::Cluster(&cluster), 3, "inst-same:", &[]).await;
    same_cold_batch_on_three_instances(&instances).await;
}

#[tokio::test]
async fn a_stampede_over_three_instances_makes_one_upstream_call() {
    let redis = RedisServer::start();
    let instances = Instances::start(Shared::One(&redis), 3, "stampede:", &[]).await;
    stampede_on_three_instances(&instances).await;
}

#[tokio::test]
async fn a_stampede_over_three_instances_on_a_cluster_makes_one_upstream_call() {
    let cluster = RedisCluster::shared();
    let instances = Instances::start(Shared::Cluster(&cluster), 3, "inst-stampede:", &[]).await;
    stampede_on_three_instances(&instances).await;
}

#[tokio::test]
async fn overlapping_exports_on_three_instances_make_one_call_per_sn() {
    let redis = RedisServer::start();
    let instances = Instances::start(Shared::One(&redis), 3, "exports:", &[]).await;
    overlapping_exports_on_three_instances(&instances).await;
}

#[tokio::test]
async fn overlapping_exports_on_three_instances_on_a_cluster_make_one_call_per_sn() {
    let cluster = RedisCluster::shared();
    let instances = Instances::start(Shared::Cluster(&cluster), 3, "inst-exports:", &[]).await;
    overlapping_exports_on_three_instances(&instances).await;
}

#[tokio::test]
async fn a_fetch_longer_than_its_lease_keeps_it_by_renewing_it() {
    let redis = RedisServer::start();
    let extra = [("DISCOUNT_PROXY_COALESCE__LEASE_TTL", "600ms")];
    let instances = Instances::start(Shared::One(&redis), 2, "renewed:", &extra).await;
    // Four leases long: unrenewed, the lease would expire and B would fetch it too.
    instances.upstream.set_latency(Duration::from_millis(2400));
    let holder = instances.get(0, "LONG");
    let waiter = async {
        crate::support::wait_until("A is fetching", Duration::from_secs(5), || async {
            instances.upstream.calls("LONG") == 1
        })
        .await;
        instances.get(1, "LONG").await
    };
    let ((status, body), (waited, waited_body)) = tokio::join!(holder, waiter);
    assert_eq!((status, waited), (200, 200), "{body} {waited_body}");
    assert_eq!(waited_body["source"], "upstream", "{waited_body}");
    assert_eq!(
        instances.upstream.calls("LONG"),
        1,
        "{}",
        instances.counters().await
    );
    let renewed = r#"discount_proxy_leases_total{event="renewed"}"#;
    assert!(instances.metric(0, renewed).await >= 3.0);
}

/// A lookup on B of the last SN of an export A has just begun: A claimed every SN at once,
/// but B takes that SN's queued claim over and fetches it at once, instead of waiting for
/// A's queue to reach it; A waits for B's answer. One call per SN all the same.
async fn lookup_during_another_instances_export(redis: Shared<'_>, prefix: &str) {
    // Two fetches at a time, 100 ms each: A's queue reaches X-39 after about 2 s.
    let extra = [("DISCOUNT_PROXY_UPSTREAM__CONCURRENCY", "2")];
    let instances = Instances::start(redis, 2, prefix, &extra).await;
    instances.upstream.set_latency(Duration::from_millis(100));
    let export = sns("X", 0..40);
    let exporting = instances.lookup(0, &export);
    let wanted = async {
        crate::support::wait_until("A is fetching", Duration::from_secs(5), || async {
            instances.upstream.total_calls() > 0
        })
        .await;
        let (status, body) = instances.get(1, "X-39").await;
        (status, body, instances.upstream.total_calls())
    };
    let (results, (status, body, calls_then)) = tokio::join!(exporting, wanted);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "upstream", "{body}");
    assert!(
        calls_then < export.len(),
        "B answered before A's queue reached X-39 ({calls_then} calls by then): {}",
        instances.counters().await
    );
    assert!(all_ok(&results), "{}", instances.logs());
    for sn in &export {
        assert_eq!(
            instances.upstream.calls(sn),
            1,
            "{sn}: {}",
            instances.counters().await
        );
    }
}

#[tokio::test]
async fn a_lookup_does_not_wait_for_another_instances_export_to_reach_its_sn() {
    let redis = RedisServer::start();
    lookup_during_another_instances_export(Shared::One(&redis), "queued:").await;
}

#[tokio::test]
async fn on_a_cluster_a_lookup_does_not_wait_for_another_instances_export() {
    let cluster = RedisCluster::shared();
    lookup_during_another_instances_export(Shared::Cluster(&cluster), "inst-queued:").await;
}

/// Whether `key` exists, wherever the proxies' Redis keeps it.
async fn exists(redis: Shared<'_>, key: &str) -> bool {
    let reply = match redis {
        Shared::One(server) => server.command(&["EXISTS", key]).await,
        Shared::Cluster(cluster) => {
            let port = cluster.master_of_key(key).await;
            cluster.command(port, &["EXISTS", key]).await
        }
    };
    reply == redis::Value::Int(1)
}

async fn delete_during_another_instances_fetch(redis: Shared<'_>, prefix: &str) {
    let instances = Instances::start(redis, 2, prefix, &[]).await;
    instances
        .upstream
        .set_latency_for("F-1", Duration::from_millis(800));
    let one = ["F-1".to_owned()];
    let fetching = instances.lookup(1, &one);
    let delete = async {
        crate::support::wait_until("B is fetching", Duration::from_secs(5), || async {
            instances.upstream.in_flight() == 1
        })
        .await;
        let url = format!("http://{}/v1/discounts/F-1", instances.addrs[0]);
        let response = instances.client.delete(url).send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    };
    let (results, ()) = tokio::join!(fetching, delete);
    assert_eq!(
        results[0]["status"], "ok",
        "B's client still gets its answer"
    );
    // B's lookup answers after its write-back: the write was refused by then.
    let key = instances.key("F-1");
    assert!(!exists(redis, &key).await, "{}", instances.logs());
    // A lookup after the delete fetches anew, and that answer is kept.
    let again = instances.lookup(0, &["F-1".to_owned()]).await;
    assert_eq!(again[0]["source"], "upstream");
    assert_eq!(instances.upstream.calls("F-1"), 2);
    assert!(exists(redis, &key).await);
}

#[tokio::test]
async fn a_delete_on_one_instance_keeps_another_instances_fetch_out_of_the_cache() {
    let redis = RedisServer::start();
    delete_during_another_instances_fetch(Shared::One(&redis), "fenced:").await;
}

#[tokio::test]
async fn on_a_cluster_a_delete_on_one_instance_keeps_another_instances_fetch_out() {
    let cluster = RedisCluster::shared();
    delete_during_another_instances_fetch(Shared::Cluster(&cluster), "inst-fenced:").await;
}

async fn holder_killed_mid_fetch(redis: Shared<'_>, prefix: &str) {
    let lease = Duration::from_secs(2);
    let extra = [("DISCOUNT_PROXY_COALESCE__LEASE_TTL", "2s")];
    let mut instances = Instances::start(redis, 2, prefix, &extra).await;
    instances.upstream.queue_replies("K-1", vec![Reply::Hang]);
    let holder_url = format!("http://{}/v1/discounts/K-1", instances.addrs[0]);
    let holder = tokio::spawn(instances.client.get(holder_url).send());
    crate::support::wait_until("A is fetching", Duration::from_secs(5), || async {
        instances.upstream.calls("K-1") == 1
    })
    .await;
    let started = Instant::now();
    let waiter = instances.get(1, "K-1");
    let kill = async {
        // B has claimed and lost by now, or claims a lease that outlives A anyway.
        tokio::time::sleep(Duration::from_millis(200)).await;
        instances.procs[0].signal("KILL");
    };
    let ((status, body), ()) = tokio::join!(waiter, kill);
    let took = started.elapsed();
    assert_eq!(status, 200, "{body} {}", instances.logs());
    assert_eq!(body["source"], "upstream");
    assert_eq!(
        instances.upstream.calls("K-1"),
        2,
        "B fetched it after A died"
    );
    println!("holder killed: the other instance answered after {took:?} (lease {lease:?})");
    // The lease, the poll that finds it gone (every second), the fetch: with room to spare.
    assert!(took < lease + Duration::from_secs(3), "{took:?}");
    assert!(
        took >= lease - Duration::from_millis(300),
        "it waited for the lease: {took:?}"
    );
    assert!(
        holder.await.unwrap().is_err(),
        "A's client lost its connection"
    );
    instances.procs[0].wait(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_holder_killed_mid_fetch_is_taken_over_within_its_lease() {
    let redis = RedisServer::start();
    holder_killed_mid_fetch(Shared::One(&redis), "killed:").await;
}

#[tokio::test]
async fn on_a_cluster_a_holder_killed_mid_fetch_is_taken_over_within_its_lease() {
    let cluster = RedisCluster::shared();
    holder_killed_mid_fetch(Shared::Cluster(&cluster), "inst-killed:").await;
}

#[tokio::test]
async fn a_pure_hit_batch_sends_no_claim() {
    let redis = RedisServer::start();
    let instances = Instances::start(Shared::One(&redis), 1, "hits:", &[]).await;
    let batch = sns("HIT", 0..100);
    assert!(all_ok(&instances.lookup(0, &batch).await));
    let claims = redis.command_calls("evalsha").await;
    assert!(claims > 0, "the misses were claimed and written by script");
    let reads = redis.command_calls("mget").await;
    let announcements = redis.command_calls("publish").await;
    let results = instances.lookup(0, &batch).await;
    assert!(results.iter().all(|item| item["source"] == "cache"));
    assert_eq!(
        redis.command_calls("evalsha").await,
        claims,
        "no claim, no script"
    );
    assert_eq!(redis.command_calls("mget").await, reads + 1, "one MGET");
    assert_eq!(
        redis.command_calls("publish").await,
        announcements,
        "no announcement"
    );
}

/// Calls of `command` over every master of `cluster`.
async fn calls_on_masters(cluster: &RedisCluster, command: &str) -> u64 {
    let mut calls = 0;
    for master in cluster.masters().await {
        calls += cluster.calls_of(master, command).await;
    }
    calls
}

#[tokio::test]
async fn on_a_cluster_a_pure_hit_batch_sends_no_claim() {
    // A cluster of its own: the shared one's masters count other tests' scripts.
    let cluster = RedisCluster::start();
    let instances = Instances::start(Shared::Cluster(&cluster), 1, "hits:", &[]).await;
    let batch = sns("HIT", 0..100);
    assert!(all_ok(&instances.lookup(0, &batch).await));
    let claims = calls_on_masters(&cluster, "evalsha").await;
    assert!(claims > 0, "the misses were claimed and written by script");
    let reads = calls_on_masters(&cluster, "mget").await;
    let announcements = calls_on_masters(&cluster, "publish").await;
    let results = instances.lookup(0, &batch).await;
    assert!(results.iter().all(|item| item["source"] == "cache"));
    assert_eq!(
        calls_on_masters(&cluster, "evalsha").await,
        claims,
        "no claim, no script"
    );
    assert!(
        calls_on_masters(&cluster, "mget").await > reads,
        "read by MGETs"
    );
    assert_eq!(
        calls_on_masters(&cluster, "publish").await,
        announcements,
        "no announcement"
    );
}

#[tokio::test]
async fn a_write_back_never_replaces_an_entry_fetched_later() {
    let app = crate::support::TestApp::spawn().await;
    // An entry fetched a minute from now, as another instance with a later answer (or a
    // clock ahead) would have written it.
    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    let millis = later
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let value = format!(r#"dp1+{millis:013} {{"later":true}}"#);
    crate::support::seed_raw(&app, "N-1", value.clone()).await;
    // A forced refresh fetches N-1 now: an earlier answer than the one stored.
    let body = app
        .lookup_at("/v1/discounts/lookup?refresh=true", &["N-1"])
        .await;
    assert_eq!(body["results"][0]["source"], "upstream");
    assert_eq!(app.upstream.calls("N-1"), 1);
    let stored = app.redis_value("N-1").await.unwrap();
    assert_eq!(
        String::from_utf8(stored).unwrap(),
        value,
        "the later entry stays"
    );
    let refused = r#"discount_proxy_refused_writes_total{reason="newer"}"#;
    assert_eq!(app.metric(refused), 1.0);
}

#[tokio::test]
async fn two_instances_behind_sentinel_fetch_a_cold_sn_once() {
    use crate::support::{SentinelSet, TestApp};
    use discount_proxy::app::CacheChoice;
    use discount_proxy::config::RedisMode;
    let sentinels = SentinelSet::shared();
    let nodes = sentinels.sentinel_urls();
    let master = sentinels.master_name().to_owned();
    let first = TestApp::spawn_with(move |config| {
        config.redis.mode = RedisMode::Sentinel;
        config.redis.nodes = nodes;
        config.redis.sentinel_master = Some(master);
        config.redis.key_prefix = "inst-sentinel:".to_owned();
    })
    .await;
    first.upstream.set_latency(Duration::from_millis(200));
    // The same config (the same sentinels and upstream) on a port of its own; the Redis and
    // stub a `TestApp` owns are not used.
    let mut config = first.config.clone();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    let unused = (RedisServer::start(), StubUpstream::start().await);
    let second = TestApp::spawn_on(config, CacheChoice::Redis, unused.0, unused.1).await;
    let lookups = (0..100).map(|i| {
        let app = if i % 2 == 0 { &first } else { &second };
        app.lookup(&["ST-1"])
    });
    for body in futures_util::future::join_all(lookups).await {
        assert_eq!(body["results"][0]["status"], "ok", "{body}");
    }
    assert_eq!(first.upstream.calls("ST-1"), 1);
}

#[tokio::test]
async fn with_distributed_off_each_instance_coalesces_alone_and_sends_no_script() {
    let redis = RedisServer::start();
    let off = [("DISCOUNT_PROXY_COALESCE__DISTRIBUTED", "false")];
    let instances = Instances::start(Shared::One(&redis), 2, "alone:", &off).await;
    instances.upstream.set_latency(Duration::from_millis(200));
    let gets = (0..20).map(|i| instances.get(i % 2, "ALONE-1"));
    for (status, _) in futures_util::future::join_all(gets).await {
        assert_eq!(status, 200);
    }
    assert_eq!(instances.upstream.calls("ALONE-1"), 2, "one per instance");
    let url = format!("http://{}/v1/discounts/ALONE-1", instances.addrs[0]);
    assert!(
        instances
            .client
            .delete(url)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    assert_eq!(
        redis.command_calls("evalsha").await,
        0,
        "no claim, fence or fenced write"
    );
    assert_eq!(redis.command_calls("publish").await, 0, "no announcement");
    assert_eq!(
        redis.command(&["DBSIZE"]).await,
        redis::Value::Int(0),
        "no lease or fence key"
    );
}
