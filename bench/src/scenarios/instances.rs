//! The cross-instance row: three proxies alike (A, B, C) on the run's one Redis and the
//! 500 ms upstream, as an operator runs them behind a load balancer. An overlapping cold
//! export, then a stampede on one cold SN, reach all three at once; the simulator counts the
//! upstream calls, which are one per distinct SN when the instances coalesce between them
//! (`coalesce.distributed`, on by default), and the stampede's latencies show how much longer
//! than the winner a loser waits. A build without that feature runs the row too, and fails
//! it: each instance fetches on its own.

use super::cold::others;
use crate::api::{self, Lookup};
use crate::kinds::{INSTANCE_CONCURRENCY, Peer, ProxyKind, Upstream};
use crate::lab::{Lab, Na, ProxyRef};
use crate::load::{self, Sample};
use crate::report::{self, Report, Row};
use anyhow::{Context, Result, ensure};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

/// The rows' group: after the cluster row's.
const GROUP: u8 = super::INSTANCES_GROUP;

/// The simulated upstream's latency: one call is both rows' reference.
const SLOW: Duration = Duration::from_millis(500);

/// The export's target for each batch: at most two upstream latencies. A batch's own SNs take
/// one round of upstream calls (a proxy has a slot for each), and the SNs another instance
/// holds arrive when that instance writes them back, in the same round. The second latency
/// is room for three proxies' write-backs and wake-ups on two cores; instances that fetched
/// in turn, or waited a round before fetching, would take three.
const EXPORT_ROUNDS: u32 = 2;

/// GETs of the stampede's SN sent to each proxy.
const STAMPEDE_PER_PROXY: usize = 100;

/// The stampede's target for the slowest loser, past the winner. The feature's goal is under
/// 5 ms for one loser, measured alone; here 300 answers leave three proxies at the same
/// moment on two cores shared with Redis and the load generator (P6's 1,000 answers from one
/// proxy go out over 31–34 ms of CPU, so these 300 take about 10 ms even with no wait). 50 ms
/// leaves room for that and the machine's noise, and is below the 100 ms poll of Shopify's
/// `sharedstore` and most of FusionCache's 10–800 ms: a loser that polls shows here.
const ADDED_TARGET: Duration = Duration::from_millis(50);

/// New upstream connections each proxy opens at a time before the row (P5 opens 256).
const WARM_WAVE: usize = 250;

/// The longest one request of the row may take.
const LIMIT: Duration = Duration::from_secs(30);

/// The three proxies, in the order of [`Peer::ALL`].
struct Trio([ProxyRef; 3]);

/// Both rows: the export, then the stampede.
pub async fn instances(lab: &mut Lab, report: &mut Report) -> Result<Vec<Row>> {
    let batch = lab.scale.instances_batch;
    ensure!(
        batch <= INSTANCE_CONCURRENCY,
        "an export batch of {batch} SNs needs more than one round of upstream calls"
    );
    let ranges = export_ranges(batch);
    let distinct = distinct(&ranges);
    let spans = |ranges: &[Range<usize>]| {
        let spans: Vec<String> = ranges.iter().map(span).collect();
        spans.join(", ")
    };
    let label = format!(
        "Instances: 3 proxies export overlapping cold SNs ({}) at once, upstream 500 ms",
        spans(&ranges)
    );
    let export_row = Row::new(
        GROUP,
        lab.scale.label(&label, &spans(&export_ranges(1_000))),
        format!(
            "exactly {} calls; each batch ≤ {}",
            report::count(distinct),
            report::duration(SLOW * EXPORT_ROUNDS)
        ),
    );
    let stampede_row = Row::new(
        GROUP,
        format!(
            "Instances: 3 × {STAMPEDE_PER_PROXY} concurrent GETs of 1 cold SN, \
             {STAMPEDE_PER_PROXY} per proxy, upstream 500 ms"
        ),
        format!(
            "1 call; all 200; slowest loser ≤ +{}",
            report::duration(ADDED_TARGET)
        ),
    );
    let trio = match trio(lab).await? {
        Ok(trio) => trio,
        Err(na) => return Ok(vec![export_row.na(na.0.clone()), stampede_row.na(na.0)]),
    };
    report.notes.push(format!(
        "Instances: three proxies alike (upstream.concurrency {}, coalesce.* at its defaults) \
         on the run's one Redis and the 500 ms simulator",
        report::count(INSTANCE_CONCURRENCY as u64)
    ));
    let simulator = lab.simulator(Upstream::Slow).await?;
    open_upstream_connections(lab, &trio, batch).await?;
    let sizes: Vec<String> = waves(batch)
        .into_iter()
        .map(|n| report::count(n as u64))
        .collect();
    report.notes.push(format!(
        "Instances: each proxy first looked up batches of cold SNs of its own ({} in turn), \
         so its upstream connections were open, as in service, before anything was timed",
        sizes.join(", ")
    ));
    let export_row = export(lab, &trio, simulator, &ranges, export_row, report).await?;
    let stampede_row = stampede(lab, &trio, simulator, stampede_row, report).await?;
    Ok(vec![export_row, stampede_row])
}

