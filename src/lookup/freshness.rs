//! Fresh, stale, gone: what a cached entry is worth now, and how long Redis keeps it.

use crate::cache::{Entry, EntryKind};
use std::time::{Duration, SystemTime};

/// How long answers are worth keeping (`cache.ttl`, `stale_ttl`, `negative_ttl`,
/// `early_refresh`).
#[derive(Debug, Clone)]
pub struct Lifetimes {
    /// A discount is fresh this long after it was fetched.
    pub ttl: Duration,
    /// …and then stale for this long: served, marked `stale`, while it is refreshed.
    pub stale_ttl: Duration,
    /// A `not_found` is remembered this long, with no stale period.
    pub negative_ttl: Duration,
    /// The last share of `ttl` in which a hit may refresh early (0 = never).
    pub early_refresh: f64,
}

/// What a cached entry is worth now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it; nothing else to do.
    Fresh,
    /// Serve it as fresh, and refresh it in the background: it is close to expiry.
    RefreshEarly,
    /// Serve it marked `stale`, and refresh it in the background.
    Stale,
    /// Too old to serve: a miss.
    Gone,
}

impl Lifetimes {
    /// Classifies `entry` at `now`. The early-refresh chance rises linearly from 0 where the
    /// early window starts to 1 at expiry, so among many hits on a hot key one refreshes it
    /// a little before it expires, and keys fetched together do not refresh together.
    pub fn classify(&self, entry: &Entry, now: SystemTime) -> Freshness {
        let age = entry.age(now);
        match entry.kind() {
            EntryKind::NotFound if age < self.negative_ttl => Freshness::Fresh,
            EntryKind::NotFound => Freshness::Gone,
            EntryKind::Found if age < self.ttl => self.fresh_or_early(age),
            EntryKind::Found if age < self.ttl.saturating_add(self.stale_ttl) => Freshness::Stale,
            EntryKind::Found => Freshness::Gone,
        }
    }

    fn fresh_or_early(&self, age: Duration) -> Freshness {
        let window = self.ttl.mul_f64(self.early_refresh);
        let window_start = self.ttl.saturating_sub(window);
        if window.is_zero() || age < window_start {
            return Freshness::Fresh;
        }
        let chance = (age - window_start).as_secs_f64() / window.as_secs_f64();
        if fastrand::f64() < chance {
            Freshness::RefreshEarly
        } else {
            Freshness::Fresh
        }
    }

    /// How long Redis keeps an entry of `kind`: its whole useful life (fresh and stale), plus
    /// up to 10% jitter so keys written together do not all expire together. The jitter only
    /// ever lengthens: [`Lifetimes::classify`] decides usefulness from the fetch time, so a
    /// key that outlives its use is a miss, while one cut short would lose its stale period.
    pub fn storage_ttl(&self, kind: EntryKind) -> Duration {
        let life = match kind {
            EntryKind::Found => self.ttl.saturating_add(self.stale_ttl),
            EntryKind::NotFound => self.negative_ttl,
        };
        life.mul_f64(1.0 + 0.1 * fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn lifetimes(early_refresh: f64) -> Lifetimes {
        Lifetimes {
            ttl: HOUR,
            stale_ttl: HOUR,
            negative_ttl: Duration::from_secs(300),
            early_refresh,
        }
    }

    fn found_aged(age: Duration) -> (Entry, SystemTime) {
        let now = SystemTime::now();
        (Entry::found(b"{}", now - age), now)
    }

    #[test]
    fn found_entries_go_fresh_then_stale_then_gone() {
        let lifetimes = lifetimes(0.0);
        for (age, expected) in [
            (Duration::ZERO, Freshness::Fresh),
            (HOUR - Duration::from_secs(1), Freshness::Fresh),
            (HOUR, Freshness::Stale),
            (2 * HOUR - Duration::from_secs(1), Freshness::Stale),
            (2 * HOUR, Freshness::Gone),
        ] {
            let (entry, now) = found_aged(age);
            assert_eq!(lifetimes.classify(&entry, now), expected, "{age:?}");
        }
    }

    #[test]
    fn negative_entries_have_no_stale_period() {
        let lifetimes = lifetimes(0.0);
        let now = SystemTime::now();
        let young = Entry::not_found(now - Duration::from_secs(299));
        let old = Entry::not_found(now - Duration::from_secs(300));
        assert_eq!(lifetimes.classify(&young, now), Freshness::Fresh);
        assert_eq!(lifetimes.classify(&old, now), Freshness::Gone);
    }

    #[test]
    fn early_refresh_only_happens_in_its_window_and_grows_towards_expiry() {
        let lifetimes = lifetimes(0.5);
        let refreshes = |age: Duration| {
            (0..2000)
                .filter(|_| {
                    let (entry, now) = found_aged(age);
                    lifetimes.classify(&entry, now) == Freshness::RefreshEarly
                })
                .count()
        };
        assert_eq!(refreshes(HOUR / 2 - Duration::from_secs(1)), 0);
        let early = refreshes(HOUR * 6 / 10);
        let late = refreshes(HOUR * 95 / 100);
        assert!(early > 0 && early < late, "{early} then {late}");
        assert!(late > 1500, "{late}");
    }

    #[test]
    fn storage_covers_the_whole_life_plus_at_most_ten_percent() {
        let lifetimes = lifetimes(0.0);
        for _ in 0..100 {
            let found = lifetimes.storage_ttl(EntryKind::Found);
            assert!(
                found >= 2 * HOUR && found <= 2 * HOUR + HOUR / 5,
                "{found:?}"
            );
            let missing = lifetimes.storage_ttl(EntryKind::NotFound);
            assert!(
                missing >= Duration::from_secs(300) && missing <= Duration::from_secs(330),
                "{missing:?}"
            );
        }
    }
}
