//! Coalescing across instances (`coalesce.distributed`): a fetch task claims the flights
//! queued in it in Redis, up to `redis.chunk_size` at a time in one round trip per node,
//! after the local flight table (so a pure-hit lookup sends nothing more than its reads).
//! The claim is recorded on the flight ([`Remote`]), not taken as a local lead: what is
//! queued may still be taken on by another lookup's task, or dropped by a drain or a client
//! that left, as without other instances. Won SNs are fetched by whichever task takes them
//! on; lost ones are waited for (see `waiting`); if Redis cannot be asked, they are fetched
//! here too (fail open to local coalescing).
//!
//! Leases held are renewed every third of `coalesce.lease_ttl` by one task per instance, all
//! at once, from the claim until the write-back (queued and retrying fetches included), and
//! released with the write-back (in the same script), or at once when the fetch fails. A
//! lease found lost at renewal is counted; the fetch goes on, and its write-back is still
//! fenced. Whatever a crashed instance held expires within `lease_ttl`.

use super::Core;
use super::fetch::Lead;
use super::flights::Flight;
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

/// What this instance may do about a flight's fetch: fetch it (its lease, or none when Redis
/// could not be asked), with the fence its write-back must still find. Shared by the flight
/// and its lead; when the last of them goes without handing the lease to a release, the
/// lease is released (and announced) here, so a flight abandoned before its fetch does not
/// keep the other instances waiting until the lease expires.
pub(super) struct LeaseHold {
    sn: String,
    token: Mutex<Option<String>>,
    fence: Bytes,
    coordination: Arc<dyn Coordination>,
    leases: Arc<Leases>,
}

impl std::fmt::Debug for LeaseHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The SN only: tokens say nothing to a reader.
        f.debug_struct("LeaseHold")
            .field("sn", &self.sn)
            .finish_non_exhaustive()
    }
}

impl LeaseHold {
    /// The fence token seen with the claim (empty: none).
    pub(super) fn fence(&self) -> &Bytes {
        &self.fence
    }

    /// Hands the lease over to whoever releases it in Redis: it is renewed no more.
    pub(super) fn take_token(&self) -> Option<String> {
        let token = self
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        self.leases.forget(&self.sn, &token);
        Some(token)
    }

    /// Releases the lease now (if still held) and tells the other instances to look again.
    pub(super) fn release_now(&self) -> impl std::future::Future<Output = ()> + use<> {
        let token = self.take_token();
        let coordination = Arc::clone(&self.coordination);
        let sn = self.sn.clone();
        async move {
            if let Some(token) = token {
                coordination.release(&[(sn.as_str(), token.as_str())]).await;
            }
            coordination.announce(&[sn.as_str()]).await;
        }
    }
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        let Some(token) = self.take_token() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let coordination = Arc::clone(&self.coordination);
        let sn = std::mem::take(&mut self.sn);
        runtime.spawn(async move {
            coordination.release(&[(sn.as_str(), token.as_str())]).await;
            coordination.announce(&[sn.as_str()]).await;
        });
    }
}

/// Where a flight stands with the other instances.
#[derive(Debug, Clone, Default)]
pub(super) enum Remote {
    /// Not claimed in Redis yet.
    #[default]
    Unchecked,
    /// A claim is on its way.
    Checking,
    /// This instance fetches it.
    Fetch(Arc<LeaseHold>),
    /// Another instance fetches it: wait for its answer.
    Lost,
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

    /// What a won (`token`) or skipped claim gives the flight of `sn`.
    pub(super) fn hold(&self, sn: &str, token: Option<&str>, fence: Bytes) -> Arc<LeaseHold> {
        if let Some(token) = token {
            self.leases.hold(sn, token);
        }
        Arc::new(LeaseHold {
            sn: sn.to_owned(),
            token: Mutex::new(token.map(str::to_owned)),
            fence,
            coordination: Arc::clone(&self.coordination),
            leases: Arc::clone(&self.leases),
        })
    }
}