/// The three proxies, or why they cannot run.
async fn trio(lab: &mut Lab) -> Result<Result<Trio, Na>> {
    let mut proxies = Vec::with_capacity(Peer::ALL.len());
    for peer in Peer::ALL {
        match lab.proxy(ProxyKind::Instance(peer)).await? {
            Ok(proxy) => proxies.push(proxy),
            Err(na) => return Ok(Err(na)),
        }
    }
    let trio: [ProxyRef; 3] = proxies
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected three proxies"))?;
    Ok(Ok(Trio(trio)))
}

/// Has each proxy, one after the other, open as many upstream connections as an export batch
/// uses: a fresh proxy's first batch would also open them, which is not what the row
/// measures.
///
/// # Errors
/// A lookup is not all `ok`: the proxy's upstream circuit may be open, so nothing after it
/// would measure coalescing.
async fn open_upstream_connections(lab: &Lab, trio: &Trio, count: usize) -> Result<()> {
    for (peer, proxy) in Peer::ALL.into_iter().zip(trio.0) {
        for (wave, size) in waves(count).into_iter().enumerate() {
            let sns = api::sns(&format!("INW{}{wave}", peer.letter()), size);
            let lookup = lab.api.lookup(proxy.addr, &sns, LIMIT).await?;
            ensure!(
                lookup.ok == size as u64,
                "opening the upstream connections of proxy {}: {} of {size} cold SNs ok{}",
                peer.letter(),
                lookup.ok,
                lookup.not_ok_note()
            );
        }
    }
    Ok(())
}

/// Lookups of `WARM_WAVE`, 2 × `WARM_WAVE`, … up to `count` SNs: each finds the connections
/// of the one before idle and opens only `WARM_WAVE` more. Hundreds of connects at once
/// overflow the simulator's accept queue on a loaded machine, and the resets open the
/// proxy's upstream circuit.
fn waves(count: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = (1..)
        .map(|n| n * WARM_WAVE)
        .take_while(|&size| size < count)
        .collect();
    sizes.push(count);
    sizes
}

