//! Coalescing across instances (`coalesce.distributed`): a fetch task claims the flights it
//! is about to fetch in Redis, a batch at a time in one round trip per node, after the local
//! flight table (so a pure-hit lookup sends nothing more than its reads). Won SNs are fetched
//! here; lost ones are waited for (see `waiting`); if Redis cannot be asked, they are fetched
//! here too (fail open to local coalescing).
//!
//! Leases held are renewed every third of `coalesce.lease_ttl` by one task per instance, all
//! at once, from the claim until the write-back (queued and retrying fetches included), and
//! released with the write-back (in the same script), or at once when the fetch fails. A
//! lease found lost at renewal is counted; the fetch goes on, and its write-back is still
//! fenced. Whatever a crashed instance held expires within `lease_ttl`.

use super::Core;
use super::fetch::Lead;
use crate::cache::{Claim, Coordination};
use crate::metrics::{ClaimResult, LeaseEvent, Metrics};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, debug, info_span, warn};

/// How often a waiter looks at the cache (and the lease) without being told: the safety net
/// under the notified wake-up, and how a crashed holder is found out once its lease expired.
const POLL: Duration = Duration::from_secs(1);

/// What the proxy needs to coalesce with the other instances sharing its Redis.
pub struct Distributed {
    /// Claims, fences, notifications.
    pub coordination: Arc<dyn Coordination>,
    /// `coalesce.lease_ttl`.
    pub lease_ttl: Duration,
}

/// The lookup core's side of it.
pub(super) struct Shared {
    pub(super) coordination: Arc<dyn Coordination>,
    pub(super) lease_ttl: Duration,
    pub(super) poll: Duration,
    pub(super) leases: Arc<Leases>,
    /// This instance's part of every lease token.
    instance: String,
    batches: AtomicU64,
    /// Stops the renewals when the core is dropped.
    _renewing: DropGuard,
}

/// A claim this instance made for a lead: the fence it saw, and its lease's token (none when
/// Redis was not asked, so its write-back must find no fence at all).
pub(super) struct Claimed {
    pub(super) token: Option<String>,
    pub(super) fence: Bytes,
    leases: Arc<Leases>,
}

impl Claimed {
    /// Hands the lease over to whoever releases it in Redis: it is renewed no more.
    pub(super) fn take_token(&mut self, sn: &str) -> Option<String> {
        let token = self.token.take()?;
        self.leases.forget(sn, &token);
        Some(token)
    }
}

/// The leases this instance holds, by SN, for the renewals.
#[derive(Default)]
pub(super) struct Leases {
    held: Mutex<HashMap<String, String>>,
}

impl Leases {
    fn hold(&self, sn: &str, token: &str) {
        self.lock().insert(sn.to_owned(), token.to_owned());
    }

    /// Stops renewing `sn`'s lease, if `token` is still the one held.
    pub(super) fn forget(&self, sn: &str, token: &str) {
        let mut held = self.lock();
        if held.get(sn).is_some_and(|held| held == token) {
            held.remove(sn);
        }
    }

