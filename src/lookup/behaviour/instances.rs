//! Instances sharing one Redis acting as one (`coalesce.distributed`): one fetch per SN
//! between them, waiters answered when the holder writes, leases renewed, released and taken
//! over, invalidations and newer answers that win. Each `Rig` here is one instance over a
//! shared [`FakeRedis`].

use super::super::testing::{FakeRedis, LATENCY, Reply, Rig, Setup, described};
use crate::cache::{Ask, Cache, Coordination, Entry};
use crate::upstream::UpstreamError;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tokio::time::{Instant, sleep};

const LEASE: Duration = Duration::from_secs(3);

fn instances(count: usize) -> (Arc<FakeRedis>, Vec<Rig>) {
    let redis = Arc::new(FakeRedis::default());
    let setup = || Setup {
        request_timeout: Duration::from_secs(30),
        ..Setup::default()
    };
    let rigs = (0..count)
        .map(|_| Rig::instance(setup(), &redis, LEASE))
        .collect();
    (redis, rigs)
}

fn calls(rigs: &[Rig], sn: &str) -> usize {
    rigs.iter().map(|rig| rig.upstream.calls(sn)).sum()
}

#[tokio::test(start_paused = true)]
async fn instances_fetch_a_cold_sn_once_and_the_others_get_it_when_it_is_written() {
    let (_redis, rigs) = instances(3);
    let started = Instant::now();
    let lookups = rigs.iter().map(|rig| async move {
        let batch = rig.resolve(&["A"]).await;
        (described(&batch), started.elapsed())
    });
    let answers = futures_util::future::join_all(lookups).await;
    assert_eq!(calls(&rigs, "A"), 1);
    for (lines, took) in &answers {
        assert_eq!(lines, &["A ok upstream"]);
        // The fetch, the write-back's gathering delay, and no poll.
        assert!(*took < LATENCY + Duration::from_millis(100), "{took:?}");
    }
    let notified: f64 = rigs
        .iter()
        .map(|rig| rig.metric("discount_proxy_distributed_waits_total{outcome=\"notified\"}"))
        .sum();
    assert_eq!(notified, 2.0);
}

#[tokio::test(start_paused = true)]
async fn overlapping_batches_on_instances_fetch_each_sn_once() {
    let (_redis, rigs) = instances(3);
    let all: Vec<String> = (0..30).map(|i| format!("S-{i}")).collect();
    let lookups = rigs.iter().enumerate().map(|(i, rig)| {
        let window: Vec<&str> = all[i * 10..i * 10 + 20.min(30 - i * 10)]
            .iter()
            .map(String::as_str)
            .collect();
        async move { described(&rig.resolve(&window).await) }
    });
    for lines in futures_util::future::join_all(lookups).await {
        assert!(
            lines.iter().all(|line| line.ends_with("ok upstream")),
            "{lines:?}"
        );
    }
    let total: usize = rigs.iter().map(|rig| rig.upstream.total_calls()).sum();
    assert_eq!(total, 30);
}