/// The export: A, B and C each get one batch of never-seen SNs, sent at once.
async fn export(
    lab: &Lab,
    trio: &Trio,
    simulator: SocketAddr,
    ranges: &[Range<usize>; 3],
    mut row: Row,
    report: &mut Report,
) -> Result<Row> {
    let distinct = distinct(ranges);
    let sns = api::sns("INX", ranges.iter().map(|r| r.end).max().unwrap_or(0));
    let batch = |range: &Range<usize>| {
        sns.get(range.clone())
            .with_context(|| format!("no SNs {}", span(range)))
    };
    let [ra, rb, rc] = ranges;
    let (a, b, c) = (batch(ra)?, batch(rb)?, batch(rc)?);
    let [pa, pb, pc] = trio.0;
    for proxy in trio.0 {
        lab.api.touch(proxy.addr).await?;
    }
    let before = lab.api.upstream_requests(simulator).await?;
    let by_proxy_before = calls_by_proxy(lab, trio).await?;
    let (la, lb, lc) = tokio::join!(
        lab.api.lookup(pa.addr, a, LIMIT),
        lab.api.lookup(pb.addr, b, LIMIT),
        lab.api.lookup(pc.addr, c, LIMIT),
    );
    let lookups: [Lookup; 3] = [la?, lb?, lc?];
    let not_ok: String = lookups.iter().map(Lookup::not_ok_note).collect();
    let calls = lab.api.upstream_requests(simulator).await? - before;
    let by_proxy = calls_by_proxy(lab, trio).await?;
    let asked: u64 = ranges.iter().map(|r| r.len() as u64).sum();
    let ok: u64 = lookups.iter().map(|lookup| lookup.ok).sum();
    let walls = lookups.map(|lookup| lookup.wall);
    let slowest = walls.iter().max().copied().unwrap_or_default();
    let times: Vec<String> = Peer::ALL
        .iter()
        .zip(walls)
        .map(|(peer, wall)| format!("{} {}", peer.letter(), report::duration(wall)))
        .collect();
    row.figure = format!(
        "upstream calls: {} for {} distinct SNs; batches {}; {} of {} SNs ok{not_ok}",
        report::count(calls),
        report::count(distinct),
        times.join(", "),
        report::count(ok),
        report::count(asked)
    );
    row.reference = format!(
        "{} calls; {} (one upstream call)",
        report::count(distinct),
        report::duration(SLOW)
    );
    row.ratio = report::ratio(calls as f64 / distinct.max(1) as f64);
    report.notes.push(format!(
        "Instances export: upstream requests by proxy (its /metrics): {}",
        by_letter(&difference(&by_proxy, &by_proxy_before), |n| report::count(
            *n
        ))
    ));
    Ok(row.judged(export_met(calls, distinct, ok == asked, slowest)))
}

/// The stampede: `STAMPEDE_PER_PROXY` GETs of one never-seen SN on each proxy, on connections
/// opened beforehand, released together.
async fn stampede(
    lab: &Lab,
    trio: &Trio,
    simulator: SocketAddr,
    mut row: Row,
    report: &mut Report,
) -> Result<Row> {
    let path = format!("/v1/discounts/{}", api::sns("INS", 1).concat());
    let addrs = trio.0.map(|proxy| proxy.addr);
    let before = lab.api.upstream_requests(simulator).await?;
    let by_proxy_before = calls_by_proxy(lab, trio).await?;
    let samples = load::burst_over(&addrs, &path, STAMPEDE_PER_PROXY, LIMIT).await?;
    let calls = lab.api.upstream_requests(simulator).await? - before;
    let by_proxy = calls_by_proxy(lab, trio).await?;
    let all: Vec<Sample> = samples.iter().flatten().cloned().collect();
    let latencies: Vec<Duration> = all.iter().map(|sample| sample.latency).collect();
    let sent = all.len();
    let ok = all
        .iter()
        .filter(|s| s.status.as_ref().ok() == Some(&200))
        .count();
    let added = added(&latencies);
    row.figure = format!(
        "upstream calls: {calls}; {ok} of {sent} × 200{}; {}",
        others(&all),
        added.map_or_else(|| "no answers".to_owned(), |added| added.describe())
    );
    row.reference = format!("1 call; {} (one upstream call)", report::duration(SLOW));
    row.ratio = report::ratio(calls as f64);
    report.notes.push(stampede_note(
        &samples,
        &difference(&by_proxy, &by_proxy_before),
    ));
    let all_200 = sent == STAMPEDE_PER_PROXY * addrs.len() && ok == sent;
    Ok(row.judged(stampede_met(calls, all_200, added)))
}

