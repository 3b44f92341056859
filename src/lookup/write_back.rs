//! Writing answers back: gathered into pipelines as they come, each pipeline a task of its
//! own, the flights settled once written; and a count of the answers still on their way, so
//! a drain that runs out of time reports what it leaves unwritten instead of losing it
//! silently.

use super::Core;
use super::fetch::Lead;
use crate::cache::{CacheError, FencedWrite, Refusals, Write};
use crate::metrics::{Metrics, RefusalReason, WriteBackOutcome};
use futures_util::{Stream, StreamExt};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

/// Answers wait at most this long for their write-back: a batch that resolves together is
/// written in one pipeline, while early answers of a slow batch are not held back by the
/// slowest SN (nor lost to the cache when the request's deadline passes).
const WRITE_BACK_DELAY: Duration = Duration::from_millis(50);

/// The next answer; while waiting for it, sends off the writes that have waited long enough.
pub(super) async fn next_answer<S: Stream + Unpin>(
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
pub(super) struct PendingWrites {
    writes: Vec<Write>,
    leads: Vec<Lead>,
    flush_at: Option<Instant>,
    flushes: Vec<JoinHandle<()>>,
    /// Where the pipelines are written, and the tasks they run as (so shutdown waits).
    core: Arc<Core>,
}

impl PendingWrites {
    pub(super) fn new(core: Arc<Core>) -> Self {
        Self {
            writes: Vec::new(),
            leads: Vec::new(),
            flush_at: None,
            flushes: Vec::new(),
            core,
        }
    }

    pub(super) fn push(&mut self, write: Write, lead: Lead) {
        self.core.unwritten.add(1);
        self.writes.push(write);
        self.leads.push(lead);
        self.flush_at
            .get_or_insert_with(|| Instant::now() + WRITE_BACK_DELAY);
        if self.writes.len() >= self.core.settings.write_batch.max(1) {
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
        let write = Arc::clone(&self.core)
            .write_back(writes, leads)
            .instrument(span);
        self.flushes.push(self.core.tasks.spawn(write));
    }

    /// Sends what is left and waits for every pipeline of this task.
    pub(super) async fn finish(mut self) {
        self.flush();
        for flush in std::mem::take(&mut self.flushes) {
            let _ = flush.await;
        }
    }
}

impl Core {
    /// Writes one pipeline, then settles its flights (dropping their leads), so a lookup
    /// after this reads the cache instead of joining. A failure is counted and logged: it is
    /// never the request's failure.
    async fn write_back(self: Arc<Self>, writes: Vec<Write>, leads: Vec<Lead>) {
        if self.shared.is_some() {
            return self.write_back_fenced(writes, leads).await;
        }
        let answers = writes.len();
        // Checked again right before the SET: an invalidation may have come in meanwhile.
        let writes: Vec<Write> = writes
            .into_iter()
            .zip(&leads)
            .filter(|(_, lead)| !lead.flight.is_invalidated())
            .map(|(write, _)| write)
            .collect();
        let unwritten = &self.unwritten;
        unwritten.settle(WriteBackOutcome::Fenced, answers - writes.len());
        if !writes.is_empty() {
            match self.cache.set_many(&writes).await {
                Ok(()) => {
                    unwritten.settle(WriteBackOutcome::Ok, writes.len());
                    debug!(keys = writes.len(), "write-back done");
                }
                Err(err) => self.count_failure(&err, writes.len()),
            }
        }
        drop(leads);
    }

    /// The write-back with other instances (see `distributed`): each entry written only if
    /// no invalidation and no later answer came since its claim, its lease released in the
    /// same step; then the SNs are announced, written or not, so the instances waiting for
    /// them look again. `writes` go with `leads`, one each.
    async fn write_back_fenced(&self, writes: Vec<Write>, leads: Vec<Lead>) {
        let Some(shared) = &self.shared else { return };
        let mut fenced = Vec::with_capacity(writes.len());
        let mut release = Vec::new();
        for (write, lead) in writes.into_iter().zip(&leads) {
            let token = lead.hold.as_ref().and_then(|hold| hold.take_token());
            // Checked again right before the write: an invalidation may have come in meanwhile.
            let hold = lead.hold.as_ref();
            let Some(hold) = hold.filter(|_| !lead.flight.is_invalidated()) else {
                self.unwritten.settle(WriteBackOutcome::Fenced, 1);
                release.extend(token.map(|token| (lead.flight.sn.clone(), token)));
                continue;
            };
            fenced.push(FencedWrite {
                write,
                fence: hold.fence().clone(),
                token,
            });
        }
        let coordination = &shared.coordination;
        // All invalidated: nothing to send (on a cluster, not even a first slot map).
        let sent = match fenced.is_empty() {
            true => Ok(Refusals::default()),
            false => coordination.write_fenced(&fenced).await,
        };
        match sent {
            Ok(refusals) => {
                let written: Vec<Write> = fenced
                    .iter()
                    .zip(&refusals.written)
                    .filter(|(_, written)| **written)
                    .map(|(fenced, _)| fenced.write.clone())
                    .collect();
                self.cache.keep_local(&written);
                self.count_refusals(fenced.len(), &refusals);
            }
            Err(err) => {
                self.count_failure(&err, fenced.len());
                if err.is_unreachable() || err.is_skipped() {
                    // Redis is down or slow: more commands would only fail too (and count
                    // against its breaker). The leases expire; the waiters poll.
                    return;
                }
                release.extend(
                    fenced
                        .into_iter()
                        .filter_map(|f| Some((f.write.sn, f.token?))),
                );
            }
        }
        let pairs: Vec<(&str, &str)> = release
            .iter()
            .map(|(sn, token)| (sn.as_str(), token.as_str()))
            .collect();
        coordination.release(&pairs).await;
        let sns: Vec<String> = leads.iter().map(|lead| lead.flight.sn.clone()).collect();
        // Settled first: this instance's lookups need not wait for the announcement.
        drop(leads);
        let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
        coordination.announce(&sns).await;
    }

    fn count_refusals(&self, sent: usize, refusals: &Refusals) {
        let refused = refusals.fenced + refusals.newer;
        self.unwritten.settle(WriteBackOutcome::Ok, sent - refused);
        self.unwritten.settle(WriteBackOutcome::Fenced, refused);
        self.metrics
            .record_refused_writes(RefusalReason::Fenced, refusals.fenced);
        self.metrics
            .record_refused_writes(RefusalReason::Newer, refusals.newer);
        if refused > 0 {
            debug!(
                fenced = refusals.fenced,
                newer = refusals.newer,
                "write-backs refused"
            );
        }
    }

    fn count_failure(&self, err: &CacheError, keys: usize) {
        if err.is_skipped() {
            self.unwritten.settle(WriteBackOutcome::Skipped, keys);
            debug!(keys, "write-back skipped: redis's circuit is open");
        } else {
            self.unwritten.settle(WriteBackOutcome::Failed, keys);
            warn!(error = %err, keys, "write-back failed; the next lookup refetches");
        }
    }
}

/// Answers handed to a write-back that has not ended. Each is counted once, by how its
/// write-back ended or, if the drain gave up first, as `abandoned`: what a drain leaves
/// behind is neither lost silently nor counted twice.
pub(super) struct Unwritten {
    metrics: Arc<Metrics>,
    state: Mutex<Ledger>,
}

#[derive(Default)]
struct Ledger {
    answers: usize,
    /// The drain gave up: everything is counted already.
    given_up: bool,
}

impl Unwritten {
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            state: Mutex::default(),
        }
    }

    fn add(&self, answers: usize) {
        let mut ledger = self.lock();
        if !ledger.given_up {
            ledger.answers += answers;
        }
    }

    /// Counts `answers` as ended this way, unless the drain has counted them already.
    fn settle(&self, how: WriteBackOutcome, answers: usize) {
        let mut ledger = self.lock();
        if ledger.given_up || answers == 0 {
            return;
        }
        ledger.answers = ledger.answers.saturating_sub(answers);
        self.metrics.record_write_backs(how, answers);
    }

    /// The drain is over: counts what has not been written as abandoned, and returns how
    /// many that is. Nothing is counted after this.
    pub(super) fn give_up(&self) -> usize {
        let mut ledger = self.lock();
        ledger.given_up = true;
        let abandoned = std::mem::take(&mut ledger.answers);
        self.metrics
            .record_write_backs(WriteBackOutcome::Abandoned, abandoned);
        abandoned
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // Two counters: a poisoned lock still holds consistent numbers.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_backs(metrics: &Metrics, outcome: &str) -> bool {
        metrics
            .encode()
            .contains(&format!("write_backs_total{{outcome=\"{outcome}\"}}"))
    }

    #[test]
    fn answers_left_when_the_drain_gives_up_are_counted_once_as_abandoned() {
        let metrics = Arc::new(Metrics::new());
        let unwritten = Unwritten::new(Arc::clone(&metrics));
        unwritten.add(3);
        unwritten.settle(WriteBackOutcome::Ok, 1);
        assert_eq!(unwritten.give_up(), 2);
        unwritten.settle(WriteBackOutcome::Ok, 2);
        unwritten.add(5);
        assert_eq!(unwritten.give_up(), 0);
        let text = metrics.encode();
        assert!(
            text.contains("discount_proxy_write_backs_total{outcome=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("discount_proxy_write_backs_total{outcome=\"abandoned\"} 2\n"),
            "{text}"
        );
        assert!(!write_backs(&metrics, "failed"));
    }
}
