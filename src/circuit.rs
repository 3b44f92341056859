//! A circuit breaker, shared by the upstream client and the Redis cache.
//!
//! Closed, it lets every call through and counts failures. When failures pile up
//! (consecutive ones, or a ratio over a window) it opens: calls fail at once, so a dead
//! dependency costs nothing instead of a timeout per call. After a cool-down it lets a few
//! probe calls through (half-open); enough successes close it, one failure opens it again.
//!
//! A call may name what it is about (the upstream's calls name their SN: see
//! [`Circuit::try_acquire_for`]). Then a key that keeps failing counts once: a failure of
//! a key that already failed recently counts neither as a failure nor as a call, and as a
//! probe it decides nothing. This is Varnish's saint mode turned around: the failing object
//! is written off, not the backend. So 30 SNs that always fail, asked again and again
//! while other SNs succeed, never open the circuit; an upstream failing as a whole still
//! does, since it fails for SN after SN it has not failed before. A success forgets its
//! key. Keys are remembered by hash, the latest [`KEYS_REMEMBERED`] failures for at most
//! [`KEY_MEMORY`] since their last failure, so the memory is bounded whatever comes.
//!
//! When the circuit opens, the memory is emptied: the dependency is suspect as a whole, and
//! a failed probe re-opens it whatever SN it was about.
//!
//! What this gives up: an outage seen only through the same few keys (a client asking
//! for the same 3 SNs in a loop) counts those keys once each, so it may never open the
//! circuit; those calls still fail, each within `upstream.timeout`.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a key that failed is remembered after its last failure.
pub const KEY_MEMORY: Duration = Duration::from_secs(300);

/// The most key failures remembered; past that the oldest are forgotten first.
pub const KEYS_REMEMBERED: usize = 10_000;

/// When a circuit opens and how it recovers: the `[upstream.circuit]` config section, and
/// what [`Circuit::new`] takes. When the upstream keeps failing, SNs with a stale entry are
/// served stale and the rest get `upstream_unavailable` at once, without touching it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitSettings {
    /// Off: every call goes through and nothing is counted.
    pub enabled: bool,
    /// This many failed calls in a row open the circuit.
    pub consecutive_failures: u32,
    /// This share of failed calls within one `window` opens the circuit…
    pub failure_ratio: f64,
    /// …once the window has seen at least this many calls.
    pub min_requests: u32,
    /// The window the failure ratio is counted over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long the circuit stays open before probe calls test the dependency.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Probe calls let through after the cool-down; this many successes close it.
    pub probes: u32,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: 20,
            failure_ratio: 0.5,
            min_requests: 50,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(5),
            probes: 3,
        }
    }
}

/// What a circuit is doing now, for `/readyz` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls fail at once, without touching the dependency.
    Open,
    /// The cool-down is over: a few probe calls decide whether it closes.
    HalfOpen,
}

impl CircuitState {
    /// The word `/readyz` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// How far from closed, as `discount_proxy_circuit_state` exposes it: 0 closed,
    /// 1 half-open, 2 open. Also the order in which one state is worse than another.
    pub fn level(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }

    /// The worse of two states (a cluster reports its worst master's).
    #[must_use]
    pub fn worst(self, other: Self) -> Self {
        if other.level() > self.level() {
            other
        } else {
            self
        }
    }
}

/// A circuit breaker around one dependency.
#[derive(Debug)]
pub struct Circuit {
    name: &'static str,
    settings: CircuitSettings,
    /// Whether the failure ratio opens it too, or only a streak of failures.
    by_ratio: bool,
    inner: Mutex<Inner>,
    /// Randomly keyed, so no one can pick keys that collide.
    hasher: ahash::RandomState,
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    window_started: Instant,
    calls: u32,
    failures: u32,
    consecutive: u32,
    probes_in_flight: u32,
    probe_successes: u32,
    /// Which half-open round the probes belong to: a probe still running from an earlier
    /// round must not count in this one.
    round: u64,
    failing: FailingKeys,
}

