//! The background half of a lookup: fetch the misses under the global limit, hand each
//! answer to the waiting request, write the definite ones back in pipelines as they come.

use super::invalidations::Invalidations;
use crate::cache::{Cache, Entry, Write};
use crate::health::Health;
use crate::lookup::LookupSettings;
use crate::upstream::{Fetched, UpstreamClient, UpstreamError};
use futures_util::stream::FuturesUnordered;
use futures_util::{Stream, StreamExt};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// What a fetch task needs, owned, so it outlives the request that started it.
pub(super) struct Fetcher {
    pub(super) cache: Arc<dyn Cache>,
    pub(super) upstream: Arc<UpstreamClient>,
    pub(super) health: Arc<Health>,
    pub(super) settings: LookupSettings,
    pub(super) invalidations: Arc<Invalidations>,
    /// Write-backs run as tasks of their own here, so shutdown waits for them too.
    pub(super) tasks: TaskTracker,
}

/// Answers wait at most this long for their write-back: a batch that resolves together is
/// written in one pipeline, while early answers of a slow batch are not held back by the
/// slowest SN (nor lost to the cache when the request's deadline passes).
const WRITE_BACK_DELAY: Duration = Duration::from_millis(50);

/// One answer for the waiting request: the SN's index in the batch, and the result.
pub(super) type FetchResult = (usize, Result<Fetched, UpstreamError>);

impl Fetcher {
    /// Fetches every job, sends each answer to `tx` as it comes, and writes the definite ones
    /// back. `tx` is dropped only after the last write-back, so the request can wait for it.
    pub(super) async fn fetch_and_write_back(
        self,
        jobs: Vec<(usize, String)>,
        tx: mpsc::UnboundedSender<FetchResult>,
    ) {
        let started = Instant::now();
        let mut pending: FuturesUnordered<_> = jobs
            .into_iter()
            .map(|(index, sn)| {
                let upstream = &self.upstream;
                async move {
                    let result = upstream.fetch(&sn).await;
                    (index, sn, result)
                }
            })
            .collect();
        let mut writes = PendingWrites::new(
            self.writer(started),
            self.tasks.clone(),
            self.settings.write_batch,
        );
        while let Some((index, sn, result)) = next_answer(&mut pending, &mut writes).await {
            self.health.record_upstream(result.is_ok());
            let write = match &result {
                Ok(fetched) => self.write_for(sn, fetched, started),
                Err(err) => {
                    warn!(sn = %sn, error = %err, "upstream fetch failed; not cached");
                    None
                }
            };
            // The answer goes out first, never behind Redis. The receiver is gone when the
            // client left or the deadline passed: keep going, the write-back still counts.
            let _ = tx.send((index, result));
            if let Some(write) = write {
                writes.push(write);
            }
        }
        drop(pending);
        writes.finish().await;
    }

    fn writer(&self, started: Instant) -> Writer {
        Writer {
            cache: Arc::clone(&self.cache),
            health: Arc::clone(&self.health),
            invalidations: Arc::clone(&self.invalidations),
            started,
        }
    }

    /// The write for one answer, unless the SN was invalidated since the fetch began.
    fn write_for(&self, sn: String, fetched: &Fetched, started: Instant) -> Option<Write> {
        if self.invalidations.since(&sn, started) {
            debug!(sn = %sn, "invalidated during its fetch; not cached");
            return None;
        }
        let now = SystemTime::now();
        let (entry, ttl) = match fetched {
            Fetched::Found(json) => (Entry::found(json, now), self.settings.ttl),
            Fetched::NotFound => (Entry::not_found(now), self.settings.negative_ttl),
        };
        Some(Write {
            sn,
            value: entry.encoded().clone(),
            ttl: jittered(ttl),
        })
    }
}

/// The next answer; while waiting for it, sends off the writes that have waited long enough.
async fn next_answer<S: Stream + Unpin>(
    pending: &mut S,
    writes: &mut PendingWrites,
) -> Option<S::Item> {
    loop {
        let Some(at) = writes.flush_at else {
            return pending.next().await;
        };
        tokio::select! {
            next = pending.next() => return next,
            () = tokio::time::sleep_until(at) => writes.flush(),
        }
    }
}

/// Writes gathered into pipelines. Each pipeline runs as its own task, so a slow Redis
/// never stops the fetch loop from collecting answers (and releasing upstream slots).
struct PendingWrites {
    writes: Vec<Write>,
    flush_at: Option<Instant>,
    flushes: Vec<JoinHandle<()>>,
    writer: Writer,
    tasks: TaskTracker,
    max: usize,
}

impl PendingWrites {
    fn new(writer: Writer, tasks: TaskTracker, max: usize) -> Self {
        Self {
            writes: Vec::new(),
            flush_at: None,
            flushes: Vec::new(),
            writer,
            tasks,
            max: max.max(1),
        }
    }

    fn push(&mut self, write: Write) {
        self.writes.push(write);
        self.flush_at
            .get_or_insert_with(|| Instant::now() + WRITE_BACK_DELAY);
        if self.writes.len() >= self.max {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.flush_at = None;
        if self.writes.is_empty() {
            return;
        }
        let writes = std::mem::take(&mut self.writes);
        self.flushes
            .push(self.tasks.spawn(self.writer.clone().write(writes)));
    }

    /// Sends what is left and waits for every pipeline of this batch.
    async fn finish(mut self) {
        self.flush();
        for flush in self.flushes {
            let _ = flush.await;
        }
    }
}

/// Writes one pipeline, counting and logging a failure: it is never the request's failure.
#[derive(Clone)]
struct Writer {
    cache: Arc<dyn Cache>,
    health: Arc<Health>,
    invalidations: Arc<Invalidations>,
    started: Instant,
}

impl Writer {
    async fn write(self, mut writes: Vec<Write>) {
        // Checked again right before the SET: an invalidation may have come in meanwhile.
        writes.retain(|write| !self.invalidations.since(&write.sn, self.started));
        if writes.is_empty() {
            return;
        }
        match self.cache.set_many(&writes).await {
            Ok(()) => debug!(keys = writes.len(), "write-back done"),
            Err(err) => {
                self.health.record_redis_error();
                warn!(error = %err, keys = writes.len(), "write-back failed; the next lookup refetches");
            }
        }
    }
}

/// ±10% on every TTL, so keys written together do not all expire together.
fn jittered(ttl: Duration) -> Duration {
    ttl.mul_f64(0.9 + 0.2 * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let ttl = Duration::from_secs(1000);
        for _ in 0..1000 {
            let jittered = jittered(ttl);
            assert!(jittered >= Duration::from_secs(900) && jittered <= Duration::from_secs(1100));
        }
    }
}
