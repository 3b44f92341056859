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
    Starting,
    Ready,
    Draining,
}

impl Health {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            STARTING => Phase::Starting,
            READY => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    pub fn mark_ready(&self) {
        // Never go back from draining to ready.
        let _ = self
            .phase
            .compare_exchange(STARTING, READY, Ordering::AcqRel, Ordering::Acquire);
    }

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
