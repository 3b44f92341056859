//! Waiting for SNs another instance fetches: the local flights stay claimed by a waiter, which
//! answers them with the holder's value when it is written.
//!
//! The waiter listens for announcements first and looks at the cache next, so an answer
//! written in between is seen either way. Then it wakes on each announcement naming its SNs
//! (reads them; one still absent means the holder ended without writing it: the waiter
//! claims it, and fetches it if the claim is won), and polls every second besides, which is
//! how a crashed holder is found out once its lease expired. It gives up at the deadline of
//! the lookup whose task claimed the flights.

use super::Core;
use super::distributed::{POLL, Remote};
use super::fetch::Lead;
use crate::cache::{Ask, Claim, Entry};
use crate::metrics::WaitOutcome;
use crate::upstream::Fetched;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span};

impl Core {
    /// Waits for the holders' answers of `leads` until `until` (see the module doc).
    pub(super) async fn await_holders(self: Arc<Self>, leads: Vec<Lead>, until: Instant) {
        let Some(shared) = &self.shared else { return };
        let sns: Vec<String> = leads.iter().map(|lead| lead.flight.sn.clone()).collect();
        let mut listener = shared.coordination.wakeups().listen(sns);
        let mut waiting: HashMap<String, Lead> = leads
            .into_iter()
            .map(|lead| (lead.flight.sn.clone(), lead))
            .collect();
        let all: Vec<String> = waiting.keys().cloned().collect();
        // Answered between the claim and the listening: as good as notified.
        self.look_again(&mut waiting, all, WaitOutcome::Notified, false, until)
            .await;
        // A poll past the deadline: the lookups' own deadlines answer them first
        // (`deadline_exceeded`), and a lookup that joined later may still want the answer.
        let give_up = until + POLL;
        let mut poll = tokio::time::interval_at(Instant::now() + POLL, POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !waiting.is_empty() {
            tokio::select! {
                heard = listener.next() => {
                    let mut sns: Vec<String> = heard.into_iter().collect();
                    while let Some(sn) = listener.try_next() {
                        sns.push(sn);
                    }
                    sns.sort_unstable();
                    sns.dedup();
                    self.look_again(&mut waiting, sns, WaitOutcome::Notified, true, until).await;
                }
                _ = poll.tick() => {
                    // Nobody wants these any more: let them go (settled, unanswered).
                    waiting.retain(|_, lead| lead.flight.is_wanted());
                    let all = waiting.keys().cloned().collect();
                    self.look_again(&mut waiting, all, WaitOutcome::Polled, true, until).await;
                }
                () = tokio::time::sleep_until(give_up) => {
                    self.metrics.record_waits(WaitOutcome::DeadlinePassed, waiting.len());
                    debug!(sns = waiting.len(), "gave up waiting for another instance's answers");
                    return;
                }
            }
        }
    }

    /// Reads `sns` (those still waited for): answers the flights whose value is there now,
    /// counted as `how`; with `claim`, claims the rest, and fetches those it wins. One that
    /// was written between the read and the claim is read once more.
    async fn look_again(
        self: &Arc<Self>,
        waiting: &mut HashMap<String, Lead>,
        sns: Vec<String>,
        how: WaitOutcome,
        claim: bool,
        until: Instant,
    ) {
        let mut sns = sns;
        for _ in 0..2 {
            sns.retain(|sn| waiting.contains_key(sn));
            if sns.is_empty() {
                return;
            }
            let absent = self.answer_stored(waiting, &sns, how).await;
            if !claim || absent.is_empty() {
                return;
            }
            sns = self.take_over(waiting, &absent, until).await;
        }
    }

    /// Answers the flights of `sns` whose value is stored now, counted as `how`; returns the
    /// others, each with whether nothing at all is stored (rather than a value it cannot use).
    async fn answer_stored(
        &self,
        waiting: &mut HashMap<String, Lead>,
        sns: &[String],
        how: WaitOutcome,
    ) -> Vec<(String, bool)> {
        let keys: Vec<&str> = sns.iter().map(String::as_str).collect();
        let read = self.cache.get_many(&keys).await;
        let now = SystemTime::now();
        let mut absent = Vec::new();
        let mut answered = 0;
        for (sn, value) in sns.iter().zip(read.values) {
            let nothing = value.is_none();
            match value.and_then(|value| self.stored_answer(value, now)) {
                Some(fetched) => {
                    if let Some(lead) = waiting.remove(sn) {
                        lead.flight.answer(Ok(fetched));
                        answered += 1;
                    }
                }
                None => absent.push((sn.clone(), nothing)),
            }
        }
        self.metrics.record_waits(how, answered);
        absent
    }

    /// Claims `absent` (the holder ended without an answer, or its lease expired) and
    /// fetches those this instance wins, in a fetch of their own; returns those written
    /// since they were read.
    async fn take_over(
        self: &Arc<Self>,
        waiting: &mut HashMap<String, Lead>,
        absent: &[(String, bool)],
        until: Instant,
    ) -> Vec<String> {
        let Some(shared) = &self.shared else {
            return Vec::new();
        };
        let token = shared.token();
        // Only if still absent: one written since the read is read again, not fetched again.
        // Fetched at once: a lease another instance holds for a fetch still queued is taken
        // over (see `distributed`).
        let asked: Vec<Ask<'_>> = absent
            .iter()
            .map(|(sn, nothing)| Ask {
                sn: sn.as_str(),
                if_absent: *nothing,
                queued: false,
            })
            .collect();
        let claims = shared
            .coordination
            .claim(&asked, &token, shared.lease_ttl)
            .await;
        let mut taken = Vec::new();
        let mut present = Vec::new();
        for ((sn, _), claim) in absent.iter().zip(claims) {
            let (token, fence) = match claim {
                Claim::Lost => continue,
                Claim::Present => {
                    present.push(sn.clone());
                    continue;
                }
                Claim::Won { fence, .. } => (Some(token.as_str()), fence),
                Claim::Skipped => (None, bytes::Bytes::new()),
            };
            if let Some(mut lead) = waiting.remove(sn) {
                let hold = shared.hold(sn, token, fence, false);
                // On the flight too, where an invalidation finds the lease to give up.
                lead.flight.decide(Remote::Fetch(Arc::clone(&hold)));
                lead.hold = Some(hold);
                taken.push(lead);
            }
        }
        if !taken.is_empty() {
            self.metrics
                .record_waits(WaitOutcome::TookOver, taken.len());
            debug!(
                sns = taken.len(),
                "took over fetches another instance did not finish"
            );
            let span = info_span!("upstream_fetch", sns = taken.len());
            let leads = futures_util::stream::iter(taken);
            let fetch = Arc::clone(self).fetch_leads(leads, until);
            self.tasks.spawn(fetch.instrument(span));
        }
        present
    }

    /// A stored value as the answer it holds, unless unreadable or past its stale period.
    fn stored_answer(&self, value: bytes::Bytes, now: SystemTime) -> Option<Fetched> {
        let entry = Entry::decode(value).ok()?;
        if self.settings.lifetimes.classify(&entry, now) == super::freshness::Freshness::Gone {
            return None;
        }
        Some(match entry.into_discount() {
            Some(discount) => Fetched::Found(discount),
            None => Fetched::NotFound,
        })
    }
}
