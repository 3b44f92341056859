//! Redis with the in-process tier in front: hot SNs are answered from memory, the rest with
//! one Redis read whose values are copied locally; writes go to both; an invalidation drops
//! the local copies here and, over Redis pub/sub, in every other instance.

use super::invalidation_channel::{self, InvalidationChannel};
use super::{
    Cache, CacheError, CacheKind, Entry, LocalTier, PoolStatus, RedisCache, Values, Write,
};
use crate::circuit::CircuitState;
use crate::metrics::{InvalidationEvent, Metrics};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::DropGuard;
use tracing::warn;

/// The tiers, and the subscription that keeps this instance's copies in step with the others.
pub struct TieredCache {
    local: Arc<LocalTier>,
    remote: Arc<RedisCache>,
    channel: InvalidationChannel,
    metrics: Arc<Metrics>,
    /// Stops following the channel when the cache is dropped.
    _following: DropGuard,
}

impl TieredCache {
    /// Puts a tier of `max_bytes` whose copies live `ttl` in front of `remote`, and starts
    /// following invalidations on `<key_prefix>invalidations` (needs a Tokio runtime).
    pub fn new(
        remote: Arc<RedisCache>,
        key_prefix: &str,
        max_bytes: usize,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let local = Arc::new(LocalTier::new(max_bytes, ttl));
        let channel = InvalidationChannel::new(key_prefix);
        let following = channel.follow(
            remote.subscription(),
            Arc::clone(&local),
            Arc::clone(&metrics),
        );
        Self {
            local,
            remote,
            channel,
            metrics,
            _following: following.drop_guard(),
        }
    }

    /// The pub/sub channel invalidations go over.
    pub fn channel(&self) -> &str {
        self.channel.name()
    }

    /// Tells the other instances to drop their copies of `sns`. A failure is logged and
    /// counted, not returned: their copies then expire within the local TTL anyway.
    async fn announce(&self, sns: &[&str]) {
        let message = invalidation_channel::encode(sns);
        match self.remote.publish(self.channel.name(), &message).await {
            Ok(_) => self
                .metrics
                .record_invalidation_message(InvalidationEvent::Published),
            Err(err) => {
                self.metrics
                    .record_invalidation_message(InvalidationEvent::PublishFailed);
                warn!(
                    error = %err, sns = sns.len(),
                    "invalidation not announced; other instances' copies expire within cache.local.ttl"
                );
            }
        }
    }
}

impl Cache for TieredCache {
    fn get_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Values> {
        Box::pin(async move {
            let now = Instant::now();
            let mut values: Vec<Option<Bytes>> = Vec::with_capacity(sns.len());
            let mut lacking: Vec<usize> = Vec::new();
            for (index, sn) in sns.iter().enumerate() {
                let copy = self.local.get(sn, now);
                if copy.is_none() {
                    lacking.push(index);
                }
                values.push(copy);
            }
            self.metrics
                .record_local_lookups(sns.len() - lacking.len(), lacking.len());
            if lacking.is_empty() {
                return Values {
                    values,
                    failures: Vec::new(),
                };
            }
            let fence = self.local.fence();
            let wanted: Vec<&str> = lacking.iter().map(|&index| sns[index]).collect();
            let read = self.remote.get_many(&wanted).await;
            // An invalidation that came during the read may be of a value it brought back.
            let copy = self.local.unchanged_since(fence);
            let now = Instant::now();
            for (&index, value) in lacking.iter().zip(read.values) {
                // Only entries we could have written: another writer's value is a miss that
                // the write-back replaces, and a copy would outlive it here.
                if copy
                    && let Some(value) = &value
                    && Entry::is_well_formed(value)
                {
                    self.local.put(sns[index], value.clone(), now);
                }
                values[index] = value;
            }
            Values {
                values,
                failures: read.failures,
            }
        })
    }

    fn set_many<'a>(&'a self, writes: &'a [Write]) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let now = Instant::now();
            for write in writes {
                self.local.put(&write.sn, write.value.clone(), now);
            }
            self.remote.set_many(writes).await
        })
    }

    fn delete_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Result<u64, CacheError>> {
        Box::pin(async move {
            self.local.invalidate(sns.iter().copied());
            let deleted = self.remote.delete_many(sns).await;
            // Again: a read of ours that raced the delete may have copied the old value back.
            self.local.invalidate(sns.iter().copied());
            if deleted.is_ok() {
                self.announce(sns).await;
            }
            deleted
        })
    }

    fn keep_local(&self, writes: &[Write]) {
        let now = Instant::now();
        for write in writes {
            self.local.put(&write.sn, write.value.clone(), now);
        }
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        self.remote.ping()
    }

    fn kind(&self) -> CacheKind {
        self.remote.kind()
    }

    fn circuit(&self) -> CircuitState {
        self.remote.circuit()
    }

    fn pool(&self) -> Option<PoolStatus> {
        self.remote.pool()
    }

    fn local_bytes(&self) -> u64 {
        self.local.weight()
    }
}
