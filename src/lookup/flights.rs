//! The fetches in flight, at most one per SN in the whole process (Varnish's waiting list,
//! nginx's `proxy_cache_lock`), shared by every request that wants the SN.
//!
//! A flight is fetched by a background task, never by a request: a requester that disconnects
//! or reaches its deadline just stops listening, and the others keep theirs. Waiters are
//! woken by a watch channel (notified, not polled) and each waits with its own deadline.
//! Every request that wants a flight nobody has started yet queues it in its own fetch task;
//! the first task to reach it claims and fetches it, the others skip it. So an SN queued deep
//! in a big export is fetched as soon as a small lookup asks for it.
//! A flight stays joinable until its write-back is done, so a lookup that comes between the
//! answer and the write joins it instead of fetching again.
//!
//! Joining subscribes under the map's lock, and a queued flight is dropped for want of
//! waiters under the same lock, so a lookup that joins a flight just as the lookup that
//! queued it goes away either keeps it alive or finds it gone and starts its own: it never
//! waits on a flight dropped under it.
//!
//! An invalidation detaches an SN's flight: its waiters still get their answer, a lookup
//! after it starts a fetch of its own, and the detached flight is fenced (its answer is not
//! written back: it may predate the invalidation). A detached flight still counts against
//! `upstream.max_pending` until it ends, so a loop of lookups and invalidations cannot pile
//! up fetches past that bound; and one nobody waits for any more is dropped before it is
//! fetched. The fence lives on the flight, so it needs no memory of its own: a map of recent
//! invalidations would grow with every SN ever invalidated, or, bounded, forget some and let
//! a pre-invalidation answer be written back.

use super::distributed::Remote;
use crate::metrics::Metrics;
use crate::upstream::{Fetched, UpstreamError};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// A fetch's result, as every waiter sees it.
pub type Answer = Result<Fetched, UpstreamError>;

/// Where a flight is.
#[derive(Debug, Clone)]
pub enum Stage {
    /// Queued or in flight at the upstream.
    Pending,
    /// Answered; the write-back (if any) is under way.
    Answered(Answer),
    /// Answered and written back (or not to be written): a new lookup now reads the cache.
    Settled(Answer),
}

impl Stage {
    /// The answer, once there is one.
    pub fn answer(&self) -> Option<&Answer> {
        match self {
            Self::Pending => None,
            Self::Answered(answer) | Self::Settled(answer) => Some(answer),
        }
    }
}

/// One SN's fetch. The owning task moves it along; every waiter holds a receiver.
#[derive(Debug)]
pub struct Flight {
    /// The SN being fetched.
    pub sn: String,
    stage: watch::Sender<Stage>,
    /// Whether a task has started fetching it.
    claimed: AtomicBool,
    /// Detached by an invalidation after it began: its answer must not be written back.
    invalidated: AtomicBool,
    /// Whether it has left the flights (removed, or no longer counted as detached).
    finished: AtomicBool,
    /// Started to refresh a value still being served (stale, or nearly expired): a lookup
    /// must read that value rather than wait for this.
    refresh: bool,
    /// With other instances: its claim in Redis (see `distributed`).
    remote: watch::Sender<Remote>,
    /// Fetched for a lookup that asked for a fresh answer (`refresh`), so it is claimed in
    /// Redis even if an entry is there.
    forced: AtomicBool,
}

impl Flight {
    fn new(sn: &str, refresh: bool) -> Arc<Self> {
        Arc::new(Self {
            sn: sn.to_owned(),
            stage: watch::Sender::new(Stage::Pending),
            claimed: AtomicBool::new(false),
            invalidated: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            refresh,
            remote: watch::Sender::new(Remote::Unchecked),
            forced: AtomicBool::new(false),
        })
    }

    /// Marks its claim in Redis as on its way; `false` if it was already made or is under
    /// way.
    pub fn begin_check(&self) -> bool {
        self.remote.send_if_modified(|remote| {
            let unchecked = matches!(remote, Remote::Unchecked);
            if unchecked {
                *remote = Remote::Checking;
            }
            unchecked
        })
    }

    /// Marks it as fetched for a lookup that wants a fresh answer whatever is cached.
    pub fn force(&self) {
        self.forced.store(true, Ordering::Release);
    }

    /// Whether its claim in Redis is to be made only if no entry is there: a miss, not a
    /// refresh.
    pub fn claims_if_absent(&self) -> bool {
        !self.refresh && !self.forced.load(Ordering::Acquire)
    }

    /// Whether it has not been claimed in Redis yet.
    pub fn is_unchecked(&self) -> bool {
        matches!(*self.remote.borrow(), Remote::Unchecked)
    }

