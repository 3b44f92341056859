//! The core of the proxy: dedup → one cache read → coalesced, bounded upstream fetch of the
//! misses → write-back as answers arrive. Every requested SN comes back exactly once, with a
//! value or a status; stale values are served at once while they are refreshed.

mod fetch;
mod flights;
mod freshness;
mod invalidations;
mod outcome;

pub use self::flights::Overloaded;
pub use self::freshness::Lifetimes;
pub use self::outcome::{Batch, ItemError, Outcome, Source, Summary};

use self::fetch::Fetcher;
use self::flights::{Answer, Flight, Flights, Stage};
use self::freshness::Freshness;
use self::invalidations::Invalidations;
use self::outcome::summarize;
use crate::cache::{Cache, Entry, EntryKind};
use crate::circuit::CircuitState;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::sn;
use crate::upstream::{Fetched, UpstreamClient, UpstreamError};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info_span, warn};

/// How long answers are kept, how long a lookup may take, how much may wait, how writes
/// are grouped.
#[derive(Debug, Clone)]
pub struct LookupSettings {
    /// Fresh, stale and negative lifetimes, and early refresh.
    pub lifetimes: Lifetimes,
    /// Deadline of one lookup, from the request's arrival (`server.request_timeout`).
    pub request_timeout: Duration,
    /// Most upstream fetches pending at once (`upstream.max_pending`).
    pub max_pending: usize,
    /// Most answers in one write-back pipeline.
    pub write_batch: usize,
}

/// The lookup service, shared by every request.
pub struct Lookup {
    cache: Arc<dyn Cache>,
    upstream: Arc<UpstreamClient>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    settings: LookupSettings,
    invalidations: Arc<Invalidations>,
    flights: Arc<Flights>,
    /// Fetches, refreshes and write-backs run here, so a client that goes away does not
    /// cancel them and shutdown can wait for them.
    tasks: TaskTracker,
}

impl Lookup {
    /// The lookup core over a cache and an upstream client, reporting into `health` and
    /// `metrics`.
    pub fn new(
        cache: Arc<dyn Cache>,
        upstream: Arc<UpstreamClient>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        settings: LookupSettings,
    ) -> Self {
        Self {
            cache,
            upstream,
            health,
            flights: Arc::new(Flights::new(settings.max_pending, Arc::clone(&metrics))),
            metrics,
            settings,
            invalidations: Arc::default(),
            tasks: TaskTracker::new(),
        }
    }

    /// The cache lookups read and write, for `/readyz` and start-up logs.
    pub fn cache(&self) -> &Arc<dyn Cache> {
        &self.cache
    }

    /// The upstream circuit's state, for `/readyz`.
    pub fn upstream_circuit(&self) -> CircuitState {
        self.upstream.circuit_state()
    }

    /// Upstream fetches queued, in flight or finishing their write-back.
    pub fn pending_fetches(&self) -> usize {
        self.flights.pending()
    }

    /// Lookups of an SN that joined a fetch already under way, since start.
    pub fn coalesced_joins(&self) -> u64 {
        self.flights.joins()
    }

