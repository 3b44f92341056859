//! Recent invalidations, so a fetch that was already under way when its SN was invalidated
//! does not write the pre-invalidation answer back after the delete.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How long an invalidation is remembered. A fetch lives at most its wait for an upstream
/// slot plus `upstream.timeout`; this is far longer than that in any sane set-up.
const HORIZON: Duration = Duration::from_secs(600);

/// Pruning runs only past this many entries, so a quiet proxy does no work at all.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug, Default)]
pub(super) struct Invalidations {
    recent: Mutex<Recent>,
}

#[derive(Debug, Default)]
struct Recent {
    at: HashMap<String, Instant>,
    /// The size past which the next prune runs: twice what the last one left, so pruning
    /// costs O(1) per invalidation on average however many are remembered.
    prune_above: usize,
}

impl Invalidations {
    /// Notes that `sns` are being invalidated now. Call before deleting them.
    pub(super) fn record(&self, sns: &[&str]) {
        let now = Instant::now();
        let mut recent = self.lock();
        if recent.at.len() > recent.prune_above.max(PRUNE_ABOVE) {
            recent
                .at
                .retain(|_, at| now.saturating_duration_since(*at) < HORIZON);
            recent.prune_above = recent.at.len() * 2;
        }
        for sn in sns {
            recent.at.insert((*sn).to_owned(), now);
        }
    }

    /// Whether `sn` was invalidated at or after `started` (so its answer must not be cached).
    pub(super) fn since(&self, sn: &str, started: Instant) -> bool {
        self.lock().at.get(sn).is_some_and(|at| *at >= started)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        // Plain inserts and reads: a poisoned map is still a consistent map.
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_invalidations_after_the_start_fence_a_fetch() {
        let invalidations = Invalidations::default();
        invalidations.record(&["A"]);
        tokio::time::advance(Duration::from_millis(10)).await;
        let started = Instant::now();
        assert!(
            !invalidations.since("A", started),
            "invalidated before the fetch began"
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        invalidations.record(&["A"]);
        assert!(invalidations.since("A", started));
        assert!(!invalidations.since("B", started));
    }
}
