//! The cluster row: all-hit batches of 100 and of 10,000 SNs through a proxy on a local
//! 3-master Redis Cluster, as a ratio to the same batches through a proxy on one standalone
//! Redis, both measured in this run. The two proxies differ only in `redis.mode`, so the ratio
//! is the cost of the cluster read path (a batch split over shards) on this machine.

use super::hits::{drive, misses_note};
use crate::api;
use crate::kinds::{CLUSTER_ROW_REDIS_TIMEOUT, ProxyKind, Upstream};
use crate::lab::{Lab, Na, ProxyRef};
use crate::load;
use crate::redis_cluster::MASTERS;
use crate::report::{self, Report, Row};
use crate::wrk::WrkResult;
use anyhow::{Result, bail, ensure};
use std::time::{Duration, Instant};

/// The rows' group: after P8's.
const GROUP: u8 = super::CLUSTER_GROUP;

/// SNs in the small and the large batch.
const SMALL: usize = 100;
const LARGE: usize = 10_000;

/// The small batch's target: at least half the standalone node's keys/s. The cluster runs on
/// the same cores as the one node, so it cannot be faster here; what it may cost is the batch
/// split into one command per shard (or slot) instead of one `MGET`. Half is the bar P1 sets
/// for the proxy against Redis itself: past it, cluster mode would need twice the proxies
/// for the same hit traffic.
const SMALL_TARGET: f64 = 0.5;

/// The large batch's target, for the same reason: at most twice the standalone's time per
/// 10,000-SN batch. A per-node pipeline of `GET`s makes three round trips where one node
/// makes twenty `MGET`s of 500; the request's parse and its 2 MB response are the same on
/// both, so a read path that doubles the batch's time spends more on the split than on the
/// rest of the request.
const LARGE_TARGET: f64 = 0.5;

/// How long warming a key set may take before the row fails.
const WARM_LIMIT: Duration = Duration::from_secs(60);

/// Between two warming lookups: write-backs of the first still landing.
const WARM_POLL: Duration = Duration::from_millis(50);

/// The longest one timed lookup may take.
const LOOKUP_LIMIT: Duration = Duration::from_secs(30);

/// The two proxies of the row.
#[derive(Clone, Copy)]
struct Pair {
    standalone: ProxyRef,
    cluster: ProxyRef,
}

/// Both rows: 100-SN batches under `wrk`, then sequential 10,000-SN batches.
pub async fn cluster(lab: &mut Lab, report: &mut Report) -> Result<Vec<Row>> {
    let small_row = Row::new(
        GROUP,
        "Cluster POST 100 hits, 3 masters vs 1 node (wrk -t2 -c64)",
        format!("≥ {SMALL_TARGET:.1}× standalone"),
    );
    let large_row = Row::new(
        GROUP,
        format!(
            "Cluster POST 10,000 hits, 3 masters vs 1 node ({} batches one at a time)",
            lab.scale.cluster_batches
        ),
        format!("≥ {LARGE_TARGET:.1}× standalone"),
    );
    let pair = match pair(lab).await? {
        Ok(pair) => pair,
        Err(na) => return Ok(vec![small_row.na(na.0.clone()), large_row.na(na.0)]),
    };
    let small = api::sns("CLS", SMALL);
    let large = api::sns("CLL", LARGE);
    for proxy in [pair.standalone, pair.cluster] {
        warm(lab, proxy, &small).await?;
        warm(lab, proxy, &large).await?;
    }
    spread_note(lab, report).await?;
    report.notes.push(format!(
        "Cluster: both proxies run with redis.timeout {CLUSTER_ROW_REDIS_TIMEOUT}, so a slow \
         read shows as time rather than as misses"
    ));
    let small_row = small_batches(lab, pair, &small, small_row).await?;
    let large_row = large_batches(lab, pair, &large, large_row).await?;
    Ok(vec![small_row, large_row])
}

/// The standalone and the cluster proxy, or why they cannot run.
async fn pair(lab: &mut Lab) -> Result<Result<Pair, Na>> {
    let standalone = match lab.proxy(ProxyKind::Standalone).await? {
        Ok(proxy) => proxy,
        Err(na) => return Ok(Err(na)),
    };
    let cluster = match lab.proxy(ProxyKind::Cluster).await? {
        Ok(proxy) => proxy,
        Err(na) => return Ok(Err(na)),
    };
    Ok(Ok(Pair {
        standalone,
        cluster,
    }))
}

