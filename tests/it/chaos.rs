//! A long chaos run, not part of the normal suite: lookups under steady load while Redis is
//! killed and restarted twice (coming back empty) and the upstream fails 30% of requests.
//!
//! ```text
//! CHAOS_SECS=60 cargo test --release --test it chaos -- --ignored --nocapture
//! ```
//!
//! It prints what happened and asserts what must hold: every request answered 200 with one
//! item per SN, no error for an SN that had been answered before, and afterwards nothing
//! cached that is an error, another SN's value, or without a TTL.

use crate::support::{RedisServer, StubUpstream, TestApp};
use discount_proxy::app::CacheChoice;
use discount_proxy::cache::{Entry, EntryKind};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// SNs the load draws from; most get cached early, and are then what must never fail.
const WORKING_SET: usize = 2000;
const BATCH: usize = 50;
const WORKERS: usize = 8;

#[derive(Default)]
struct Tally {
    requests: AtomicUsize,
    sns: AtomicUsize,
    ok: AtomicUsize,
    from_cache: AtomicUsize,
    stale: AtomicUsize,
    errors_on_cached_sns: AtomicUsize,
    errors_on_new_sns: AtomicUsize,
    non_200: AtomicUsize,
    /// SNs answered `ok` at least once: from then on they count as cached.
    answered: Mutex<HashSet<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 60 s chaos run; run it with --ignored (see the module docs)"]
async fn chaos_redis_restarts_and_a_flaky_upstream() {
    let seconds: u64 = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let run_for = Duration::from_secs(seconds);
    crate::support::init_logging();
    let redis = RedisServer::start();
    let upstream = StubUpstream::start().await;
    upstream.set_latency(Duration::from_millis(20));
    upstream.set_failure_ratio(0.3, 20_261_122);
    let mut config = TestApp::config_for(&redis, &upstream);
    config.server.request_timeout = Duration::from_secs(10);
    config.upstream.concurrency = 64;
    // A 30% failure rate: a fetch fails for the client only if 13 attempts in a row fail
    // (0.3^13 ≈ 1.6e-7). Backoff keeps that gentle on the upstream.
    config.upstream.retries = 12;
    config.upstream.retry_backoff = Duration::from_millis(20);
    config.upstream.retry_backoff_max = Duration::from_millis(500);
    let mut app = TestApp::spawn_on(config, CacheChoice::Redis, redis, upstream).await;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let client = app.client.clone();
            let url = app.url("/v1/discounts/lookup");
            let tally = Arc::clone(&tally);
            let stop = Arc::clone(&stop);
            tokio::spawn(load(client, url, worker as u64, tally, stop))
        })
        .collect();

    let started = Instant::now();
    let mut restarts = 0;
    for fraction in [0.25, 0.6] {
        tokio::time::sleep_until(started + run_for.mul_f64(fraction)).await;
        app.redis.stop();
        eprintln!("chaos: redis killed at {:?}", started.elapsed());
        tokio::time::sleep(run_for / 12).await;
        app.redis.restart();
        restarts += 1;
        eprintln!("chaos: redis restarted (empty) at {:?}", started.elapsed());
    }
    tokio::time::sleep_until(started + run_for).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();
    let _ = app.state.lookup.drain(Duration::from_secs(10)).await;
    let cached = check_nothing_wrong_is_cached(&app).await;

    let t = |counter: &AtomicUsize| counter.load(Ordering::SeqCst);
    let report = json!({
        "seconds": elapsed.as_secs_f64(),
        "redis_restarts": restarts,
        "requests": t(&tally.requests),
        "sn_lookups": t(&tally.sns),
        "ok": t(&tally.ok),
        "served_from_cache": t(&tally.from_cache),
        "served_stale": t(&tally.stale),
        "errors_on_previously_cached_sns": t(&tally.errors_on_cached_sns),
        "errors_on_never_cached_sns": t(&tally.errors_on_new_sns),
        "non_200_responses": t(&tally.non_200),
        "upstream_calls": app.upstream.total_calls(),
        "redis_errors_counted": app.redis_failures(),
        "keys_in_redis_at_the_end": cached,
    });
    eprintln!(
        "chaos report: {}",
        serde_json::to_string_pretty(&report).unwrap()
    );
    assert_eq!(t(&tally.non_200), 0);
    assert_eq!(t(&tally.errors_on_cached_sns), 0, "{report}");
    app.begin_shutdown();
    app.stopped().await;
}

async fn load(
    client: reqwest::Client,
    url: String,
    seed: u64,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while !stop.load(Ordering::SeqCst) {
        let sns: Vec<String> = (0..BATCH)
            .map(|_| format!("CH-{:04}", rng.usize(0..WORKING_SET)))
            .collect();
        let response = client
            .post(&url)
            .json(&json!({ "sns": sns }))
            .send()
            .await
            .unwrap();
        tally.requests.fetch_add(1, Ordering::SeqCst);
        if response.status() != 200 {
            tally.non_200.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let body: Value = response.json().await.unwrap();
        let items = body["results"].as_array().unwrap();
        assert_eq!(items.len(), sns.len(), "one item per requested SN");
        tally.sns.fetch_add(items.len(), Ordering::SeqCst);
        let mut answered = tally.answered.lock().unwrap();
        for (item, sn) in items.iter().zip(&sns) {
            assert_eq!(item["sn"], *sn);
            if item["status"] == "ok" {
                assert_eq!(item["discount"], StubUpstream::discount_for(sn), "{sn}");
                tally.ok.fetch_add(1, Ordering::SeqCst);
                match item["source"].as_str() {
                    Some("cache") => tally.from_cache.fetch_add(1, Ordering::SeqCst),
                    Some("stale") => tally.stale.fetch_add(1, Ordering::SeqCst),
                    _ => 0,
                };
                answered.insert(sn.clone());
            } else if answered.contains(sn) {
                eprintln!("chaos: error for an SN answered before: {item}");
                tally.errors_on_cached_sns.fetch_add(1, Ordering::SeqCst);
            } else {
                tally.errors_on_new_sns.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Every key holds a well-formed entry of its own SN's discount and has a TTL; returns how
/// many keys there are.
async fn check_nothing_wrong_is_cached(app: &TestApp) -> usize {
    let mut redis = app.redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", app.config.redis.key_prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    for key in &keys {
        let sn = key.trim_start_matches(&app.config.redis.key_prefix);
        let value: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let entry = Entry::decode(value.into()).unwrap();
        assert_eq!(entry.kind(), EntryKind::Found);
        let discount: Value = serde_json::from_slice(&entry.into_discount().unwrap()).unwrap();
        assert_eq!(discount, StubUpstream::discount_for(sn), "{key}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} has no TTL");
    }
    keys.len()
}
