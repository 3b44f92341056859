//! A bounded in-process cache with the same TTL semantics as Redis: used by `demo` when no
//! Redis answers, and the shape of the in-process tier that will sit in front of Redis.

use super::{BoxFuture, Cache, CacheError, Values, Write};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::time::Instant;

/// Entries expire like Redis keys; when full, expired entries go first, then arbitrary ones
/// (a random eviction, which needs no bookkeeping per read).
pub struct MemoryCache {
    entries: Mutex<HashMap<String, (Bytes, Instant)>>,
    max_entries: usize,
}

impl MemoryCache {
    /// An empty cache holding at most `max_entries` entries (at least one).
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Bytes, Instant)>> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // matters for a cache, so a poisoned lock is simply taken over.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Frees room for one more entry. Each pass frees a tenth of the capacity, so a full cache
    /// pays for a sweep once per `max / 10` inserts, not on every insert.
    fn make_room(entries: &mut HashMap<String, (Bytes, Instant)>, max: usize, now: Instant) {
        if entries.len() < max {
            return;
        }
        entries.retain(|_, (_, expires)| *expires > now);
        let target = max - max.div_ceil(10);
        if entries.len() <= target {
            return;
        }
        let victims: Vec<String> = entries
            .keys()
            .take(entries.len() - target)
            .cloned()
            .collect();
        for key in victims {
            entries.remove(&key);
        }
    }
}

impl Cache for MemoryCache {
    fn get_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Values> {
        let now = Instant::now();
        let entries = self.lock();
        let values = sns
            .iter()
            .map(|sn| match entries.get(*sn) {
                Some((value, expires)) if *expires > now => Some(value.clone()),
                _ => None,
            })
            .collect();
        Box::pin(std::future::ready(Values {
            values,
            failures: Vec::new(),
        }))
    }

    fn set_many<'a>(&'a self, writes: &'a [Write]) -> BoxFuture<'a, Result<(), CacheError>> {
        let now = Instant::now();
        let mut entries = self.lock();
        for write in writes {
            if !entries.contains_key(&write.sn) {
                Self::make_room(&mut entries, self.max_entries, now);
            }
            entries.insert(write.sn.clone(), (write.value.clone(), now + write.ttl));
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Result<u64, CacheError>> {
        let now = Instant::now();
        let mut entries = self.lock();
        let existed = sns
            .iter()
            .filter_map(|sn| entries.remove(*sn))
            .filter(|(_, expires)| *expires > now)
            .count();
        Box::pin(std::future::ready(Ok(existed as u64)))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write(sn: &str, ttl: Duration) -> Write {
        Write {
            sn: sn.to_owned(),
            value: Bytes::from(format!("v-{sn}")),
            ttl,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn values_expire_after_their_ttl() {
        let cache = MemoryCache::new(10);
        cache
            .set_many(&[write("a", Duration::from_secs(2))])
            .await
            .unwrap();
        assert_eq!(
            cache.get_many(&["a", "b"]).await.values,
            [Some(Bytes::from("v-a")), None]
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(cache.get_many(&["a"]).await.values, [None]);
        assert_eq!(cache.delete_many(&["a"]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn never_holds_more_than_its_bound() {
        let cache = MemoryCache::new(3);
        let writes: Vec<_> = (0..10)
            .map(|i| write(&i.to_string(), Duration::from_secs(60)))
            .collect();
        cache.set_many(&writes).await.unwrap();
        assert!(cache.lock().len() <= 3);
        // The newest write is always kept.
        assert!(cache.get_many(&["9"]).await.values[0].is_some());
    }

    #[tokio::test]
    async fn delete_counts_only_existing_keys() {
        let cache = MemoryCache::new(10);
        cache
            .set_many(&[write("a", Duration::from_secs(60))])
            .await
            .unwrap();
        assert_eq!(cache.delete_many(&["a", "b"]).await.unwrap(), 1);
        assert_eq!(cache.get_many(&["a"]).await.values, [None]);
    }
}
