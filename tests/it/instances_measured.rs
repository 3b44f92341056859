//! What coalescing across instances costs: measured, not run in the normal suite.
//!
//! `cargo test --release --test it instances_measured -- --ignored --nocapture --test-threads 1`
//!
//! - the latency a loser adds over the winner on the same cold SN (two proxy processes on
//!   one Redis, the loser asked once the winner's upstream call started);
//! - the fenced write-back script against the plain `SET … PX` pipeline, 10,000 entries
//!   through `RedisCache`, on one Redis and on the local cluster;
//! - the hit path's throughput with `coalesce.distributed` on and off, one proxy each, in
//!   turns;
//! - claiming a 10,000-SN batch's misses all at once against a chunk of 500 per call in
//!   turn (as a fetch task claimed before), and what starting one queued claim costs, the
//!   script call each queued fetch makes before its upstream call, on one Redis and on the
//!   local cluster.
//!
//! One run on the 2-core development machine (shared, loaded): loser's added latency median
//! 0.39 ms, max 4.4 ms over 50 trials; 10,000-entry write-back 17.7 ms plain against 72 ms
//! fenced on one Redis, 31 ms against 109 ms on the cluster; hit batches per second on/off
//! 9,076/3,452, 3,965/4,192, 4,888/2,632 (noise, no measurable change: a hit sends the same
//! `MGET`s either way). A later run, release build, with the claims made at once: loser
//! median 0.27 ms, max 0.55 ms; write-back 12.8 ms plain against 56 ms fenced on one Redis,
//! 19 ms against 56 ms on the cluster; claiming 10,000 misses all at once 62 ms against
//! 71 ms a chunk of 500 per call in turn on one Redis, 61 ms against 75 ms on the cluster
//! (the script calls cost Redis the same either way: what changes is that every claim is
//! held before the first fetch); starting a queued claim median 0.10 ms (0.07 ms on the
//! cluster); hit batches per second on/off 7,672/7,686, 7,523/8,990, 8,570/8,041.

use crate::support::{Process, RedisCluster, RedisServer, StubUpstream, http_client};
use bytes::Bytes;
use discount_proxy::cache::{
    Ask, Cache, Claim, Coordination, Entry, FencedWrite, RedisCache, Write,
};
use discount_proxy::config::{RedisConfig, RedisMode};
use discount_proxy::metrics::Metrics;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

fn median(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() / 2]
}

#[tokio::test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn loser_added_latency() {
    let redis = RedisServer::start();
    let upstream = StubUpstream::start().await;
    upstream.set_latency(Duration::from_millis(100));
    let url = upstream.url_template();
    let envs = [
        ("DISCOUNT_PROXY_UPSTREAM__URL", url.as_str()),
        ("DISCOUNT_PROXY_UPSTREAM__RETRIES", "0"),
    ];
    let winner = Process::serve(&redis.url(), &envs);
    let loser = Process::serve(&redis.url(), &envs);
    let (a, b) = (winner.listening_addr().await, loser.listening_addr().await);
    let client = http_client();
    let mut added = Vec::new();
    for trial in 0..50 {
        let sn = format!("LAT-{trial}");
        let get = |addr| {
            let request = client
                .get(format!("http://{addr}/v1/discounts/{sn}"))
                .send();
            async move {
                let response = request.await.unwrap();
                assert_eq!(response.status(), 200);
                let body: serde_json::Value = response.json().await.unwrap();
                assert_eq!(body["source"], "upstream");
                Instant::now()
            }
        };
        let first = tokio::spawn(get(a));
        crate::support::wait_until("the winner fetches", Duration::from_secs(5), || async {
            upstream.calls(&sn) == 1
        })
        .await;
        let loser_done = get(b).await;
        let winner_done = first.await.unwrap();
        assert_eq!(upstream.calls(&sn), 1);
        added.push(loser_done.saturating_duration_since(winner_done));
    }
    added.sort();
    println!(
        "loser's added latency over the winner, 50 trials: median {:?}, max {:?}",
        median(&added),
        added[added.len() - 1]
    );
}

fn writes(prefix: &str, count: usize) -> Vec<Write> {
    let entry = Entry::found(br#"{"rate":0.1}"#, SystemTime::now());
    (0..count)
        .map(|i| Write {
            sn: format!("{prefix}-{i}"),
            value: entry.encoded().clone(),
            ttl: Duration::from_secs(600),
        })
        .collect()
}

/// The best of five rounds of the plain pipeline and of the fenced script, in turns.
async fn write_costs(redis: &RedisCache, what: &str) {
    let plain = writes("PLAIN", 10_000);
    let fenced: Vec<FencedWrite> = writes("FENCED", 10_000)
        .into_iter()
        .map(|write| FencedWrite {
            write,
            fence: Bytes::new(),
            token: None,
        })
        .collect();
    let (mut best_plain, mut best_fenced) = (Duration::MAX, Duration::MAX);
    for _ in 0..5 {
        let started = Instant::now();
        redis.set_many(&plain).await.unwrap();
        best_plain = best_plain.min(started.elapsed());
        let started = Instant::now();
        let refusals = redis.write_fenced(&fenced).await.unwrap();
        best_fenced = best_fenced.min(started.elapsed());
        assert_eq!(refusals.written.iter().filter(|w| **w).count(), 10_000);
    }
    println!(
        "10,000-entry write-back on {what}: plain SET PX pipeline {best_plain:?}, fenced script {best_fenced:?}"
    );
}

#[tokio::test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn fenced_write_back_cost() {
    on_one_redis_and_a_cluster("measured-writes:", |cache, what| async move {
        write_costs(&cache, what).await;
    })
    .await;
}

