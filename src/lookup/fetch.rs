//! The background half of a lookup: fetch the flights a request started, hand each answer to
//! every waiter, write the definite ones back in pipelines as they come, then settle them.

use super::flights::{Flight, Flights};
use super::freshness::Lifetimes;
use super::invalidations::Invalidations;
use crate::cache::{Cache, Entry, EntryKind, Write};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::upstream::{Fetched, UpstreamClient, UpstreamError};
use futures_util::{Stream, StreamExt};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

/// What a fetch task needs, owned, so it outlives the request that started it.
#[derive(Clone)]
pub(super) struct Fetcher {
    pub(super) cache: Arc<dyn Cache>,
    pub(super) upstream: Arc<UpstreamClient>,
    pub(super) health: Arc<Health>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) lifetimes: Lifetimes,
    pub(super) write_batch: usize,
    pub(super) invalidations: Arc<Invalidations>,
    pub(super) flights: Arc<Flights>,
    /// Write-backs run as tasks of their own here, so shutdown waits for them too.
    pub(super) tasks: TaskTracker,
}

/// Answers wait at most this long for their write-back: a batch that resolves together is
/// written in one pipeline, while early answers of a slow batch are not held back by the
/// slowest SN (nor lost to the cache when the request's deadline passes).
const WRITE_BACK_DELAY: Duration = Duration::from_millis(50);

/// A flight this task leads. However the task ends, the flight is settled and leaves the
/// map when its `Lead` is dropped: a waiter never waits for an answer that cannot come.
struct Lead {
    flight: Arc<Flight>,
    flights: Arc<Flights>,
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
        }
    }

    /// After a cancellation: the queued flights nobody else waits for are dropped (settled as
    /// abandoned and removed); those another lookup waits for are left for that lookup's own
    /// task, which queued them too.
    fn drop_unwanted(&mut self) {
        self.close_feed();
        for flight in std::mem::take(&mut self.waiting) {
            if flight.waiters() == 0 && flight.claim() {
                drop(self.lead(flight));
            }
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
            if let Some(lead) = self.next() {
                return Some(lead);
            }
            let more = match self.streamed.as_mut() {
                Some(streamed) if !streamed.cancel.is_cancelled() => streamed.more.recv().await,
                _ => None,
            };
            match more {
                Some(flights) => self.waiting.extend(flights),
                None => return None,
            }
        }
    }
}

impl Iterator for Queue {
    type Item = Lead;

    fn next(&mut self) -> Option<Lead> {
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
            if flight.claim() {
                return Some(self.lead(flight));
            }
        }
        None
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.close_feed();
        // Claiming makes a Lead, whose drop settles the flight and removes it.
        while let Some(flight) = self.waiting.pop_front() {
            if flight.claim() {
                drop(self.lead(flight));
            }
        }
    }
}

