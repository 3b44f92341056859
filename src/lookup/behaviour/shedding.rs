//! `upstream.max_pending`: a lookup needing more new fetches than there is room for is
//! refused whole, before anything starts; joining and cache hits are never refused.

use super::super::Overloaded;
use super::super::testing::{HOUR, Rig, Setup, described, sns, strs};
use std::time::Duration;
use tokio::time::sleep;

fn rig(max_pending: usize) -> Rig {
    Rig::with(Setup {
        max_pending,
        ..Setup::default()
    })
}

#[tokio::test(start_paused = true)]
async fn a_lookup_needing_more_new_fetches_than_max_pending_is_refused_and_starts_nothing() {
    let rig = rig(3);
    let cold = sns("C", 4);
    assert_eq!(
        rig.try_resolve(&strs(&cold), false).await.err(),
        Some(Overloaded)
    );
    assert_eq!(rig.lookup.pending_fetches(), 0);
    sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.upstream.total_calls(), 0);
    assert!(rig.try_resolve(&strs(&cold[..3]), false).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn joining_fetches_under_way_is_never_refused() {
    let rig = rig(2);
    let first = rig.spawn_resolve(&["A", "B"]);
    sleep(Duration::from_millis(10)).await;
    let second = rig.resolve(&["A", "B"]).await;
    assert_eq!(described(&second), ["A ok upstream", "B ok upstream"]);
    first.await.unwrap();
    assert_eq!(rig.upstream.total_calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn cached_sns_get_through_while_max_pending_is_reached() {
    let rig = rig(1);
    rig.store_found("H", Duration::ZERO).await;
    let _busy = rig.spawn_resolve(&["X"]);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(described(&rig.resolve(&["H"]).await), ["H ok cache"]);
    assert_eq!(
        rig.try_resolve(&["H", "Y"], false).await.err(),
        Some(Overloaded)
    );
}

#[tokio::test(start_paused = true)]
async fn a_stale_entry_is_served_without_a_refresh_while_max_pending_is_reached() {
    let rig = rig(1);
    rig.store_found("S", HOUR + HOUR / 2).await;
    let busy = rig.spawn_resolve(&["X"]);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(described(&rig.resolve(&["S"]).await), ["S ok stale"]);
    busy.await.unwrap();
    rig.settled().await;
    assert_eq!(rig.upstream.calls("S"), 0);
}
