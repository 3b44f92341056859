//! The core of the proxy: dedup → one cache read → bounded upstream fetch of the misses →
//! one write-back. Every requested SN comes back exactly once with a value or a status.

use crate::cache::{Cache, Entry, EntryKind, Write};
use crate::health::Health;
use crate::sn::{self, SnError};
use crate::upstream::{Fetched, UpstreamClient, UpstreamError};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// How long answers are kept and how long a lookup may take.
#[derive(Debug, Clone)]
pub struct LookupSettings {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub request_timeout: Duration,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Upstream,
    Stale,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Upstream => "upstream",
            Self::Stale => "stale",
        }
    }
}

/// Why one SN of a batch has no answer; the others are unaffected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ItemError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the request's deadline passed before the upstream answered")]
    DeadlineExceeded,
}

impl ItemError {
    /// The API error code, from API.md's table of item codes.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Upstream(err) => err.code(),
            Self::DeadlineExceeded => "deadline_exceeded",
        }
    }
}

/// What happened to one distinct SN.
#[derive(Debug, Clone)]
pub enum Outcome {
    Found { discount: Bytes, source: Source },
    NotFound { source: Source },
    Invalid(SnError),
    Failed(ItemError),
}

/// The `summary` of a batch response; counts are over distinct SNs.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub requested: usize,
    pub unique: usize,
    pub cache_hits: usize,
    pub upstream_fetches: usize,
    pub stale: usize,
    pub not_found: usize,
    pub errors: usize,
    pub invalid: usize,
    pub elapsed_ms: u64,
}

/// A resolved batch: each distinct SN once, and for each requested position which one it is.
#[derive(Debug)]
pub struct Batch {
    pub distinct: Vec<String>,
    pub outcomes: Vec<Outcome>,
    /// `order[i]` is the index in `distinct` of the `i`-th requested SN.
    pub order: Vec<usize>,
    pub summary: Summary,
}

impl Batch {
    /// The results in request order, duplicates repeated.
    pub fn in_request_order(&self) -> impl Iterator<Item = (&str, &Outcome)> {
        self.order
            .iter()
            .map(|&i| (self.distinct[i].as_str(), &self.outcomes[i]))
    }
}

/// The lookup service, shared by every request.
pub struct Lookup {
    cache: Arc<dyn Cache>,
    upstream: Arc<UpstreamClient>,
    health: Arc<Health>,
    settings: LookupSettings,
    /// Fetches and write-backs run here, so a client that goes away does not cancel them and
    /// shutdown can wait for them.
    tasks: TaskTracker,
}

impl Lookup {
    pub fn new(
        cache: Arc<dyn Cache>,
        upstream: Arc<UpstreamClient>,
        health: Arc<Health>,
        settings: LookupSettings,
    ) -> Self {
        Self {
            cache,
            upstream,
            health,
            settings,
            tasks: TaskTracker::new(),
        }
    }

    pub fn cache(&self) -> &Arc<dyn Cache> {
        &self.cache
    }

