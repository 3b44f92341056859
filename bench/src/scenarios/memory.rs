//! P7: each proxy's resident memory after the throughput scenarios, and a huge streamed
//! lookup whose peak memory growth must stay well below the size of its response.

use crate::api::{self, Summary};
use crate::kinds::ProxyKind;
use crate::lab::Lab;
use crate::processes;
use crate::report::{self, Row};
use anyhow::{Context, Result, bail, ensure};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// P7's memory ceiling per proxy.
const RSS_LIMIT: u64 = 64 << 20;

/// P7's ceiling on memory growth during the stream, as a share of the response size.
const GROWTH_SHARE: f64 = 0.25;

/// How fast the stream is read: slow enough that a proxy which renders ahead of its reader
/// shows it in memory, fast enough for the time budget.
const READ_BYTES_PER_SEC: f64 = 20e6;

/// Batches the warm-up is sent in (the warmer proxy's `max_batch`).
const WARM_BATCH: usize = 10_000;

/// How often the proxy's RSS is sampled during the stream.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// One row per proxy started so far: `VmRSS` (judged) and `VmHWM` (shown).
pub fn rss(lab: &Lab) -> Vec<Row> {
    let proxies = lab.proxies();
    if proxies.is_empty() {
        let row = Row::new(7, "P7 RSS after P1–P5", "≤ 64 MiB");
        return vec![row.na("no proxy ran P1–P5 in this run")];
    }
    proxies
        .into_iter()
        .map(|proxy| {
            let mut row = Row::new(
                7,
                format!("P7 RSS after P1–P5, {} proxy", proxy.kind.name()),
                "≤ 64 MiB",
            );
            match processes::memory(proxy.pid) {
                Ok(memory) => {
                    row.figure = format!(
                        "VmRSS {} (peak VmHWM {})",
                        report::mib(memory.rss),
                        report::mib(memory.hwm)
                    );
                    row.reference = "64 MiB".to_owned();
                    row.ratio = report::ratio(memory.rss as f64 / RSS_LIMIT as f64);
                    row.judged(memory.rss <= RSS_LIMIT)
                }
                Err(err) => row.na(format!("{err:#}")),
            }
        })
        .collect()
}

/// The streamed lookup of `scale.p7_sns` cached SNs, with the proxy's RSS sampled meanwhile.
pub async fn stream(lab: &mut Lab) -> Result<Vec<Row>> {
    let n = lab.scale.p7_sns;
    let sns = api::sns("P7", n);
    // Filled through another proxy, so the measured one starts without the warm-up's garbage.
    warm(lab, &sns).await?;
    let proxy = lab
        .proxy(ProxyKind::Stream)
        .await?
        .map_err(|na| anyhow::anyhow!("the stream proxy cannot run: {}", na.0))?;
    // A small stream first: pools and buffers made once are not growth.
    let first = sns.get(..100).context("fewer than 100 SNs")?;
    streamed_lookup(lab.api.http(), proxy.addr, first, None).await?;
    let before = processes::memory(proxy.pid)?;
    let sampler = Sampler::start(proxy.pid);
    let outcome = streamed_lookup(lab.api.http(), proxy.addr, &sns, Some(READ_BYTES_PER_SEC)).await;
    let sampled_peak = sampler.stop().await;
    let streamed = outcome?;
    let after = processes::memory(proxy.pid)?;
    // VmHWM catches a peak between samples, but only if it rose during the stream.
    let peak = if after.hwm > before.hwm {
        after.hwm
    } else {
        sampled_peak.max(after.rss)
    };
    let growth = peak.saturating_sub(before.rss);
    let share = growth as f64 / streamed.bytes as f64;
    let label = format!("P7 stream {} cached SNs (ndjson)", report::count(n as u64));
    let mut row = Row::new(
        7,
        lab.scale.label(&label, "100,000"),
        "growth ≤ 0.25× response",
    );
    row.figure = format!(
        "peak RSS growth {} (from {}); {} lines, {} cache hits",
        report::mib(growth),
        report::mib(before.rss),
        report::count(streamed.lines),
        report::count(streamed.summary.cache_hits)
    );
    row.reference = format!("response {}", report::mib(streamed.bytes));
    row.ratio = report::ratio(share);
    let complete = streamed.lines == n as u64 + 1
        && streamed.summary.requested == n as u64
        && streamed.summary.cache_hits == n as u64;
    Ok(vec![row.judged(share <= GROWTH_SHARE && complete)])
}

