//! A lookup past its cache read: some SNs resolved, the rest waiting on their fetches. It is
//! either finished whole (a JSON response) or walked SN by SN as each resolves (NDJSON).

use super::Core;
use super::fetch::Streamed;
use super::flights::{Answer, Flight, Overloaded, Stage};
use super::outcome::summarize;
use super::{Batch, ItemError, Outcome, Source};
use crate::metrics::{Metrics, SnOutcome};
use crate::upstream::{Fetched, UpstreamError};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, Span, info_span};

/// An answer for the SN at an index, and the channel to wait on for its write-back.
pub(super) type Waiting = BoxFuture<'static, (usize, Answer, watch::Receiver<Stage>)>;

/// A lookup in progress.
pub struct Resolving {
    pub(super) distinct: Vec<String>,
    pub(super) order: Vec<usize>,
    pub(super) outcomes: Vec<Option<Outcome>>,
    pub(super) answers: FuturesUnordered<Waiting>,
    pub(super) settling: Vec<watch::Receiver<Stage>>,
    pub(super) arrived: Instant,
    pub(super) deadline: Instant,
    pub(super) upstream_fetches: usize,
    pub(super) metrics: Arc<Metrics>,
    /// Cancels this lookup's queued fetches if it is dropped before it ends (a streaming
    /// client that went away); disarmed when it ends normally, deadline included.
    pub(super) cancel_on_drop: Option<DropGuard>,
    /// The next index to report among those resolved before any fetch (hits, invalid SNs).
    pub(super) cursor: usize,
    /// The deadline passed: the unresolved SNs are now `deadline_exceeded`.
    pub(super) expired: bool,
    /// Where the scan for SNs left unresolved at the deadline goes on from.
    pub(super) expired_cursor: usize,
    /// A streamed lookup's cache reads still to come; `None` when it was all read at start.
    pub(super) reader: Option<Reader>,
    /// The SN reported last, whose discount a streamed lookup lets go of on the next call.
    pub(super) last_reported: Option<usize>,
}

/// How long a window whose misses could not be queued (`upstream.max_pending` reached by
/// other lookups, and none of this one's fetches outstanding) waits before trying again.
const ROOM_RETRY: Duration = Duration::from_millis(25);

/// What a streamed lookup still has to read from the cache, and how it feeds its fetch task.
pub(super) struct Reader {
    pub(super) core: Arc<Core>,
    /// Valid SNs not read yet, in request order.
    pub(super) unread: VecDeque<usize>,
    /// Misses read but not yet joined to a flight: there was no room under `max_pending`.
    pub(super) unjoined: Vec<usize>,
    pub(super) refresh: bool,
    /// The lookup's one fetch task, started with its first misses; closed once all is read.
    pub(super) feed: Option<mpsc::UnboundedSender<Vec<Arc<Flight>>>>,
    pub(super) cancel: CancellationToken,
    /// SNs per cache read.
    pub(super) window: usize,
    /// Fetches waited on past which no further window is read.
    pub(super) max_outstanding: usize,
    /// The request's span, parent of the fetch task's.
    pub(super) span: Span,
}

impl Resolving {
    /// Waits for every SN (until the deadline) and their write-backs, and returns the batch.
    pub async fn finish(mut self) -> Batch {
        while self.next_resolved().await.is_some() {}
        self.batch().await
    }

    /// The index of the next SN resolved: first those resolved without a fetch, in request
    /// order, then the fetched ones as their answers come, then, once the deadline passes,
    /// the rest as `deadline_exceeded`. `None` when every SN has been reported.
    pub async fn next_resolved(&mut self) -> Option<usize> {
        self.let_go_of_last_reported();
        loop {
            let read_up_to = self.read_up_to();
            while self.cursor < read_up_to {
                let index = self.cursor;
                self.cursor += 1;
                if self.outcomes[index].is_some() {
                    return self.report(index);
                }
            }
            if self.read_step().await {
                continue;
            }
            if self.expired {
                break;
            }
            match tokio::time::timeout_at(self.deadline, self.answers.next()).await {
                Ok(Some((index, answer, stage))) => {
                    self.outcomes[index] = Some(fetched_outcome(answer));
                    self.settling.push(stage);
                    return self.report(index);
                }
                Ok(None) => return None,
                // Round again: what was resolved but not reported yet goes first, so the scan
                // below, which starts only once the cursor is at the end, reports each SN once.
                Err(_) => self.expire(),
            }
        }
        // Past the deadline: whatever is left is reported as such, each once.
        let index = self.expired_cursor
            + self.outcomes[self.expired_cursor..]
                .iter()
                .position(Option::is_none)?;
        self.expired_cursor = index + 1;
        self.outcomes[index] = Some(Outcome::Failed(ItemError::DeadlineExceeded));
        self.report(index)
    }

