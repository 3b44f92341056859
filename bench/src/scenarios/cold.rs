//! The cold paths: one batch of 100 misses on the 500 ms upstream (P4), a wide batch at 256
//! in flight (P5), and 1,000 concurrent requests for one cold SN (P6).

use super::Scale;
use crate::api::{self, Lookup};
use crate::http1::Conn;
use crate::kinds::{ProxyKind, Upstream};
use crate::lab::{Lab, ProxyRef};
use crate::load::{self, Sample};
use crate::report::{self, Report, Row};
use anyhow::{Context, Result, ensure};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The slow upstream's latency: one call is P4's and P6's reference.
const SLOW: Duration = Duration::from_millis(500);

/// P5's upstream latency and concurrency.
const NORMAL: Duration = Duration::from_millis(50);
const P5_CONCURRENCY: usize = 256;

/// P6's concurrent requests.
const P6_REQUESTS: usize = 1_000;

/// P4: 100 never-seen SNs in one batch, then the same 100 again at once.
pub async fn p4(lab: &mut Lab, report: &mut Report) -> Result<Vec<Row>> {
    let proxy = ready(lab, ProxyKind::Cold).await?;
    let sns = api::sns("P4", 100);
    let (first, first_calls) = timed_lookup(lab, proxy, Upstream::Slow, &sns).await?;
    let (again, again_calls) = timed_lookup(lab, proxy, Upstream::Slow, &sns).await?;
    // Two figures that tell where time over 500 ms goes: the simulator itself, and opening
    // the proxy's upstream connections (a second cold batch finds them open).
    let (other, _) = timed_lookup(lab, proxy, Upstream::Slow, &api::sns("P4b", 100)).await?;
    report.notes.push(format!(
        "P4: one direct call to the 500 ms simulator took {}; a second batch of 100 other \
         cold SNs (upstream connections open by then) took {}",
        report::duration(direct_call(lab).await?),
        report::duration(other.wall)
    ));

    let ratio = first.wall.as_secs_f64() / SLOW.as_secs_f64();
    let mut cold = Row::new(
        4,
        "P4 POST 100 cold SNs, upstream 500 ms",
        "≤ 1.02× (0.51 s)",
    );
    cold.figure = format!(
        "{}; {} fetched, upstream calls: {first_calls}, errors: {}",
        report::duration(first.wall),
        first.summary.upstream_fetches,
        first.summary.errors
    );
    cold.reference = "0.500 s (one upstream call)".to_owned();
    cold.ratio = report::ratio(ratio);
    let cold = cold.judged(ratio <= 1.02 && first_calls == 100 && first.summary.errors == 0);

    let mut warm = Row::new(4, "P4 the same 100 again", "≤ 5 ms, all hits");
    warm.figure = format!(
        "{}; {} cache hits, upstream calls: {again_calls}",
        report::duration(again.wall),
        again.summary.cache_hits
    );
    let hit = again.summary.cache_hits == 100 && again_calls == 0;
    let fast = again.wall <= Duration::from_millis(5);
    Ok(vec![cold, warm.judged(fast && hit)])
}

/// P5: a batch of never-seen SNs at 256 upstream requests in flight, against the ideal of
/// ceil(n / 256) rounds of 50 ms.
pub async fn p5(lab: &mut Lab, report: &mut Report) -> Result<Vec<Row>> {
    let scale: Scale = lab.scale;
    let n = scale.p5_sns;
    let proxy = ready(lab, ProxyKind::Wide).await?;
    let sns = api::sns("P5", n);
    let (lookup, calls) = timed_lookup(lab, proxy, Upstream::Normal, &sns).await?;
    let rounds = n.div_ceil(P5_CONCURRENCY);
    let ideal = NORMAL * u32::try_from(rounds).context("too many rounds")?;
    let ratio = lookup.wall.as_secs_f64() / ideal.as_secs_f64();
    let label = format!(
        "P5 POST {} cold SNs, 256 in flight, upstream 50 ms",
        report::count(n as u64)
    );
    let target = format!("≤ 1.05×; exactly {} calls", report::count(n as u64));
    let mut row = Row::new(5, scale.label(&label, "10,000"), target);
    row.figure = format!(
        "{}; upstream calls: {}, errors: {}",
        report::duration(lookup.wall),
        report::count(calls),
        lookup.summary.errors
    );
    row.reference = format!("{} ideal ({rounds} × 50 ms)", report::duration(ideal));
    row.ratio = report::ratio(ratio);
    let overhead = lookup.wall.saturating_sub(ideal) / u32::try_from(rounds).unwrap_or(1);
    report.notes.push(format!(
        "P5: {} over the ideal per round of 256 upstream calls",
        report::duration(overhead)
    ));
    let exact = calls == n as u64 && lookup.summary.upstream_fetches == n as u64;
    Ok(vec![row.judged(
        ratio <= 1.05 && exact && lookup.summary.errors == 0,
    )])
}

