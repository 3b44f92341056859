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
use tokio::time::Instant;
use tracing::{debug, warn};

/// What a fetch task needs, owned, so it outlives the request that started it.
pub(super) struct Fetcher {
    pub(super) cache: Arc<dyn Cache>,
    pub(super) upstream: Arc<UpstreamClient>,
    pub(super) health: Arc<Health>,
    pub(super) settings: LookupSettings,
    pub(super) invalidations: Arc<Invalidations>,
}

/// Answers wait at most this long for their write-back: a batch that resolves together is
/// written in one pipeline, while early answers of a slow batch are not held back by the
/// slowest SN (nor lost to the cache when the request's deadline passes).
const WRITE_BACK_DELAY: Duration = Duration::from_millis(50);

/// One answer for the waiting request: the SN's index in the batch, and the result.
pub(super) type FetchResult = (usize, Result<Fetched, UpstreamError>);

impl Fetcher {
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
        let mut writes = Vec::new();
        let mut flush_at: Option<Instant> = None;
        while let Some((index, sn, result)) = self
            .next_answer(&mut pending, &mut writes, &mut flush_at)
            .await
        {
            self.health.record_upstream(result.is_ok());
            match &result {
                Ok(fetched) => {
                    if let Some(write) = self.write_for(sn, fetched, started) {
                        writes.push(write);
                        flush_at.get_or_insert_with(|| Instant::now() + WRITE_BACK_DELAY);
                    }
                }
                Err(err) => warn!(sn = %sn, error = %err, "upstream fetch failed; not cached"),
            }
            if writes.len() >= self.settings.write_batch {
                self.write_back(std::mem::take(&mut writes)).await;
                flush_at = None;
            }
            // The receiver is gone when the client left or the deadline passed: keep going,
            // the write-back still makes the next lookup a hit.
            let _ = tx.send((index, result));
        }
        drop(pending);
        self.write_back(writes).await;
    }

    /// The next answer; while waiting for it, writes back what has waited long enough.
    async fn next_answer<S: Stream + Unpin>(
        &self,
        pending: &mut S,
        writes: &mut Vec<Write>,
        flush_at: &mut Option<Instant>,
    ) -> Option<S::Item> {
        loop {
            let Some(at) = *flush_at else {
                return pending.next().await;
            };
            tokio::select! {
                next = pending.next() => return next,
                () = tokio::time::sleep_until(at) => {
                    self.write_back(std::mem::take(writes)).await;
                    *flush_at = None;
                }
            }
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

    async fn write_back(&self, writes: Vec<Write>) {
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
pub fn jittered(ttl: Duration) -> Duration {
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