/// The keys that failed lately (by hash), each with its last failure.
#[derive(Debug, Default)]
struct FailingKeys {
    last: HashMap<u64, Instant>,
    /// Every failure noted, oldest first; an entry whose key failed again later, or
    /// succeeded since, is stale and only waits to be popped.
    order: VecDeque<(u64, Instant)>,
}

impl FailingKeys {
    /// Notes that `key` failed now; returns whether it had failed lately already.
    fn note(&mut self, key: u64, now: Instant) -> bool {
        self.forget_older_than(now);
        let known = self.last.insert(key, now).is_some();
        self.order.push_back((key, now));
        while self.order.len() > KEYS_REMEMBERED {
            self.pop_oldest();
        }
        known
    }

    /// A success: the key counts again when it next fails.
    fn forget(&mut self, key: u64) {
        self.last.remove(&key);
    }

    fn forget_older_than(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= KEY_MEMORY)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((key, at)) = self.order.pop_front()
            && self.last.get(&key) == Some(&at)
        {
            self.last.remove(&key);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

/// Permission for one call. Report how it went with [`Ticket::success`] or
/// [`Ticket::failure`]; a ticket dropped without either (a cancelled call, or an answer that
/// says nothing about the dependency's health) counts as neither.
#[derive(Debug)]
pub struct Ticket<'a> {
    circuit: &'a Circuit,
    /// The half-open round this ticket probes in; `None` for an ordinary call.
    probe: Option<u64>,
    /// The hash of what the call is about, when it named it.
    key: Option<u64>,
}

impl Circuit {
    /// A closed circuit named `name` in its logs, opened by a streak of failures or by a
    /// failure ratio.
    pub fn new(name: &'static str, settings: CircuitSettings) -> Self {
        Self::with_rules(name, settings, true)
    }

    /// A closed circuit opened by a streak of `consecutive_failures` alone (0: never),
    /// probed by one call after `cooldown`: Redis's, whose failures are timeouts and refused
    /// connections that come in streaks, with no ratio worth a window.
    pub fn on_streak(name: &'static str, consecutive_failures: u32, cooldown: Duration) -> Self {
        let settings = CircuitSettings {
            enabled: consecutive_failures > 0,
            consecutive_failures,
            cooldown,
            probes: 1,
            ..CircuitSettings::default()
        };
        Self::with_rules(name, settings, false)
    }

    fn with_rules(name: &'static str, settings: CircuitSettings, by_ratio: bool) -> Self {
        Self {
            name,
            settings,
            by_ratio,
            inner: Mutex::new(Inner {
                mode: Mode::Closed,
                window_started: Instant::now(),
                calls: 0,
                failures: 0,
                consecutive: 0,
                probes_in_flight: 0,
                probe_successes: 0,
                round: 0,
                failing: FailingKeys::default(),
            }),
            hasher: ahash::RandomState::new(),
        }
    }

    /// A ticket for one call, or `None` while the circuit is open (fail fast). Every
    /// failure reported on it counts: for a dependency whose calls are all alike (Redis).
    pub fn try_acquire(&self) -> Option<Ticket<'_>> {
        self.acquire(None)
    }