/// P6: 1,000 requests for one never-seen SN, on connections opened beforehand and released
/// together: one upstream call, every answer within 1.05 × 500 ms.
pub async fn p6(lab: &mut Lab) -> Result<Vec<Row>> {
    let proxy = ready(lab, ProxyKind::Cold).await?;
    let simulator = lab.simulator(Upstream::Slow).await?;
    let path = format!("/v1/discounts/{}", api::sns("P6", 1).concat());
    let before = lab.api.upstream_requests(simulator).await?;
    let samples = load::burst(proxy.addr, &path, P6_REQUESTS, Duration::from_secs(10)).await?;
    let calls = lab.api.upstream_requests(simulator).await? - before;
    let latencies: Vec<Duration> = samples.iter().map(|sample| sample.latency).collect();
    let max = latencies.iter().max().copied().unwrap_or_default();
    let ok = samples
        .iter()
        .filter(|s| s.status.as_ref().ok() == Some(&200))
        .count();
    let ratio = max.as_secs_f64() / SLOW.as_secs_f64();
    let mut row = Row::new(
        6,
        "P6 1,000 concurrent GETs of 1 cold SN, upstream 500 ms",
        "1 call; all 200 in ≤ 1.05×",
    );
    row.figure = format!(
        "min {}, p50 {}, max {}; {ok} of {P6_REQUESTS} × 200{}; upstream calls: {calls}",
        report::duration(latencies.iter().min().copied().unwrap_or_default()),
        report::duration(load::percentile(&latencies, 50.0)),
        report::duration(max),
        others(&samples)
    );
    row.reference = "0.500 s (one upstream call)".to_owned();
    row.ratio = report::ratio(ratio);
    Ok(vec![
        row.judged(calls == 1 && ok == P6_REQUESTS && ratio <= 1.05),
    ])
}

/// The statuses other than 200 and the transport errors among `samples`, as a note.
pub fn others(samples: &[Sample]) -> String {
    let mut statuses = BTreeMap::new();
    let mut errors = 0;
    for sample in samples {
        match &sample.status {
            Ok(200) => {}
            Ok(status) => *statuses.entry(*status).or_insert(0) += 1,
            Err(_) => errors += 1,
        }
    }
    let mut note: String = statuses
        .iter()
        .map(|(status, count)| format!(", {count} × {status}"))
        .collect();
    if errors > 0 {
        note += &format!(", {errors} transport errors");
    }
    note
}

/// One call straight to the slow simulator on an open connection: how much of P4's and
/// P6's time over 500 ms is the simulator's own.
async fn direct_call(lab: &mut Lab) -> Result<Duration> {
    let simulator = lab.simulator(Upstream::Slow).await?;
    let limit = Duration::from_secs(5);
    let mut conn = Conn::connect(simulator, limit).await?;
    conn.get("/stats", limit).await?;
    let start = Instant::now();
    let reply = conn.get("/contract/?sn=P4-direct", limit).await?;
    ensure!(
        reply.status == 200,
        "the simulator answered {}",
        reply.status
    );
    Ok(start.elapsed())
}

async fn ready(lab: &mut Lab, kind: ProxyKind) -> Result<ProxyRef> {
    lab.proxy(kind)
        .await?
        .map_err(|na| anyhow::anyhow!("the {} proxy cannot run: {}", kind.name(), na.0))
}

/// One batch lookup on a kept-alive connection, with the upstream calls it caused.
async fn timed_lookup(
    lab: &mut Lab,
    proxy: ProxyRef,
    upstream: Upstream,
    sns: &[String],
) -> Result<(Lookup, u64)> {
    let simulator = lab.simulator(upstream).await?;
    lab.api.touch(proxy.addr).await?;
    let before = lab.api.upstream_requests(simulator).await?;
    let lookup = lab
        .api
        .lookup(proxy.addr, sns, Duration::from_secs(60))
        .await?;
    let calls = lab.api.upstream_requests(simulator).await? - before;
    Ok((lookup, calls))
}
