//! The hit paths (P1–P3): batches of 100 cached SNs and single cached SNs under `wrk`,
//! held to Redis's own MGET and to nginx `proxy_cache`.

use super::references::References;
use crate::api;
use crate::http1::Conn;
use crate::kinds::{ProxyKind, Upstream};
use crate::lab::{Lab, Na, ProxyRef};
use crate::report::{self, Report, Row};
use crate::wrk::{self, Load, WrkResult};
use anyhow::{Result, ensure};
use std::net::SocketAddr;
use std::time::Duration;

/// The cached SNs every hit scenario asks for.
pub const HOT_SET: usize = 100;

/// P1's latency target.
const P1_P99: Duration = Duration::from_millis(10);

/// P1: batches of 100 hits against the Redis-only proxy.
pub async fn p1(lab: &mut Lab, refs: &mut References, report: &mut Report) -> Result<Vec<Row>> {
    let row = Row::new(1, "P1 POST 100 hits, Redis only", "≥ 0.5×, p99 ≤ 10 ms");
    batch_of_hits(lab, refs, report, row, ProxyKind::RedisOnly, 0.5).await
}

/// P2: the same with the in-process tier on.
pub async fn p2(lab: &mut Lab, refs: &mut References, report: &mut Report) -> Result<Vec<Row>> {
    let row = Row::new(2, "P2 POST 100 hits, local tier", "≥ 1.0×, p99 ≤ 10 ms");
    batch_of_hits(lab, refs, report, row, ProxyKind::LocalTier, 1.0).await
}

async fn batch_of_hits(
    lab: &mut Lab,
    refs: &mut References,
    report: &mut Report,
    mut row: Row,
    kind: ProxyKind,
    target: f64,
) -> Result<Vec<Row>> {
    let proxy = match lab.proxy(kind).await? {
        Ok(proxy) => proxy,
        Err(na) => return Ok(vec![row.na(na.0)]),
    };
    warm_hot_set(lab, proxy).await?;
    let reference = refs.mget(lab, report).await;
    let body = serde_json::json!({ "sns": api::sns("HOT", HOT_SET) }).to_string();
    let url = format!("http://{}/v1/discounts/lookup", proxy.addr);
    let (result, misses) = match drive(lab, &url, Some(&body), kind.upstream()).await? {
        Ok(measured) => measured,
        Err(na) => return Ok(vec![row.na(na.0)]),
    };
    let keys = result.requests_per_sec * HOT_SET as f64;
    row.figure = format!(
        "{} keys/s ({} req/s), p99 {}{}{}",
        report::rate(keys),
        report::rate(result.requests_per_sec),
        report::duration(result.p99),
        result.failures(),
        misses_note(misses)
    );
    let clean = result.non_2xx == 0 && result.socket_errors == 0 && misses == 0;
    Ok(vec![match reference {
        Ok(reference) => {
            row.reference = format!("{} keys/s (Redis MGET-100)", report::rate(reference));
            row.ratio = report::ratio(keys / reference);
            row.judged(keys / reference >= target && result.p99 <= P1_P99 && clean)
        }
        Err(na) => row.na(format!("no reference: {}", na.0)),
    }])
}

/// P3: single-SN GETs of a hot SN, with the local tier and with Redis only.
pub async fn p3(lab: &mut Lab, refs: &mut References, report: &mut Report) -> Result<Vec<Row>> {
    let cases = [
        (ProxyKind::LocalTier, "P3 GET 1 hit, local tier", 1.0),
        (ProxyKind::RedisOnly, "P3 GET 1 hit, Redis only", 0.5),
    ];
    let mut rows = Vec::new();
    for (kind, label, target) in cases {
        let row = Row::new(3, label, format!("≥ {target:.1}× nginx"));
        rows.push(
            match single_hits(lab, refs, report, row.clone(), kind, target).await {
                Ok(row) => row,
                Err(err) => {
                    report.error(row, &err);
                    continue;
                }
            },
        );
    }
    Ok(rows)
}

