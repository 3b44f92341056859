//! Reading the cache for a lookup: hits (fresh or stale) filled in, stale ones refreshed in
//! the background, SNs already being fetched joined instead of read.

use super::flights::Flight;
use super::freshness::Freshness;
use super::{Core, Outcome, Source};
use crate::cache::{CacheError, Entry};
use bytes::Bytes;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, info_span, warn};

/// What a cache read left to fetch.
#[derive(Default)]
pub(super) struct Misses {
    /// The indices still to fetch, in order.
    pub(super) indices: Vec<usize>,
    /// Part of the read failed.
    pub(super) failed: bool,
    /// The misses that found a value they could not use (unreadable, or past its stale
    /// period): their claims cannot ask for an absent entry.
    pub(super) occupied: Vec<usize>,
}

impl Core {
    /// Fills in the hits (fresh or stale) and starts the background refreshes they call for;
    /// returns the indices still to fetch, in order, and whether part of the read failed.
    /// SNs already being fetched for a lookup that missed them are not read: they are joined.
    /// A cache failure is logged and counted, and then its SNs are misses: the upstream
    /// answers instead.
    pub(super) async fn read_cache(
        self: &Arc<Self>,
        distinct: &[String],
        candidates: Vec<usize>,
        deadline: Instant,
        outcomes: &mut [Option<Outcome>],
    ) -> Misses {
        let (fetching, candidates) = self
            .flights
            .split_fetching(candidates, |index| distinct[index].as_str());
        if candidates.is_empty() {
            return Misses {
                indices: fetching,
                ..Misses::default()
            };
        }
        let sns: Vec<&str> = candidates.iter().map(|&i| distinct[i].as_str()).collect();
        let read = self
            .cache
            .get_many(&sns)
            .instrument(debug_span!("cache_read", sns = sns.len()));
        let Ok(read) = tokio::time::timeout_at(deadline, read).await else {
            // The request's own deadline ran out, not Redis's timeout: Redis is not to blame.
            debug!(sns = sns.len(), "the deadline passed during the cache read");
            return Misses {
                indices: in_order(candidates, fetching),
                ..Misses::default()
            };
        };
        self.note_failures(&read.failures);
        let failed = !read.failures.is_empty();
        let (misses, occupied) = self.fill_hits(distinct, candidates, read.values, outcomes);
        Misses {
            indices: in_order(misses, fetching),
            failed,
            occupied,
        }
    }

    /// A failed chunk leaves only its own keys as misses (the rest are still hits); each
    /// failure is logged and counted, unless Redis was skipped on purpose.
    fn note_failures(&self, failures: &[CacheError]) {
        for err in failures {
            if err.is_skipped() {
                debug!("redis is skipped while its circuit is open; fetching from the upstream");
                continue;
            }
            warn!(error = %err, "cache read failed for part of the batch; fetching it from the upstream");
        }
    }

    /// Fills in the outcome of every usable value read and starts the refreshes they call
    /// for; returns the indices that were misses, and those of them that found a value.
    fn fill_hits(
        self: &Arc<Self>,
        distinct: &[String],
        candidates: Vec<usize>,
        values: Vec<Option<Bytes>>,
        outcomes: &mut [Option<Outcome>],
    ) -> (Vec<usize>, Vec<usize>) {
        let now = SystemTime::now();
        let mut misses = Vec::new();
        let mut occupied = Vec::new();
        let mut refreshes = Vec::new();
        for (index, value) in candidates.into_iter().zip(values) {
            let sn = &distinct[index];
            let found = value.is_some();
            let Some((outcome, freshness)) = self.usable(sn, value, now) else {
                misses.push(index);
                if found {
                    occupied.push(index);
                }
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
        (misses, occupied)
    }

    /// What a stored value is worth now: an outcome to serve and how fresh it is, or `None`
    /// for a miss (nothing stored, unreadable, or past its stale period).
    fn usable(
        &self,
        sn: &str,
        value: Option<Bytes>,
        now: SystemTime,
    ) -> Option<(Outcome, Freshness)> {
        let entry = match Entry::decode(value?) {
            Ok(entry) => entry,
            Err(err) => {
                self.metrics.record_rejected_entry();
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
        Some((cached(entry, source), freshness))
    }

    /// Refreshes stale or nearly expired entries without anyone waiting. A failed refresh
    /// leaves the entry as it was, so it goes on being served stale (serve-stale-on-error).
    fn refresh_in_background(self: &Arc<Self>, flights: Vec<Arc<Flight>>) {
        if flights.is_empty() {
            return;
        }
        debug!(sns = flights.len(), "refreshing in the background");
        let retry_until = Instant::now() + self.settings.request_timeout;
        let span = info_span!("refresh", sns = flights.len());
        let fetch = Arc::clone(self).fetch(flights, retry_until, None);
        self.tasks.spawn(fetch.instrument(span));
    }
}

/// Two ascending index lists as one.
fn in_order(mut misses: Vec<usize>, fetching: Vec<usize>) -> Vec<usize> {
    if !fetching.is_empty() {
        misses.extend(fetching);
        misses.sort_unstable();
    }
    misses
}

fn cached(entry: Entry, source: Source) -> Outcome {
    match entry.into_discount() {
        Some(discount) => Outcome::Found { discount, source },
        None => Outcome::NotFound { source },
    }
}