    /// Resolves a batch for a request that arrived at `arrived` (its deadline counts from
    /// then). With `refresh`, the cache is not read, every SN is fetched.
    ///
    /// # Errors
    /// [`Overloaded`]: the misses would need more new upstream fetches than may be pending.
    /// Nothing was started for this request then.
    pub async fn resolve(
        &self,
        requested: Vec<String>,
        refresh: bool,
        arrived: Instant,
    ) -> Result<Batch, Overloaded> {
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
                .await?;
        }
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or(Outcome::Failed(ItemError::DeadlineExceeded)))
            .collect();
        for outcome in &outcomes {
            self.metrics.record_sn(outcome.metric());
        }
        let summary = summarize(order.len(), &outcomes, upstream_fetches, arrived.elapsed());
        Ok(Batch {
            distinct,
            outcomes,
            order,
            summary,
        })
    }

    /// Fills in the hits (fresh or stale) and starts the background refreshes they call for;
    /// returns the indices still to fetch. A cache failure is logged and counted, and then
    /// its SNs are misses: the upstream answers instead.
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
        let read = self
            .cache
            .get_many(&sns)
            .instrument(debug_span!("cache_read", sns = sns.len()));
        let read = tokio::time::timeout_at(deadline, read).await;
        let Ok(read) = read else {
            // The request's own deadline ran out, not Redis's timeout: Redis is not to blame.
            debug!(sns = sns.len(), "the deadline passed during the cache read");
            return candidates;
        };
        // A failed chunk leaves only its own keys as misses; the rest are still hits.
        for err in &read.failures {
            if err.is_skipped() {
                debug!("redis is skipped while its circuit is open; fetching from the upstream");
                continue;
            }
            self.health.record_redis_error();
            warn!(error = %err, "cache read failed for part of the batch; fetching it from the upstream");
        }
        let now = SystemTime::now();
        let mut misses = Vec::new();
        let mut refreshes = Vec::new();
        for (index, value) in candidates.into_iter().zip(read.values) {
            let sn = &distinct[index];
            let Some((outcome, freshness)) = self.usable(sn, value, now) else {
                misses.push(index);
                continue;
            };
            if freshness != Freshness::Fresh
                && let Some(flight) = self.flights.start_refresh(sn)
            {
                refreshes.push(flight);
            }
            outcomes[index] = Some(outcome);
        }
        self.refresh_in_background(refreshes);
        misses
    }

    /// What a stored value is worth now: an outcome to serve and how fresh it is, or `None`
    /// for a miss (nothing stored, unreadable, or past its stale period).
    fn usable(
        &self,
        sn: &str,
        value: Option<bytes::Bytes>,
        now: SystemTime,
    ) -> Option<(Outcome, Freshness)> {
        let entry = match Entry::decode(value?) {
            Ok(entry) => entry,
            Err(err) => {
                warn!(sn = %sn, error = %err, "unreadable cache entry; refetching");
                return None;
            }
        };
        let freshness = self.settings.lifetimes.classify(&entry, now);
        let source = match freshness {
            Freshness::Gone => return None,
            Freshness::Fresh | Freshness::RefreshEarly => Source::Cache,
            Freshness::Stale => Source::Stale,
        };
        Some((cached(&entry, source), freshness))
    }

    /// Refreshes stale or nearly expired entries without anyone waiting. A failed refresh
    /// leaves the entry as it was, so it goes on being served stale (serve-stale-on-error).
    fn refresh_in_background(&self, flights: Vec<Arc<Flight>>) {
        if flights.is_empty() {
            return;
        }
        debug!(sns = flights.len(), "refreshing in the background");
        let retry_until = Instant::now() + self.settings.request_timeout;
        let span = info_span!("refresh", sns = flights.len());
        self.tasks
            .spawn(self.fetcher().run(flights, retry_until).instrument(span));
    }

    /// Joins (or starts) the flights of the misses and collects their answers until the
    /// deadline; then waits, within the deadline, for their write-backs, so a lookup of the
    /// same SNs right after this response is all hits.
    async fn fetch_misses(
        &self,
        distinct: &[String],
        misses: &[usize],
        deadline: Instant,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<(), Overloaded> {
        let joined = self
            .flights
            .join(misses.iter().map(|&i| (i, distinct[i].as_str())))?;
        if !joined.unclaimed.is_empty() {
            // Retries never start past the deadline of the request whose task fetches it.
            // A child of the request's span: its log lines carry the request id.
            let span = info_span!("upstream_fetch", sns = joined.unclaimed.len());
            self.tasks.spawn(
                self.fetcher()
                    .run(joined.unclaimed, deadline)
                    .instrument(span),
            );
        }
        let mut answers: FuturesUnordered<_> = joined
            .all
            .iter()
            .map(|(index, flight)| wait_for_answer(*index, flight.subscribe()))
            .collect();
        let mut settling = Vec::with_capacity(joined.all.len());
        while let Ok(Some((index, answer, stage))) =
            tokio::time::timeout_at(deadline, answers.next()).await
        {
            outcomes[index] = Some(fetched_outcome(answer));
            settling.push(stage);
        }
        drop(answers);
        let written = futures_util::future::join_all(settling.iter_mut().map(|stage| async {
            // The guard the wait returns borrows the channel: dropped at once, never held.
            let settled = stage
                .wait_for(|stage| matches!(stage, Stage::Settled(_)))
                .await;
            drop(settled);
        }));
        let _ = tokio::time::timeout_at(deadline, written).await;
        Ok(())
    }

    fn fetcher(&self) -> Fetcher {
        Fetcher {
            cache: Arc::clone(&self.cache),
            upstream: Arc::clone(&self.upstream),
            health: Arc::clone(&self.health),
            metrics: Arc::clone(&self.metrics),
            lifetimes: self.settings.lifetimes.clone(),
            write_batch: self.settings.write_batch,
            invalidations: Arc::clone(&self.invalidations),
            flights: Arc::clone(&self.flights),
            tasks: self.tasks.clone(),
        }
    }

    /// Removes SNs from the cache; returns how many were cached.
    ///
    /// # Errors
    /// The cache could not be reached: the caller must not claim they were removed.
    pub async fn invalidate(&self, sns: &[&str]) -> Result<u64, crate::cache::CacheError> {
        // Before the delete: a fetch under way must not write its older answer back after it,
        // and a lookup from now on must not join that fetch.
        self.invalidations.record(sns);
        self.flights.detach(sns);
        self.cache.delete_many(sns).await.inspect_err(|err| {
            if !err.is_skipped() {
                self.health.record_redis_error();
            }
        })
    }

    /// Stops taking new background work and waits (up to `grace`) for what is under way.
    /// Returns whether everything finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

/// Waits (notified, not polling) until the flight has an answer; keeps the receiver so the
/// caller can wait for the write-back next.
async fn wait_for_answer(
    index: usize,
    mut stage: watch::Receiver<Stage>,
) -> (usize, Answer, watch::Receiver<Stage>) {
    let answer = match stage.wait_for(|stage| stage.answer().is_some()).await {
        Ok(current) => current.answer().cloned(),
        Err(_) => None,
    };
    let answer = answer.unwrap_or_else(|| Err(UpstreamError::Abandoned));
    (index, answer, stage)
}

fn fetched_outcome(answer: Answer) -> Outcome {
    match answer {
        Ok(Fetched::Found(discount)) => Outcome::Found {
            discount,
            source: Source::Upstream,
        },
        Ok(Fetched::NotFound) => Outcome::NotFound {
            source: Source::Upstream,
        },
        Err(err) => Outcome::Failed(ItemError::Upstream(err)),
    }
}

fn cached(entry: &Entry, source: Source) -> Outcome {
    match (entry.kind(), entry.discount()) {
        (EntryKind::Found, Some(discount)) => Outcome::Found { discount, source },
        _ => Outcome::NotFound { source },
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