/// Which proxy made the stampede's calls, and each one's slowest answer past the winner of
/// all three (a loser on another instance than the winner waits for a write-back it did not
/// make).
fn stampede_note(samples: &[Vec<Sample>], calls: &[u64]) -> String {
    let latencies: Vec<Duration> = samples.iter().flatten().map(|s| s.latency).collect();
    let winner = latencies.iter().min().copied().unwrap_or_default();
    let slowest: Vec<Duration> = samples
        .iter()
        .map(|of_proxy| {
            let max = of_proxy.iter().map(|s| s.latency).max().unwrap_or_default();
            max.saturating_sub(winner)
        })
        .collect();
    format!(
        "Instances stampede: upstream requests by proxy (its /metrics): {}; slowest answer \
         past the winner by proxy: {}",
        by_letter(calls, |n| report::count(*n)),
        by_letter(&slowest, |d| format!("+{}", report::duration(*d)))
    )
}

/// Each proxy's own count of upstream requests so far.
async fn calls_by_proxy(lab: &Lab, trio: &Trio) -> Result<Vec<u64>> {
    let mut calls = Vec::with_capacity(trio.0.len());
    for proxy in trio.0 {
        calls.push(lab.api.proxy_upstream_requests(proxy.addr).await?);
    }
    Ok(calls)
}

fn difference(after: &[u64], before: &[u64]) -> Vec<u64> {
    after
        .iter()
        .zip(before)
        .map(|(after, before)| after.saturating_sub(*before))
        .collect()
}

/// `A x, B y, C z`.
fn by_letter<T>(values: &[T], show: impl Fn(&T) -> String) -> String {
    let shown: Vec<String> = Peer::ALL
        .iter()
        .zip(values)
        .map(|(peer, value)| format!("{} {}", peer.letter(), show(value)))
        .collect();
    shown.join(", ")
}

/// The export's batches: A `[0, n)`, B `[n/2, n/2 + n)`, C `[n, 2n)`. B overlaps each of the
/// others by half; A and C do not overlap.
fn export_ranges(n: usize) -> [Range<usize>; 3] {
    let half = n / 2;
    [0..n, half..half + n, n..2 * n]
}

/// How many distinct SNs the ranges cover together.
fn distinct(ranges: &[Range<usize>]) -> u64 {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|range| range.start);
    let mut covered = 0;
    let mut reached = 0;
    for range in sorted {
        let start = range.start.max(reached);
        covered += range.end.saturating_sub(start);
        reached = reached.max(range.end);
    }
    covered as u64
}

/// `0–999` for `0..1000`.
fn span(range: &Range<usize>) -> String {
    format!("{}–{}", range.start, range.end.saturating_sub(1))
}

/// How much longer than the fastest answer (the winner's) the other answers took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Added {
    /// The fastest answer's latency.
    winner: Duration,
    /// The median loser's latency minus the winner's.
    median: Duration,
    /// The slowest loser's latency minus the winner's.
    max: Duration,
}

impl Added {
    fn describe(&self) -> String {
        format!(
            "winner {}; a loser's added latency: median +{}, max +{}",
            report::duration(self.winner),
            report::duration(self.median),
            report::duration(self.max)
        )
    }
}

/// Each latency minus the fastest, over every answer but the fastest itself; `None` without
/// answers. A lone answer has no losers: both figures are zero.
fn added(latencies: &[Duration]) -> Option<Added> {
    let winner = latencies.iter().min().copied()?;
    let mut losers: Vec<Duration> = latencies.iter().map(|l| l.saturating_sub(winner)).collect();
    losers.sort_unstable();
    losers.remove(0);
    Some(Added {
        winner,
        median: load::percentile(&losers, 50.0),
        max: losers.last().copied().unwrap_or_default(),
    })
}