impl Core {
    /// Claims `flights` in Redis in one round trip per node, and records on each what this
    /// instance may do about it (see [`Remote`]). Only flights this call moved from
    /// unchecked to checking are claimed: a flight is claimed once per instance.
    pub(super) async fn claim_ahead(&self, flights: &[Arc<Flight>]) {
        let Some(shared) = &self.shared else { return };
        let flights: Vec<&Arc<Flight>> = flights.iter().filter(|f| f.begin_check()).collect();
        if flights.is_empty() {
            return;
        }
        let token = shared.token();
        let sns: Vec<(&str, bool)> = flights
            .iter()
            .map(|flight| (flight.sn.as_str(), flight.claims_if_absent()))
            .collect();
        let claims = shared
            .coordination
            .claim(&sns, &token, shared.lease_ttl)
            .await;
        let mut counts = [0usize; 4];
        for (flight, claim) in flights.into_iter().zip(claims) {
            let remote = match claim {
                Claim::Won { fence } => {
                    counts[0] += 1;
                    Remote::Fetch(shared.hold(&flight.sn, Some(&token), fence))
                }
                Claim::Lost => {
                    counts[1] += 1;
                    Remote::Lost
                }
                Claim::Skipped => {
                    counts[2] += 1;
                    Remote::Fetch(shared.hold(&flight.sn, None, Bytes::new()))
                }
                // Written meanwhile: the wait for it reads it at once.
                Claim::Present => {
                    counts[3] += 1;
                    Remote::Lost
                }
            };
            flight.decide(remote);
        }
        let results = [
            ClaimResult::Won,
            ClaimResult::Lost,
            ClaimResult::Skipped,
            ClaimResult::Present,
        ];
        for (result, count) in results.into_iter().zip(counts) {
            self.metrics.record_claims(result, count);
        }
    }

    /// Marks `flights` as fetched here without a claim, when the lookup's cache read failed:
    /// Redis is down or slow, and a claim would only add its timeout to the lookup (fail open
    /// to local coalescing). Their write-backs still must find no fence.
    pub(super) fn skip_claims(&self, flights: &[Arc<Flight>]) {
        let Some(shared) = &self.shared else { return };
        let mut skipped = 0;
        for flight in flights {
            if flight.begin_check() {
                flight.decide(Remote::Fetch(shared.hold(&flight.sn, None, Bytes::new())));
                skipped += 1;
            }
        }
        self.metrics.record_claims(ClaimResult::Skipped, skipped);
    }

    /// What to do with a lead this task took on: fetch it (returned, with its lease), or,
    /// fetched by another instance, wait for that answer in a task of its own until `until`
    /// (a refresh nobody waits for is just dropped). Claims it first if nobody has.
    pub(super) async fn decide(self: &Arc<Self>, mut lead: Lead, until: Instant) -> Option<Lead> {
        if self.shared.is_none() {
            return Some(lead);
        }
        let mut remote = lead.flight.decided().await;
        if matches!(remote, Remote::Unchecked) {
            self.claim_ahead(std::slice::from_ref(&lead.flight)).await;
            remote = lead.flight.decided().await;
        }
        match remote {
            Remote::Fetch(hold) => {
                lead.hold = Some(hold);
                Some(lead)
            }
            Remote::Lost if lead.flight.is_refresh() => None,
            Remote::Lost => {
                self.wait_elsewhere(vec![lead], until);
                None
            }
            // Not decided (its claim was dropped half-way): fetch it, unfenced by a lease.
            Remote::Unchecked | Remote::Checking => Some(lead),
        }
    }

    /// Waits for the holders' answers of `leads` in a task of its own.
    pub(super) fn wait_elsewhere(self: &Arc<Self>, leads: Vec<Lead>, until: Instant) {
        if leads.is_empty() {
            return;
        }
        debug!(
            sns = leads.len(),
            "fetched by another instance; waiting for its answers"
        );
        let span = info_span!("await_holders", sns = leads.len());
        let wait = Arc::clone(self).await_holders(leads, until);
        self.tasks.spawn(wait.instrument(span));
    }

    /// A fetch that ended without an answer gives its lease up at once and says so, so a
    /// waiter elsewhere may claim and try (errors are never cached).
    pub(super) fn let_go(&self, lead: &Lead) {
        if let Some(hold) = &lead.hold {
            self.tasks.spawn(hold.release_now());
        }
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