    fn snapshot(&self) -> Vec<(String, String)> {
        let held = self.lock();
        held.iter()
            .map(|(sn, token)| (sn.clone(), token.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // Inserts and removes only: a poisoned map is still a consistent map.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Shared {
    /// Starts renewing the leases this instance will hold (needs a Tokio runtime).
    pub(super) fn new(distributed: Distributed, metrics: Arc<Metrics>) -> Self {
        let leases = Arc::new(Leases::default());
        let stop = CancellationToken::new();
        tokio::spawn(
            renew_leases(
                Arc::clone(&distributed.coordination),
                Arc::clone(&leases),
                distributed.lease_ttl,
                metrics,
                stop.clone(),
            )
            .instrument(info_span!("lease_renewals")),
        );
        Self {
            coordination: distributed.coordination,
            lease_ttl: distributed.lease_ttl,
            poll: POLL,
            leases,
            instance: format!("{:016x}", fastrand::u64(..)),
            batches: AtomicU64::new(0),
            _renewing: stop.drop_guard(),
        }
    }

    /// A token no other claim (of this instance or another) has.
    pub(super) fn token(&self) -> String {
        let batch = self.batches.fetch_add(1, Ordering::Relaxed);
        format!("{}:{batch}", self.instance)
    }

    /// What a won (or skipped) claim gives its lead.
    pub(super) fn claimed(&self, sn: &str, token: Option<&str>, fence: Bytes) -> Claimed {
        if let Some(token) = token {
            self.leases.hold(sn, token);
        }
        Claimed {
            token: token.map(str::to_owned),
            fence,
            leases: Arc::clone(&self.leases),
        }
    }
}

impl Core {
    /// Claims `leads` in Redis (one round trip per node) and returns those this instance
    /// fetches: won, or not claimable (Redis down: local coalescing only). The lost ones are
    /// waited for in a task of their own, until `until`; a lost refresh is dropped (another
    /// instance refreshes the value, nobody waits for it here).
    pub(super) async fn claim(self: &Arc<Self>, leads: Vec<Lead>, until: Instant) -> Vec<Lead> {
        let Some(shared) = &self.shared else {
            return leads;
        };
        let token = shared.token();
        let sns: Vec<&str> = leads.iter().map(|lead| lead.flight.sn.as_str()).collect();
        let claims = shared
            .coordination
            .claim(&sns, &token, shared.lease_ttl)
            .await;
        drop(sns);
        let mut counts = [0usize; 3];
        let mut fetch = Vec::with_capacity(leads.len());
        let mut lost = Vec::new();
        for (mut lead, claim) in leads.into_iter().zip(claims) {
            match claim {
                Claim::Won { fence } => {
                    counts[0] += 1;
                    lead.claimed = Some(shared.claimed(&lead.flight.sn, Some(&token), fence));
                    fetch.push(lead);
                }
                Claim::Lost => {
                    counts[1] += 1;
                    if !lead.flight.is_refresh() {
                        lost.push(lead);
                    }
                }
                Claim::Skipped => {
                    counts[2] += 1;
                    lead.claimed = Some(shared.claimed(&lead.flight.sn, None, Bytes::new()));
                    fetch.push(lead);
                }
            }
        }
        let results = [ClaimResult::Won, ClaimResult::Lost, ClaimResult::Skipped];
        for (result, count) in results.into_iter().zip(counts) {
            self.metrics.record_claims(result, count);
        }
        if !lost.is_empty() {
            debug!(
                sns = lost.len(),
                "fetched by another instance; waiting for its answers"
            );
            let span = info_span!("await_holders", sns = lost.len());
            let wait = Arc::clone(self).await_holders(lost, until);
            self.tasks.spawn(wait.instrument(span));
        }
        fetch
    }

    /// A fetch that ended without an answer gives its lease up at once and says so, so a
    /// waiter elsewhere may claim and try (errors are never cached).
    pub(super) fn let_go(&self, lead: &mut Lead) {
        let (Some(shared), Some(claimed)) = (&self.shared, lead.claimed.as_mut()) else {
            return;
        };
        let sn = lead.flight.sn.clone();
        let token = claimed.take_token(&sn);
        let coordination = Arc::clone(&shared.coordination);
        self.tasks.spawn(async move {
            if let Some(token) = token {
                coordination.release(&[(sn.as_str(), token.as_str())]).await;
            }
            coordination.announce(&[sn.as_str()]).await;
        });
    }
}

/// Renews every lease held, every third of `lease_ttl`, until `stop`.
async fn renew_leases(
    coordination: Arc<dyn Coordination>,
    leases: Arc<Leases>,
    lease_ttl: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let every = lease_ttl / 3;
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let held = leases.snapshot();
        if held.is_empty() {
            continue;
        }
        let pairs: Vec<(&str, &str)> = held
            .iter()
            .map(|(sn, token)| (sn.as_str(), token.as_str()))
            .collect();
        let renewed = coordination.renew(&pairs, lease_ttl).await;
        let mut counts = (0, 0);
        for (&(sn, token), renewed) in pairs.iter().zip(renewed) {
            match renewed {
                Some(true) => counts.0 += 1,
                Some(false) => {
                    counts.1 += 1;
                    leases.forget(sn, token);
                }
                None => {}
            }
        }
        if counts.1 > 0 {
            warn!(
                leases = counts.1,
                "leases lost before their fetches ended; another instance may fetch them too"
            );
        }
        metrics.record_leases(LeaseEvent::Renewed, counts.0);
        metrics.record_leases(LeaseEvent::Expired, counts.1);
    }
}
