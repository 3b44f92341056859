//! The background half of a lookup: fetch the flights a request started, hand each answer to
//! every waiter, and pass the definite ones on to be written back (see `write_back`).
//!
//! A task fetches its queue in order and skips what it need not fetch: a flight another task
//! claimed, and an invalidated one nobody waits for (its answer could be neither served nor
//! cached). Once the proxy drains, it starts nothing new: what is queued is settled as
//! abandoned, and only the fetches under way finish and are written back.

use super::Core;
use super::distributed::LeaseHold;
use super::flights::{Flight, Flights};
use super::write_back::{PendingWrites, next_answer};
use crate::cache::{Entry, EntryKind, Write};
use crate::metrics::WriteBackOutcome;
use crate::upstream::{Fetched, UpstreamError};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A flight this task leads. However the task ends, the flight is settled and leaves the
/// map when its `Lead` is dropped: a waiter never waits for an answer that cannot come.
pub(super) struct Lead {
    pub(super) flight: Arc<Flight>,
    flights: Arc<Flights>,
    /// With `coalesce.distributed`: what its claim in Redis allows (see `distributed`).
    pub(super) hold: Option<Arc<LeaseHold>>,
}

impl Drop for Lead {
    fn drop(&mut self) {
        self.flight.settle();
        self.flights.finish(&self.flight);
    }
}

/// The flights a task may fetch, in order. It yields a [`Lead`] for each one it claims, and
/// skips those another task claimed first. If the task ends early, what is still queued and
/// unclaimed is settled (as abandoned), so no waiter waits for it until its deadline.
struct Queue {
    waiting: std::collections::VecDeque<Arc<Flight>>,
    flights: Arc<Flights>,
    /// Set for a streamed lookup's task; taken once its feed is closed.
    streamed: Option<Streamed>,
    /// Cancelled when the proxy drains.
    stopping: CancellationToken,
    /// With other instances: the core that claims in Redis, and the deadline of the waits
    /// for what another instance fetches.
    claims: Option<(Arc<Core>, Instant)>,
}

/// What ties a fetch task to the streamed lookup it fetches for.
pub(super) struct Streamed {
    /// Cancelled when the lookup went away (a client that left).
    pub(super) cancel: CancellationToken,
    /// The flights of each window the lookup reads; the queue ends when this closes.
    pub(super) more: tokio::sync::mpsc::UnboundedReceiver<Vec<Arc<Flight>>>,
}

impl Queue {
    fn lead(&self, flight: Arc<Flight>) -> Lead {
        Lead {
            flight,
            flights: Arc::clone(&self.flights),
            hold: None,
        }
    }

    /// With other instances: when the next flight to fetch has not been claimed in Redis,
    /// claims it with every unclaimed one queued behind it, in one round trip per node (all
    /// of a batch's misses, or the window a streamed lookup just fed); the ones lost are
    /// taken on at once, to wait for the other instance's answers.
    async fn claim_ahead(&mut self) {
        let Some((core, until)) = self.claims.clone() else {
            return;
        };
        // Nothing more is started: no claim for what is about to be dropped.
        let cancelled = self
            .streamed
            .as_ref()
            .is_some_and(|streamed| streamed.cancel.is_cancelled());
        if self.stopping.is_cancelled() || cancelled {
            return;
        }
        let head_unchecked = self
            .waiting
            .front()
            .is_some_and(|flight| flight.is_unchecked());
        if !head_unchecked {
            return;
        }
        let ahead: Vec<Arc<Flight>> = self
            .waiting
            .iter()
            .filter(|flight| flight.is_unchecked())
            .cloned()
            .collect();
        // Those this task fetches first start at once; the others wait, held as queued.
        core.claim_ahead(&ahead, core.upstream.concurrency()).await;
        let lost = ahead
            .into_iter()
            .filter(|flight| flight.is_lost() && !flight.is_refresh() && flight.claim())
            .map(|flight| self.lead(flight))
            .collect();
        core.wait_elsewhere(lost, until);
    }