    fn report(&mut self, index: usize) -> Option<usize> {
        if self.reader.is_some() {
            self.last_reported = Some(index);
        }
        Some(index)
    }

    /// A streamed line is out: its discount bytes are not needed any more (its kind and
    /// source stay, for the summary).
    fn let_go_of_last_reported(&mut self) {
        if let Some(index) = self.last_reported.take()
            && let Some(Some(Outcome::Found { discount, .. })) = self.outcomes.get_mut(index)
        {
            *discount = Bytes::new();
        }
    }

    /// The deadline passed: nothing more is read or waited for; the rest is reported as
    /// `deadline_exceeded`, after every SN resolved before it.
    fn expire(&mut self) {
        self.expired = true;
        self.answers = FuturesUnordered::new();
        if let Some(reader) = &mut self.reader {
            reader.unread.clear();
            reader.unjoined.clear();
            reader.feed = None;
        }
    }

    /// SNs before this index have been read from the cache (or need no read).
    fn read_up_to(&self) -> usize {
        self.reader
            .as_ref()
            .and_then(|reader| reader.unread.front().copied())
            .unwrap_or(self.outcomes.len())
    }

    /// Takes the next step of a streamed lookup's reading: joins the misses that found no
    /// room before, or reads the next window if few enough fetches are outstanding. `false`
    /// when there is nothing to do but report and wait on what is outstanding.
    async fn read_step(&mut self) -> bool {
        let Some(reader) = &self.reader else {
            return false;
        };
        if self.expired {
            return false;
        }
        if !reader.unjoined.is_empty() {
            if self.join_unjoined().is_ok() {
                return true;
            }
            // No room under upstream.max_pending: our own answers make some; else wait.
            if !self.answers.is_empty() {
                return false;
            }
            if Instant::now() >= self.deadline {
                self.expire();
                return true;
            }
            tokio::time::sleep_until((Instant::now() + ROOM_RETRY).min(self.deadline)).await;
            return true;
        }
        if !reader.unread.is_empty() && self.answers.len() < reader.max_outstanding {
            // A later window without room keeps its misses for the next step.
            let _ = self.read_window().await;
            return true;
        }
        self.close_feed_if_all_read();
        false
    }

    /// Reads the first window; its misses must find room at once, or nothing is started.
    pub(super) async fn read_first_window(&mut self) -> Result<(), Overloaded> {
        self.read_window().await?;
        self.close_feed_if_all_read();
        Ok(())
    }

    /// Reads the next window of the cache, fills in its hits and joins its misses.
    async fn read_window(&mut self) -> Result<(), Overloaded> {
        let Some(reader) = &mut self.reader else {
            return Ok(());
        };
        let take = reader.window.min(reader.unread.len());
        let window: Vec<usize> = reader.unread.drain(..take).collect();
        let misses = if reader.refresh {
            window
        } else {
            let core = Arc::clone(&reader.core);
            core.read_cache(&self.distinct, window, self.deadline, &mut self.outcomes)
                .await
        };
        if let Some(reader) = &mut self.reader {
            reader.unjoined.extend(misses);
        }
        self.join_unjoined()
    }