    /// Resolves a batch. With `refresh`, the cache is not read, every SN is fetched.
    pub async fn resolve(&self, requested: Vec<String>, refresh: bool) -> Batch {
        let started = Instant::now();
        let deadline = started + self.settings.request_timeout;
        let (distinct, order) = dedup(requested);
        let mut outcomes: Vec<Option<Outcome>> = vec![None; distinct.len()];
        let mut valid = Vec::with_capacity(distinct.len());
        for (index, sn) in distinct.iter().enumerate() {
            match sn::validate(sn) {
                Ok(()) => valid.push(index),
                Err(err) => outcomes[index] = Some(Outcome::Invalid(err)),
            }
        }
        let misses = if refresh {
            valid
        } else {
            self.read_cache(&distinct, valid, deadline, &mut outcomes)
                .await
        };
        let upstream_fetches = misses.len();
        if !misses.is_empty() {
            self.fetch_misses(&distinct, &misses, deadline, &mut outcomes)
                .await;
        }
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or(Outcome::Failed(ItemError::DeadlineExceeded)))
            .collect();
        let summary = summarize(order.len(), &outcomes, upstream_fetches, started.elapsed());
        Batch {
            distinct,
            outcomes,
            order,
            summary,
        }
    }

    /// Fills in the hits; returns the indices still to fetch. A cache failure is logged and
    /// counted, and then every SN is a miss: the upstream answers instead.
    async fn read_cache(
        &self,
        distinct: &[String],
        candidates: Vec<usize>,
        deadline: Instant,
        outcomes: &mut [Option<Outcome>],
    ) -> Vec<usize> {
        if candidates.is_empty() {
            return candidates;
        }
        let sns: Vec<&str> = candidates.iter().map(|&i| distinct[i].as_str()).collect();
        let read = tokio::time::timeout_at(deadline, self.cache.get_many(&sns)).await;
        let values = match read {
            Ok(Ok(values)) => values,
            Ok(Err(err)) => {
                self.health.record_redis_error();
                warn!(error = %err, sns = sns.len(), "cache read failed; fetching from the upstream");
                return candidates;
            }
            Err(_) => {
                self.health.record_redis_error();
                warn!(sns = sns.len(), "cache read outlived the request deadline");
                return candidates;
            }
        };
        let mut misses = Vec::new();
        for (index, value) in candidates.into_iter().zip(values) {
            match value.map(Entry::decode) {
                Some(Ok(entry)) => outcomes[index] = Some(hit(&entry)),
                Some(Err(err)) => {
                    warn!(sn = %distinct[index], error = %err, "unreadable cache entry; refetching");
                    misses.push(index);
                }
                None => misses.push(index),
            }
        }
        misses
    }

    /// Fetches the misses in a tracked task and collects its answers until the deadline.
    async fn fetch_misses(
        &self,
        distinct: &[String],
        misses: &[usize],
        deadline: Instant,
        outcomes: &mut [Option<Outcome>],
    ) {
        let jobs: Vec<(usize, String)> = misses.iter().map(|&i| (i, distinct[i].clone())).collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let fetcher = Fetcher {
            cache: Arc::clone(&self.cache),
            upstream: Arc::clone(&self.upstream),
            health: Arc::clone(&self.health),
            settings: self.settings.clone(),
        };
        self.tasks.spawn(fetcher.fetch_and_write_back(jobs, tx));
        // The channel closes only after the write-back, so a response never races its own
        // write-back: the next lookup of the same SNs is a hit.
        while let Ok(Some((index, result))) = tokio::time::timeout_at(deadline, rx.recv()).await {
            outcomes[index] = Some(match result {
                Ok(Fetched::Found(discount)) => Outcome::Found {
                    discount,
                    source: Source::Upstream,
                },
                Ok(Fetched::NotFound) => Outcome::NotFound {
                    source: Source::Upstream,
                },
                Err(err) => Outcome::Failed(ItemError::Upstream(err)),
            });
        }
    }

    /// Removes SNs from the cache; returns how many were cached.
    ///
    /// # Errors
    /// The cache could not be reached: the caller must not claim they were removed.
    pub async fn invalidate(&self, sns: &[&str]) -> Result<u64, crate::cache::CacheError> {
        self.cache
            .delete_many(sns)
            .await
            .inspect_err(|_| self.health.record_redis_error())
    }

    /// Stops taking new background work and waits (up to `grace`) for what is under way.
    /// Returns whether everything finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

/// What a fetch task needs, owned, so it outlives the request that started it.
struct Fetcher {
    cache: Arc<dyn Cache>,
    upstream: Arc<UpstreamClient>,
    health: Arc<Health>,
    settings: LookupSettings,
}

type FetchResult = (usize, Result<Fetched, UpstreamError>);

