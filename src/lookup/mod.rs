//! The core of the proxy: dedup → one cache read → bounded upstream fetch of the misses →
//! write-back as answers arrive. Every requested SN comes back exactly once, with a value or
//! a status.

mod fetch;
mod invalidations;
mod outcome;

pub use self::outcome::{Batch, ItemError, Outcome, Source, Summary};

use self::fetch::Fetcher;
use self::invalidations::Invalidations;
use self::outcome::summarize;
use crate::cache::{Cache, Entry, EntryKind};
use crate::health::Health;
use crate::sn;
use crate::upstream::{Fetched, UpstreamClient};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// How long answers are kept, how long a lookup may take, how writes are grouped.
#[derive(Debug, Clone)]
pub struct LookupSettings {
    /// How long a written-back discount stays fresh (`cache.ttl`, jittered per key).
    pub ttl: Duration,
    /// How long a written-back `not_found` is remembered (`cache.negative_ttl`).
    pub negative_ttl: Duration,
    /// Deadline of one lookup, from the request's arrival (`server.request_timeout`).
    pub request_timeout: Duration,
    /// Most answers in one write-back pipeline.
    pub write_batch: usize,
}

/// The lookup service, shared by every request.
pub struct Lookup {
    cache: Arc<dyn Cache>,
    upstream: Arc<UpstreamClient>,
    health: Arc<Health>,
    settings: LookupSettings,
    invalidations: Arc<Invalidations>,
    /// Fetches and write-backs run here, so a client that goes away does not cancel them and
    /// shutdown can wait for them.
    tasks: TaskTracker,
}

impl Lookup {
    /// The lookup core over a cache and an upstream client, reporting into `health`.
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
            invalidations: Arc::default(),
            tasks: TaskTracker::new(),
        }
    }

    /// The cache lookups read and write, for `/readyz` and start-up logs.
    pub fn cache(&self) -> &Arc<dyn Cache> {
        &self.cache
    }

    /// Resolves a batch for a request that arrived at `arrived` (its deadline counts from
    /// then). With `refresh`, the cache is not read, every SN is fetched.
    pub async fn resolve(&self, requested: Vec<String>, refresh: bool, arrived: Instant) -> Batch {
        let deadline = arrived + self.settings.request_timeout;
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
        let summary = summarize(order.len(), &outcomes, upstream_fetches, arrived.elapsed());
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
        let Ok(read) = read else {
            // The request's own deadline ran out, not Redis's timeout: Redis is not to blame.
            debug!(sns = sns.len(), "the deadline passed during the cache read");
            return candidates;
        };
        // A failed chunk leaves only its own keys as misses; the rest are still hits.
        for err in &read.failures {
            self.health.record_redis_error();
            warn!(error = %err, "cache read failed for part of the batch; fetching it from the upstream");
        }
        let values = read.values;
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
            invalidations: Arc::clone(&self.invalidations),
            tasks: self.tasks.clone(),
        };
        self.tasks.spawn(fetcher.fetch_and_write_back(jobs, tx));
        // The channel closes only after the batch's last write-back, so a response that got
        // every answer is sent with all of them cached: the next lookup of the same SNs hits.
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
        // Before the delete: a fetch under way must not write its older answer back after it.
        self.invalidations.record(sns);
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

/// Each distinct SN once, in first-seen order, and the index of each requested SN in it.
///
/// The strings are moved, not copied: a 10,000-SN batch costs no allocation per SN here.
fn dedup(requested: Vec<String>) -> (Vec<String>, Vec<usize>) {
    let mut order = Vec::with_capacity(requested.len());
    let mut first_seen = Vec::with_capacity(requested.len());
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(requested.len());
    for sn in &requested {
        let next = seen.len();
        let index = *seen.entry(sn.as_str()).or_insert(next);
        first_seen.push(index == next);
        order.push(index);
    }
    drop(seen);
    let distinct = requested
        .into_iter()
        .zip(first_seen)
        .filter_map(|(sn, first)| first.then_some(sn))
        .collect();
    (distinct, order)
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
}
