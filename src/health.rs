//! What `/readyz` reports: the server's phase and what the lookups saw of their dependencies,
//! each as a type whose variants are the words `/readyz` shows.

use serde::Serialize;
use std::sync::atomic::{AtomicU8, Ordering};

/// Shared, lock-free health state. Written on the request path, read by `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    phase: AtomicU8,
    upstream: AtomicU8,
}

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Not yet accepting requests; `/readyz` answers `503 starting`.
    Starting = 0,
    /// Serving; `/readyz` answers 200 (`ok` or `degraded`).
    Ready = 1,
    /// Shutting down after a signal; `/readyz` answers `503 draining` so traffic moves away.
    Draining = 2,
}

/// The upstream as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum UpstreamState {
    /// No upstream answer yet.
    Unknown = 0,
    /// The last answer was a definite one.
    Ok = 1,
    /// The last answer was a failure.
    Failing = 2,
    /// Its circuit is not closed: lookups without a stale value get `upstream_unavailable`.
    Unavailable = 3,
}

/// Redis as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisState {
    /// It answered the readiness `PING`.
    Ok,
    /// It did not (or its circuit is open).
    Down,
    /// The in-process cache serves instead (`demo` without Redis).
    Unused,
}

/// The `/readyz` `status` word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Serving, every dependency fine.
    Ok,
    /// Serving, a dependency is not (lookups still answer: see [`readiness`]).
    Degraded,
    /// Not yet serving.
    Starting,
    /// Shutting down.
    Draining,
}

/// The `/readyz` verdict: whether to answer 200, and the `status` word.
///
/// Only the phase decides readiness: a proxy whose Redis is down, or whose upstream fails,
/// still answers lookups (from the upstream, or with per-SN errors), so it is `degraded`, and
/// taking it out of the load balancer would only move the same failures elsewhere.
pub fn readiness(phase: Phase, cache_ok: bool, upstream: UpstreamState) -> (bool, Status) {
    match phase {
        Phase::Starting => (false, Status::Starting),
        Phase::Draining => (false, Status::Draining),
        Phase::Ready
            if cache_ok && matches!(upstream, UpstreamState::Ok | UpstreamState::Unknown) =>
        {
            (true, Status::Ok)
        }
        Phase::Ready => (true, Status::Degraded),
    }
}

impl Health {
    /// Where the server is in its life right now.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    /// Moves from starting to ready; does nothing once draining has begun.
    pub fn mark_ready(&self) {
        // Never go back from draining to ready.
        let _ = self.phase.compare_exchange(
            Phase::Starting as u8,
            Phase::Ready as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Marks the server as shutting down, so `/readyz` turns it away from new traffic.
    pub fn mark_draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::Release);
    }

    /// Records one upstream answer: a definite one (`ok`) or a failure.
    pub fn record_upstream(&self, ok: bool) {
        let state = if ok {
            UpstreamState::Ok
        } else {
            UpstreamState::Failing
        };
        self.upstream.store(state as u8, Ordering::Relaxed);
    }

    /// [`UpstreamState::Unknown`] until the first upstream answer, then how the last one went.
    pub fn upstream_state(&self) -> UpstreamState {
        match self.upstream.load(Ordering::Relaxed) {
            0 => UpstreamState::Unknown,
            1 => UpstreamState::Ok,
            _ => UpstreamState::Failing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_starting_and_draining_are_unready() {
        use UpstreamState::{Failing, Ok as Up, Unavailable, Unknown};
        assert_eq!(
            readiness(Phase::Starting, true, Up),
            (false, Status::Starting)
        );
        assert_eq!(
            readiness(Phase::Draining, true, Up),
            (false, Status::Draining)
        );
        assert_eq!(readiness(Phase::Ready, true, Unknown), (true, Status::Ok));
        assert_eq!(readiness(Phase::Ready, true, Up), (true, Status::Ok));
        assert_eq!(readiness(Phase::Ready, false, Up), (true, Status::Degraded));
        assert_eq!(
            readiness(Phase::Ready, true, Failing),
            (true, Status::Degraded)
        );
        assert_eq!(
            readiness(Phase::Ready, true, Unavailable),
            (true, Status::Degraded)
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
        assert_eq!(health.upstream_state(), UpstreamState::Unknown);
        health.record_upstream(false);
        assert_eq!(health.upstream_state(), UpstreamState::Failing);
        health.record_upstream(true);
        assert_eq!(health.upstream_state(), UpstreamState::Ok);
    }

    #[test]
    fn readyz_words_are_snake_case() {
        let words = serde_json::json!([
            Status::Degraded,
            UpstreamState::Unavailable,
            RedisState::Unused
        ]);
        assert_eq!(words.to_string(), r#"["degraded","unavailable","unused"]"#);
    }
}