/// Runs `measure` with a `RedisCache` on a Redis of its own, then with one on the shared
/// local cluster (keys under `prefix`), each named for the printout.
async fn on_one_redis_and_a_cluster<F, Measured>(prefix: &str, measure: F)
where
    F: Fn(RedisCache, &'static str) -> Measured,
    Measured: std::future::Future<Output = ()>,
{
    let cache = |config: RedisConfig| {
        let config = RedisConfig {
            timeout: Duration::from_secs(5),
            ..config
        };
        RedisCache::new(&config, Arc::new(Metrics::new())).unwrap()
    };
    let server = RedisServer::start();
    let one = cache(RedisConfig {
        url: server.url(),
        ..RedisConfig::default()
    });
    measure(one, "one Redis").await;
    let cluster = RedisCluster::shared();
    let many = cache(RedisConfig {
        url: cluster.nodes()[0].clone(),
        nodes: cluster.nodes(),
        mode: RedisMode::Cluster,
        key_prefix: prefix.to_owned(),
        ..RedisConfig::default()
    });
    measure(many, "a 3-master cluster").await;
}

/// The best of five rounds of claiming 10,000 misses at once and a chunk of 500 per call in
/// turn, then the median of 1,000 starts of one queued claim each.
async fn claim_costs(redis: &RedisCache, what: &str) {
    const LEASE: Duration = Duration::from_secs(30);
    let (mut best_once, mut best_chunked) = (Duration::MAX, Duration::MAX);
    for round in 0..5 {
        let sns: Vec<String> = (0..10_000).map(|i| format!("ONCE-{round}-{i}")).collect();
        let asks = queued_asks(&sns);
        let started = Instant::now();
        let claims = redis.claim(&asks, "measure", LEASE).await;
        best_once = best_once.min(started.elapsed());
        assert!(
            claims
                .iter()
                .all(|claim| matches!(claim, Claim::Won { .. }))
        );

        let sns: Vec<String> = (0..10_000).map(|i| format!("CHUNK-{round}-{i}")).collect();
        let asks = queued_asks(&sns);
        let started = Instant::now();
        for chunk in asks.chunks(500) {
            redis.claim(chunk, "measure", LEASE).await;
        }
        best_chunked = best_chunked.min(started.elapsed());
    }
    let sns: Vec<String> = (0..1_000).map(|i| format!("START-{i}")).collect();
    redis.claim(&queued_asks(&sns), "measure", LEASE).await;
    let mut starts = Vec::with_capacity(sns.len());
    for sn in &sns {
        let started = Instant::now();
        let answered = redis.start(&[(sn.as_str(), "measure")], LEASE).await;
        starts.push(started.elapsed());
        assert_eq!(answered, [Some(true)]);
    }
    starts.sort_unstable();
    println!(
        "claiming 10,000 misses on {what}: all at once {best_once:?}, a chunk of 500 per call in turn {best_chunked:?}; starting one queued claim: median {:?}, max {:?}",
        median(&starts),
        starts[starts.len() - 1]
    );
}

fn queued_asks(sns: &[String]) -> Vec<Ask<'_>> {
    sns.iter()
        .map(|sn| Ask {
            sn,
            if_absent: true,
            queued: true,
        })
        .collect()
}

#[tokio::test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn claim_cost() {
    on_one_redis_and_a_cluster("measured-claims:", |cache, what| async move {
        claim_costs(&cache, what).await;
    })
    .await;
}

/// 100-SN hit batches from 8 clients for `run`: batches per second.
async fn hit_batches_per_second(addr: std::net::SocketAddr, sns: &[String], run: Duration) -> f64 {
    let client = http_client();
    let url = format!("http://{addr}/v1/discounts/lookup");
    let until = Instant::now() + run;
    let clients = (0..8).map(|c| {
        let (client, url) = (client.clone(), url.clone());
        let batch: Vec<&String> = sns.iter().cycle().skip(c * 100).take(100).collect();
        let body = json!({ "sns": batch });
        async move {
            let mut done = 0u32;
            while Instant::now() < until {
                let response = client.post(&url).json(&body).send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                done += 1;
            }
            done
        }
    });
    let done: u32 = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .sum();
    f64::from(done) / run.as_secs_f64()
}

#[tokio::test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn hit_path_throughput_with_and_without_distributed() {
    let upstream = StubUpstream::start().await;
    let url = upstream.url_template();
    let sns: Vec<String> = (0..1000).map(|i| format!("HOT-{i}")).collect();
    let mut proxies = Vec::new();
    for distributed in ["true", "false"] {
        let redis = RedisServer::start();
        let envs = [
            ("DISCOUNT_PROXY_UPSTREAM__URL", url.as_str()),
            ("DISCOUNT_PROXY_COALESCE__DISTRIBUTED", distributed),
            ("RUST_LOG", "warn,discount_proxy::app=info"),
        ];
        let proxy = Process::serve(&redis.url(), &envs);
        let addr = proxy.listening_addr().await;
        let warm = http_client()
            .post(format!("http://{addr}/v1/discounts/lookup"))
            .json(&json!({ "sns": sns }))
            .send()
            .await
            .unwrap();
        assert_eq!(warm.status(), 200);
        proxies.push((distributed, addr, proxy, redis));
    }
    for round in 0..3 {
        for (distributed, addr, _, _) in &proxies {
            let rate = hit_batches_per_second(*addr, &sns, Duration::from_secs(3)).await;
            println!(
                "round {round}: distributed={distributed}: {rate:.0} hit batches of 100 SNs per second"
            );
        }
    }
}
