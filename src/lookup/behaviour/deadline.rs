//! The request's deadline: what is not answered by then is `deadline_exceeded`, while its
//! fetch goes on and is written back; and a batch ends after its write-backs.

use super::super::testing::{HOUR, LATENCY, Reply, Rig, Setup, described};
use crate::upstream::UpstreamError;
use std::time::Duration;
use tokio::time::{Instant, sleep};

const TIMEOUT: Duration = Duration::from_secs(1);

fn rig() -> Rig {
    Rig::with(Setup {
        request_timeout: TIMEOUT,
        ..Setup::default()
    })
}

#[tokio::test(start_paused = true)]
async fn past_the_deadline_the_unanswered_sns_are_deadline_exceeded_and_the_others_answered() {
    let rig = rig();
    rig.upstream.script("B", [(Duration::ZERO, Reply::Hang)]);
    let started = Instant::now();
    let batch = rig.resolve(&["A", "B"]).await;
    assert_eq!(
        described(&batch),
        ["A ok upstream", "B error deadline_exceeded"]
    );
    assert_eq!(started.elapsed(), TIMEOUT);
    assert_eq!(batch.summary.errors, 1);
    assert_eq!(batch.summary.upstream_fetches, 2);
}

#[tokio::test(start_paused = true)]
async fn a_fetch_that_outlives_its_deadline_is_still_written_back() {
    let rig = rig();
    rig.upstream.script("B", [(2 * TIMEOUT, Reply::Discount)]);
    let batch = rig.resolve(&["B"]).await;
    assert_eq!(described(&batch), ["B error deadline_exceeded"]);
    rig.settled().await;
    assert_eq!(described(&rig.resolve(&["B"]).await), ["B ok cache"]);
    assert_eq!(rig.upstream.calls("B"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_batch_returns_after_its_write_backs_so_the_same_batch_right_after_is_all_hits() {
    let rig = rig();
    rig.slow_writes(Duration::from_millis(200));
    let started = Instant::now();
    let batch = rig.resolve(&["A", "B"]).await;
    assert_eq!(described(&batch), ["A ok upstream", "B ok upstream"]);
    assert!(started.elapsed() >= LATENCY + Duration::from_millis(200));
    assert_eq!(rig.keys_written(), 2, "written before the batch returned");
    assert_eq!(
        described(&rig.resolve(&["A", "B"]).await),
        ["A ok cache", "B ok cache"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_write_back_does_not_hold_the_batch_past_its_deadline() {
    let rig = rig();
    rig.slow_writes(Duration::from_secs(10));
    let started = Instant::now();
    let batch = rig.resolve(&["A"]).await;
    assert_eq!(described(&batch), ["A ok upstream"]);
    assert_eq!(started.elapsed(), TIMEOUT);
    rig.settled().await;
    assert_eq!(rig.keys_written(), 1, "and it is still written");
}

#[tokio::test(start_paused = true)]
async fn a_refresh_lookup_skips_the_cache_and_overwrites_the_entry() {
    let rig = rig();
    rig.store_found("A", Duration::from_secs(600)).await;
    let batch = rig.try_resolve(&["A"], true).await.unwrap();
    assert_eq!(described(&batch), ["A ok upstream"]);
    assert_eq!(rig.keys_read(), 0);
    let age = rig
        .stored("A")
        .await
        .unwrap()
        .age(std::time::SystemTime::now());
    assert!(age < Duration::from_secs(60), "rewritten: {age:?}");
}

#[tokio::test(start_paused = true)]
async fn the_summary_counts_hits_stale_fetches_not_found_errors_and_invalid_sns() {
    let rig = rig();
    rig.store_found("HIT", Duration::ZERO).await;
    rig.store_found("STALE", HOUR + HOUR / 2).await;
    rig.upstream.script("NF", [(LATENCY, Reply::NotFound)]);
    let failure = Reply::Fail(UpstreamError::Timeout(Duration::from_secs(1)));
    rig.upstream.script("ERR", [(LATENCY, failure)]);
    let batch = rig
        .resolve(&["HIT", "STALE", "NF", "ERR", "NEW", "", "HIT"])
        .await;
    assert_eq!(
        described(&batch),
        [
            "HIT ok cache",
            "STALE ok stale",
            "NF not_found upstream",
            "ERR error upstream_timeout",
            "NEW ok upstream",
            " invalid",
        ]
    );
    let summary = &batch.summary;
    assert_eq!((summary.requested, summary.unique), (7, 6));
    assert_eq!((summary.cache_hits, summary.stale), (1, 1));
    assert_eq!((summary.upstream_fetches, summary.not_found), (3, 1));
    assert_eq!((summary.errors, summary.invalid), (1, 1));
    assert!(
        (500..600).contains(&summary.elapsed_ms),
        "{}",
        summary.elapsed_ms
    );
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_joins_late_keeps_its_own_deadline() {
    let rig = rig();
    rig.upstream
        .script("A", [(Duration::from_millis(1600), Reply::Discount)]);
    let first = rig.spawn_resolve(&["A"]);
    sleep(Duration::from_millis(800)).await;
    let started = Instant::now();
    let second = rig.resolve(&["A"]).await;
    assert_eq!(
        described(&second),
        ["A ok upstream"],
        "answered at 1.6 s, within 1.8 s"
    );
    assert!(started.elapsed() < TIMEOUT, "{:?}", started.elapsed());
    assert_eq!(
        described(&first.await.unwrap()),
        ["A error deadline_exceeded"]
    );
    assert_eq!(rig.upstream.calls("A"), 1);
}