    /// After a cancellation: the queued flights nobody else waits for are dropped (settled as
    /// abandoned and removed); those another lookup waits for are left for that lookup's own
    /// task, which queued them too. Checked and claimed under the flights' lock, so a lookup
    /// joining one right now either keeps it or finds it gone.
    fn drop_unwanted(&mut self) {
        self.close_feed();
        let dropped: Vec<Arc<Flight>> = std::mem::take(&mut self.waiting)
            .into_iter()
            .filter(|flight| self.flights.claim_unwanted(flight))
            .collect();
        self.settle_dropped(dropped);
    }

    /// Settles everything still queued as abandoned: the proxy is draining, or the task
    /// ended early.
    fn abandon_all(&mut self) {
        self.close_feed();
        let dropped: Vec<Arc<Flight>> = std::mem::take(&mut self.waiting)
            .into_iter()
            .filter(|flight| flight.claim())
            .collect();
        self.settle_dropped(dropped);
    }

    /// Settles `dropped` (claimed by this task, not to be fetched) as abandoned and removes
    /// them; their leases in Redis, if any, go all at once.
    fn settle_dropped(&self, dropped: Vec<Arc<Flight>>) {
        if let Some((core, _)) = &self.claims {
            core.release_unstarted(&dropped);
        }
        // A Lead's drop settles the flight and removes it.
        for flight in dropped {
            drop(self.lead(flight));
        }
    }

    /// Takes in what was fed and not yet received, and accepts no more: a flight left in the
    /// channel would never be claimed, nor settled for its waiters.
    fn close_feed(&mut self) {
        if let Some(Streamed { mut more, .. }) = self.streamed.take() {
            more.close();
            while let Ok(flights) = more.try_recv() {
                self.waiting.extend(flights);
            }
        }
    }

    /// The next flight to fetch, waiting for more to be fed when the queue has run dry.
    async fn next_lead(&mut self) -> Option<Lead> {
        loop {
            self.claim_ahead().await;
            if let Some(lead) = self.next() {
                return Some(lead);
            }
            let more = match self.streamed.as_mut() {
                Some(streamed) if !streamed.cancel.is_cancelled() => tokio::select! {
                    more = streamed.more.recv() => more,
                    () = self.stopping.cancelled() => None,
                },
                _ => None,
            };
            match more {
                Some(flights) => self.waiting.extend(flights),
                // Dropping the queue settles what is left in it.
                None => return None,
            }
        }
    }
}

impl Iterator for Queue {
    type Item = Lead;

    fn next(&mut self) -> Option<Lead> {
        if self.stopping.is_cancelled() {
            debug!(
                queued = self.waiting.len(),
                "draining: the queued fetches are not started"
            );
            self.abandon_all();
            return None;
        }
        if self
            .streamed
            .as_ref()
            .is_some_and(|streamed| streamed.cancel.is_cancelled())
        {
            debug!(
                queued = self.waiting.len(),
                "the lookup went away; its queued fetches are dropped"
            );
            self.drop_unwanted();
            return None;
        }
        while let Some(flight) = self.waiting.pop_front() {
            // Invalidated and unwanted: its answer could be neither served nor cached.
            if flight.is_invalidated() && self.flights.claim_unwanted(&flight) {
                drop(self.lead(flight));
                continue;
            }
            if flight.claim() {
                return Some(self.lead(flight));
            }
        }
        None
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.abandon_all();
    }
}

