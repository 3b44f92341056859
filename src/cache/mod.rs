//! The cache tiers behind one trait, and the entry format they all store.
//!
//! The Redis backend is the shared cache; [`TieredCache`] puts the in-process tier
//! ([`LocalTier`]) in front of it when `cache.local.enabled`; the in-memory one serves `demo`
//! on a machine without Redis. Redis is also what instances sharing it coalesce through
//! (`coordination`: claims, fences, announcements).

mod cluster;
mod connections;
pub mod coordination;
mod entry;
mod invalidation_channel;
mod local;
mod memory;
mod redis;
mod sentinel;
mod slots;
mod subscription;
mod tiered;
mod wakeups;

pub use self::coordination::{Ask, Claim, Coordination, FencedWrite, Refusals};
pub use self::entry::{Entry, EntryError, EntryKind};
pub use self::local::LocalTier;
pub use self::memory::MemoryCache;
pub use self::redis::RedisCache;
pub use self::tiered::TieredCache;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::time::Duration;

/// Why a cache operation failed. Never a request failure: the caller logs it, counts it and
/// goes on without the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A connect or a command took longer than `redis.timeout` (a hung Redis).
    #[error("redis {op} timed out after {timeout:?}")]
    Timeout {
        /// What timed out: `connect` or the command's name.
        op: &'static str,
        /// The bound it ran past.
        timeout: Duration,
    },
    /// No connection could be made, typically because Redis is down or refusing.
    #[error("no redis connection: {0}")]
    Connect(#[source] ::redis::RedisError),
    /// The connect this call waited for (made by another caller) failed just now: trying
    /// again at once would only make every waiter pay for a connect in turn.
    #[error("no redis connection: the connect attempt this call waited for failed")]
    ConnectFailed,
    /// `redis.url` is not a URL redis-rs can connect with.
    #[error("redis URL cannot be used: {0}")]
    InvalidUrl(#[source] ::redis::RedisError),
    /// Redis failed repeatedly and its circuit is open: it was not asked, so a dead Redis
    /// costs nothing per request until a probe finds it back.
    #[error("redis is skipped after repeated failures; a probe will try it again soon")]
    Skipped,
    /// Redis answered a command with an error, or the connection broke during it.
    #[error("redis {op} failed: {source}")]
    Command {
        /// The command that failed, like `MGET`.
        op: &'static str,
        /// What redis-rs reported.
        #[source]
        source: ::redis::RedisError,
    },
}

impl CacheError {
    /// Whether the backend was not even asked, because its circuit is open: the failure was
    /// already counted and logged when the circuit opened, so callers only note it at debug.
    pub fn is_skipped(&self) -> bool {
        matches!(self, Self::Skipped)
    }
}

/// Which backend a [`Cache`] is, as `/readyz` names it (`"cache"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheKind {
    /// Redis (alone or behind the in-process tier).
    Redis,
    /// The bounded in-process cache, without Redis.
    Memory,
}

/// What a multi-key read found: a value or `None` per key, in order, and the failures met on
/// the way. The keys of a failed chunk are `None`; the caller logs and counts the failures, so
/// a partial failure is never a silent miss.
#[derive(Debug, Default)]
pub struct Values {
    /// One slot per requested SN, in request order; `None` is a miss or a failed chunk.
    pub values: Vec<Option<Bytes>>,
    /// The errors of the chunks that failed, for the caller to log and count.
    pub failures: Vec<CacheError>,
}

/// One value to write back: the SN, its encoded [`Entry`], and how long Redis keeps it.
#[derive(Debug, Clone)]
pub struct Write {
    /// The SN the value belongs to; the backend adds its key prefix.
    pub sn: String,
    /// The encoded entry, stored as-is.
    pub value: Bytes,
    /// How long the backend keeps the value before it expires.
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

    /// Keeps a copy of entries just written to the backend some other way (a fenced
    /// write-back, see `coordination`) in an in-process tier, if there is one.
    fn keep_local(&self, _writes: &[Write]) {}

    /// Checks the backend answers, for `/readyz`.
    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>>;

    /// What this cache is, for logs and `/readyz`.
    fn kind(&self) -> CacheKind;

    /// Whether the backend is being skipped after repeated failures, for `/readyz`.
    fn circuit(&self) -> crate::circuit::CircuitState {
        crate::circuit::CircuitState::Closed
    }

    /// The connection pool's state, for `/metrics`; `None` without a pool.
    fn pool(&self) -> Option<PoolStatus> {
        None
    }

    /// Bytes held by an in-process tier in front of the backend, for `/metrics`.
    fn local_bytes(&self) -> u64 {
        0
    }
}

/// How a connection pool stands.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStatus {
    /// Connections held, busy or idle.
    pub size: usize,
    /// Idle connections.
    pub available: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}
