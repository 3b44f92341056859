//! A lookup past its cache read: some SNs resolved, the rest waiting on their fetches. It is
//! either finished whole (a JSON response) or walked SN by SN as each resolves (NDJSON).

use super::flights::{Answer, Stage};
use super::outcome::summarize;
use super::{Batch, ItemError, Outcome, Source};
use crate::metrics::{Metrics, SnOutcome};
use crate::upstream::{Fetched, UpstreamError};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::DropGuard;

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
        while self.cursor < self.outcomes.len() {
            let index = self.cursor;
            self.cursor += 1;
            if self.outcomes[index].is_some() {
                return Some(index);
            }
        }
        if !self.expired {
            match tokio::time::timeout_at(self.deadline, self.answers.next()).await {
                Ok(Some((index, answer, stage))) => {
                    self.outcomes[index] = Some(fetched_outcome(answer));
                    self.settling.push(stage);
                    return Some(index);
                }
                Ok(None) => return None,
                Err(_) => {
                    self.expired = true;
                    self.answers = FuturesUnordered::new();
                }
            }
        }
        // Past the deadline: whatever is left is reported as such, each once.
        let index = self.expired_cursor
            + self.outcomes[self.expired_cursor..]
                .iter()
                .position(Option::is_none)?;
        self.expired_cursor = index + 1;
        self.outcomes[index] = Some(Outcome::Failed(ItemError::DeadlineExceeded));
        Some(index)
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