/// The export passes with one call per distinct SN, every SN answered `ok`, and no batch
/// slower than `EXPORT_ROUNDS` upstream latencies.
fn export_met(calls: u64, distinct: u64, all_ok: bool, slowest: Duration) -> bool {
    calls == distinct && all_ok && slowest <= SLOW * EXPORT_ROUNDS
}

/// The stampede passes with one call, every GET answered `200`, and the slowest loser within
/// `ADDED_TARGET` of the winner.
fn stampede_met(calls: u64, all_200: bool, added: Option<Added>) -> bool {
    calls == 1 && all_200 && added.is_some_and(|added| added.max <= ADDED_TARGET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn the_export_overlaps_by_half_batches() {
        let ranges = export_ranges(1_000);
        assert_eq!(ranges, [0..1_000, 500..1_500, 1_000..2_000]);
        assert_eq!(distinct(&ranges), 2_000);
        let spans: Vec<String> = ranges.iter().map(span).collect();
        assert_eq!(spans, ["0–999", "500–1499", "1000–1999"]);
        assert_eq!(distinct(&export_ranges(300)), 600);
    }

    #[test]
    fn connections_are_opened_a_wave_at_a_time() {
        assert_eq!(waves(1_000), [250, 500, 750, 1_000]);
        assert_eq!(waves(300), [250, 300]);
        assert_eq!(waves(250), [250]);
        assert_eq!(waves(10), [10]);
    }

    #[test]
    fn distinct_counts_each_sn_once_whatever_the_order() {
        assert_eq!(distinct(&[10..20, 0..5, 3..12]), 20);
        assert_eq!(distinct(&[0..5, 10..15]), 10);
        assert_eq!(distinct(&[0..10, 2..3]), 10);
        assert_eq!(distinct(&[]), 0);
    }

    #[test]
    fn added_latency_is_measured_from_the_winner_over_the_losers_only() {
        let added = added(&[ms(530), ms(500), ms(502), ms(510)]).unwrap();
        assert_eq!(added.winner, ms(500));
        // Losers: +2, +10, +30; the winner's own +0 is not one of them.
        assert_eq!(added.median, ms(10));
        assert_eq!(added.max, ms(30));
        assert!(added.describe().contains("median +10.00 ms, max +30.00 ms"));
    }

    #[test]
    fn added_latency_needs_answers_and_a_lone_answer_adds_nothing() {
        assert_eq!(added(&[]), None);
        let lone = added(&[ms(500)]).unwrap();
        assert_eq!((lone.median, lone.max), (Duration::ZERO, Duration::ZERO));
        let tie = added(&[ms(500), ms(500)]).unwrap();
        assert_eq!(tie.max, Duration::ZERO);
    }

    #[test]
    fn the_export_passes_only_with_one_call_per_sn_all_ok_in_time() {
        assert!(export_met(2_000, 2_000, true, ms(1_000)));
        assert!(!export_met(3_000, 2_000, true, ms(600)));
        assert!(!export_met(1_999, 2_000, true, ms(600)));
        assert!(!export_met(2_000, 2_000, false, ms(600)));
        assert!(!export_met(2_000, 2_000, true, ms(1_001)));
    }

    #[test]
    fn the_stampede_passes_only_with_one_call_all_200_and_a_quick_loser() {
        let quick = added(&[ms(500), ms(550)]);
        let slow = added(&[ms(500), ms(551)]);
        assert!(stampede_met(1, true, quick));
        assert!(!stampede_met(3, true, quick));
        assert!(!stampede_met(1, false, quick));
        assert!(!stampede_met(1, true, slow));
        assert!(!stampede_met(1, true, None));
    }

    #[test]
    fn notes_name_each_proxy() {
        assert_eq!(
            by_letter(&[1_000u64, 0, 7], |n| n.to_string()),
            "A 1000, B 0, C 7"
        );
        assert_eq!(difference(&[5, 9, 3], &[2, 9, 4]), [3, 0, 0]);
    }
}
