//! Coalescing across instances (`coalesce.distributed`): a fetch task claims every flight
//! queued in it in Redis at once, in one round trip per node (all of a batch's misses, or a
//! streamed lookup's window), after the local flight table (so a pure-hit lookup sends
//! nothing more than its reads). The claim is recorded on the flight ([`Remote`]), not taken
//! as a local lead: what is queued may still be taken on by another lookup's task, or dropped
//! by a drain or a client that left, as without other instances. Won SNs are fetched by
//! whichever task takes them on; lost ones are waited for (see `waiting`); if Redis cannot be
//! asked, they are fetched here too (fail open to local coalescing).
//!
//! Claiming a 10,000-SN export at once must not make another instance wait for that
//! export's queue to reach an SN it wants now. So only the first `upstream.concurrency`
//! claims of a batch are for fetches that start at once; the rest are held as *queued*. A
//! claim for a fetch that starts at once (a short lookup's, or a waiter's taking over) takes
//! a queued lease over; the holder starts each queued fetch by turning its lease into a
//! started one first (`START`, one script call), and on finding it taken over it waits for
//! the new holder's answer instead. Still one instance fetches each SN. Facebook's memcache
//! leases (NSDI 2013) have no queue to take over from; this is that, plus the queue.
//!
//! Leases held are renewed every third of `coalesce.lease_ttl` by one task per instance, all
//! at once, from the claim until the write-back (queued and retrying fetches included), and
//! released with the write-back (in the same script), or at once when the fetch fails. A
//! lease found lost at renewal is counted; the fetch goes on, and its write-back is still
//! fenced. Whatever a crashed instance held expires within `lease_ttl`.

use super::Core;
use super::fetch::Lead;
use super::flights::Flight;
use crate::cache::{Ask, Claim, Coordination};
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
pub(super) const POLL: Duration = Duration::from_secs(1);

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
    /// Held as queued: its fetch must be started in Redis (`START`) before it begins.
    queued: std::sync::atomic::AtomicBool,
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

    /// The lease's token, if still held and its fetch not yet started in Redis.
    fn queued_token(&self) -> Option<String> {
        if !self.queued.load(Ordering::Acquire) {
            return None;
        }
        self.token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
        let leases = self.take_token().map(|token| (self.sn.clone(), token));
        let coordination = Arc::clone(&self.coordination);
        release_and_announce(
            coordination,
            leases.into_iter().collect(),
            vec![self.sn.clone()],
        )
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
        let sn = std::mem::take(&mut self.sn);
        let coordination = Arc::clone(&self.coordination);
        runtime.spawn(release_and_announce(
            coordination,
            vec![(sn.clone(), token)],
            vec![sn],
        ));
    }
}

/// Gives up the leases `(sn, token)` (compare-and-delete, one round trip per node), then tells
/// every instance to look at `sns` again.
async fn release_and_announce(
    coordination: Arc<dyn Coordination>,
    leases: Vec<(String, String)>,
    sns: Vec<String>,
) {
    let pairs: Vec<(&str, &str)> = leases
        .iter()
        .map(|(sn, token)| (sn.as_str(), token.as_str()))
        .collect();
    coordination.release(&pairs).await;
    let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
    coordination.announce(&sns).await;
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

    /// What a won (`token`, held as `queued` or not) or skipped claim gives the flight of
    /// `sn`.
    pub(super) fn hold(
        &self,
        sn: &str,
        token: Option<&str>,
        fence: Bytes,
        queued: bool,
    ) -> Arc<LeaseHold> {
        if let Some(token) = token {
            self.leases.hold(sn, token);
        }
        Arc::new(LeaseHold {
            sn: sn.to_owned(),
            token: Mutex::new(token.map(str::to_owned)),
            queued: std::sync::atomic::AtomicBool::new(queued && token.is_some()),
            fence,
            coordination: Arc::clone(&self.coordination),
            leases: Arc::clone(&self.leases),
        })
    }
}