async fn single_hits(
    lab: &mut Lab,
    refs: &mut References,
    report: &mut Report,
    mut row: Row,
    kind: ProxyKind,
    target: f64,
) -> Result<Row> {
    let proxy = match lab.proxy(kind).await? {
        Ok(proxy) => proxy,
        Err(na) => return Ok(row.na(na.0)),
    };
    warm_hot_set(lab, proxy).await?;
    let path = format!("/v1/discounts/{}", api::sns("HOT", 1).concat());
    let name = format!("the {} proxy", proxy.kind.name());
    expect_hit(proxy.addr, &name, &path, "x-cache", "HIT").await?;
    let reference = refs.nginx(lab, report).await;
    let url = format!("http://{}{path}", proxy.addr);
    let (result, misses) = match drive(lab, &url, None, kind.upstream()).await? {
        Ok(measured) => measured,
        Err(na) => return Ok(row.na(na.0)),
    };
    row.figure = format!(
        "{} req/s, p99 {}{}{}",
        report::rate(result.requests_per_sec),
        report::duration(result.p99),
        result.failures(),
        misses_note(misses)
    );
    let clean = result.non_2xx == 0 && result.socket_errors == 0 && misses == 0;
    Ok(match reference {
        Ok(nginx) => {
            let ratio = result.requests_per_sec / nginx.requests_per_sec;
            row.reference = format!("{} req/s (nginx)", report::rate(nginx.requests_per_sec));
            row.ratio = report::ratio(ratio);
            row.judged(ratio >= target && clean)
        }
        Err(na) => row.na(format!("no reference: {}", na.0)),
    })
}

/// Runs `wrk` at `url` and counts the calls made meanwhile to the proxy's `upstream` (there
/// must be none: a hit figure measured on misses is not a hit figure).
pub(super) async fn drive(
    lab: &mut Lab,
    url: &str,
    body: Option<&str>,
    upstream: Upstream,
) -> Result<Result<(WrkResult, u64), Na>> {
    let tool = match &lab.tools.wrk {
        Ok(tool) => tool.clone(),
        Err(na) => return Ok(Err(na.clone())),
    };
    let simulator = lab.simulator(upstream).await?;
    let before = lab.api.upstream_requests(simulator).await?;
    let load = Load {
        url,
        json_body: body,
        duration: lab.scale.wrk,
    };
    let result = wrk::run(&tool, lab.dir(), &load).await?;
    let misses = lab.api.upstream_requests(simulator).await? - before;
    Ok(Ok((result, misses)))
}

pub(super) fn misses_note(misses: u64) -> String {
    if misses == 0 {
        String::new()
    } else {
        format!("; {misses} upstream calls during the run")
    }
}

/// Looks the hot set up through `proxy` until a lookup is all cache hits, so no hit figure
/// is measured on misses.
pub(super) async fn warm_hot_set(lab: &Lab, proxy: ProxyRef) -> Result<()> {
    let sns = api::sns("HOT", HOT_SET);
    let limit = Duration::from_secs(10);
    lab.api.lookup(proxy.addr, &sns, limit).await?;
    let second = lab.api.lookup(proxy.addr, &sns, limit).await?;
    ensure!(
        second.summary.cache_hits == HOT_SET as u64,
        "the hot set is not cached in the {} proxy: a second lookup had {} cache hits of {HOT_SET}",
        proxy.kind.name(),
        second.summary.cache_hits
    );
    Ok(())
}

/// Checks that `GET path` on `server` answers 200 with `header: value`.
pub(super) async fn expect_hit(
    server: SocketAddr,
    name: &str,
    path: &str,
    header: &str,
    value: &str,
) -> Result<()> {
    let limit = Duration::from_secs(5);
    let mut conn = Conn::connect(server, limit).await?;
    let reply = conn.get(path, limit).await?;
    ensure!(
        reply.status == 200 && reply.header(header) == Some(value),
        "GET {path} on {name}: {} with {header}: {:?}, not a {value}",
        reply.status,
        reply.header(header)
    );
    Ok(())
}
