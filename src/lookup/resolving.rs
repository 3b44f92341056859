//! What every lookup keeps past its cache read, batch or stream alike: each distinct SN's
//! outcome, the answers still awaited from the fetches of its misses, and the write-backs to
//! wait for before it is summed up.

use super::Core;
use super::flights::{Answer, Flight, Flights, Overloaded, Stage};
use super::outcome::summarize;
use super::{Batch, ItemError, Outcome, Source};
use crate::metrics::{Metrics, SnOutcome};
use crate::sn;
use crate::upstream::{Fetched, UpstreamError};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::time::Instant;

/// An answer for the SN at an index, and the channel to wait on for its write-back.
type Waiting = BoxFuture<'static, (usize, Answer, watch::Receiver<Stage>)>;

/// A lookup's SNs and what has become of them so far.
pub(super) struct Resolving {
    distinct: Vec<String>,
    order: Vec<usize>,
    outcomes: Vec<Option<Outcome>>,
    /// The answers awaited from the flights this lookup joined.
    answers: FuturesUnordered<Waiting>,
    /// The flights answered, whose write-backs the lookup waits for before it ends.
    settling: Vec<watch::Receiver<Stage>>,
    arrived: Instant,
    deadline: Instant,
    upstream_fetches: usize,
    metrics: Arc<Metrics>,
    /// Misses read but not joined yet that found a value they could not use.
    occupied: Vec<usize>,
}

/// What waiting for the next answer came to.
pub(super) enum Next {
    /// The SN at this index has its answer.
    Answered(usize),
    /// Every answer awaited has come.
    AllAnswered,
    /// The deadline passed first: no answer is awaited any more.
    DeadlinePassed,
}

impl Resolving {
    /// A lookup with its SNs deduplicated and validated (the invalid ones resolved), nothing
    /// read or fetched yet; and the indices of the valid SNs, in order.
    pub(super) fn new(core: &Core, requested: Vec<String>, arrived: Instant) -> (Self, Vec<usize>) {
        let (distinct, order) = super::dedup(requested);
        let mut outcomes: Vec<Option<Outcome>> = vec![None; distinct.len()];
        let mut valid = Vec::with_capacity(distinct.len());
        for (index, sn) in distinct.iter().enumerate() {
            match sn::validate(sn) {
                Ok(()) => valid.push(index),
                Err(err) => outcomes[index] = Some(Outcome::Invalid(err)),
            }
        }
        let resolving = Self {
            distinct,
            order,
            outcomes,
            answers: FuturesUnordered::new(),
            settling: Vec::new(),
            arrived,
            deadline: arrived + core.settings.request_timeout,
            upstream_fetches: 0,
            metrics: Arc::clone(&core.metrics),
            occupied: Vec::new(),
        };
        (resolving, valid)
    }

    /// When the lookup's time is up, counted from the request's arrival.
    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Distinct SNs.
    pub(super) fn len(&self) -> usize {
        self.outcomes.len()
    }

    /// Answers awaited from fetches.
    pub(super) fn outstanding(&self) -> usize {
        self.answers.len()
    }

    pub(super) fn is_resolved(&self, index: usize) -> bool {
        self.outcomes[index].is_some()
    }

    /// Reads `candidates` from the cache, filling in the hits; returns the misses, and
    /// whether part of the read failed (then Redis is down or slow, and claiming the misses
    /// there would only add its timeout to the lookup: see `Core::skip_claims`).
    pub(super) async fn read(
        &mut self,
        core: &Arc<Core>,
        candidates: Vec<usize>,
    ) -> (Vec<usize>, bool) {
        let misses = core
            .read_cache(
                &self.distinct,
                candidates,
                self.deadline,
                &mut self.outcomes,
            )
            .await;
        self.occupied.extend(misses.occupied);
        (misses.indices, misses.failed)
    }