    /// Joins the misses read but not joined yet, and queues the new ones in the fetch task.
    fn join_unjoined(&mut self) -> Result<(), Overloaded> {
        let Some(reader) = &mut self.reader else {
            return Ok(());
        };
        if reader.unjoined.is_empty() {
            return Ok(());
        }
        let distinct = &self.distinct;
        let joined = reader.core.flights.join(
            reader
                .unjoined
                .iter()
                .map(|&index| (index, distinct[index].as_str())),
        )?;
        self.upstream_fetches += reader.unjoined.len();
        reader.unjoined.clear();
        if !joined.unclaimed.is_empty() {
            reader.queue(joined.unclaimed, self.deadline);
        }
        for (index, stage) in joined.all {
            self.answers.push(wait_for_answer(index, stage));
        }
        Ok(())
    }

    /// Once every window is read and joined, the fetch task is told no more is coming, so it
    /// ends (and writes back) when its queue is done.
    fn close_feed_if_all_read(&mut self) {
        if let Some(reader) = &mut self.reader
            && reader.unread.is_empty()
            && reader.unjoined.is_empty()
        {
            reader.feed = None;
        }
    }

    /// The SN at `index` and its outcome, once [`Resolving::next_resolved`] returned it.
    pub fn resolved(&self, index: usize) -> Option<(&str, &Outcome)> {
        let outcome = self.outcomes.get(index)?.as_ref()?;
        Some((self.distinct[index].as_str(), outcome))
    }

    /// Waits (within the deadline) for the write-backs of what was fetched, so a lookup of
    /// the same SNs right after this one is all hits; then counts and sums up the batch.
    pub async fn batch(mut self) -> Batch {
        let written = futures_util::future::join_all(self.settling.iter_mut().map(|stage| async {
            // The guard the wait returns borrows the channel: dropped at once, never held.
            let settled = stage
                .wait_for(|stage| matches!(stage, Stage::Settled(_)))
                .await;
            drop(settled);
        }));
        let _ = tokio::time::timeout_at(self.deadline, written).await;
        if let Some(guard) = self.cancel_on_drop.take() {
            guard.disarm();
        }
        let outcomes: Vec<Outcome> = std::mem::take(&mut self.outcomes)
            .into_iter()
            .map(|outcome| outcome.unwrap_or(Outcome::Failed(ItemError::DeadlineExceeded)))
            .collect();
        let mut counts = [0u64; SnOutcome::ALL.len()];
        for outcome in &outcomes {
            counts[outcome.metric().index()] += 1;
        }
        for (outcome, count) in SnOutcome::ALL.into_iter().zip(counts) {
            self.metrics.record_sns(outcome, count);
        }
        let summary = summarize(
            self.order.len(),
            &outcomes,
            self.upstream_fetches,
            self.arrived.elapsed(),
        );
        Batch {
            distinct: std::mem::take(&mut self.distinct),
            outcomes,
            order: std::mem::take(&mut self.order),
            summary,
        }
    }
}

impl Reader {
    /// Sends flights to the lookup's fetch task, starting it with the first ones.
    fn queue(&mut self, flights: Vec<Arc<Flight>>, deadline: Instant) {
        // A task that ended (its lookup was cancelled) hands the flights back for a new one.
        let flights = match &self.feed {
            Some(feed) => match feed.send(flights) {
                Ok(()) => return,
                Err(mpsc::error::SendError(flights)) => flights,
            },
            None => flights,
        };
        let (feed, more) = mpsc::unbounded_channel();
        self.feed = Some(feed);
        let span = info_span!(parent: &self.span, "upstream_fetch", streamed = true);
        let streamed = Streamed {
            cancel: self.cancel.clone(),
            more,
        };
        let fetch = Arc::clone(&self.core).fetch(flights, deadline, Some(streamed));
        self.core.tasks.spawn(fetch.instrument(span));
    }
}

/// Waits (notified, not polling) until the flight has an answer; keeps the receiver so the
/// caller can wait for the write-back next.
pub(super) fn wait_for_answer(index: usize, mut stage: watch::Receiver<Stage>) -> Waiting {
    Box::pin(async move {
        let answer = match stage.wait_for(|stage| stage.answer().is_some()).await {
            Ok(current) => current.answer().cloned(),
            Err(_) => None,
        };
        let answer = answer.unwrap_or(Err(UpstreamError::Abandoned));
        (index, answer, stage)
    })
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