    /// Whether another instance fetches it.
    pub fn is_lost(&self) -> bool {
        matches!(*self.remote.borrow(), Remote::Lost)
    }

    /// What its claim in Redis allows, if it was won here.
    pub fn hold(&self) -> Option<Arc<super::distributed::LeaseHold>> {
        match &*self.remote.borrow() {
            Remote::Fetch(hold) => Some(Arc::clone(hold)),
            _ => None,
        }
    }

    /// Records what its claim came to.
    pub fn decide(&self, remote: Remote) {
        self.remote.send_replace(remote);
    }

    /// What its claim came to, once made (waits while one is on its way).
    pub async fn decided(&self) -> Remote {
        let mut remote = self.remote.subscribe();
        let decided = remote
            .wait_for(|remote| !matches!(remote, Remote::Checking))
            .await
            .map(|remote| remote.clone());
        // The sender lives with the flight: a closed channel cannot be seen from here.
        decided.unwrap_or_default()
    }

    /// Takes the fetch on; `false` if another task already has.
    pub fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }

    /// Whether a lookup still listens for the answer.
    pub fn is_wanted(&self) -> bool {
        self.waiters() > 0
    }

    /// Whether it refreshes a value still served: nobody waits for its answer.
    pub fn is_refresh(&self) -> bool {
        self.refresh
    }

    /// Lookups listening for the answer now.
    fn waiters(&self) -> usize {
        self.stage.receiver_count()
    }

    /// Whether a task has taken the fetch on.
    fn is_claimed(&self) -> bool {
        self.claimed.load(Ordering::Acquire)
    }

    /// Whether the SN was invalidated while this flight was under way, so its answer, which
    /// may be older than the invalidation, must not be cached.
    pub fn is_invalidated(&self) -> bool {
        self.invalidated.load(Ordering::Acquire)
    }

    /// Listens to the flight; a receiver never misses the latest stage. Only [`Flights`]
    /// subscribes, under its lock.
    fn subscribe(&self) -> watch::Receiver<Stage> {
        self.stage.subscribe()
    }

    /// Hands the answer to every waiter.
    pub fn answer(&self, answer: Answer) {
        self.stage.send_replace(Stage::Answered(answer));
    }

    /// Marks the write-back done (or skipped). A flight left without an answer (its task
    /// was dropped) gets an error, so no waiter waits for an answer that cannot come.
    pub fn settle(&self) {
        self.stage.send_modify(|stage| {
            let answer = match stage {
                Stage::Pending => Err(UpstreamError::Abandoned),
                Stage::Answered(answer) => answer.clone(),
                Stage::Settled(_) => return,
            };
            *stage = Stage::Settled(answer);
        });
    }
}

/// A lookup would need more new fetches than `upstream.max_pending` allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded;

/// A request's place in the flights of its misses.
pub struct Joined {
    /// The flights no task has started yet (new here, or queued by another request): this
    /// request's own task fetches each one unless another task gets to it first.
    pub unclaimed: Vec<Arc<Flight>>,
    /// Every miss's flight, by its index in the request (started here or joined), already
    /// listened to: the flight cannot be dropped for want of waiters from the moment it is
    /// joined.
    pub all: Vec<(usize, watch::Receiver<Stage>)>,
}

/// The flights in the process, keyed by SN.
#[derive(Debug)]
pub struct Flights {
    map: Mutex<HashMap<String, Arc<Flight>>>,
    /// The map's size, readable without its lock: the hit path checks it on every lookup,
    /// and when nothing is being fetched it need not take the lock at all.
    size: AtomicUsize,
    /// Flights detached by an invalidation that have not ended; changed under the lock.
    detached: AtomicUsize,
    max_pending: usize,
    metrics: Arc<Metrics>,
}