    /// A ticket for one call about `key` (an SN), or `None` while the circuit is open. A
    /// failure counts only if `key` has not failed lately: a key that keeps failing is that
    /// key's problem, not the dependency's.
    pub fn try_acquire_for(&self, key: &str) -> Option<Ticket<'_>> {
        self.acquire(Some(self.hasher.hash_one(key)))
    }

    fn acquire(&self, key: Option<u64>) -> Option<Ticket<'_>> {
        if !self.settings.enabled {
            return Some(Ticket {
                circuit: self,
                probe: None,
                key,
            });
        }
        let mut inner = self.lock();
        let now = Instant::now();
        if let Mode::Open { until } = inner.mode {
            if now < until {
                return None;
            }
            inner.mode = Mode::HalfOpen;
            inner.probes_in_flight = 0;
            inner.probe_successes = 0;
            inner.round += 1;
            info!(circuit = self.name, "circuit half-open: probing");
        }
        match inner.mode {
            Mode::HalfOpen if inner.probes_in_flight >= self.settings.probes.max(1) => None,
            Mode::HalfOpen => {
                inner.probes_in_flight += 1;
                Some(Ticket {
                    circuit: self,
                    probe: Some(inner.round),
                    key,
                })
            }
            _ => Some(Ticket {
                circuit: self,
                probe: None,
                key,
            }),
        }
    }

    /// Whether calls go through now. An open circuit whose cool-down is over reports
    /// half-open: the next call is a probe.
    pub fn state(&self) -> CircuitState {
        match self.lock().mode {
            Mode::Closed => CircuitState::Closed,
            Mode::Open { until } if Instant::now() < until => CircuitState::Open,
            Mode::Open { .. } | Mode::HalfOpen => CircuitState::HalfOpen,
        }
    }

    fn record(&self, probe: Option<u64>, key: Option<u64>, ok: bool) {
        if !self.settings.enabled {
            return;
        }
        let mut inner = self.lock();
        let now = Instant::now();
        let known_failing = match key {
            Some(key) if ok => {
                inner.failing.forget(key);
                false
            }
            Some(key) => inner.failing.note(key, now),
            None => false,
        };
        let probe = match probe {
            Some(round) if round == inner.round => {
                inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
                true
            }
            // A probe of an earlier round: that round is decided already.
            Some(_) => return,
            None => false,
        };
        if known_failing {
            // Says nothing new about the dependency; a probe's slot is free for another.
            return;
        }
        match inner.mode {
            // A call admitted before the circuit opened: its answer changes nothing now.
            Mode::Open { .. } => {}
            Mode::HalfOpen if !probe => {}
            Mode::HalfOpen if ok => {
                inner.probe_successes += 1;
                if inner.probe_successes >= self.settings.probes.max(1) {
                    inner.close(now);
                    info!(circuit = self.name, "circuit closed: probes succeeded");
                }
            }
            Mode::HalfOpen => {
                inner.open(now + self.settings.cooldown);
                warn!(circuit = self.name, cooldown = ?self.settings.cooldown, "circuit re-opened: a probe failed");
            }
            Mode::Closed => self.record_closed(&mut inner, now, ok),
        }
    }

    fn record_closed(&self, inner: &mut Inner, now: Instant, ok: bool) {
        if now.saturating_duration_since(inner.window_started) >= self.settings.window {
            inner.window_started = now;
            inner.calls = 0;
            inner.failures = 0;
        }
        inner.calls += 1;
        if ok {
            inner.consecutive = 0;
            return;
        }
        inner.failures += 1;
        inner.consecutive += 1;
        let settings = &self.settings;
        let by_streak = inner.consecutive >= settings.consecutive_failures.max(1);
        let by_ratio = self.by_ratio
            && inner.calls >= settings.min_requests
            && f64::from(inner.failures) >= settings.failure_ratio * f64::from(inner.calls);
        if by_streak || by_ratio {
            inner.open(now + settings.cooldown);
            warn!(
                circuit = self.name,
                consecutive = inner.consecutive,
                failures = inner.failures,
                calls = inner.calls,
                cooldown = ?settings.cooldown,
                "circuit opened: calls fail fast until the cool-down is over"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain counters: a poisoned lock still holds consistent numbers.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    /// Opens the circuit until `until`. The failing keys are forgotten: the dependency is
    /// suspect as a whole now, so a probe's failure counts whatever SN it was about. Else
    /// clients asking again for the SNs that opened it would keep it half-open through a
    /// real outage.
    fn open(&mut self, until: Instant) {
        self.mode = Mode::Open { until };
        self.failing = FailingKeys::default();
    }

    fn close(&mut self, now: Instant) {
        self.mode = Mode::Closed;
        self.window_started = now;
        self.calls = 0;
        self.failures = 0;
        self.consecutive = 0;
    }
}

impl Ticket<'_> {
    /// The dependency answered as it should.
    pub fn success(self) {
        self.finish(true);
    }

    /// The dependency failed: a timeout, a broken connection, an error status.
    pub fn failure(self) {
        self.finish(false);
    }

    fn finish(self, ok: bool) {
        let this = std::mem::ManuallyDrop::new(self);
        this.circuit.record(this.probe, this.key, ok);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(round) = self.probe {
            // A probe that never reported frees its slot, so the next call can probe instead.
            let mut inner = self.circuit.lock();
            if inner.round == round {
                inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CircuitSettings {
        CircuitSettings {
            enabled: true,
            consecutive_failures: 3,
            failure_ratio: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(5),
            probes: 2,
        }
    }

    #[test]
    fn a_streak_only_circuit_is_not_opened_by_half_its_calls_failing() {
        let circuit = Circuit::on_streak("redis", 3, Duration::from_secs(5));
        for _ in 0..100 {
            circuit.try_acquire().unwrap().failure();
            circuit.try_acquire().unwrap().success();
        }
        assert_eq!(circuit.state(), CircuitState::Closed);
        fail(&circuit, 3);
        assert_eq!(circuit.state(), CircuitState::Open);
    }

    #[test]
    fn a_streak_only_circuit_of_zero_failures_never_opens() {
        let circuit = Circuit::on_streak("redis", 0, Duration::from_secs(5));
        fail(&circuit, 1000);
        assert_eq!(circuit.state(), CircuitState::Closed);
    }

    fn fail(circuit: &Circuit, times: usize) {
        for _ in 0..times {
            circuit.try_acquire().unwrap().failure();
        }
    }

    fn fail_keys(circuit: &Circuit, keys: &[&str]) {
        for key in keys {
            circuit.try_acquire_for(key).unwrap().failure();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keys_that_keep_failing_count_once_so_they_never_open_it() {
        let circuit = Circuit::new("test", settings());
        fail_keys(&circuit, &["A", "B"]);
        for _ in 0..100 {
            fail_keys(&circuit, &["A", "B"]);
        }
        assert_eq!(circuit.state(), CircuitState::Closed);
        fail_keys(&circuit, &["C"]);
        assert_eq!(
            circuit.state(),
            CircuitState::Open,
            "three distinct keys in a row"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_failures_of_a_key_do_not_weigh_on_the_ratio() {
        let circuit = Circuit::new(
            "test",
            CircuitSettings {
                consecutive_failures: 1000,
                ..settings()
            },
        );
        for i in 0..8 {
            circuit
                .try_acquire_for(&format!("OK-{i}"))
                .unwrap()
                .success();
        }
        fail_keys(&circuit, &["A", "B"]);
        for _ in 0..20 {
            fail_keys(&circuit, &["A", "B"]);
        }
        assert_eq!(circuit.state(), CircuitState::Closed, "2 of 10 counted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_counts_again_after_a_success_or_once_forgotten() {
        let circuit = Circuit::new("test", settings());
        fail_keys(&circuit, &["A", "B"]);
        circuit.try_acquire_for("A").unwrap().success();
        fail_keys(&circuit, &["B", "A"]);
        assert_eq!(circuit.state(), CircuitState::Closed, "B again, then A");
        circuit.try_acquire().unwrap().success();
        fail_keys(&circuit, &["B", "A"]);
        assert_eq!(circuit.state(), CircuitState::Closed);
        tokio::time::advance(KEY_MEMORY).await;
        fail_keys(&circuit, &["B", "A", "C"]);
        assert_eq!(
            circuit.state(),
            CircuitState::Open,
            "A and B were forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_seen_through_the_keys_that_opened_it_re_opens_it_on_a_failed_probe() {
        let circuit = Circuit::new("test", settings());
        fail_keys(&circuit, &["A", "B", "C"]);
        assert_eq!(circuit.state(), CircuitState::Open);
        tokio::time::advance(Duration::from_secs(5)).await;
        circuit.try_acquire_for("A").unwrap().failure();
        assert_eq!(
            circuit.state(),
            CircuitState::Open,
            "A failed before the circuit opened, but an open circuit forgets that"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        let probes = [circuit.try_acquire_for("D"), circuit.try_acquire_for("B")];
        for probe in probes.into_iter().flatten() {
            probe.success();
        }
        assert_eq!(circuit.state(), CircuitState::Closed);
        circuit.try_acquire_for("E").unwrap().failure();
        fail_keys(&circuit, &["B", "F"]);
        assert_eq!(
            circuit.state(),
            CircuitState::Open,
            "B succeeded, so counts"
        );
    }

    #[test]
    fn the_memory_of_failing_keys_is_bounded_oldest_first() {
        let mut keys = FailingKeys::default();
        let now = Instant::now();
        for key in 0..(KEYS_REMEMBERED as u64 + 10) {
            assert!(!keys.note(key, now));
        }
        assert_eq!(keys.last.len(), KEYS_REMEMBERED);
        assert!(!keys.note(0, now), "the oldest were forgotten first");
        assert!(keys.note(KEYS_REMEMBERED as u64 + 9, now));
        assert!(keys.order.len() <= KEYS_REMEMBERED);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_it_and_probes_close_it() {
        let circuit = Circuit::new("test", settings());
        fail(&circuit, 2);
        circuit.try_acquire().unwrap().success();
        fail(&circuit, 2);
        assert_eq!(
            circuit.state(),
            CircuitState::Closed,
            "the streak was broken"
        );
        fail(&circuit, 1);
        assert_eq!(circuit.state(), CircuitState::Open);
        assert!(circuit.try_acquire().is_none(), "open circuits fail fast");

        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(circuit.state(), CircuitState::HalfOpen);
        let first = circuit.try_acquire().unwrap();
        let second = circuit.try_acquire().unwrap();
        assert!(circuit.try_acquire().is_none(), "only two probes at a time");
        first.success();
        assert_eq!(circuit.state(), CircuitState::HalfOpen);
        second.success();
        assert_eq!(circuit.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again() {
        let circuit = Circuit::new("test", settings());
        fail(&circuit, 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        circuit.try_acquire().unwrap().failure();
        assert_eq!(circuit.state(), CircuitState::Open);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(circuit.try_acquire().is_none(), "a full cool-down again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_its_slot() {
        let circuit = Circuit::new("test", settings());
        fail(&circuit, 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        let probes = [circuit.try_acquire(), circuit.try_acquire()];
        assert!(circuit.try_acquire().is_none());
        drop(probes);
        assert!(circuit.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_ratio_opens_it_once_the_window_has_enough_calls() {
        let circuit = Circuit::new("test", settings());
        for _ in 0..4 {
            circuit.try_acquire().unwrap().success();
            fail(&circuit, 1);
        }
        assert_eq!(
            circuit.state(),
            CircuitState::Closed,
            "8 calls < min_requests"
        );
        circuit.try_acquire().unwrap().success();
        fail(&circuit, 1);
        assert_eq!(circuit.state(), CircuitState::Open, "5 of 10 failed");
    }

    #[tokio::test(start_paused = true)]
    async fn old_windows_are_forgotten() {
        let circuit = Circuit::new("test", settings());
        for _ in 0..4 {
            circuit.try_acquire().unwrap().success();
            fail(&circuit, 1);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        circuit.try_acquire().unwrap().success();
        fail(&circuit, 1);
        assert_eq!(
            circuit.state(),
            CircuitState::Closed,
            "a new window of 2 calls"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_probe_of_an_earlier_round_does_not_count_in_the_next() {
        let circuit = Circuit::new("test", settings());
        fail(&circuit, 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        let slow = circuit.try_acquire().unwrap();
        circuit.try_acquire().unwrap().failure();
        tokio::time::advance(Duration::from_secs(5)).await;
        let round_two = [circuit.try_acquire(), circuit.try_acquire()];
        assert!(round_two.iter().all(Option::is_some));
        slow.success();
        assert!(circuit.try_acquire().is_none(), "still two probes at most");
        assert_eq!(
            circuit.state(),
            CircuitState::HalfOpen,
            "the late success does not count"
        );
        for probe in round_two.into_iter().flatten() {
            probe.success();
        }
        assert_eq!(circuit.state(), CircuitState::Closed);
    }

    #[test]
    fn a_disabled_circuit_never_opens() {
        let circuit = Circuit::new(
            "test",
            CircuitSettings {
                enabled: false,
                ..settings()
            },
        );
        fail(&circuit, 100);
        assert_eq!(circuit.state(), CircuitState::Closed);
    }
}
