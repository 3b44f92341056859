//! The core of the proxy: dedup → one cache read → coalesced, bounded upstream fetch of the
//! misses → write-back as answers arrive. Every requested SN comes back exactly once, with a
//! value or a status; stale values are served at once while they are refreshed.

#[cfg(test)]
mod behaviour;
mod distributed;
mod fetch;
mod flights;
mod freshness;
mod outcome;
mod read;
mod resolving;
mod streamed;
#[cfg(test)]
mod testing;
mod upstream;
mod waiting;
mod whole;
mod write_back;

pub use self::distributed::Distributed;
pub use self::flights::Overloaded;
pub use self::freshness::Lifetimes;
pub use self::outcome::{Batch, ItemError, Outcome, Source, Summary};
pub use self::streamed::StreamedLookup;
pub use self::upstream::Upstream;

use self::distributed::Shared;
use self::flights::Flights;
use self::whole::WholeLookup;
use self::write_back::Unwritten;
use crate::cache::Cache;
use crate::circuit::CircuitState;
use crate::health::Health;
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

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
    core: Arc<Core>,
}

/// What lookups share. Fetch tasks and write-backs hold on to it (so they outlive the
/// request that started them), and so does a streamed lookup, to read its later windows.
struct Core {
    cache: Arc<dyn Cache>,
    upstream: Arc<dyn Upstream>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    settings: LookupSettings,
    flights: Arc<Flights>,
    /// Fetches, refreshes and write-backs run here, so a client that goes away does not
    /// cancel them and shutdown can wait for them.
    tasks: TaskTracker,
    /// Cancelled when the proxy drains: fetch tasks start nothing new.
    stopping: CancellationToken,
    /// Answers on their way to the cache, for the drain to count what it leaves behind.
    unwritten: Unwritten,
    /// With `coalesce.distributed` and Redis: claims, leases and waits shared with the other
    /// instances.
    shared: Option<Shared>,
}

impl Lookup {
    /// The lookup core over a cache and an upstream (the [`crate::upstream::UpstreamClient`]
    /// in the proxy), reporting into `health` and `metrics`; with `distributed`, coalescing
    /// with the other instances sharing the cache (needs a Tokio runtime then).
    pub fn new(
        cache: Arc<dyn Cache>,
        upstream: Arc<dyn Upstream>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        settings: LookupSettings,
        distributed: Option<Distributed>,
    ) -> Self {
        let core = Core {
            shared: distributed.map(|distributed| Shared::new(distributed, Arc::clone(&metrics))),
            cache,
            upstream,
            health,
            flights: Arc::new(Flights::new(settings.max_pending, Arc::clone(&metrics))),
            unwritten: Unwritten::new(Arc::clone(&metrics)),
            metrics,
            settings,
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
        };
        Self {
            core: Arc::new(core),
        }
    }

    /// The cache lookups read and write, for `/readyz` and start-up logs.
    pub fn cache(&self) -> &Arc<dyn Cache> {
        &self.core.cache
    }

    /// The upstream circuit's state, for `/readyz`.
    pub fn upstream_circuit(&self) -> CircuitState {
        self.core.upstream.circuit()
    }

    /// Upstream fetches queued, in flight or finishing their write-back, those detached by
    /// an invalidation included.
    pub fn pending_fetches(&self) -> usize {
        self.core.flights.pending()
    }

    /// Resolves a batch for a request that arrived at `arrived` (its deadline counts from
    /// then): validates, reads the cache, joins or starts the fetches of the misses, and
    /// waits for them and their write-backs. With `refresh`, the cache is not read, every SN
    /// is fetched.
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
        let lookup = WholeLookup::start(&self.core, requested, refresh, arrived).await?;
        Ok(lookup.finish().await)
    }

    /// Starts a lookup to be streamed, for the caller to walk as its SNs resolve. Unlike
    /// [`Lookup::resolve`], the cache is read a window (`redis.chunk_size` SNs) at a time as
    /// the stream is consumed, and each line's discount is let go once it is out, so a
    /// 100,000-SN stream never holds its whole response. The next window is read once the
    /// previous one's hits are out and fewer than `2 × upstream.concurrency` (at least one
    /// window) of its fetches are outstanding, so the upstream stays busy. When `cancel` fires (or the lookup is
    /// dropped before its end: a client that went away), the fetches it queued but did not
    /// start are dropped, unless another lookup waits for them; those under way still finish
    /// and are written back.
    ///
    /// # Errors
    /// [`Overloaded`] for the first window's misses; later windows wait for room instead.
    pub async fn stream(
        &self,
        requested: Vec<String>,
        refresh: bool,
        arrived: Instant,
        cancel: CancellationToken,
    ) -> Result<StreamedLookup, Overloaded> {
        StreamedLookup::start(&self.core, requested, refresh, arrived, cancel).await
    }

    /// Removes SNs from the cache; returns how many were cached.
    ///
    /// # Errors
    /// The cache could not be reached: the caller must not claim they were removed.
    pub async fn invalidate(&self, sns: &[&str]) -> Result<u64, crate::cache::CacheError> {
        let core = &self.core;
        // Before the delete: a fetch under way must not write its older answer back after it,
        // and a lookup from now on must not join that fetch.
        let detached = core.flights.detach(sns);
        let deleted = core.cache.delete_many(sns).await;
        // Their answers will not be written: their leases go now, so a lookup from now on
        // (here or on another instance) claims and fetches without waiting for them.
        let releases = detached
            .iter()
            .filter_map(|flight| flight.hold())
            .map(|hold| hold.release_now());
        futures_util::future::join_all(releases).await;
        deleted
    }

    /// Stops taking new background work and waits (up to `grace`) for what is under way.
    /// Returns whether everything finished.
    ///
    /// Fetch tasks start no new fetch from here on: what they still have queued is settled
    /// as abandoned (the requests are over by now, or out of time), and only the fetches
    /// under way finish and are written back. If `grace` runs out first, the answers not
    /// yet written are counted (`discount_proxy_write_backs_total{outcome="abandoned"}`) and
    /// logged: they are lost when the process exits, and the next lookup refetches them.
    pub async fn drain(&self, grace: Duration) -> bool {
        let core = &self.core;
        core.stopping.cancel();
        core.tasks.close();
        if tokio::time::timeout(grace, core.tasks.wait()).await.is_ok() {
            return true;
        }
        let abandoned = core.unwritten.give_up();
        warn!(
            answers = abandoned,
            fetches = core.flights.pending(),
            "the drain is out of time: answers not yet written back are lost, and fetches under way are dropped"
        );
        false
    }
}

/// Each distinct SN once, in first-seen order, and the index of each requested SN in it.
///
/// The strings are moved, not copied: a 10,000-SN batch costs no allocation per SN here.
fn dedup(requested: Vec<String>) -> (Vec<String>, Vec<usize>) {
    let mut order = Vec::with_capacity(requested.len());
    let mut first_seen = Vec::with_capacity(requested.len());
    // aHash, not SipHash: hashing was a tenth of the hit path's CPU. Still randomly keyed, so
    // a client cannot pick SNs that collide.
    let mut seen: HashMap<&str, usize, ahash::RandomState> =
        HashMap::with_capacity_and_hasher(requested.len(), ahash::RandomState::new());
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
