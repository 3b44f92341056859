//! Load shapes `wrk` cannot make: a burst of requests released together on connections
//! opened beforehand, to one server (P6) or several (the cross-instance row), and an open-loop schedule that sends at fixed times whatever the
//! answers do (P8).

use crate::http1::Conn;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
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
    /// From the moment the request was sent (connection included) to the whole response
    /// read.
    pub latency: Duration,
    /// When the response was complete, since the load started (for a burst: since that
    /// request was sent).
    pub done_at: Duration,
    /// From the moment the request was due to the moment it was sent: the load
    /// generator's own delay past its schedule, not part of `latency`.
    pub lag: Duration,
    /// The response carried `Retry-After`.
    pub retry_after: bool,
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
    let mut per_server = burst_over(&[addr], path, count, limit).await?;
    Ok(per_server.pop().unwrap_or_default())
}

/// The same burst over several servers: `per_server` connections to each, all released by
/// one barrier, so the servers see their requests at the same moment. The samples come back
/// by server, in the order of `addrs`.
///
/// # Errors
/// A connection cannot be opened or does not answer its health check.
pub async fn burst_over(
    addrs: &[SocketAddr],
    path: &str,
    per_server: usize,
    limit: Duration,
) -> Result<Vec<Vec<Sample>>> {
    let mut opened = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        opened.push(open(addr, per_server).await?);
    }
    let barrier = Arc::new(Barrier::new(per_server * addrs.len() + 1));
    let mut tasks = JoinSet::new();
    for (server, conns) in opened.into_iter().enumerate() {
        for mut conn in conns {
            let barrier = Arc::clone(&barrier);
            let path = path.to_owned();
            tasks.spawn(async move {
                barrier.wait().await;
                let start = Instant::now();
                let reply = conn.get(&path, limit).await;
                let reply = reply.map(|reply| (reply.status, false));
                (server, sample(reply, start, start, Duration::ZERO))
            });
        }
    }
    barrier.wait().await;
    let mut by_server = vec![Vec::with_capacity(per_server); addrs.len()];
    for (server, sample) in collect(tasks).await? {
        if let Some(samples) = by_server.get_mut(server) {
            samples.push(sample);
        }
    }
    Ok(by_server)
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

/// An open-loop load: requests due at fixed times, whatever became of the earlier ones.
pub struct OpenLoop {
    /// Requests per second.
    pub rate: f64,
    /// How long requests are sent for.
    pub duration: Duration,
    /// Connections opened before the start; more are opened when all are busy.
    pub connections: usize,
    /// The longest one request may take.
    pub limit: Duration,
}

/// Idle keep-alive connections shared by the open-loop tasks. The lock is never held
/// across an `.await`.
type Pool = Arc<Mutex<Vec<Conn>>>;

impl OpenLoop {
    /// Sends `GET path(i)` for request i at `start + i / rate`, each on its own task, so a
    /// slow answer never delays the schedule.
    ///
    /// # Errors
    /// The first connections cannot be opened.
    pub async fn run(
        &self,
        addr: SocketAddr,
        path: impl Fn(usize) -> String,
    ) -> Result<Vec<Sample>> {
        let pool: Pool = Arc::new(Mutex::new(open(addr, self.connections).await?));
        let total = (self.rate * self.duration.as_secs_f64()).round() as usize;
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / self.rate);
            tokio::time::sleep_until(due.into()).await;
            tasks.spawn(send(
                addr,
                path(i),
                Arc::clone(&pool),
                due,
                start,
                self.limit,
            ));
        }
        collect(tasks).await
    }
}

/// One open-loop request. Its latency counts from when this task got to send it, and the
/// generator's own delay past the schedule (timer ticks, CPU) is kept apart as `lag`, so the
/// table can show the server's share and the user's view (latency + lag) side by side.
async fn send(
    addr: SocketAddr,
    path: String,
    pool: Pool,
    due: Instant,
    start: Instant,
    limit: Duration,
) -> Sample {
    let sent = Instant::now();
    let lag = sent.saturating_duration_since(due);
    let idle = pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
    let conn = match idle {
        Some(conn) => Ok(conn),
        None => Conn::connect(addr, limit).await,
    };
    let reply = match conn {
        Ok(mut conn) => conn.get(&path, limit).await.map(|reply| {
            if !reply.close {
                pool.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(conn);
            }
            (reply.status, reply.header("retry-after").is_some())
        }),
        Err(err) => Err(err),
    };
    sample(reply, sent, start, lag)
}

fn sample(reply: Result<(u16, bool)>, sent: Instant, start: Instant, lag: Duration) -> Sample {
    let (status, retry_after) = match reply {
        Ok((status, retry_after)) => (Ok(status), retry_after),
        Err(err) => (Err(format!("{err:#}")), false),
    };
    Sample {
        status,
        latency: sent.elapsed(),
        done_at: start.elapsed(),
        lag,
        retry_after,
    }
}

async fn collect<T: 'static>(mut tasks: JoinSet<T>) -> Result<Vec<T>> {
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