impl Core {
    /// A fetch task: fetches the flights not claimed by another task first, at most
    /// `upstream.concurrency` at a time for this task.
    ///
    /// That bound is what shares the upstream fairly: the global limit's queue is FIFO, and
    /// a task only queues its next fetch when one of its own finishes, so a single-SN
    /// lookup waits for one free slot, not behind the whole of a 10,000-SN export (and if it
    /// wants an SN the export has queued, it claims and fetches that SN itself).
    ///
    /// For a streamed lookup, flights keep coming until it closes the feed, and those not
    /// started are dropped if it is cancelled.
    pub(super) async fn fetch(
        self: Arc<Self>,
        flights: Vec<Arc<Flight>>,
        retry_until: Instant,
        streamed: Option<Streamed>,
    ) {
        let queue = Queue {
            waiting: flights.into(),
            flights: Arc::clone(&self.flights),
            streamed,
            stopping: self.stopping.clone(),
            claims: self
                .shared
                .as_ref()
                .map(|_| (Arc::clone(&self), retry_until)),
        };
        let leads = futures_util::stream::unfold(queue, |mut queue| async move {
            let lead = queue.next_lead().await?;
            Some((lead, queue))
        });
        let core = Arc::clone(&self);
        let leads = leads.filter_map(move |lead| {
            let core = Arc::clone(&core);
            async move { core.decide(lead, retry_until).await }
        });
        self.fetch_leads(leads, retry_until).await;
    }

    /// Fetches `leads` (flights this task has claimed), at most `upstream.concurrency` at a
    /// time, hands each answer to its waiters and writes the definite ones back.
    pub(super) async fn fetch_leads(
        self: Arc<Self>,
        leads: impl futures_util::Stream<Item = Lead>,
        retry_until: Instant,
    ) {
        let per_request = self.upstream.concurrency();
        // Boxed, so it can be dropped (its queue settling what is left) before the writes end.
        let mut answers = Box::pin(
            leads
                .map(|lead| {
                    let core = &self;
                    async move {
                        if !core.start_fetch(&lead).await {
                            return (lead, None);
                        }
                        let answer = core.upstream.fetch(&lead.flight.sn, retry_until).await;
                        (lead, Some(answer))
                    }
                })
                .buffer_unordered(per_request),
        );
        let mut writes = PendingWrites::new(Arc::clone(&self));
        while let Some((lead, answer)) = next_answer(&mut answers, &mut writes).await {
            let Some(answer) = answer else {
                // Taken over by another instance before it started: wait for its answer.
                if !lead.flight.is_refresh() {
                    self.wait_elsewhere(vec![lead], retry_until);
                }
                continue;
            };
            self.record(&lead.flight.sn, &answer);
            if answer.is_err() {
                self.let_go(&lead);
            }
            let write = match &answer {
                Ok(fetched) => self.write_for(&lead.flight, fetched),
                Err(_) => None,
            };
            // The answer goes out first, never behind Redis.
            lead.flight.answer(answer);
            match write {
                Some(write) => writes.push(write, lead),
                None => drop(lead),
            }
        }
        drop(answers);
        writes.finish().await;
    }

    fn record(&self, sn: &str, answer: &Result<Fetched, UpstreamError>) {
        match answer {
            Ok(_) => self.health.record_upstream(true),
            // Not a call: the circuit already knows, and one line per SN would flood the log.
            Err(UpstreamError::CircuitOpen) => {}
            Err(err) => {
                // A bad body for one SN is that SN's problem, not a failing upstream.
                if err.counts_against_upstream() {
                    self.health.record_upstream(false);
                }
                warn!(sn = %sn, error = %err, "upstream fetch failed; not cached");
            }
        }
    }