/// Looks `sns` up through `proxy` until one lookup is all cache hits, so no figure of the row
/// is measured on misses.
async fn warm(lab: &Lab, proxy: ProxyRef, sns: &[String]) -> Result<()> {
    let deadline = Instant::now() + WARM_LIMIT;
    loop {
        let lookup = lab.api.lookup(proxy.addr, sns, LOOKUP_LIMIT).await?;
        let summary = lookup.summary;
        ensure!(
            summary.errors == 0,
            "warming {} SNs on the {} proxy: {} errors",
            sns.len(),
            proxy.kind.name(),
            summary.errors
        );
        if summary.cache_hits == sns.len() as u64 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} SNs are not all cached in the {} proxy after {WARM_LIMIT:?}: the last \
                 lookup had {} cache hits",
                sns.len(),
                proxy.kind.name(),
                summary.cache_hits
            );
        }
        tokio::time::sleep(WARM_POLL).await;
    }
}

/// Notes how the cached keys lie over the masters; fails unless every master holds some and
/// together they hold every SN of the row (the cluster proxy is its only writer).
async fn spread_note(lab: &mut Lab, report: &mut Report) -> Result<()> {
    let cli = match &lab.tools.redis_cli {
        Ok(cli) => cli.clone(),
        Err(na) => bail!("counting the cluster's keys: {}", na.0),
    };
    let cluster = match lab.cluster().await? {
        Ok(cluster) => cluster,
        Err(na) => bail!("counting the cluster's keys: {}", na.0),
    };
    let counts = cluster.key_counts(&cli).await?;
    let total: u64 = counts.iter().sum();
    let listed: Vec<String> = counts.iter().map(|&count| report::count(count)).collect();
    ensure!(
        counts.len() == MASTERS && counts.iter().all(|&count| count > 0),
        "the row's keys are not on every master: {}",
        listed.join(" / ")
    );
    ensure!(
        total == (SMALL + LARGE) as u64,
        "the cluster holds {total} keys, not the row's {}",
        SMALL + LARGE
    );
    report.notes.push(format!(
        "Cluster: the row's {} keys lie over the {MASTERS} masters as {}",
        report::count(total),
        listed.join(" / ")
    ));
    Ok(())
}

/// 100-SN batches under `wrk` on each proxy, standalone first; keys/s compared.
async fn small_batches(lab: &mut Lab, pair: Pair, sns: &[String], mut row: Row) -> Result<Row> {
    let body = serde_json::json!({ "sns": sns }).to_string();
    let url = |proxy: ProxyRef| format!("http://{}/v1/discounts/lookup", proxy.addr);
    let upstream = Upstream::Fast;
    let standalone = match drive(lab, &url(pair.standalone), Some(&body), upstream).await? {
        Ok(measured) => measured,
        Err(na) => return Ok(row.na(na.0)),
    };
    let cluster = match drive(lab, &url(pair.cluster), Some(&body), upstream).await? {
        Ok(measured) => measured,
        Err(na) => return Ok(row.na(na.0)),
    };
    let describe = |(result, misses): &(WrkResult, u64)| {
        format!(
            "{} keys/s ({} req/s), p99 {}{}{}",
            report::rate(result.requests_per_sec * SMALL as f64),
            report::rate(result.requests_per_sec),
            report::duration(result.p99),
            result.failures(),
            misses_note(*misses)
        )
    };
    row.figure = describe(&cluster);
    row.reference = format!("{} (1 node)", describe(&standalone));
    let clean = [&standalone, &cluster]
        .iter()
        .all(|(result, misses)| result.non_2xx == 0 && result.socket_errors == 0 && *misses == 0);
    let ratio = rate_ratio(cluster.0.requests_per_sec, standalone.0.requests_per_sec);
    Ok(judge(row, ratio, SMALL_TARGET, clean))
}

/// `cluster_batches` 10,000-SN lookups on each proxy, one at a time and taking turns, so both
/// see the same machine; their median times compared.
async fn large_batches(lab: &mut Lab, pair: Pair, sns: &[String], mut row: Row) -> Result<Row> {
    let simulator = lab.simulator(Upstream::Fast).await?;
    for proxy in [pair.standalone, pair.cluster] {
        lab.api.touch(proxy.addr).await?;
    }
    let before = lab.api.upstream_requests(simulator).await?;
    let mut standalone = Batches::default();
    let mut cluster = Batches::default();
    for _ in 0..lab.scale.cluster_batches {
        standalone.time(lab, pair.standalone, sns).await?;
        cluster.time(lab, pair.cluster, sns).await?;
    }
    let calls = lab.api.upstream_requests(simulator).await? - before;
    row.figure = format!("{}{}", cluster.describe(), misses_note(calls));
    row.reference = format!("{} (1 node)", standalone.describe());
    let clean = calls == 0 && standalone.misses == 0 && cluster.misses == 0;
    let ratio = rate_ratio(cluster.keys_per_sec(), standalone.keys_per_sec());
    Ok(judge(row, ratio, LARGE_TARGET, clean))
}

