//! The cross-instance row: three proxies alike (A, B, C) on the run's one Redis and the
//! 500 ms upstream, as an operator runs them behind a load balancer. An overlapping cold
//! export, then a stampede on one cold SN, reach all three at once; the simulator counts the
//! upstream calls, which are one per distinct SN when the instances coalesce between them
//! (`coalesce.distributed`, on by default), and the stampede's latencies show how much longer
//! than the winner a loser waits. A build without that feature runs the row too, and fails
//! it: each instance fetches on its own.

mod figures;

use super::Scale;
use super::cold::others;
use crate::api::{self, Lookup};
use crate::kinds::{INSTANCE_CONCURRENCY, Peer, ProxyKind, Upstream};
use crate::lab::{Lab, Na, ProxyRef};
use crate::load::{self, Sample};
use crate::report::{self, Report, Row};
use anyhow::{Context, Result, ensure};
use figures::{
    ADDED_TARGET, EXPORT_ROUNDS, SLOW, added, by_letter, difference, distinct, export_met,
    export_ranges, span, stampede_met, waves,
};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

/// The rows' group: after the cluster row's.
const GROUP: u8 = super::INSTANCES_GROUP;

/// GETs of the stampede's SN sent to each proxy.
const STAMPEDE_PER_PROXY: usize = 100;

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
    let (export_row, stampede_row) = rows(&lab.scale, &ranges);
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

/// The two rows, named and with their targets, not yet measured.
fn rows(scale: &Scale, ranges: &[Range<usize>; 3]) -> (Row, Row) {
    let distinct = distinct(ranges);
    let spans = |ranges: &[Range<usize>]| {
        let spans: Vec<String> = ranges.iter().map(span).collect();
        spans.join(", ")
    };
    let label = format!(
        "Instances: 3 proxies export overlapping cold SNs ({}) at once, upstream 500 ms",
        spans(ranges)
    );
    let export_row = Row::new(
        GROUP,
        scale.label(&label, &spans(&export_ranges(1_000))),
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
    (export_row, stampede_row)
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
