//! The invalidation fence: an answer fetched before an invalidation never reaches the cache
//! after it, and a lookup after it never joins the older fetch.

use super::super::Overloaded;
use super::super::testing::{LATENCY, Reply, Rig, Setup, described};
use std::time::Duration;
use tokio::time::sleep;

#[tokio::test(start_paused = true)]
async fn an_invalidation_during_a_fetch_keeps_its_older_answer_out_of_the_cache() {
    let rig = Rig::new();
    let lookup = rig.spawn_resolve(&["A"]);
    sleep(Duration::from_millis(100)).await;
    assert_eq!(rig.lookup.invalidate(&["A"]).await.unwrap(), 0);
    assert_eq!(
        described(&lookup.await.unwrap()),
        ["A ok upstream"],
        "its waiter still gets it"
    );
    rig.settled().await;
    assert!(rig.stored("A").await.is_none());
    assert_eq!(rig.write_backs("fenced"), 1);
    assert_eq!(rig.write_backs("ok"), 0);
}

#[tokio::test(start_paused = true)]
async fn an_invalidation_between_an_answer_and_its_write_back_keeps_it_out_of_the_cache() {
    let rig = Rig::new();
    rig.upstream.script("B", [(4 * LATENCY, Reply::Discount)]);
    let lookup = rig.spawn_resolve(&["A", "B"]);
    // A is answered at 500 ms and, B still to come, written back 50 ms later: the
    // invalidation comes in between.
    sleep(LATENCY + Duration::from_millis(20)).await;
    rig.lookup.invalidate(&["A"]).await.unwrap();
    assert_eq!(
        described(&lookup.await.unwrap()),
        ["A ok upstream", "B ok upstream"]
    );
    rig.settled().await;
    assert!(rig.stored("A").await.is_none());
    assert_eq!(rig.keys_written(), 1, "B only");
    assert_eq!(rig.write_backs("fenced"), 1);
}

#[tokio::test(start_paused = true)]
async fn after_an_invalidation_a_lookup_starts_its_own_fetch_instead_of_joining() {
    let rig = Rig::new();
    let before = rig.spawn_resolve(&["A"]);
    sleep(Duration::from_millis(100)).await;
    rig.lookup.invalidate(&["A"]).await.unwrap();
    let after = rig.resolve(&["A"]).await;
    assert_eq!(described(&after), ["A ok upstream"]);
    assert_eq!(rig.joins(), 0);
    assert_eq!(rig.upstream.calls("A"), 2);
    assert_eq!(described(&before.await.unwrap()), ["A ok upstream"]);
    rig.settled().await;
    assert!(
        rig.stored("A").await.is_some(),
        "the newer answer is cached"
    );
    assert_eq!((rig.write_backs("ok"), rig.write_backs("fenced")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn an_invalidated_fetch_counts_against_max_pending_until_it_ends() {
    let rig = Rig::with(Setup {
        max_pending: 1,
        ..Setup::default()
    });
    let lookup = rig.spawn_resolve(&["A"]);
    sleep(Duration::from_millis(100)).await;
    rig.lookup.invalidate(&["A"]).await.unwrap();
    assert_eq!(rig.lookup.pending_fetches(), 1);
    assert_eq!(rig.try_resolve(&["B"], false).await.err(), Some(Overloaded));
    lookup.await.unwrap();
    rig.settled().await;
    assert_eq!(described(&rig.resolve(&["B"]).await), ["B ok upstream"]);
}

#[tokio::test(start_paused = true)]
async fn invalidate_removes_a_cached_entry_and_counts_only_those_that_existed() {
    let rig = Rig::new();
    rig.store_found("A", Duration::ZERO).await;
    assert_eq!(rig.lookup.invalidate(&["A", "B"]).await.unwrap(), 1);
    assert_eq!(described(&rig.resolve(&["A"]).await), ["A ok upstream"]);
}

#[tokio::test(start_paused = true)]
async fn a_queued_fetch_invalidated_after_its_lookup_went_away_is_never_started() {
    let rig = Rig::with(Setup {
        concurrency: 1,
        ..Setup::default()
    });
    let lookup = rig.spawn_resolve(&["A", "B"]);
    sleep(Duration::from_millis(100)).await;
    lookup.abort();
    sleep(Duration::from_millis(1)).await;
    rig.lookup.invalidate(&["B"]).await.unwrap();
    rig.settled().await;
    assert_eq!(rig.upstream.calls("A"), 1, "under way: it finishes");
    assert_eq!(rig.upstream.calls("B"), 0);
}