    /// The write for one answer, unless the SN was invalidated since the fetch began.
    fn write_for(&self, flight: &Flight, fetched: &Fetched) -> Option<Write> {
        if flight.is_invalidated() {
            debug!(sn = %flight.sn, "invalidated during its fetch; not cached");
            self.metrics.record_write_backs(WriteBackOutcome::Fenced, 1);
            return None;
        }
        let now = SystemTime::now();
        let entry = match fetched {
            Fetched::Found(json) => Entry::found(json, now),
            Fetched::NotFound => Entry::not_found(now),
        };
        let lifetimes = &self.settings.lifetimes;
        let ttl = lifetimes.storage_ttl(entry.kind());
        debug_assert!(entry.kind() == EntryKind::NotFound || ttl >= lifetimes.ttl);
        Some(Write {
            sn: flight.sn.clone(),
            value: entry.encoded().clone(),
            ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::flights::Stage;
    use super::*;

    /// The queue of a streamed lookup's task, holding `queued`.
    fn streamed_queue(
        flights: &Arc<Flights>,
        queued: Vec<Arc<Flight>>,
        cancel: &CancellationToken,
    ) -> Queue {
        let (_feed, more) = tokio::sync::mpsc::unbounded_channel();
        Queue {
            waiting: queued.into(),
            flights: Arc::clone(flights),
            streamed: Some(Streamed {
                cancel: cancel.clone(),
                more,
            }),
            stopping: CancellationToken::new(),
            claims: None,
        }
    }

    #[tokio::test]
    async fn a_lookup_joining_a_queued_fetch_as_the_streamed_lookup_that_queued_it_goes_away_gets_its_answer()
     {
        let flights = Arc::new(Flights::new(10, Arc::default()));
        let cancel = CancellationToken::new();
        let streamed = flights.join([(0, "F")].into_iter()).unwrap();
        let mut queue = streamed_queue(&flights, streamed.unclaimed, &cancel);
        drop(streamed.all);

        // Another lookup joins F, still queued…
        let mut joined = flights.join([(0, "F")].into_iter()).unwrap();
        // …just as the streamed lookup goes away and its task drops what nobody waits for.
        cancel.cancel();
        assert!(queue.next().is_none());

        let flight = &joined.unclaimed[0];
        assert!(flight.claim(), "the joining lookup's own task fetches F");
        flight.answer(Ok(Fetched::NotFound));
        let (_, mut stage) = joined.all.remove(0);
        let stage = stage
            .wait_for(|stage| stage.answer().is_some())
            .await
            .unwrap();
        assert!(
            matches!(&*stage, Stage::Answered(Ok(Fetched::NotFound))),
            "{:?}",
            *stage
        );
    }

    #[test]
    fn a_queued_fetch_of_an_invalidated_sn_nobody_waits_for_is_not_started() {
        let flights = Arc::new(Flights::new(10, Arc::default()));
        let joined = flights.join([(0, "A"), (1, "B")].into_iter()).unwrap();
        let mut queue = streamed_queue(&flights, joined.unclaimed, &CancellationToken::new());
        let mut waits = joined.all;
        drop(waits.remove(0));
        flights.detach(&["A", "B"]);
        assert_eq!(flights.pending(), 2);
        let lead = queue.next().unwrap();
        assert_eq!(lead.flight.sn, "B", "B's lookup still waits for it");
        assert_eq!(flights.pending(), 1, "A ended without a fetch");
        drop(lead);
        assert_eq!(flights.pending(), 0);
    }

    #[test]
    fn once_draining_a_task_starts_nothing_and_settles_its_queue() {
        let flights = Arc::new(Flights::new(10, Arc::default()));
        let joined = flights.join([(0, "A"), (1, "B")].into_iter()).unwrap();
        let stopping = CancellationToken::new();
        let mut queue = Queue {
            waiting: joined.unclaimed.into(),
            flights: Arc::clone(&flights),
            streamed: None,
            stopping: stopping.clone(),
            claims: None,
        };
        let first = queue.next().unwrap();
        stopping.cancel();
        assert!(queue.next().is_none());
        assert_eq!(flights.pending(), 1, "only the fetch under way is left");
        let stage = joined.all[1].1.borrow().clone();
        assert!(
            matches!(stage, Stage::Settled(Err(UpstreamError::Abandoned))),
            "{stage:?}"
        );
        drop(first);
        assert_eq!(flights.pending(), 0);
    }
}
