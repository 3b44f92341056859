//! The cache tiers behind one trait, and the entry format they all store.
//!
//! The Redis backend is the shared cache; the in-memory one serves `demo` on a machine without
//! Redis and is shaped to become the in-process tier in front of Redis.

mod entry;
mod memory;
mod redis;

pub use self::entry::{Entry, EntryError, EntryKind};
pub use self::memory::MemoryCache;
pub use self::redis::{RedisCache, RedisSettings};

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future, so `dyn Cache` can pick its backend at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a cache operation failed. Never a request failure: the caller logs it, counts it and
/// goes on without the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis {op} timed out after {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("no redis connection: {0}")]
    Pool(#[source] deadpool_redis::PoolError),
    #[error("the redis connection pool could not be built: {0}")]
    PoolBuild(#[source] deadpool_redis::BuildError),
    #[error("redis URL cannot be used: {0}")]
    InvalidUrl(#[source] ::redis::RedisError),
    #[error("redis {op} failed: {source}")]
    Command {
        op: &'static str,
        #[source]
        source: ::redis::RedisError,
    },
}

/// What a multi-key read found: a value or `None` per key, in order, and the failures met on
/// the way. The keys of a failed chunk are `None`; the caller logs and counts the failures, so
/// a partial failure is never a silent miss.
#[derive(Debug, Default)]
pub struct Values {
    pub values: Vec<Option<Bytes>>,
    pub failures: Vec<CacheError>,
}

/// One value to write back: the SN, its encoded [`Entry`], and how long Redis keeps it.
#[derive(Debug, Clone)]
pub struct Write {
    pub sn: String,
    pub value: Bytes,
    pub ttl: Duration,
}

/// A store of encoded entries keyed by SN. Implementations add their own key prefix.
pub trait Cache: Send + Sync + 'static {
    /// The raw values for `sns`, in the same order; `None` where nothing is stored.
    fn get_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Values>;

    /// Stores every write with its own TTL. Nothing is ever stored without one.
    fn set_many<'a>(&'a self, writes: &'a [Write]) -> BoxFuture<'a, Result<(), CacheError>>;

    /// Removes `sns`; returns how many of them existed.
    fn delete_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Result<u64, CacheError>>;

    /// Checks the backend answers, for `/readyz`.
    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>>;

    /// What this cache is, for logs and `/readyz` (`"redis"`, `"memory"`).
    fn kind(&self) -> &'static str;
}

impl From<&crate::config::RedisConfig> for RedisSettings {
    fn from(config: &crate::config::RedisConfig) -> Self {
        Self {
            url: config.url.clone(),
            pool_size: config.pool_size,
            key_prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            chunk_size: config.chunk_size,
        }
    }
}
