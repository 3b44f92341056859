//! Draining: nothing queued is started, what is under way finishes and is written back, and
//! what the grace period leaves unwritten is counted.

use super::super::testing::{LATENCY, Rig, Setup, described};
use std::time::Duration;
use tokio::time::sleep;

#[tokio::test(start_paused = true)]
async fn a_drain_starts_no_queued_fetch_and_waits_for_those_under_way() {
    let rig = Rig::with(Setup {
        concurrency: 1,
        ..Setup::default()
    });
    let lookup = rig.spawn_resolve(&["A", "B", "C"]);
    sleep(Duration::from_millis(100)).await;
    assert!(rig.lookup.drain(Duration::from_secs(10)).await);
    assert_eq!(
        described(&lookup.await.unwrap()),
        [
            "A ok upstream",
            "B error upstream_error",
            "C error upstream_error"
        ]
    );
    assert_eq!((rig.upstream.calls("B"), rig.upstream.calls("C")), (0, 0));
    assert!(
        rig.stored("A").await.is_some(),
        "written back before the drain ended"
    );
    assert_eq!(rig.lookup.pending_fetches(), 0);
}

#[tokio::test(start_paused = true)]
async fn answers_not_written_back_when_the_grace_runs_out_are_counted_as_abandoned() {
    let rig = Rig::new();
    rig.slow_writes(Duration::from_secs(10));
    let _lookup = rig.spawn_resolve(&["A"]);
    sleep(LATENCY + Duration::from_millis(100)).await;
    assert!(!rig.lookup.drain(Duration::from_secs(1)).await);
    assert_eq!(rig.write_backs("abandoned"), 1);
    assert_eq!(rig.write_backs("ok"), 0);
}
