//! The in-process tier: a size-bounded, short-lived copy of hot entries, read without a
//! Redis round trip.
//!
//! It holds the same encoded entries Redis does, so freshness is judged the same way whichever
//! tier answered. Copies expire after `cache.local.ttl` whatever happens, which is what bounds
//! how out of date one can be when an invalidation does not arrive.

use bytes::Bytes;
use quick_cache::Weighter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Bytes counted per entry on top of its key and value: the cache's own bookkeeping, so a
/// flood of tiny entries cannot hold far more memory than `max_bytes` says.
const ENTRY_OVERHEAD: u64 = 96;

/// A copy and when it stops being served.
#[derive(Clone)]
struct Copy {
    value: Bytes,
    expires: Instant,
}

#[derive(Clone)]
struct ByteSize;

impl Weighter<String, Copy> for ByteSize {
    fn weight(&self, key: &String, copy: &Copy) -> u64 {
        (key.len() + copy.value.len()) as u64 + ENTRY_OVERHEAD
    }
}

/// The copies, and a count of invalidations that fences reads which raced one.
pub struct LocalTier {
    copies: quick_cache::sync::Cache<String, Copy, ByteSize>,
    ttl: Duration,
    invalidations: AtomicU64,
}

/// Taken before reading Redis for what the local tier lacked: if an invalidation arrives
/// while the read is under way, what it read may be the value just invalidated, so it is
/// served but not copied.
#[derive(Debug, Clone, Copy)]
pub struct Fence(u64);

impl LocalTier {
    /// A tier of at most `max_bytes` whose copies live for `ttl`.
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        // Discount entries are a few hundred bytes; the estimate only sizes the tables.
        let estimated_entries = (max_bytes / 256).max(16);
        Self {
            copies: quick_cache::sync::Cache::with_weighter(
                estimated_entries,
                max_bytes as u64,
                ByteSize,
            ),
            ttl,
            invalidations: AtomicU64::new(0),
        }
    }

    /// The copy of `sn`'s entry, unless there is none or it has expired.
    pub fn get(&self, sn: &str, now: Instant) -> Option<Bytes> {
        let copy = self.copies.get(sn)?;
        if copy.expires <= now {
            self.copies.remove(sn);
            return None;
        }
        Some(copy.value)
    }

    /// Keeps a copy of `sn`'s entry for the tier's TTL.
    pub fn put(&self, sn: &str, value: Bytes, now: Instant) {
        let expires = now + self.ttl;
        self.copies.insert(sn.to_owned(), Copy { value, expires });
    }

    /// A fence to check before copying what a read brings back.
    pub fn fence(&self) -> Fence {
        Fence(self.invalidations.load(Ordering::Acquire))
    }

    /// Whether no invalidation arrived since `fence` was taken.
    pub fn unchanged_since(&self, fence: Fence) -> bool {
        self.invalidations.load(Ordering::Acquire) == fence.0
    }

    /// Drops the copies of `sns`, and fences reads under way.
    pub fn invalidate<'a>(&self, sns: impl IntoIterator<Item = &'a str>) {
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        for sn in sns {
            self.copies.remove(sn);
        }
    }

    /// Drops every copy: after invalidations may have been missed.
    pub fn clear(&self) {
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        self.copies.clear();
    }

    /// Bytes held, as the bound counts them.
    pub fn weight(&self) -> u64 {
        self.copies.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &'static str) -> Bytes {
        Bytes::from_static(text.as_bytes())
    }

    #[test]
    fn a_copy_is_served_until_its_ttl_and_not_after() {
        let tier = LocalTier::new(1 << 20, Duration::from_secs(2));
        let now = Instant::now();
        tier.put("A", value("one"), now);
        assert_eq!(
            tier.get("A", now + Duration::from_millis(1999)),
            Some(value("one"))
        );
        assert_eq!(tier.get("A", now + Duration::from_secs(2)), None);
        assert_eq!(tier.weight(), 0, "an expired copy is dropped when met");
    }

    #[test]
    fn invalidation_drops_copies_and_moves_the_fence() {
        let tier = LocalTier::new(1 << 20, Duration::from_secs(2));
        let now = Instant::now();
        tier.put("A", value("one"), now);
        tier.put("B", value("two"), now);
        let fence = tier.fence();
        assert!(tier.unchanged_since(fence));
        tier.invalidate(["A"]);
        assert!(!tier.unchanged_since(fence));
        assert_eq!(tier.get("A", now), None);
        assert_eq!(tier.get("B", now), Some(value("two")));
        tier.clear();
        assert_eq!(tier.get("B", now), None);
    }

    #[test]
    fn the_byte_bound_holds_however_many_entries_come() {
        let max_bytes = 64 * 1024;
        let tier = LocalTier::new(max_bytes, Duration::from_secs(60));
        let now = Instant::now();
        let big = Bytes::from(vec![b'x'; 1000]);
        for i in 0..1000 {
            tier.put(&format!("SN{i}"), big.clone(), now);
        }
        assert!(tier.weight() <= max_bytes as u64, "{}", tier.weight());
        assert!(tier.copies.len() < 1000 && !tier.copies.is_empty());
    }
}
