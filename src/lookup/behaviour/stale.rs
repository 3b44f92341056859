//! Stale and early refresh, and the upstream's circuit: a cached value is served at once
//! while one background fetch renews it, and a failure never replaces it.

use super::super::testing::{HOUR, LATENCY, Reply, Rig, Setup, described};
use crate::cache::Entry;
use crate::circuit::CircuitState;
use crate::upstream::UpstreamError;
use bytes::Bytes;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

fn age_of(entry: &Entry) -> Duration {
    entry.age(SystemTime::now())
}

#[tokio::test(start_paused = true)]
async fn a_stale_entry_is_served_at_once_and_refreshed_once_in_the_background() {
    let rig = Rig::new();
    rig.store_found("S", HOUR + HOUR / 2).await;
    let started = Instant::now();
    let (first, second) = tokio::join!(rig.resolve(&["S"]), rig.resolve(&["S"]));
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(described(&first), ["S ok stale"]);
    assert_eq!(described(&second), ["S ok stale"]);
    rig.settled().await;
    assert_eq!(rig.upstream.calls("S"), 1);
    assert_eq!(described(&rig.resolve(&["S"]).await), ["S ok cache"]);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_during_a_refresh_reads_the_stale_value_instead_of_waiting() {
    let rig = Rig::new();
    rig.store_found("S", HOUR + HOUR / 2).await;
    rig.resolve(&["S"]).await;
    assert_eq!(rig.lookup.pending_fetches(), 1, "the refresh is under way");
    let started = Instant::now();
    assert_eq!(described(&rig.resolve(&["S"]).await), ["S ok stale"]);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(rig.joins(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stale_entry_keeps_being_served_while_the_upstream_fails() {
    let rig = Rig::new();
    rig.upstream
        .script("S", [(LATENCY, Reply::Fail(UpstreamError::Status(500)))]);
    rig.store_found("S", HOUR + HOUR / 2).await;
    for _ in 0..3 {
        assert_eq!(described(&rig.resolve(&["S"]).await), ["S ok stale"]);
        rig.settled().await;
    }
    assert_eq!(
        rig.upstream.calls("S"),
        3,
        "one refresh per lookup, one at a time"
    );
    assert!(age_of(&rig.stored("S").await.unwrap()) >= HOUR + HOUR / 2);
}

#[tokio::test(start_paused = true)]
async fn an_entry_past_its_stale_period_is_a_miss() {
    let rig = Rig::new();
    rig.store_found("G", 2 * HOUR + Duration::from_secs(1))
        .await;
    assert_eq!(described(&rig.resolve(&["G"]).await), ["G ok upstream"]);
    assert!(age_of(&rig.stored("G").await.unwrap()) < Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_negative_entry_has_no_stale_period() {
    let rig = Rig::new();
    let young = Entry::not_found(SystemTime::now() - Duration::from_secs(299));
    let old = Entry::not_found(SystemTime::now() - Duration::from_secs(301));
    rig.store("YOUNG", &young).await;
    rig.store("OLD", &old).await;
    let batch = rig.resolve(&["YOUNG", "OLD"]).await;
    assert_eq!(
        described(&batch),
        ["YOUNG not_found cache", "OLD ok upstream"]
    );
}

#[tokio::test(start_paused = true)]
async fn early_refresh_renews_an_entry_close_to_expiry_and_serves_it_fresh() {
    let rig = Rig::with(Setup {
        early_refresh: 1.0,
        ..Setup::default()
    });
    // The chance is age / ttl here, 0.9997; seeded, so the test does not depend on luck.
    fastrand::seed(7);
    rig.store_found("E", HOUR - Duration::from_secs(1)).await;
    assert_eq!(described(&rig.resolve(&["E"]).await), ["E ok cache"]);
    rig.settled().await;
    assert_eq!(rig.upstream.calls("E"), 1);
    assert!(age_of(&rig.stored("E").await.unwrap()) < Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn an_entry_before_the_early_refresh_window_is_never_refreshed() {
    let rig = Rig::with(Setup {
        early_refresh: 0.5,
        ..Setup::default()
    });
    rig.store_found("E", HOUR * 4 / 10).await;
    for _ in 0..50 {
        assert_eq!(described(&rig.resolve(&["E"]).await), ["E ok cache"]);
    }
    rig.settled().await;
    assert_eq!(rig.upstream.calls("E"), 0);
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_entry_is_refetched_and_overwritten() {
    let rig = Rig::new();
    rig.store_raw("U", Bytes::from_static(b"{\"not\":\"ours\"}"))
        .await;
    assert_eq!(described(&rig.resolve(&["U"]).await), ["U ok upstream"]);
    assert!(rig.stored("U").await.is_some(), "decodes now");
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_answers_upstream_unavailable_at_once_without_a_call() {
    let rig = Rig::new();
    rig.upstream.set_circuit(CircuitState::Open);
    assert_eq!(rig.lookup.upstream_circuit(), CircuitState::Open);
    let started = Instant::now();
    let batch = rig.resolve(&["A"]).await;
    assert_eq!(described(&batch), ["A error upstream_unavailable"]);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(rig.upstream.calls("A"), 0);
    assert_eq!(rig.keys_written(), 0);
}

#[tokio::test(start_paused = true)]
async fn with_the_circuit_open_a_stale_entry_is_still_served_and_kept() {
    let rig = Rig::new();
    rig.upstream.set_circuit(CircuitState::Open);
    rig.store_found("S", HOUR + HOUR / 2).await;
    assert_eq!(described(&rig.resolve(&["S"]).await), ["S ok stale"]);
    rig.settled().await;
    assert!(age_of(&rig.stored("S").await.unwrap()) >= HOUR + HOUR / 2);
}