impl Fetcher {
    /// Fetches the flights not claimed by another task first, at most `upstream.concurrency`
    /// at a time for this task.
    ///
    /// That bound is what shares the upstream fairly: the global limit's queue is FIFO, and
    /// a task only queues its next fetch when one of its own finishes, so a single-SN
    /// lookup waits for one free slot, not behind the whole of a 10,000-SN export (and if it
    /// wants an SN the export has queued, it claims and fetches that SN itself).
    ///
    /// For a streamed lookup, flights keep coming until it closes the feed, and those not
    /// started are dropped if it is cancelled.
    pub(super) async fn run(
        self,
        flights: Vec<Arc<Flight>>,
        retry_until: Instant,
        streamed: Option<Streamed>,
    ) {
        let per_request = self.upstream.concurrency();
        let queue = Queue {
            waiting: flights.into(),
            flights: Arc::clone(&self.flights),
            streamed,
        };
        let leads = futures_util::stream::unfold(queue, |mut queue| async move {
            let lead = queue.next_lead().await?;
            Some((lead, queue))
        });
        // Boxed, so it can be dropped (its queue settling what is left) before the writes end.
        let mut answers = Box::pin(
            leads
                .map(|lead| {
                    let upstream = &self.upstream;
                    async move {
                        let answer = upstream.fetch(&lead.flight.sn, retry_until).await;
                        (lead, answer)
                    }
                })
                .buffer_unordered(per_request),
        );
        let mut writes = PendingWrites::new(self.writer(), self.tasks.clone(), self.write_batch);
        while let Some((lead, answer)) = next_answer(&mut answers, &mut writes).await {
            self.record(&lead.flight.sn, &answer);
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

    fn writer(&self) -> Writer {
        Writer {
            cache: Arc::clone(&self.cache),
            health: Arc::clone(&self.health),
            metrics: Arc::clone(&self.metrics),
            invalidations: Arc::clone(&self.invalidations),
        }
    }

    /// The write for one answer, unless the SN was invalidated since the fetch began.
    fn write_for(&self, flight: &Flight, fetched: &Fetched) -> Option<Write> {
        if self.invalidations.since(&flight.sn, flight.started) {
            debug!(sn = %flight.sn, "invalidated during its fetch; not cached");
            self.metrics.record_write_backs("fenced", 1);
            return None;
        }
        let now = SystemTime::now();
        let entry = match fetched {
            Fetched::Found(json) => Entry::found(json, now),
            Fetched::NotFound => Entry::not_found(now),
        };
        let ttl = self.lifetimes.storage_ttl(entry.kind());
        debug_assert!(entry.kind() == EntryKind::NotFound || ttl >= self.lifetimes.ttl);
        Some(Write {
            sn: flight.sn.clone(),
            value: entry.encoded().clone(),
            ttl,
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
    leads: Vec<Lead>,
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
            leads: Vec::new(),
            flush_at: None,
            flushes: Vec::new(),
            writer,
            tasks,
            max: max.max(1),
        }
    }

    fn push(&mut self, write: Write, lead: Lead) {
        self.writes.push(write);
        self.leads.push(lead);
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
        let leads = std::mem::take(&mut self.leads);
        let span = info_span!("write_back", keys = writes.len());
        let write = self.writer.clone().write(writes, leads).instrument(span);
        self.flushes.push(self.tasks.spawn(write));
    }

    /// Sends what is left and waits for every pipeline of this task.
    async fn finish(mut self) {
        self.flush();
        for flush in std::mem::take(&mut self.flushes) {
            let _ = flush.await;
        }
    }
}

/// Writes one pipeline, counting and logging a failure: it is never the request's failure.
#[derive(Clone)]
struct Writer {
    cache: Arc<dyn Cache>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    invalidations: Arc<Invalidations>,
}

impl Writer {
    /// Writes, then settles the flights (dropping their leads), so a lookup after this reads
    /// the cache instead of joining.
    async fn write(self, writes: Vec<Write>, leads: Vec<Lead>) {
        let answers = writes.len();
        // Checked again right before the SET: an invalidation may have come in meanwhile.
        let writes: Vec<Write> = writes
            .into_iter()
            .zip(&leads)
            .filter(|(write, lead)| !self.invalidations.since(&write.sn, lead.flight.started))
            .map(|(write, _)| write)
            .collect();
        self.metrics
            .record_write_backs("fenced", answers - writes.len());
        if !writes.is_empty() {
            match self.cache.set_many(&writes).await {
                Ok(()) => {
                    self.metrics.record_write_backs("ok", writes.len());
                    debug!(keys = writes.len(), "write-back done");
                }
                Err(err) if err.is_skipped() => {
                    self.metrics.record_write_backs("skipped", writes.len());
                    debug!(
                        keys = writes.len(),
                        "write-back skipped: redis's circuit is open"
                    );
                }
                Err(err) => {
                    self.metrics.record_write_backs("failed", writes.len());
                    self.health.record_redis_error();
                    warn!(error = %err, keys = writes.len(), "write-back failed; the next lookup refetches");
                }
            }
        }
        drop(leads);
    }
}