    /// Joins (or starts) the flights of `misses` and awaits their answers; returns the
    /// flights no task has started yet, for the caller to queue in a fetch task.
    ///
    /// # Errors
    /// [`Overloaded`]: starting them would pass `upstream.max_pending`; nothing was joined.
    /// With `forced` (a lookup that asked for fresh answers), the flights are claimed in
    /// Redis even where an entry is there.
    pub(super) fn join(
        &mut self,
        flights: &Flights,
        misses: &[usize],
        forced: bool,
    ) -> Result<Vec<Arc<Flight>>, Overloaded> {
        let distinct = &self.distinct;
        let joined = flights.join(misses.iter().map(|&i| (i, distinct[i].as_str())))?;
        if forced {
            joined.unclaimed.iter().for_each(|flight| flight.force());
        } else if !self.occupied.is_empty() {
            // A value is there, unusable: a claim only if absent would never be won.
            let occupied: std::collections::HashSet<&str> = self
                .occupied
                .drain(..)
                .map(|index| distinct[index].as_str())
                .collect();
            for flight in &joined.unclaimed {
                if occupied.contains(flight.sn.as_str()) {
                    flight.force();
                }
            }
        }
        self.upstream_fetches += misses.len();
        let waits = joined.all.into_iter();
        self.answers
            .extend(waits.map(|(index, stage)| wait_for_answer(index, stage)));
        Ok(joined.unclaimed)
    }

    /// Waits, until the deadline, for the next answer of a fetch and fills it in.
    pub(super) async fn next_answer(&mut self) -> Next {
        match tokio::time::timeout_at(self.deadline, self.answers.next()).await {
            Ok(Some((index, answer, stage))) => {
                self.outcomes[index] = Some(fetched_outcome(answer));
                self.settling.push(stage);
                Next::Answered(index)
            }
            Ok(None) => Next::AllAnswered,
            Err(_) => {
                self.stop_waiting();
                Next::DeadlinePassed
            }
        }
    }

    /// Stops listening for the answers not come yet: the lookup no longer wants them.
    pub(super) fn stop_waiting(&mut self) {
        self.answers = FuturesUnordered::new();
    }

    /// Past the deadline: the first SN from `from` on without an outcome, now
    /// `deadline_exceeded`.
    pub(super) fn next_overdue(&mut self, from: usize) -> Option<usize> {
        let index = from + self.outcomes[from..].iter().position(Option::is_none)?;
        self.outcomes[index] = Some(Outcome::Failed(ItemError::DeadlineExceeded));
        Some(index)
    }

    /// The SN at `index` and its outcome, once it has one.
    pub(super) fn resolved(&self, index: usize) -> Option<(&str, &Outcome)> {
        let outcome = self.outcomes.get(index)?.as_ref()?;
        Some((self.distinct[index].as_str(), outcome))
    }

    /// The discount at `index` is out (a streamed line): its bytes are not needed any more
    /// (its kind and source stay, for the summary).
    pub(super) fn let_go(&mut self, index: usize) {
        if let Some(Some(Outcome::Found { discount, .. })) = self.outcomes.get_mut(index) {
            *discount = Bytes::new();
        }
    }

    /// Waits (within the deadline) for the write-backs of what was fetched, so a lookup of
    /// the same SNs right after this one is all hits.
    pub(super) async fn write_backs(&mut self) {
        let written = futures_util::future::join_all(self.settling.iter_mut().map(|stage| async {
            // The guard the wait returns borrows the channel: dropped at once, never held.
            let settled = stage
                .wait_for(|stage| matches!(stage, Stage::Settled(_)))
                .await;
            drop(settled);
        }));
        let _ = tokio::time::timeout_at(self.deadline, written).await;
    }

    /// Counts and sums up the lookup; what has no outcome is `deadline_exceeded`.
    pub(super) fn into_batch(self) -> Batch {
        let outcomes: Vec<Outcome> = self
            .outcomes
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
            distinct: self.distinct,
            outcomes,
            order: self.order,
            summary,
        }
    }
}

/// Waits (notified, not polling) until the flight has an answer; keeps the receiver so the
/// caller can wait for the write-back next.
fn wait_for_answer(index: usize, mut stage: watch::Receiver<Stage>) -> Waiting {
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
