//! A lookup streamed SN by SN (NDJSON): what needed no fetch first, in request order, then
//! each fetched SN as its answer comes, then, past the deadline, the rest as
//! `deadline_exceeded`. The cache is read a window at a time as the stream is consumed, and
//! the window's misses are fed to the lookup's one fetch task.

use super::fetch::Streamed;
use super::flights::{Flight, Overloaded};
use super::resolving::{Next, Resolving};
use super::{Batch, Core, Outcome};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, Span, info_span};

/// How long a window whose misses could not be queued (`upstream.max_pending` reached by
/// other lookups, and none of this one's fetches outstanding) waits before trying again.
const ROOM_RETRY: Duration = Duration::from_millis(25);

/// A lookup being streamed; see [`super::Lookup::stream`].
pub struct StreamedLookup {
    resolving: Resolving,
    reader: Reader,
    /// Cancels this lookup's queued fetches if it is dropped before it ends (a client that
    /// went away); disarmed when it ends normally, deadline included.
    cancel_on_drop: DropGuard,
    /// The next index to report among those resolved before any fetch (hits, invalid SNs).
    cursor: usize,
    /// Once the deadline has passed: where the scan for SNs left unresolved goes on from.
    overdue_from: Option<usize>,
    /// The SN reported last, whose discount is let go of on the next call.
    last_reported: Option<usize>,
}

/// What the lookup still has to read from the cache, and how it feeds its fetch task.
struct Reader {
    core: Arc<Core>,
    /// Valid SNs not read yet, in request order.
    unread: VecDeque<usize>,
    /// Misses read but not yet joined to a flight: there was no room under `max_pending`.
    unjoined: Vec<usize>,
    /// Part of a read of the misses not joined yet failed: they are fetched without claims.
    read_failed: bool,
    refresh: bool,
    /// The lookup's one fetch task, started with its first misses; closed once all is read.
    feed: Option<mpsc::UnboundedSender<Vec<Arc<Flight>>>>,
    cancel: CancellationToken,
    /// SNs per cache read.
    window: usize,
    /// Fetches waited on past which no further window is read.
    max_outstanding: usize,
    /// The request's span, parent of the fetch task's.
    span: Span,
}

impl StreamedLookup {
    /// Validates and reads the first window. `cancel` (or dropping the lookup before its
    /// end) drops the fetches it queued but did not start, unless another lookup waits for
    /// them.
    ///
    /// # Errors
    /// [`Overloaded`]: the first window's misses would pass `upstream.max_pending`.
    pub(super) async fn start(
        core: &Arc<Core>,
        requested: Vec<String>,
        refresh: bool,
        arrived: Instant,
        cancel: CancellationToken,
    ) -> Result<Self, Overloaded> {
        let (resolving, valid) = Resolving::new(core, requested, arrived);
        let settings = &core.settings;
        let reader = Reader {
            core: Arc::clone(core),
            unread: valid.into(),
            unjoined: Vec::new(),
            read_failed: false,
            refresh,
            feed: None,
            cancel: cancel.clone(),
            window: settings.write_batch.max(1),
            max_outstanding: (2 * core.upstream.concurrency()).max(settings.write_batch),
            span: Span::current(),
        };
        let mut lookup = Self {
            resolving,
            reader,
            cancel_on_drop: cancel.drop_guard(),
            cursor: 0,
            overdue_from: None,
            last_reported: None,
        };
        lookup.read_window().await?;
        lookup.close_feed_if_all_read();
        Ok(lookup)
    }

    /// The index of the next SN resolved: first those resolved without a fetch, in request
    /// order, then the fetched ones as their answers come, then, once the deadline passes,
    /// the rest as `deadline_exceeded`. `None` when every SN has been reported.
    pub async fn next_resolved(&mut self) -> Option<usize> {
        if let Some(index) = self.last_reported.take() {
            self.resolving.let_go(index);
        }
        let index = self.next_index().await?;
        self.last_reported = Some(index);
        Some(index)
    }

