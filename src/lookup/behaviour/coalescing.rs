//! One fetch per SN, however many lookups want it, and who fetches it.

use super::super::testing::{LATENCY, Reply, Rig, Setup, described, sns, strs};
use crate::cache::EntryKind;
use crate::upstream::UpstreamError;
use std::time::Duration;
use tokio::time::{Instant, sleep};

#[tokio::test(start_paused = true)]
async fn a_hundred_concurrent_lookups_of_one_cold_sn_make_one_upstream_call() {
    let rig = Rig::new();
    let started = Instant::now();
    let batches = futures_util::future::join_all((0..100).map(|_| rig.resolve(&["A"]))).await;
    assert!(
        batches
            .iter()
            .all(|batch| described(batch) == ["A ok upstream"])
    );
    assert_eq!(rig.upstream.calls("A"), 1);
    assert_eq!(rig.joins(), 99);
    assert!(started.elapsed() < 2 * LATENCY, "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn overlapping_batches_fetch_each_sn_exactly_once() {
    let rig = Rig::new();
    let all = sns("S", 30);
    let batches = (0..20).map(|i| {
        let rig = &rig;
        let window: Vec<&str> = strs(&all[i..i + 10]);
        async move {
            sleep(Duration::from_millis(10 * i as u64)).await;
            rig.resolve(&window).await
        }
    });
    let batches = futures_util::future::join_all(batches).await;
    for batch in &batches {
        assert!(
            described(batch)
                .iter()
                .all(|line| line.ends_with("ok upstream"))
        );
    }
    assert!(all[..29].iter().all(|sn| rig.upstream.calls(sn) == 1));
    assert_eq!(rig.upstream.total_calls(), 29);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_of_an_sn_being_fetched_joins_it_without_reading_the_cache() {
    let rig = Rig::new();
    let first = rig.spawn_resolve(&["A"]);
    sleep(Duration::from_millis(100)).await;
    assert_eq!(rig.keys_read(), 1);
    let second = rig.resolve(&["A"]).await;
    assert_eq!(described(&second), ["A ok upstream"]);
    assert_eq!(
        rig.keys_read(),
        1,
        "the second lookup joined without a read"
    );
    assert_eq!(rig.joins(), 1);
    assert_eq!(described(&first.await.unwrap()), ["A ok upstream"]);
    assert_eq!(rig.upstream.calls("A"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_right_after_a_fetch_reads_the_cache_instead_of_joining() {
    let rig = Rig::new();
    rig.resolve(&["A"]).await;
    let again = rig.resolve(&["A"]).await;
    assert_eq!(described(&again), ["A ok cache"]);
    assert_eq!(rig.joins(), 0);
    assert_eq!(rig.upstream.calls("A"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_goes_away_does_not_fail_the_fetch_for_those_who_joined_it() {
    let rig = Rig::new();
    let leader = rig.spawn_resolve(&["A"]);
    sleep(Duration::from_millis(100)).await;
    let follower = rig.spawn_resolve(&["A"]);
    sleep(Duration::from_millis(100)).await;
    leader.abort();
    assert_eq!(described(&follower.await.unwrap()), ["A ok upstream"]);
    assert_eq!(rig.upstream.calls("A"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_goes_away_alone_still_has_its_fetch_written_back() {
    let rig = Rig::new();
    let leader = rig.spawn_resolve(&["A"]);
    sleep(Duration::from_millis(100)).await;
    leader.abort();
    rig.settled().await;
    assert!(rig.stored("A").await.is_some());
    assert_eq!(described(&rig.resolve(&["A"]).await), ["A ok cache"]);
    assert_eq!(rig.upstream.calls("A"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_sn_queued_deep_in_a_big_lookup_is_fetched_at_once_when_asked_for_alone() {
    let rig = Rig::with(Setup {
        concurrency: 2,
        ..Setup::default()
    });
    let export = sns("E", 20);
    let big = rig.spawn_resolve(&strs(&export));
    sleep(Duration::from_millis(10)).await;
    let started = Instant::now();
    let alone = rig.resolve(&["E-19"]).await;
    assert_eq!(described(&alone), ["E-19 ok upstream"]);
    assert!(started.elapsed() < 2 * LATENCY, "{:?}", started.elapsed());
    let big = big.await.unwrap();
    assert!(
        described(&big)
            .iter()
            .all(|line| line.ends_with("ok upstream"))
    );
    assert_eq!(
        rig.upstream.calls("E-19"),
        1,
        "the big lookup's task skipped it"
    );
}

#[tokio::test(start_paused = true)]
async fn one_lookup_never_has_more_than_concurrency_fetches_at_the_upstream() {
    let rig = Rig::with(Setup {
        concurrency: 3,
        ..Setup::default()
    });
    let started = Instant::now();
    let batch = rig.resolve(&strs(&sns("C", 12))).await;
    assert_eq!(batch.summary.upstream_fetches, 12);
    assert_eq!(rig.upstream.most_in_flight(), 3);
    assert!(started.elapsed() >= 4 * LATENCY, "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn duplicates_are_fetched_once_and_repeated_in_request_order() {
    let rig = Rig::new();
    let batch = rig.resolve(&["B", "A", "B", "C", "A"]).await;
    let order: Vec<&str> = batch.in_request_order().map(|(sn, _)| sn).collect();
    assert_eq!(order, ["B", "A", "B", "C", "A"]);
    assert_eq!(batch.summary.unique, 3);
    assert_eq!(rig.upstream.total_calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_failure_reaches_every_waiter_and_is_never_cached() {
    let rig = Rig::new();
    rig.upstream
        .script("A", [(LATENCY, Reply::Fail(UpstreamError::Status(503)))]);
    let (first, second) = tokio::join!(rig.resolve(&["A"]), rig.resolve(&["A"]));
    assert_eq!(described(&first), ["A error upstream_error"]);
    assert_eq!(described(&second), ["A error upstream_error"]);
    assert_eq!(rig.upstream.calls("A"), 1);
    assert!(rig.stored("A").await.is_none());
    rig.resolve(&["A"]).await;
    assert_eq!(rig.upstream.calls("A"), 2, "the next lookup asks again");
}

#[tokio::test(start_paused = true)]
async fn not_found_is_cached_as_a_negative_entry() {
    let rig = Rig::new();
    rig.upstream.script("NF", [(LATENCY, Reply::NotFound)]);
    assert_eq!(
        described(&rig.resolve(&["NF"]).await),
        ["NF not_found upstream"]
    );
    assert_eq!(
        described(&rig.resolve(&["NF"]).await),
        ["NF not_found cache"]
    );
    assert_eq!(rig.stored("NF").await.unwrap().kind(), EntryKind::NotFound);
    assert_eq!(rig.upstream.calls("NF"), 1);
}

#[tokio::test(start_paused = true)]
async fn invalid_sns_are_answered_without_a_cache_read_or_a_fetch() {
    let rig = Rig::new();
    let batch = rig.resolve(&["", "a b", "OK-1"]).await;
    assert_eq!(
        described(&batch),
        [" invalid", "a b invalid", "OK-1 ok upstream"]
    );
    assert_eq!(rig.keys_read(), 1);
    assert_eq!(rig.upstream.total_calls(), 1);
}