/// Fills Redis with `sns` through the warmer proxy on the instant upstream.
async fn warm(lab: &mut Lab, sns: &[String]) -> Result<()> {
    let warmer = lab
        .proxy(ProxyKind::Warmer)
        .await?
        .map_err(|na| anyhow::anyhow!("the warmer proxy cannot run: {}", na.0))?;
    for batch in sns.chunks(WARM_BATCH) {
        let lookup = lab
            .api
            .lookup(warmer.addr, batch, Duration::from_secs(120))
            .await?;
        let resolved = lookup.summary.cache_hits + lookup.summary.upstream_fetches;
        ensure!(
            lookup.summary.errors == 0 && resolved == batch.len() as u64,
            "warming P7's SNs: {} errors, {resolved} of {} resolved",
            lookup.summary.errors,
            batch.len()
        );
    }
    Ok(())
}

/// What a streamed lookup delivered.
struct Streamed {
    bytes: u64,
    lines: u64,
    summary: Summary,
}

/// `POST` with `Accept: application/x-ndjson`, read to the end (at most `bytes_per_sec`),
/// counting lines and keeping only the last one, the summary.
async fn streamed_lookup(
    http: &reqwest::Client,
    proxy: SocketAddr,
    sns: &[String],
    bytes_per_sec: Option<f64>,
) -> Result<Streamed> {
    let body = serde_json::json!({ "sns": sns }).to_string();
    let mut response = http
        .post(format!("http://{proxy}/v1/discounts/lookup"))
        .header("content-type", "application/json")
        .header("accept", "application/x-ndjson")
        .body(body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .with_context(|| format!("streamed lookup of {} SNs", sns.len()))?;
    if !response.status().is_success() {
        bail!(
            "streamed lookup of {} SNs: {}",
            sns.len(),
            response.status()
        );
    }
    let start = Instant::now();
    let mut bytes = 0_u64;
    let mut lines = Lines::default();
    while let Some(chunk) = response.chunk().await.context("reading the stream")? {
        bytes += chunk.len() as u64;
        lines.feed(&chunk);
        if let Some(rate) = bytes_per_sec {
            let due = Duration::from_secs_f64(bytes as f64 / rate);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(ahead).await;
            }
        }
    }
    let (lines, last) = lines.finish();
    let value: serde_json::Value =
        serde_json::from_slice(&last).context("the stream's last line is not JSON")?;
    let summary = Summary::from_json(&value["summary"]).context("the stream's last line")?;
    Ok(Streamed {
        bytes,
        lines,
        summary,
    })
}

/// Counts the lines of a byte stream, keeping only the last one: the client must not hold
/// the response either, or its own memory would hide nothing but muddle the machine's.
#[derive(Default)]
struct Lines {
    count: u64,
    current: Vec<u8>,
    last: Vec<u8>,
}

impl Lines {
    fn feed(&mut self, chunk: &[u8]) {
        let mut pieces = chunk.split(|byte| *byte == b'\n');
        self.current
            .extend_from_slice(pieces.next().unwrap_or_default());
        for piece in pieces {
            self.count += 1;
            self.last = std::mem::replace(&mut self.current, piece.to_vec());
        }
    }

    /// The number of lines and the last one (an unterminated last line counts).
    fn finish(mut self) -> (u64, Vec<u8>) {
        if !self.current.is_empty() {
            self.count += 1;
            self.last = self.current;
        }
        (self.count, self.last)
    }
}

/// Samples a process's `VmRSS` in the background, keeping the highest.
struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<u64>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            let mut ticks = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {
                        if let Ok(memory) = processes::memory(pid) {
                            peak = peak.max(memory.rss);
                        }
                    }
                    _ = &mut stopped => return peak,
                }
            }
        });
        Self { stop, task }
    }

    /// Stops sampling; the highest RSS seen (0 if the task failed).
    async fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_across_chunks_and_the_last_is_kept() {
        let mut lines = Lines::default();
        lines.feed(b"{\"a\":1}\n{\"b\"");
        lines.feed(b":2}\n{\"summary\"");
        lines.feed(b":{}}\n");
        assert_eq!(lines.finish(), (3, b"{\"summary\":{}}".to_vec()));
    }

    #[test]
    fn an_unterminated_last_line_counts() {
        let mut lines = Lines::default();
        lines.feed(b"a\nb");
        assert_eq!(lines.finish(), (2, b"b".to_vec()));
    }
}