    async fn next_index(&mut self) -> Option<usize> {
        loop {
            let read_up_to = self.reader.unread.front().copied();
            let read_up_to = read_up_to.unwrap_or(self.resolving.len());
            while self.cursor < read_up_to {
                let index = self.cursor;
                self.cursor += 1;
                if self.resolving.is_resolved(index) {
                    return Some(index);
                }
            }
            if self.overdue_from.is_some() {
                break;
            }
            if self.read_step().await {
                continue;
            }
            match self.resolving.next_answer().await {
                Next::Answered(index) => return Some(index),
                Next::AllAnswered => return None,
                // Round again: what was resolved but not reported yet goes first, so the scan
                // below, which starts only once the cursor is at the end, reports each SN once.
                Next::DeadlinePassed => self.expire(),
            }
        }
        // Past the deadline: whatever is left is reported as such, each once.
        let index = self.resolving.next_overdue(self.overdue_from?)?;
        self.overdue_from = Some(index + 1);
        Some(index)
    }

    /// The deadline passed: nothing more is read or waited for; the rest is reported as
    /// `deadline_exceeded`, after every SN resolved before it.
    fn expire(&mut self) {
        self.overdue_from = Some(0);
        self.resolving.stop_waiting();
        let reader = &mut self.reader;
        reader.unread.clear();
        reader.unjoined.clear();
        reader.feed = None;
    }

    /// Takes the next step of reading: joins the misses that found no room before, or reads
    /// the next window if few enough fetches are outstanding. `false` when there is nothing
    /// to do but report and wait on what is outstanding.
    async fn read_step(&mut self) -> bool {
        if !self.reader.unjoined.is_empty() {
            if self.join_unjoined().is_ok() {
                return true;
            }
            // No room under upstream.max_pending: our own answers make some; else wait.
            if self.resolving.outstanding() > 0 {
                return false;
            }
            let deadline = self.resolving.deadline();
            if Instant::now() >= deadline {
                self.expire();
                return true;
            }
            tokio::time::sleep_until((Instant::now() + ROOM_RETRY).min(deadline)).await;
            return true;
        }
        let reader = &self.reader;
        if !reader.unread.is_empty() && self.resolving.outstanding() < reader.max_outstanding {
            // A later window without room keeps its misses for the next step.
            let _ = self.read_window().await;
            return true;
        }
        self.close_feed_if_all_read();
        false
    }

    /// Reads the next window of the cache, fills in its hits and joins its misses.
    async fn read_window(&mut self) -> Result<(), Overloaded> {
        let reader = &mut self.reader;
        let take = reader.window.min(reader.unread.len());
        let window: Vec<usize> = reader.unread.drain(..take).collect();
        let (misses, read_failed) = if reader.refresh {
            (window, false)
        } else {
            self.resolving.read(&reader.core, window).await
        };
        self.reader.unjoined.extend(misses);
        self.reader.read_failed |= read_failed;
        self.join_unjoined()
    }

    /// Joins the misses read but not joined yet, and queues the new ones in the fetch task.
    fn join_unjoined(&mut self) -> Result<(), Overloaded> {
        let reader = &mut self.reader;
        if reader.unjoined.is_empty() {
            return Ok(());
        }
        let unclaimed =
            self.resolving
                .join(&reader.core.flights, &reader.unjoined, reader.refresh)?;
        reader.unjoined.clear();
        if std::mem::take(&mut reader.read_failed) {
            reader.core.skip_claims(&unclaimed);
        }
        if !unclaimed.is_empty() {
            reader.queue(unclaimed, self.resolving.deadline());
        }
        Ok(())
    }

    /// Once every window is read and joined, the fetch task is told no more is coming, so it
    /// ends (and writes back) when its queue is done.
    fn close_feed_if_all_read(&mut self) {
        let reader = &mut self.reader;
        if reader.unread.is_empty() && reader.unjoined.is_empty() {
            reader.feed = None;
        }
    }

    /// The SN at `index` and its outcome, once [`StreamedLookup::next_resolved`] returned it.
    pub fn resolved(&self, index: usize) -> Option<(&str, &Outcome)> {
        self.resolving.resolved(index)
    }

    /// Waits (within the deadline) for the write-backs of what was fetched, so a lookup of
    /// the same SNs right after this one is all hits; then counts and sums up the batch.
    pub async fn batch(mut self) -> Batch {
        self.resolving.write_backs().await;
        self.cancel_on_drop.disarm();
        self.resolving.into_batch()
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
