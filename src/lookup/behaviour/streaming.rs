//! Streamed lookups: hits first, misses as they resolve; the cache read a window at a time,
//! held back by a slow reader and by the fetches outstanding; what a client that goes away
//! leaves behind; the deadline; and `max_pending` for later windows.

use super::super::testing::{LATENCY, Reply, Rig, Setup, describe, described, sns, strs};
use super::super::{Outcome, Overloaded, StreamedLookup};
use std::collections::HashSet;
use std::time::Duration;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

/// The next line, as [`describe`] writes it.
async fn next_line(stream: &mut StreamedLookup) -> Option<String> {
    let index = stream.next_resolved().await?;
    let (sn, outcome) = stream.resolved(index).expect("reported");
    Some(describe(sn, outcome))
}

async fn all_lines(stream: &mut StreamedLookup) -> Vec<String> {
    let mut lines = Vec::new();
    while let Some(line) = next_line(stream).await {
        lines.push(line);
    }
    lines
}

fn owned(sns: &[&str]) -> Vec<String> {
    sns.iter().map(|sn| (*sn).to_owned()).collect()
}

#[tokio::test(start_paused = true)]
async fn hits_come_at_once_then_misses_as_they_resolve_then_the_end() {
    let rig = Rig::new();
    rig.store_found("H1", Duration::ZERO).await;
    rig.store_found("H2", Duration::ZERO).await;
    rig.upstream
        .script("M1", [(Duration::from_millis(300), Reply::Discount)]);
    rig.upstream
        .script("M2", [(Duration::from_millis(100), Reply::Discount)]);
    let started = Instant::now();
    let requested = owned(&["M1", "H1", "M2", "H2"]);
    let mut stream = rig.open_stream(&requested).await;
    let mut timed = Vec::new();
    while let Some(line) = next_line(&mut stream).await {
        timed.push((line, started.elapsed().as_millis()));
    }
    assert_eq!(
        timed,
        [
            ("H1 ok cache".to_owned(), 0),
            ("H2 ok cache".to_owned(), 0),
            ("M2 ok upstream".to_owned(), 100),
            ("M1 ok upstream".to_owned(), 300),
        ]
    );
    let summary = stream.batch().await.summary;
    assert_eq!((summary.cache_hits, summary.upstream_fetches), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn a_stream_longer_than_one_window_reports_each_sn_once_with_its_source() {
    let rig = Rig::with(Setup {
        window: 10,
        ..Setup::default()
    });
    let requested = sns("W", 35);
    for sn in requested.iter().step_by(2) {
        rig.store_found(sn, Duration::ZERO).await;
    }
    let mut stream = rig.open_stream(&requested).await;
    let lines = all_lines(&mut stream).await;
    assert_eq!(lines.len(), 35);
    let expected: HashSet<String> = requested
        .iter()
        .enumerate()
        .map(|(i, sn)| match i % 2 {
            0 => format!("{sn} ok cache"),
            _ => format!("{sn} ok upstream"),
        })
        .collect();
    assert_eq!(lines.into_iter().collect::<HashSet<_>>(), expected);
    assert_eq!((rig.cache_reads(), rig.keys_read()), (4, 35));
    assert_eq!(rig.upstream.total_calls(), 17);
}

#[tokio::test(start_paused = true)]
async fn the_next_window_is_read_only_while_few_fetches_are_outstanding() {
    // Outstanding fetches allowed: max(2 × concurrency, window) = 4.
    let rig = Rig::with(Setup {
        concurrency: 2,
        window: 4,
        request_timeout: Duration::from_secs(60),
        ..Setup::default()
    });
    let requested = sns("P", 40);
    let mut stream = rig.open_stream(&requested).await;
    assert_eq!(rig.keys_read(), 4, "the first window only");
    let mut reported = 0;
    while let Some(line) = next_line(&mut stream).await {
        assert!(line.ends_with("ok upstream"), "{line}");
        reported += 1;
        let read_ahead = rig.keys_read() - reported;
        assert!(
            read_ahead <= 4 - 1 + 4,
            "{read_ahead} SNs read and not reported"
        );
    }
    assert_eq!((reported, rig.keys_read()), (40, 40));
    assert!(rig.upstream.most_in_flight() <= 2);
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_stops_reading_holds_back_the_next_window() {
    let rig = Rig::with(Setup {
        window: 10,
        ..Setup::default()
    });
    let requested = sns("R", 30);
    for sn in &requested {
        rig.store_found(sn, Duration::ZERO).await;
    }
    let mut stream = rig.open_stream(&requested).await;
    for _ in 0..5 {
        next_line(&mut stream).await.unwrap();
    }
    sleep(Duration::from_secs(10)).await;
    assert_eq!(
        rig.keys_read(),
        10,
        "nothing read while the client does not read"
    );
    for _ in 0..5 {
        next_line(&mut stream).await.unwrap();
    }
    assert_eq!(
        rig.keys_read(),
        10,
        "the window's hits are out, no line asked for yet"
    );
    next_line(&mut stream).await.unwrap();
    assert_eq!(rig.keys_read(), 20);
}

#[tokio::test(start_paused = true)]
async fn a_lines_discount_is_let_go_once_the_next_line_is_asked_for() {
    let rig = Rig::new();
    rig.store_found("A", Duration::ZERO).await;
    rig.store_found("B", Duration::ZERO).await;
    let mut stream = rig
        .stream(&owned(&["A", "B"]), CancellationToken::new())
        .await
        .unwrap();
    let first = stream.next_resolved().await.unwrap();
    let discount_of = |stream: &StreamedLookup| match stream.resolved(first) {
        Some((_, Outcome::Found { discount, .. })) => discount.len(),
        other => panic!("{other:?}"),
    };
    assert!(discount_of(&stream) > 0);
    stream.next_resolved().await.unwrap();
    assert_eq!(discount_of(&stream), 0);
    assert_eq!(stream.batch().await.summary.cache_hits, 2, "still counted");
}

#[tokio::test(start_paused = true)]
async fn past_the_deadline_every_sn_left_is_deadline_exceeded_once_unread_windows_included() {
    let rig = Rig::with(Setup {
        concurrency: 1,
        window: 2,
        request_timeout: Duration::from_secs(1),
        ..Setup::default()
    });
    let requested = sns("D", 6);
    rig.upstream
        .script("D-0", [(Duration::from_millis(100), Reply::Discount)]);
    for sn in &requested[1..] {
        rig.upstream.script(sn, [(Duration::ZERO, Reply::Hang)]);
    }
    let started = Instant::now();
    let mut stream = rig.open_stream(&requested).await;
    let lines = all_lines(&mut stream).await;
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(lines[0], "D-0 ok upstream");
    let rest: HashSet<&str> = lines[1..].iter().map(String::as_str).collect();
    let expected: HashSet<String> = requested[1..]
        .iter()
        .map(|sn| format!("{sn} error deadline_exceeded"))
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(rest, expected.iter().map(String::as_str).collect());
    assert_eq!(stream.batch().await.summary.errors, 5);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_stops_its_queued_fetches_but_not_those_under_way() {
    let rig = Rig::with(Setup {
        concurrency: 2,
        ..Setup::default()
    });
    let stream = rig
        .stream(&sns("G", 10), CancellationToken::new())
        .await
        .unwrap();
    sleep(Duration::from_millis(100)).await;
    assert_eq!(rig.upstream.in_flight(), 2);
    drop(stream);
    rig.settled().await;
    assert_eq!(rig.upstream.total_calls(), 2);
    assert_eq!(
        rig.keys_written(),
        2,
        "the fetches under way are written back"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_cancelled_by_its_token_drops_its_queued_fetches() {
    let rig = Rig::with(Setup {
        concurrency: 2,
        ..Setup::default()
    });
    let cancel = CancellationToken::new();
    let _stream = rig.stream(&sns("T", 10), cancel.clone()).await.unwrap();
    sleep(Duration::from_millis(100)).await;
    cancel.cancel();
    sleep(10 * LATENCY).await;
    assert_eq!(rig.upstream.total_calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_goes_away_does_not_fail_another_lookup_of_its_queued_sns() {
    let rig = Rig::with(Setup {
        concurrency: 2,
        ..Setup::default()
    });
    let requested = sns("Q", 10);
    let stream = rig.open_stream(&requested).await;
    sleep(Duration::from_millis(100)).await;
    let other = rig.spawn_resolve(&["Q-9"]);
    sleep(Duration::from_millis(1)).await;
    drop(stream);
    assert_eq!(described(&other.await.unwrap()), ["Q-9 ok upstream"]);
    rig.settled().await;
    assert_eq!(rig.upstream.total_calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_later_window_without_room_under_max_pending_waits_for_it_instead_of_failing() {
    let rig = Rig::with(Setup {
        max_pending: 2,
        window: 2,
        ..Setup::default()
    });
    rig.store_found("H-0", Duration::ZERO).await;
    rig.store_found("H-1", Duration::ZERO).await;
    let others = rig.spawn_resolve(&["X", "Y"]);
    sleep(Duration::from_millis(10)).await;
    let requested = owned(&["H-0", "H-1", "M-0", "M-1"]);
    let started = Instant::now();
    let mut stream = rig.open_stream(&requested).await;
    let lines = all_lines(&mut stream).await;
    assert_eq!(&lines[..2], ["H-0 ok cache", "H-1 ok cache"]);
    let misses: HashSet<&str> = lines[2..].iter().map(String::as_str).collect();
    assert_eq!(
        misses,
        HashSet::from(["M-0 ok upstream", "M-1 ok upstream"])
    );
    assert!(
        started.elapsed() >= 2 * LATENCY,
        "waited for X and Y to end"
    );
    others.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn only_the_first_window_of_a_stream_can_be_refused_as_overloaded() {
    let rig = Rig::with(Setup {
        max_pending: 2,
        ..Setup::default()
    });
    let _others = rig.spawn_resolve(&["X", "Y"]);
    sleep(Duration::from_millis(10)).await;
    let refused = rig.stream(&owned(&["M"]), CancellationToken::new()).await;
    assert_eq!(refused.err(), Some(Overloaded));
    assert_eq!(rig.upstream.calls("M"), 0);
}

#[tokio::test(start_paused = true)]
async fn the_summary_comes_after_the_write_backs_so_the_same_lookup_right_after_is_all_hits() {
    let rig = Rig::new();
    rig.slow_writes(Duration::from_millis(200));
    let requested = sns("S", 3);
    let mut stream = rig.open_stream(&requested).await;
    assert_eq!(all_lines(&mut stream).await.len(), 3);
    stream.batch().await;
    assert_eq!(rig.keys_written(), 3);
    let again = rig.resolve(&strs(&requested)).await;
    assert!(
        described(&again)
            .iter()
            .all(|line| line.ends_with("ok cache"))
    );
}
