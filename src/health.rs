//! What `/readyz` reports: the server's phase and what the lookups saw of their dependencies.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

const UNKNOWN: u8 = 0;
const OK: u8 = 1;
const FAILING: u8 = 2;

/// Shared, lock-free health state. Written on the request path, read by `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    phase: AtomicU8,
    upstream: AtomicU8,
    redis_errors: AtomicU64,
    upstream_errors: AtomicU64,
}

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not yet accepting requests; `/readyz` answers `503 starting`.
    Starting,
    /// Serving; `/readyz` answers 200 (`ok` or `degraded`).
    Ready,
    /// Shutting down after a signal; `/readyz` answers `503 draining` so traffic moves away.
    Draining,
}

/// The `/readyz` verdict: whether to answer 200, and the `status` word.
///
/// Only the phase decides readiness: a proxy whose Redis is down, or whose upstream fails,
/// still answers lookups (from the upstream, or with per-SN errors), so it is `degraded`, and
/// taking it out of the load balancer would only move the same failures elsewhere.
pub fn readiness(phase: Phase, cache_ok: bool, upstream_state: &str) -> (bool, &'static str) {
    match phase {
        Phase::Starting => (false, "starting"),
        Phase::Draining => (false, "draining"),
        Phase::Ready if cache_ok && matches!(upstream_state, "ok" | "unknown") => (true, "ok"),
        Phase::Ready => (true, "degraded"),
    }
}

impl Health {
    /// Where the server is in its life right now.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            STARTING => Phase::Starting,
            READY => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    /// Moves from starting to ready; does nothing once draining has begun.
    pub fn mark_ready(&self) {
        // Never go back from draining to ready.
        let _ = self
            .phase
            .compare_exchange(STARTING, READY, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Marks the server as shutting down, so `/readyz` turns it away from new traffic.
    pub fn mark_draining(&self) {
        self.phase.store(DRAINING, Ordering::Release);
    }

    /// Records one upstream answer: a definite one (`ok`) or a failure.
    pub fn record_upstream(&self, ok: bool) {
        self.upstream
            .store(if ok { OK } else { FAILING }, Ordering::Relaxed);
        if !ok {
            self.upstream_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `"unknown"` until the first upstream answer, then how the last one went.
    pub fn upstream_state(&self) -> &'static str {
        match self.upstream.load(Ordering::Relaxed) {
            UNKNOWN => "unknown",
            OK => "ok",
            _ => "failing",
        }
    }

    /// Counts one failed Redis operation (a read, write-back or delete).
    pub fn record_redis_error(&self) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Redis operations that failed since start (reads, write-backs, deletes).
    pub fn redis_errors(&self) -> u64 {
        self.redis_errors.load(Ordering::Relaxed)
    }

    /// Upstream requests that ended without a definite answer since start.
    pub fn upstream_errors(&self) -> u64 {
        self.upstream_errors.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_starting_and_draining_are_unready() {
        assert_eq!(readiness(Phase::Starting, true, "ok"), (false, "starting"));
        assert_eq!(readiness(Phase::Draining, true, "ok"), (false, "draining"));
        assert_eq!(readiness(Phase::Ready, true, "unknown"), (true, "ok"));
        assert_eq!(readiness(Phase::Ready, true, "ok"), (true, "ok"));
        assert_eq!(readiness(Phase::Ready, false, "ok"), (true, "degraded"));
        assert_eq!(readiness(Phase::Ready, true, "failing"), (true, "degraded"));
        assert_eq!(
            readiness(Phase::Ready, true, "unavailable"),
            (true, "degraded")
        );
    }

    #[test]
    fn draining_is_final() {
        let health = Health::default();
        assert_eq!(health.phase(), Phase::Starting);
        health.mark_ready();
        assert_eq!(health.phase(), Phase::Ready);
        health.mark_draining();
        health.mark_ready();
        assert_eq!(health.phase(), Phase::Draining);
    }

    #[test]
    fn upstream_state_follows_the_last_answer() {
        let health = Health::default();
        assert_eq!(health.upstream_state(), "unknown");
        health.record_upstream(false);
        assert_eq!(
            (health.upstream_state(), health.upstream_errors()),
            ("failing", 1)
        );
        health.record_upstream(true);
        assert_eq!(health.upstream_state(), "ok");
    }
}
