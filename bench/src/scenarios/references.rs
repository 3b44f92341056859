//! The references the hit paths are held to, each measured once in the run that needs it:
//! Redis's own MGET and GET of the keys the proxy stored, and nginx `proxy_cache`.

use super::hits::{HOT_SET, drive, expect_hit, warm_hot_set};
use crate::api;
use crate::http1::Conn;
use crate::kinds::{ProxyKind, Upstream};
use crate::lab::{KEY_PREFIX, Lab, Na};
use crate::redis_bench;
use crate::report::{self, Report, Row, Verdict};
use crate::wrk::WrkResult;
use anyhow::{Context, Result, bail};
use std::time::Duration;

/// The reference figures, each measured once, the first time a scenario needs it.
#[derive(Default)]
pub struct References {
    mget_keys_per_sec: Option<Result<f64, Na>>,
    nginx: Option<Result<WrkResult, Na>>,
}

/// The labels of the reference rows, also used when a reference cannot be measured.
const MGET_LABEL: &str = "Redis MGET of the 100 hot keys, 32 clients";
const GET_LABEL: &str = "Redis GET of one hot key, 32 clients";
const NGINX_LABEL: &str = "nginx proxy_cache hit, GET 1 SN (wrk -t2 -c64)";

impl References {
    /// Redis's MGET-100 throughput in keys/s on the hot keys (adds the Redis rows).
    pub async fn mget(&mut self, lab: &mut Lab, report: &mut Report) -> Result<f64, Na> {
        if self.mget_keys_per_sec.is_none() {
            let measured = redis_ceiling(lab, report).await;
            let labels = [MGET_LABEL, GET_LABEL];
            self.mget_keys_per_sec = Some(settle(measured, &labels, report));
        }
        self.mget_keys_per_sec
            .clone()
            .unwrap_or_else(|| Err(Na("not measured".to_owned())))
    }

    /// nginx's single-key hit throughput (adds the nginx row).
    pub async fn nginx(&mut self, lab: &mut Lab, report: &mut Report) -> Result<WrkResult, Na> {
        if self.nginx.is_none() {
            let measured = nginx_reference(lab, report).await;
            self.nginx = Some(settle(measured, &[NGINX_LABEL], report));
        }
        self.nginx
            .clone()
            .unwrap_or_else(|| Err(Na("not measured".to_owned())))
    }
}

/// A reference that could not be measured still gets its rows: n/a with the reason, or
/// failed with the error in the notes.
fn settle<T>(
    measured: Result<Result<T, Na>>,
    labels: &[&str],
    report: &mut Report,
) -> Result<T, Na> {
    match measured {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(na)) => {
            for label in labels {
                report.push(Row::new(0, *label, "reference").na(na.0.clone()));
            }
            Err(na)
        }
        Err(err) => {
            report.error(Row::new(0, labels.join("; "), "reference"), &err);
            Err(Na("the reference failed".to_owned()))
        }
    }
}

/// Redis's MGET of the 100 hot keys and GET of one, as the proxy stored them.
async fn redis_ceiling(lab: &mut Lab, report: &mut Report) -> Result<Result<f64, Na>> {
    let (bench, cli) = match (&lab.tools.redis_benchmark, &lab.tools.redis_cli) {
        (Ok(bench), Ok(cli)) => (bench.clone(), cli.clone()),
        (Err(na), _) | (_, Err(na)) => return Ok(Err(na.clone())),
    };
    // The keys exist only once a proxy has stored them.
    let proxy = match lab.proxy(ProxyKind::RedisOnly).await? {
        Ok(proxy) => proxy,
        Err(na) => return Ok(Err(na)),
    };
    warm_hot_set(lab, proxy).await?;
    let keys = redis_bench::scan(&cli, lab.redis_addr, &format!("{KEY_PREFIX}HOT-*")).await?;
    if keys.len() != HOT_SET {
        bail!("SCAN found {} hot keys, not {HOT_SET}", keys.len());
    }
    let first = keys.first().context("no hot key")?.clone();
    let value_bytes = redis_bench::strlen(&cli, lab.redis_addr, &first).await?;
    let mget: Vec<String> = std::iter::once("MGET".to_owned()).chain(keys).collect();
    let result = redis_bench::run(&bench, lab.redis_addr, lab.scale.mget_requests, &mget).await?;
    let keys_per_sec = result.rps * HOT_SET as f64;
    report.push(reference_row(
        format!("{MGET_LABEL} ({value_bytes} B values)"),
        format!(
            "{} keys/s ({} MGET/s){}",
            report::rate(keys_per_sec),
            report::rate(result.rps),
            p99_ms(result.p99_ms)
        ),
    ));
    let get = ["GET".to_owned(), first];
    let result = redis_bench::run(&bench, lab.redis_addr, lab.scale.get_requests, &get).await?;
    report.push(reference_row(
        GET_LABEL.to_owned(),
        format!(
            "{} GET/s{}",
            report::rate(result.rps),
            p99_ms(result.p99_ms)
        ),
    ));
    Ok(Ok(keys_per_sec))
}

/// nginx `proxy_cache` answering one cached SN, driven like P3.
async fn nginx_reference(lab: &mut Lab, report: &mut Report) -> Result<Result<WrkResult, Na>> {
    let addr = match lab.nginx().await? {
        Ok(addr) => addr,
        Err(na) => return Ok(Err(na)),
    };
    let path = format!("/contract/?sn={}", api::sns("HOT", 1).concat());
    // The first GET fills nginx's cache; the reference must be measured on hits too.
    let limit = Duration::from_secs(5);
    Conn::connect(addr, limit).await?.get(&path, limit).await?;
    expect_hit(addr, "nginx", &path, "x-cache", "HIT").await?;
    let (result, _) =
        match drive(lab, &format!("http://{addr}{path}"), None, Upstream::Normal).await? {
            Ok(measured) => measured,
            Err(na) => return Ok(Err(na)),
        };
    report.push(reference_row(
        NGINX_LABEL.to_owned(),
        format!(
            "{} req/s, p99 {}{}",
            report::rate(result.requests_per_sec),
            report::duration(result.p99),
            result.failures()
        ),
    ));
    Ok(Ok(result))
}

fn reference_row(scenario: String, figure: String) -> Row {
    let mut row = Row::new(0, scenario, "reference");
    row.figure = figure;
    row.verdict = Verdict::Reference;
    row
}

fn p99_ms(p99: Option<f64>) -> String {
    p99.map(|ms| format!(", p99 {ms:.2} ms"))
        .unwrap_or_default()
}