/// The timed lookups of one proxy.
#[derive(Debug, Default)]
struct Batches {
    /// Each lookup's time, send to last byte.
    walls: Vec<Duration>,
    /// SNs asked for over all lookups.
    keys: u64,
    /// SNs of those that were not cache hits.
    misses: u64,
}

impl Batches {
    async fn time(&mut self, lab: &Lab, proxy: ProxyRef, sns: &[String]) -> Result<()> {
        let lookup = lab.api.lookup(proxy.addr, sns, LOOKUP_LIMIT).await?;
        self.add(lookup.wall, sns.len() as u64, lookup.summary.cache_hits);
        Ok(())
    }

    fn add(&mut self, wall: Duration, keys: u64, hits: u64) {
        self.walls.push(wall);
        self.keys += keys;
        self.misses += keys.saturating_sub(hits);
    }

    /// The median lookup's time.
    fn median(&self) -> Duration {
        load::percentile(&self.walls, 50.0)
    }

    /// Keys per second at the median lookup's time.
    fn keys_per_sec(&self) -> f64 {
        let batches = self.walls.len().max(1) as f64;
        let per_batch = self.keys as f64 / batches;
        per_batch / self.median().as_secs_f64()
    }

    fn describe(&self) -> String {
        let misses = if self.misses == 0 {
            String::new()
        } else {
            format!("; {} SNs not cache hits", report::count(self.misses))
        };
        format!(
            "median {} per batch ({} keys/s), max {}{misses}",
            report::duration(self.median()),
            report::rate(self.keys_per_sec()),
            report::duration(self.walls.iter().max().copied().unwrap_or_default())
        )
    }
}

/// cluster ÷ standalone of two rates (higher is better for both); `None` when the standalone
/// rate is not a positive number, so no ratio is made up.
fn rate_ratio(cluster: f64, standalone: f64) -> Option<f64> {
    let ratio = cluster / standalone;
    (standalone > 0.0 && ratio.is_finite()).then_some(ratio)
}

/// Fills in the ratio and the verdict: pass when the ratio meets `target` and every request
/// was a clean all-hit answer.
fn judge(mut row: Row, ratio: Option<f64>, target: f64, clean: bool) -> Row {
    match ratio {
        Some(ratio) => {
            row.ratio = report::ratio(ratio);
            row.judged(ratio >= target && clean)
        }
        None => {
            row.ratio = "—".to_owned();
            row.judged(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Verdict;

    fn batches(millis: &[u64], keys: u64, hits: u64) -> Batches {
        let mut batches = Batches::default();
        for &ms in millis {
            batches.add(Duration::from_millis(ms), keys, hits);
        }
        batches
    }

    #[test]
    fn large_batches_are_judged_by_the_median_time() {
        let standalone = batches(&[20, 25, 900], 10_000, 10_000);
        let cluster = batches(&[50, 40, 60], 10_000, 10_000);
        assert_eq!(standalone.median(), Duration::from_millis(25));
        assert!((standalone.keys_per_sec() - 400_000.0).abs() < 1e-6);
        let ratio = rate_ratio(cluster.keys_per_sec(), standalone.keys_per_sec()).unwrap();
        assert!((ratio - 0.5).abs() < 1e-9, "{ratio}");
        let described = cluster.describe();
        assert!(described.contains("median 50.00 ms per batch (200.0 k keys/s), max 60.00 ms"));
        assert!(!described.contains("not cache hits"));
    }

    #[test]
    fn misses_are_counted_and_shown() {
        let cluster = batches(&[50, 50], 10_000, 9_990);
        assert_eq!(cluster.misses, 20);
        assert!(cluster.describe().ends_with("; 20 SNs not cache hits"));
    }

    #[test]
    fn the_ratio_is_cluster_over_standalone_and_never_made_up() {
        assert_eq!(rate_ratio(5.0, 10.0), Some(0.5));
        assert_eq!(rate_ratio(5.0, 0.0), None);
        assert_eq!(rate_ratio(f64::NAN, 10.0), None);
    }

    #[test]
    fn a_row_passes_only_at_its_target_with_clean_answers() {
        let row = || Row::new(GROUP, "Cluster", "≥ 0.5×");
        let pass = |row: Row| matches!(row.verdict, Verdict::Pass);
        let at_target = judge(row(), Some(0.5), 0.5, true);
        assert_eq!(at_target.ratio, "0.50×");
        assert!(pass(at_target));
        assert!(!pass(judge(row(), Some(0.49), 0.5, true)));
        assert!(!pass(judge(row(), Some(0.9), 0.5, false)));
        assert!(!pass(judge(row(), None, 0.5, true)));
    }
}