impl Core {
    /// Claims `flights` in Redis in one round trip per node, the first `at_once` for fetches
    /// that start now and the rest as queued, and records on each what this instance may do
    /// about it (see [`Remote`]). Only flights this call moved from unchecked to checking are
    /// claimed: a flight is claimed once per instance.
    pub(super) async fn claim_ahead(&self, flights: &[Arc<Flight>], at_once: usize) {
        let Some(shared) = &self.shared else { return };
        let flights: Vec<&Arc<Flight>> = flights.iter().filter(|f| f.begin_check()).collect();
        if flights.is_empty() {
            return;
        }
        let token = shared.token();
        let asks: Vec<Ask<'_>> = flights
            .iter()
            .enumerate()
            .map(|(at, flight)| Ask {
                sn: flight.sn.as_str(),
                if_absent: flight.claims_if_absent(),
                queued: at >= at_once,
            })
            .collect();
        let claims = shared
            .coordination
            .claim(&asks, &token, shared.lease_ttl)
            .await;
        let mut counts = Counts::default();
        for ((flight, ask), claim) in flights.into_iter().zip(&asks).zip(claims) {
            counts.add(&claim);
            let remote = match claim {
                Claim::Won { fence, .. } => {
                    Remote::Fetch(shared.hold(&flight.sn, Some(&token), fence, ask.queued))
                }
                Claim::Skipped => Remote::Fetch(shared.hold(&flight.sn, None, Bytes::new(), false)),
                // Written meanwhile (present): the wait for it reads it at once.
                Claim::Lost | Claim::Present => Remote::Lost,
            };
            flight.decide(remote);
        }
        counts.record(&self.metrics);
    }

    /// Starts `lead`'s fetch in Redis if its lease is held as queued (see the module doc):
    /// `false` when another instance took it over meanwhile, and fetches it. If Redis cannot
    /// be asked, the fetch goes on (fail open).
    pub(super) async fn start_fetch(&self, lead: &Lead) -> bool {
        let (Some(shared), Some(hold)) = (&self.shared, &lead.hold) else {
            return true;
        };
        let Some(token) = hold.queued_token() else {
            return true;
        };
        let lease = [(hold.sn.as_str(), token.as_str())];
        let started = shared.coordination.start(&lease, shared.lease_ttl).await;
        hold.queued.store(false, Ordering::Release);
        if started.first().copied().flatten() == Some(false) {
            // Not ours any more: not renewed, not released.
            hold.take_token();
            self.metrics.record_leases(LeaseEvent::Yielded, 1);
            return false;
        }
        true
    }

    /// Gives up at once, in one round trip per node, the leases of `flights` that are
    /// dropped before their fetches started (a drain, a client that left), and tells the
    /// other instances to look again, instead of one release per flight as each goes.
    pub(super) fn release_unstarted(&self, flights: &[Arc<Flight>]) {
        let Some(shared) = &self.shared else { return };
        let leases: Vec<(String, String)> = flights
            .iter()
            .filter_map(|flight| {
                let token = flight.hold()?.take_token()?;
                Some((flight.sn.clone(), token))
            })
            .collect();
        if leases.is_empty() {
            return;
        }
        let sns = leases.iter().map(|(sn, _)| sn.clone()).collect();
        let coordination = Arc::clone(&shared.coordination);
        self.tasks
            .spawn(release_and_announce(coordination, leases, sns));
    }

    /// Marks `flights` as fetched here without a claim, when the lookup's cache read failed:
    /// Redis is down or slow, and a claim would only add its timeout to the lookup (fail open
    /// to local coalescing). Their write-backs still must find no fence.
    pub(super) fn skip_claims(&self, flights: &[Arc<Flight>]) {
        let Some(shared) = &self.shared else { return };
        let mut skipped = 0;
        for flight in flights {
            if flight.begin_check() {
                let hold = shared.hold(&flight.sn, None, Bytes::new(), false);
                flight.decide(Remote::Fetch(hold));
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
            self.claim_ahead(std::slice::from_ref(&lead.flight), 1)
                .await;
            remote = lead.flight.decided().await;
        }
        match remote {
            Remote::Fetch(hold) => {
                lead.hold = Some(hold);
                Some(lead)
            }
            Remote::Lost if lead.flight.is_refresh() => None,
            // Lost; or not decided, if a claim was ever cut off half-way: then no lease fences
            // a write-back of its own, and the waiter claims it anew before it fetches.
            Remote::Lost | Remote::Unchecked | Remote::Checking => {
                self.wait_elsewhere(vec![lead], until);
                None
            }
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

/// Claims by what they came to, for the metrics.
#[derive(Default)]
struct Counts {
    won: usize,
    took_over: usize,
    lost: usize,
    skipped: usize,
    present: usize,
}

impl Counts {
    fn add(&mut self, claim: &Claim) {
        let count = match claim {
            Claim::Won {
                took_over: false, ..
            } => &mut self.won,
            Claim::Won {
                took_over: true, ..
            } => &mut self.took_over,
            Claim::Lost => &mut self.lost,
            Claim::Skipped => &mut self.skipped,
            Claim::Present => &mut self.present,
        };
        *count += 1;
    }

    fn record(&self, metrics: &Metrics) {
        metrics.record_claims(ClaimResult::Won, self.won);
        metrics.record_claims(ClaimResult::TookOver, self.took_over);
        metrics.record_claims(ClaimResult::Lost, self.lost);
        metrics.record_claims(ClaimResult::Skipped, self.skipped);
        metrics.record_claims(ClaimResult::Present, self.present);
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
