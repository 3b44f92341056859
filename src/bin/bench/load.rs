//! Load shapes `wrk` cannot make: a burst of requests released together on connections
//! opened beforehand (P6).

use crate::http1::Conn;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

/// How many connections are opened at once while preparing a burst.
const CONNECT_WAVE: usize = 100;

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The status, or the transport error.
    pub status: Result<u16, String>,
    /// From the moment the request was sent to the whole response read.
    pub latency: Duration,
}

/// Opens `count` keep-alive connections (each proven with `GET /healthz`), then sends
/// `GET path` on all of them at once and times each.
///
/// # Errors
/// A connection cannot be opened or does not answer its health check.
pub async fn burst(
    addr: SocketAddr,
    path: &str,
    count: usize,
    limit: Duration,
) -> Result<Vec<Sample>> {
    let conns = open(addr, count).await?;
    let barrier = Arc::new(Barrier::new(count + 1));
    let mut tasks = JoinSet::new();
    for mut conn in conns {
        let barrier = Arc::clone(&barrier);
        let path = path.to_owned();
        tasks.spawn(async move {
            barrier.wait().await;
            let start = Instant::now();
            let reply = conn.get(&path, limit).await;
            Sample {
                status: reply
                    .map(|reply| reply.status)
                    .map_err(|err| format!("{err:#}")),
                latency: start.elapsed(),
            }
        });
    }
    barrier.wait().await;
    collect(tasks).await
}

/// Opens `count` connections in waves, each checked with `GET /healthz`, so connection
/// set-up is over before any timing starts.
async fn open(addr: SocketAddr, count: usize) -> Result<Vec<Conn>> {
    let limit = Duration::from_secs(10);
    let mut conns = Vec::with_capacity(count);
    while conns.len() < count {
        let mut wave = JoinSet::new();
        for _ in 0..CONNECT_WAVE.min(count - conns.len()) {
            wave.spawn(async move {
                let mut conn = Conn::connect(addr, limit).await?;
                let reply = conn.get("/healthz", limit).await?;
                anyhow::ensure!(reply.status == 200, "GET /healthz: {}", reply.status);
                Ok(conn)
            });
        }
        while let Some(joined) = wave.join_next().await {
            let conn = joined
                .context("a connecting task failed")?
                .with_context(|| format!("opening connection {} of {count}", conns.len() + 1))?;
            conns.push(conn);
        }
    }
    Ok(conns)
}

async fn collect(mut tasks: JoinSet<Sample>) -> Result<Vec<Sample>> {
    let mut samples = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        samples.push(joined.context("a request task failed")?);
    }
    Ok(samples)
}

/// The `p`-th percentile (0–100) of `values` by nearest rank; zero when empty.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&values, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
    }
}