impl Fetcher {
    async fn fetch_and_write_back(
        self,
        jobs: Vec<(usize, String)>,
        tx: mpsc::UnboundedSender<FetchResult>,
    ) {
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
        while let Some((index, sn, result)) = pending.next().await {
            self.health.record_upstream(result.is_ok());
            match &result {
                Ok(fetched) => writes.push(self.write_for(sn, fetched)),
                Err(err) => warn!(sn = %sn, error = %err, "upstream fetch failed; not cached"),
            }
            // The receiver is gone when the client left or the deadline passed: keep going,
            // the write-back still makes the next lookup a hit.
            let _ = tx.send((index, result));
        }
        drop(pending);
        self.write_back(&writes).await;
    }

    fn write_for(&self, sn: String, fetched: &Fetched) -> Write {
        let now = SystemTime::now();
        let (entry, ttl) = match fetched {
            Fetched::Found(json) => (Entry::found(json, now), self.settings.ttl),
            Fetched::NotFound => (Entry::not_found(now), self.settings.negative_ttl),
        };
        Write {
            sn,
            value: entry.encoded().clone(),
            ttl: jittered(ttl),
        }
    }

    async fn write_back(&self, writes: &[Write]) {
        if writes.is_empty() {
            return;
        }
        match self.cache.set_many(writes).await {
            Ok(()) => debug!(keys = writes.len(), "write-back done"),
            Err(err) => {
                self.health.record_redis_error();
                warn!(error = %err, keys = writes.len(), "write-back failed; the next lookup refetches");
            }
        }
    }
}

fn hit(entry: &Entry) -> Outcome {
    match (entry.kind(), entry.discount()) {
        (EntryKind::Found, Some(discount)) => Outcome::Found {
            discount,
            source: Source::Cache,
        },
        _ => Outcome::NotFound {
            source: Source::Cache,
        },
    }
}

/// ±10% on every TTL, so keys written together do not all expire together.
pub fn jittered(ttl: Duration) -> Duration {
    ttl.mul_f64(0.9 + 0.2 * fastrand::f64())
}

/// Each distinct SN once, in first-seen order, and the index of each requested SN in it.
fn dedup(requested: Vec<String>) -> (Vec<String>, Vec<usize>) {
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(requested.len());
    let mut distinct = Vec::with_capacity(requested.len());
    let order = requested
        .into_iter()
        .map(|sn| {
            *seen.entry(sn).or_insert_with_key(|sn| {
                distinct.push(sn.clone());
                distinct.len() - 1
            })
        })
        .collect();
    (distinct, order)
}

fn summarize(
    requested: usize,
    outcomes: &[Outcome],
    upstream_fetches: usize,
    elapsed: Duration,
) -> Summary {
    let mut summary = Summary {
        requested,
        unique: outcomes.len(),
        upstream_fetches,
        elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        ..Summary::default()
    };
    for outcome in outcomes {
        match outcome {
            Outcome::Found { source, .. } | Outcome::NotFound { source } => {
                match source {
                    Source::Cache => summary.cache_hits += 1,
                    Source::Stale => summary.stale += 1,
                    Source::Upstream => {}
                }
                if matches!(outcome, Outcome::NotFound { .. }) {
                    summary.not_found += 1;
                }
            }
            Outcome::Invalid(_) => summary.invalid += 1,
            Outcome::Failed(_) => summary.errors += 1,
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keeps_first_seen_order_and_maps_every_position() {
        let requested = ["b", "a", "b", "c", "a"].map(String::from).to_vec();
        let (distinct, order) = dedup(requested);
        assert_eq!(distinct, ["b", "a", "c"]);
        assert_eq!(order, [0, 1, 0, 2, 1]);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let ttl = Duration::from_secs(1000);
        for _ in 0..1000 {
            let jittered = jittered(ttl);
            assert!(jittered >= Duration::from_secs(900) && jittered <= Duration::from_secs(1100));
        }
    }
}
