//! P8: cold single-SN lookups at three times what the upstream limit can serve, sent on a
//! fixed schedule: most of the capacity must still be served at normal latency, and the
//! rest shed quickly with `503`.

use super::cold::others;
use crate::api;
use crate::kinds::{ProxyKind, Upstream};
use crate::lab::Lab;
use crate::load::{self, OpenLoop, Sample};
use crate::report::{self, Report, Row};
use anyhow::Result;
use std::time::Duration;

/// The overload proxy's `upstream.concurrency` (see `ProxyKind::Overload`).
const CONCURRENCY: f64 = 64.0;

/// The upstream's latency.
const UPSTREAM: Duration = Duration::from_millis(50);

/// "Normal latency" for a served cold SN at capacity: the upstream call (50 ms), at most one
/// round spent waiting for a slot (`max_pending` 128 is two rounds of 64, so a queued fetch
/// waits for at most one round ahead of it), and one more round of headroom for the load
/// generator and the proxy sharing two cores: 3 × 50 ms.
const SERVED_P99: Duration = Duration::from_millis(150);

/// How fast a refusal must be: it should cost no more than parsing the request.
const SHED_P99: Duration = Duration::from_millis(5);

/// P8: an open-loop load of distinct never-seen SNs at 3 × capacity.
pub async fn p8(lab: &mut Lab, report: &mut Report) -> Result<Vec<Row>> {
    let proxy = lab
        .proxy(ProxyKind::Overload)
        .await?
        .map_err(|na| anyhow::anyhow!("the overload proxy cannot run: {}", na.0))?;
    let simulator = lab.simulator(Upstream::Normal).await?;
    let load = OpenLoop {
        rate: 3.0 * capacity(),
        duration: lab.scale.p8,
        connections: 256,
        limit: Duration::from_secs(5),
    };
    let before = lab.api.upstream_requests(simulator).await?;
    let sns = api::sns("P8", (load.rate * load.duration.as_secs_f64()) as usize + 1);
    let samples = load
        .run(proxy.addr, |i| {
            let sn = sns.get(i).map_or("P8-x", String::as_str);
            format!("/v1/discounts/{sn}")
        })
        .await?;
    let calls = lab.api.upstream_requests(simulator).await? - before;
    let label = format!(
        "P8 cold GETs at 3× capacity ({} req/s for {} s)",
        report::rate(load.rate),
        load.duration.as_secs()
    );
    let served = served_row(lab.scale.label(&label, "5 s"), &samples, load.duration);
    let without_retry_after = samples
        .iter()
        .filter(|s| s.status.as_ref().ok() == Some(&503) && !s.retry_after)
        .count();
    let lags: Vec<Duration> = samples.iter().map(|sample| sample.lag).collect();
    report.notes.push(format!(
        "P8: {} requests sent, {} upstream calls, {without_retry_after} 503s without \
         Retry-After; the load generator's lag behind its schedule: p99 {}, max {}",
        report::count(samples.len() as u64),
        report::count(calls),
        report::duration(load::percentile(&lags, 99.0)),
        report::duration(lags.iter().max().copied().unwrap_or_default())
    ));
    Ok(vec![served, shed_row(&samples, without_retry_after)])
}

/// SNs per second the upstream limit allows: 64 in flight, 50 ms each.
fn capacity() -> f64 {
    CONCURRENCY / UPSTREAM.as_secs_f64()
}

/// The 200s: their rate over the load's duration (or until the last one, if later) against
/// capacity, and their p99.
fn served_row(label: String, samples: &[Sample], duration: Duration) -> Row {
    let (served, p99, p99_due) = p99s(samples, 200);
    let window = samples
        .iter()
        .filter(|sample| sample.status.as_ref().ok() == Some(&200))
        .map(|sample| sample.done_at)
        .max()
        .unwrap_or_default()
        .max(duration);
    let rate = served as f64 / window.as_secs_f64();
    let mut row = Row::new(8, label, "≥ 0.8×; p99 ≤ 150 ms");
    row.figure = format!(
        "{} served/s ({} × 200), p99 {} ({} from the schedule)",
        report::rate(rate),
        report::count(served as u64),
        report::duration(p99),
        report::duration(p99_due)
    );
    row.reference = format!("{} SNs/s capacity (64 / 50 ms)", report::rate(capacity()));
    row.ratio = report::ratio(rate / capacity());
    row.judged(rate >= 0.8 * capacity() && p99 <= SERVED_P99)
}

/// The 503s: their p99, and whatever was neither a 200 nor a 503.
fn shed_row(samples: &[Sample], without_retry_after: usize) -> Row {
    let (shed, p99, p99_due) = p99s(samples, 503);
    let other = others_than_503(samples);
    let mut row = Row::new(8, "P8 the rest shed", "503 p99 ≤ 5 ms; nothing else");
    let rest = if other.is_empty() {
        "; no other outcome".to_owned()
    } else {
        other.clone()
    };
    row.figure = format!(
        "{} × 503, p99 {} ({} from the schedule){rest}",
        report::count(shed as u64),
        report::duration(p99),
        report::duration(p99_due)
    );
    row.judged(p99 <= SHED_P99 && other.is_empty() && without_retry_after == 0)
}

/// The p99 latency of the answers with `status`: from the send (judged: the proxy's share),
/// and from the schedule (shown: what a client on that schedule saw, generator lag included).
fn p99s(samples: &[Sample], status: u16) -> (usize, Duration, Duration) {
    let chosen: Vec<&Sample> = samples
        .iter()
        .filter(|sample| sample.status.as_ref().ok() == Some(&status))
        .collect();
    let sent: Vec<Duration> = chosen.iter().map(|sample| sample.latency).collect();
    let due: Vec<Duration> = chosen.iter().map(|s| s.latency + s.lag).collect();
    let p99 = |values: &[Duration]| load::percentile(values, 99.0);
    (chosen.len(), p99(&sent), p99(&due))
}

/// Outcomes other than 200 and 503, as a note (empty when there are none).
fn others_than_503(samples: &[Sample]) -> String {
    let rest: Vec<Sample> = samples
        .iter()
        .filter(|sample| sample.status.as_ref().ok() != Some(&503))
        .cloned()
        .collect();
    others(&rest)
}