impl Flights {
    /// No flights; at most `max_pending` at once (`upstream.max_pending`).
    pub fn new(max_pending: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            size: AtomicUsize::new(0),
            detached: AtomicUsize::new(0),
            max_pending,
            metrics,
        }
    }

    /// Joins the flight of each SN, starting the ones that have none. All or nothing: if
    /// starting them would pass `max_pending`, nothing is joined or started.
    ///
    /// # Errors
    /// [`Overloaded`]: too many fetches are already pending.
    pub fn join<'a>(
        &self,
        misses: impl Iterator<Item = (usize, &'a str)> + Clone,
    ) -> Result<Joined, Overloaded> {
        let mut map = self.lock();
        let new = misses
            .clone()
            .filter(|(_, sn)| !map.contains_key(*sn))
            .count();
        if new > 0 && self.counted(&map) + new > self.max_pending {
            return Err(Overloaded);
        }
        let mut joined = Joined {
            unclaimed: Vec::with_capacity(new),
            all: Vec::new(),
        };
        for (index, sn) in misses {
            let flight = match map.entry(sn.to_owned()) {
                Entry::Occupied(running) => {
                    self.metrics.record_join();
                    Arc::clone(running.get())
                }
                Entry::Vacant(vacant) => Arc::clone(vacant.insert(Flight::new(sn, false))),
            };
            if !flight.is_claimed() {
                joined.unclaimed.push(Arc::clone(&flight));
            }
            // Under the lock: no task can find the flight unwanted and drop it from now on.
            joined.all.push((index, flight.subscribe()));
        }
        self.size.store(map.len(), Ordering::Relaxed);
        Ok(joined)
    }

    /// Splits `candidates` into the SNs being fetched for lookups that missed them, which a
    /// cache read would only find missing too (1,000 requests for one cold SN make one Redis
    /// read, not 1,000), and the rest, to read from the cache. A refresh does not count: the
    /// value it refreshes is still there to serve.
    pub fn split_fetching<'a>(
        &self,
        candidates: Vec<usize>,
        sn_of: impl Fn(usize) -> &'a str,
    ) -> (Vec<usize>, Vec<usize>) {
        if self.size.load(Ordering::Relaxed) == 0 {
            return (Vec::new(), candidates);
        }
        let map = self.lock();
        candidates
            .into_iter()
            .partition(|&index| map.get(sn_of(index)).is_some_and(|flight| !flight.refresh))
    }

    /// Starts a background refresh of `sn` unless one is under way or the proxy is full.
    pub fn start_refresh(&self, sn: &str) -> Option<Arc<Flight>> {
        let mut map = self.lock();
        if self.counted(&map) >= self.max_pending || map.contains_key(sn) {
            return None;
        }
        let flight = Flight::new(sn, true);
        map.insert(sn.to_owned(), Arc::clone(&flight));
        self.size.store(map.len(), Ordering::Relaxed);
        Some(flight)
    }

    /// Takes a finished flight out: removes it from the map, unless an invalidation already
    /// replaced or removed it, in which case it stops counting as detached. Only the first
    /// call for a flight does anything.
    pub fn finish(&self, flight: &Arc<Flight>) {
        let mut map = self.lock();
        self.finish_locked(&mut map, flight);
    }

    /// Claims a queued flight that nobody waits for and takes it out, in one step under the
    /// lock, so that no lookup can join it in between; `false` (and nothing done) if a
    /// lookup waits for it or a task has it. The caller settles it.
    pub fn claim_unwanted(&self, flight: &Arc<Flight>) -> bool {
        let mut map = self.lock();
        if flight.waiters() > 0 || !flight.claim() {
            return false;
        }
        self.finish_locked(&mut map, flight);
        true
    }

    fn finish_locked(&self, map: &mut HashMap<String, Arc<Flight>>, flight: &Arc<Flight>) {
        if flight.finished.swap(true, Ordering::AcqRel) {
            return;
        }
        if map
            .get(&flight.sn)
            .is_some_and(|current| Arc::ptr_eq(current, flight))
        {
            map.remove(&flight.sn);
            self.size.store(map.len(), Ordering::Relaxed);
        } else if flight.is_invalidated() {
            self.detached.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Detaches the flights of invalidated SNs: their waiters still get the answer they
    /// asked for, but it is not written back, and a lookup from now on starts a fetch of its
    /// own. They count as pending until they end. Returns them.
    pub fn detach(&self, sns: &[&str]) -> Vec<Arc<Flight>> {
        let mut map = self.lock();
        let mut detached = Vec::new();
        for sn in sns {
            if let Some(flight) = map.remove(*sn) {
                flight.invalidated.store(true, Ordering::Release);
                self.detached.fetch_add(1, Ordering::Relaxed);
                detached.push(flight);
            }
        }
        self.size.store(map.len(), Ordering::Relaxed);
        detached
    }

    /// Fetches queued, in flight, or waiting for their write-back, detached ones included.
    pub fn pending(&self) -> usize {
        self.size.load(Ordering::Relaxed) + self.detached.load(Ordering::Relaxed)
    }

    /// What counts against `max_pending`, with the lock held.
    fn counted(&self, map: &HashMap<String, Arc<Flight>>) -> usize {
        map.len() + self.detached.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        // Inserts and removes only: a poisoned map is still a consistent map.
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn misses<'a>(sns: &'a [&'a str]) -> impl Iterator<Item = (usize, &'a str)> + Clone {
        sns.iter().copied().enumerate()
    }

    /// Joins `sn` alone and returns its flight (as the task that queued it holds it), and the
    /// lookup's wait on it.
    fn join_one(flights: &Flights, sn: &str) -> (Arc<Flight>, watch::Receiver<Stage>) {
        let mut joined = flights.join(misses(&[sn])).unwrap();
        let flight = joined.unclaimed.pop().unwrap();
        (flight, joined.all.remove(0).1)
    }

    #[test]
    fn the_second_request_joins_and_may_take_on_what_is_still_queued() {
        let metrics = Arc::new(Metrics::new());
        let flights = Flights::new(100, Arc::clone(&metrics));
        let first = flights.join(misses(&["A", "B"])).unwrap();
        assert_eq!(first.unclaimed.len(), 2);
        assert!(first.unclaimed[0].claim(), "the first task starts A");
        let second = flights.join(misses(&["A", "B", "C"])).unwrap();
        assert!(
            metrics
                .encode()
                .contains("discount_proxy_coalesced_joins_total 2\n"),
            "two lookups joined"
        );
        let unclaimed: Vec<&str> = second
            .unclaimed
            .iter()
            .map(|flight| flight.sn.as_str())
            .collect();
        assert_eq!(
            unclaimed,
            ["B", "C"],
            "B is still queued, so it may be taken on"
        );
        assert!(
            Arc::ptr_eq(&first.unclaimed[1], &second.unclaimed[0]),
            "B is shared"
        );
        assert!(second.unclaimed[0].claim());
        assert!(!first.unclaimed[1].claim(), "B is fetched once");
    }

    #[test]
    fn max_pending_refuses_all_or_nothing() {
        let flights = Flights::new(3, Arc::default());
        flights.join(misses(&["A", "B"])).unwrap();
        assert_eq!(
            flights.join(misses(&["C", "D"])).err(),
            Some(Overloaded),
            "2 + 2 > 3"
        );
        assert_eq!(flights.pending(), 2, "nothing was started");
        assert!(flights.join(misses(&["A", "B"])).is_ok(), "joining is free");
        assert!(flights.start_refresh("C").is_some());
        assert!(flights.start_refresh("D").is_none(), "full");
    }

    #[tokio::test]
    async fn waiters_see_the_answer_and_a_finished_flight_is_gone() {
        let flights = Flights::new(10, Arc::default());
        let (flight, mut waiter) = join_one(&flights, "A");
        flight.answer(Ok(Fetched::NotFound));
        let stage = waiter
            .wait_for(|stage| stage.answer().is_some())
            .await
            .unwrap();
        assert!(matches!(stage.answer(), Some(Ok(Fetched::NotFound))));
        drop(stage);
        flight.settle();
        flights.finish(&flight);
        assert_eq!(flights.pending(), 0);
    }

    #[test]
    fn an_invalidated_flight_is_not_removed_in_place_of_its_successor() {
        let flights = Flights::new(10, Arc::default());
        let (old, _) = join_one(&flights, "A");
        flights.detach(&["A"]);
        let (new, _) = join_one(&flights, "A");
        assert!(old.is_invalidated() && !new.is_invalidated());
        flights.finish(&old);
        assert_eq!(flights.pending(), 1, "the new flight stays");
        flights.finish(&new);
        assert_eq!(flights.pending(), 0);
    }

    #[test]
    fn invalidating_flights_does_not_make_room_past_max_pending_until_they_end() {
        let flights = Flights::new(2, Arc::default());
        let (a, _) = join_one(&flights, "A");
        let (b, _) = join_one(&flights, "B");
        flights.detach(&["A", "B"]);
        assert_eq!(flights.pending(), 2, "detached, still being fetched");
        assert_eq!(flights.join(misses(&["C"])).err(), Some(Overloaded));
        assert!(flights.start_refresh("C").is_none());
        flights.finish(&a);
        flights.finish(&a);
        assert_eq!(flights.pending(), 1, "a flight ends once");
        assert!(flights.join(misses(&["C"])).is_ok());
        flights.finish(&b);
        assert_eq!(flights.pending(), 1);
    }

    #[test]
    fn a_queued_flight_someone_joined_is_not_dropped_as_unwanted() {
        let flights = Flights::new(10, Arc::default());
        let (flight, first_waiter) = join_one(&flights, "A");
        drop(first_waiter);
        let (_, second_waiter) = join_one(&flights, "A");
        assert!(!flights.claim_unwanted(&flight), "the second lookup waits");
        assert!(!flight.is_claimed());
        drop(second_waiter);
        assert!(flights.claim_unwanted(&flight));
        assert_eq!(flights.pending(), 0, "dropped, and gone at once");
        assert!(!flights.claim_unwanted(&flight), "claimed already");
    }
}