#[tokio::test(start_paused = true)]
async fn a_pure_hit_lookup_claims_nothing() {
    let (redis, rigs) = instances(1);
    rigs[0].store_found("A", Duration::ZERO).await;
    assert_eq!(described(&rigs[0].resolve(&["A"]).await), ["A ok cache"]);
    assert_eq!(redis.claim_calls.load(Ordering::SeqCst), 0);
    rigs[0].resolve(&["B"]).await;
    assert_eq!(redis.claim_calls.load(Ordering::SeqCst), 1, "a miss claims");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_holder_keeps_its_claim_by_renewing_it() {
    let (redis, rigs) = instances(2);
    rigs[0].upstream.script("A", [(4 * LEASE, Reply::Discount)]);
    let holder = rigs[0].spawn_resolve(&["A"]);
    sleep(Duration::from_millis(100)).await;
    let waiter = rigs[1].resolve(&["A"]).await;
    assert_eq!(described(&waiter), ["A ok upstream"]);
    assert_eq!(described(&holder.await.unwrap()), ["A ok upstream"]);
    assert_eq!(calls(&rigs, "A"), 1, "the waiter never took over");
    assert!(rigs[0].metric("discount_proxy_leases_total{event=\"renewed\"}") >= 3.0);
    rigs[0].settled().await;
    assert!(!redis.leased("A"), "released with the write-back");
}

#[tokio::test(start_paused = true)]
async fn a_dead_holder_delays_the_others_at_most_its_lease() {
    let (redis, rigs) = instances(1);
    // An instance that claimed A and died: its lease is never renewed nor released.
    let dead = redis.link();
    let ask = Ask {
        sn: "A",
        if_absent: true,
        queued: false,
    };
    let claims = dead.claim(&[ask], "dead", LEASE).await;
    assert!(matches!(claims[0], crate::cache::Claim::Won { .. }));
    let started = Instant::now();
    let batch = rigs[0].resolve(&["A"]).await;
    assert_eq!(described(&batch), ["A ok upstream"]);
    let took = started.elapsed();
    // The lease, the next poll after it, the fetch, the write-back's gathering.
    let bound = LEASE + Duration::from_secs(1) + LATENCY + Duration::from_millis(100);
    assert!(took > LEASE && took <= bound, "{took:?}");
    assert_eq!(
        rigs[0].metric("discount_proxy_distributed_waits_total{outcome=\"took_over\"}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_fetch_releases_its_claim_so_a_waiter_tries_at_once() {
    let (redis, rigs) = instances(2);
    let failure = Reply::Fail(UpstreamError::Status(503));
    rigs[0].upstream.script("A", [(LATENCY, failure)]);
    let holder = rigs[0].spawn_resolve(&["A"]);
    sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let waiter = rigs[1].resolve(&["A"]).await;
    assert_eq!(
        described(&holder.await.unwrap()),
        ["A error upstream_error"]
    );
    assert_eq!(described(&waiter), ["A ok upstream"]);
    // Told at the failure (400 ms in), it fetched at once: no poll, no lease expiry.
    let took = started.elapsed();
    assert!(took < 2 * LATENCY, "{took:?}");
    rigs[1].settled().await;
    assert!(!redis.leased("A"));
}

#[tokio::test(start_paused = true)]
async fn an_invalidation_on_one_instance_keeps_another_instances_older_answer_out() {
    let (_redis, rigs) = instances(2);
    let fetch = rigs[0].spawn_resolve(&["A"]);
    sleep(Duration::from_millis(100)).await;
    rigs[1].lookup.invalidate(&["A"]).await.unwrap();
    assert_eq!(described(&fetch.await.unwrap()), ["A ok upstream"]);
    rigs[0].settled().await;
    assert!(rigs[0].stored("A").await.is_none());
    assert_eq!(
        rigs[0].metric("discount_proxy_refused_writes_total{reason=\"fenced\"}"),
        1.0
    );
    // A lookup after the invalidation fetches again, and that answer is kept.
    rigs[1].resolve(&["A"]).await;
    rigs[1].settled().await;
    assert!(rigs[1].stored("A").await.is_some());
}

#[tokio::test(start_paused = true)]
async fn an_older_answer_never_replaces_a_newer_one() {
    let (_redis, rigs) = instances(1);
    let later = Entry::found(
        b"{\"later\":1}",
        SystemTime::now() + Duration::from_secs(60),
    );
    let rig = &rigs[0];
    rig.store("A", &later).await;
    // A forced refresh fetches A now, earlier than what is stored.
    let batch = rig.try_resolve(&["A"], true).await.unwrap();
    assert_eq!(described(&batch), ["A ok upstream"]);
    rig.settled().await;
    assert_eq!(rig.stored("A").await, Some(later));
    assert_eq!(
        rig.metric("discount_proxy_refused_writes_total{reason=\"newer\"}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn without_redis_each_instance_fetches_on_its_own_and_answers() {
    let (redis, rigs) = instances(2);
    redis.set_down(true);
    let both = futures_util::future::join(rigs[0].resolve(&["A"]), rigs[1].resolve(&["A"])).await;
    assert_eq!(described(&both.0), ["A ok upstream"]);
    assert_eq!(described(&both.1), ["A ok upstream"]);
    assert_eq!(calls(&rigs, "A"), 2);
    assert_eq!(
        rigs[0].metric("discount_proxy_claims_total{result=\"skipped\"}"),
        1.0
    );
    let cache: &dyn Cache = redis.as_ref();
    assert!(
        cache.get_many(&["A"]).await.values[0].is_none(),
        "nothing written"
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_of_misses_is_claimed_in_one_call_before_its_first_fetch() {
    let (redis, rigs) = instances(1);
    let batch: Vec<String> = (0..250).map(|i| format!("C-{i}")).collect();
    let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
    let export = rigs[0].spawn_resolve(&batch);
    sleep(LATENCY / 2).await;
    assert_eq!(
        rigs[0].upstream.total_calls(),
        8,
        "the first fetches are under way"
    );
    // All of them, though `write_batch` (`redis.chunk_size`) is 100 here.
    assert!(
        batch.iter().all(|sn| redis.leased(sn)),
        "every miss claimed"
    );
    assert_eq!(redis.claim_calls.load(Ordering::SeqCst), 1);
    let lines = described(&export.await.unwrap());
    assert!(lines.iter().all(|line| line.ends_with("ok upstream")));
    assert_eq!(redis.claim_calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        rigs[0].metric("discount_proxy_claims_total{result=\"won\"}"),
        250.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_lookup_does_not_wait_for_another_instances_export_to_reach_its_sn() {
    let (_redis, rigs) = instances(2);
    // Eight at a time, half a second each: ten rounds before the export reaches E-79.
    let export: Vec<String> = (0..80).map(|i| format!("E-{i}")).collect();
    let refs: Vec<&str> = export.iter().map(String::as_str).collect();
    let holder = rigs[0].spawn_resolve(&refs);
    sleep(Duration::from_millis(10)).await;
    let started = Instant::now();
    let wanted = rigs[1].resolve(&["E-79"]).await;
    assert_eq!(described(&wanted), ["E-79 ok upstream"]);
    let took = started.elapsed();
    assert!(
        took <= LATENCY + Duration::from_millis(100),
        "took over the queued claim and fetched at once, not after the export's queue: {took:?}"
    );
    let lines = described(&holder.await.unwrap());
    assert!(
        lines.iter().all(|line| line.ends_with("ok upstream")),
        "{lines:?}"
    );
    assert_eq!(calls(&rigs, "E-79"), 1, "one fetch between them");
    assert_eq!(
        rigs[0].upstream.calls("E-79"),
        0,
        "the export waited for it"
    );
    let total: usize = rigs.iter().map(|rig| rig.upstream.total_calls()).sum();
    assert_eq!(total, 80);
    assert_eq!(
        rigs[1].metric("discount_proxy_claims_total{result=\"took_over\"}"),
        1.0
    );
    assert_eq!(
        rigs[0].metric("discount_proxy_leases_total{event=\"yielded\"}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_started_fetch_is_never_taken_over() {
    let (_redis, rigs) = instances(2);
    let holder = rigs[0].spawn_resolve(&["S-0"]);
    sleep(Duration::from_millis(10)).await;
    let waiter = rigs[1].resolve(&["S-0"]).await;
    assert_eq!(described(&waiter), ["S-0 ok upstream"]);
    assert_eq!(described(&holder.await.unwrap()), ["S-0 ok upstream"]);
    assert_eq!(calls(&rigs, "S-0"), 1);
    assert_eq!(
        rigs[1].metric("discount_proxy_claims_total{result=\"lost\"}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_an_export_gives_its_queued_claims_up_in_one_call() {
    let redis = Arc::new(FakeRedis::default());
    let setup = Setup {
        concurrency: 2,
        ..Setup::default()
    };
    let rig = Rig::instance(setup, &redis, LEASE);
    let export: Vec<String> = (0..40).map(|i| format!("L-{i}")).collect();
    let stream = rig.open_stream(&export).await;
    sleep(Duration::from_millis(100)).await;
    assert!(export.iter().all(|sn| redis.leased(sn)), "all claimed");
    drop(stream);
    // The task finds its client gone when it next takes from its queue: as a fetch ends.
    sleep(LATENCY).await;
    let queued = &export[2..];
    assert!(
        queued.iter().all(|sn| !redis.leased(sn)),
        "the queued ones are free for another instance long before their leases expire"
    );
    assert_eq!(redis.release_calls.load(Ordering::SeqCst), 1);
    rig.settled().await;
    assert_eq!(
        rig.upstream.total_calls(),
        2,
        "only the fetches under way ran"
    );
}
