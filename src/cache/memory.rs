//! A bounded in-process cache with the same TTL semantics as Redis: used by `demo` when no
//! Redis answers, and by the lookup core's unit tests. Built on `quick_cache`, like the
//! in-process tier: its eviction keeps what is read again and drops one-off entries first.

use super::{Cache, CacheError, CacheKind, Values, Write};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::time::Instant;

/// Entries expire like Redis keys (an expired entry reads as missing); when full, quick_cache
/// evicts the entries least likely to be read again.
pub struct MemoryCache {
    entries: quick_cache::sync::Cache<String, (Bytes, Instant)>,
}

impl MemoryCache {
    /// An empty cache holding at most `max_entries` entries (at least one).
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(max_entries.max(1)),
        }
    }
}

impl Cache for MemoryCache {
    fn get_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Values> {
        let now = Instant::now();
        let values = sns
            .iter()
            .map(|sn| match self.entries.get(*sn) {
                Some((value, expires)) if expires > now => Some(value),
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
        for write in writes {
            self.entries
                .insert(write.sn.clone(), (write.value.clone(), now + write.ttl));
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Result<u64, CacheError>> {
        let now = Instant::now();
        let existed = sns
            .iter()
            .filter_map(|sn| self.entries.remove(*sn))
            .filter(|(_, (_, expires))| *expires > now)
            .count();
        Box::pin(std::future::ready(Ok(existed as u64)))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn kind(&self) -> CacheKind {
        CacheKind::Memory
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
        assert!(cache.entries.len() <= 3, "{} entries", cache.entries.len());
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
