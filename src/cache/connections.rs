//! A small, fixed set of multiplexed Redis connections shared by every request.
//!
//! Why not a pool: a pooled checkout of a reused connection costs a recycle check (`UNWATCH` +
//! `PING`), one more round trip per command, and each command then has the connection to
//! itself. A multiplexed connection pipelines whatever concurrent requests send on it, so
//! under load many lookups share one `write` and one `read` to Redis. A few of them, taken in
//! turn, keep one slow reply from queueing everything behind it.
//!
//! Why not redis-rs's own `aio::ConnectionManager` (a reconnecting multiplexed connection
//! with connect and response timeouts): it reconnects only when a connection is seen to
//! drop (reset, EOF), never after a response timeout (nor on `READONLY`). A flow that goes
//! silent without closing (a NAT or load balancer that lost its state, a failover behind
//! the same address) then fails every command forever. Measured with
//! `cargo run --release -p bench --example connection_manager` (a relay that silences the
//! flows open at one moment while new ones pass): these connections answered again 0.53 s
//! after the cut in three runs out of three, `ConnectionManager` was still failing 10 s
//! after it every time. On the hit path the two are alike (64 tasks of 100-key `MGET`s:
//! 12–16 k/s for `ConnectionManager`, 13–18 k/s here with two connections, run to run).
//!
//! A connection that broke (or timed out) is discarded by the caller that saw it fail; the
//! next caller of that slot connects afresh, and callers of one slot wait for the same connect
//! instead of stampeding Redis with their own. When that connect fails, the callers that
//! waited for it fail with it rather than each connecting in turn: with a hung Redis, the
//! tenth waiter would otherwise pay for ten connect timeouts. Callers bound their whole
//! attempt, wait included, by `redis.timeout` (see `send_over` in `redis`).

use super::sentinel::SentinelEndpoint;
use super::subscription::SeedRotation;
use super::{CacheError, PoolStatus};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Where connections go, asked at each connect: one fixed Redis, the node (master or
/// replica) the sentinels name now, or (the invalidation subscription on a cluster) the next
/// seed.
pub(super) enum Endpoint {
    /// `redis.url`.
    Fixed(Box<Client>),
    /// The master of `redis.sentinel_master`, or one of its replicas.
    Sentinel(Arc<SentinelEndpoint>),
    /// A cluster's seeds, one per connect in turn: a `PUBLISH` on a cluster reaches the
    /// subscribers of every node, so any node that answers will do, and a dead one must not
    /// keep the channel down while the others are up.
    Seeds(SeedRotation),
}

impl Endpoint {
    /// A client for the next connect.
    ///
    /// # Errors
    /// Sentinel only: no sentinel answered, or none names a node of the kind asked for.
    pub(super) async fn client(&self) -> Result<Client, CacheError> {
        match self {
            Self::Fixed(client) => Ok(Client::clone(client)),
            Self::Sentinel(sentinels) => sentinels.client().await,
            Self::Seeds(seeds) => Ok(seeds.next()),
        }
    }
}

/// The shared connections, connected lazily: a Redis that is down at start is not an error.
pub(super) struct Connections {
    endpoint: Endpoint,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    slots: Box<[Slot]>,
    next: AtomicUsize,
    generations: AtomicU64,
    waiting: AtomicUsize,
}

#[derive(Default)]
struct Slot {
    /// Held only to clone or replace the connection, never across an `.await`.
    current: Mutex<Option<Lease>>,
    /// Held while connecting, so one caller connects and the others of this slot wait for it.
    connecting: tokio::sync::Mutex<()>,
    /// Connects of this slot that failed so far: a waiter that sees it move while it waited
    /// fails with that connect instead of making its own.
    failed_connects: AtomicU64,
}

impl Slot {
    fn current(&self) -> Option<Lease> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A connection handed out for one command, and when it was made (its generation), so a
/// failure discards it and older ones but never a replacement made since.
#[derive(Clone)]
pub(super) struct Lease {
    pub(super) conn: MultiplexedConnection,
    pub(super) generation: u64,
}

impl Connections {
    /// `count` connections (at least one) to the Redis `client` points at.
    pub(super) fn new(
        endpoint: Endpoint,
        config: AsyncConnectionConfig,
        connect_timeout: Duration,
        count: usize,
    ) -> Self {
        Self {
            endpoint,
            config,
            connect_timeout,
            slots: (0..count.max(1)).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
            generations: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    /// The next connection in turn, connecting it first if it is not open.
    ///
    /// # Errors
    /// The connect failed or took longer than the timeout.
    pub(super) async fn get(&self) -> Result<Lease, CacheError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[index];
        if let Some(lease) = slot.current() {
            return Ok(lease);
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let connected = self.connect(index).await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        connected
    }

    async fn connect(&self, index: usize) -> Result<Lease, CacheError> {
        let slot = &self.slots[index];
        let failed_before = slot.failed_connects.load(Ordering::Acquire);
        let _connecting = slot.connecting.lock().await;
        // Whoever held the lock before may have connected this slot already, or failed to.
        if let Some(lease) = slot.current() {
            return Ok(lease);
        }
        if slot.failed_connects.load(Ordering::Acquire) != failed_before {
            return Err(CacheError::ConnectFailed);
        }
        let conn = self.connect_once().await.inspect_err(|_| {
            slot.failed_connects.fetch_add(1, Ordering::AcqRel);
        })?;
        let lease = Lease {
            conn,
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
        };
        *slot.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(lease.clone());
        Ok(lease)
    }

    async fn connect_once(&self) -> Result<MultiplexedConnection, CacheError> {
        let connect = async {
            let client = self.endpoint.client().await?;
            client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map_err(CacheError::Connect)
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| CacheError::Timeout {
                op: "connect",
                timeout: self.connect_timeout,
            })?
    }

    /// Drops every open connection (the master moved): the next callers connect afresh.
    pub(super) fn discard_all(&self) {
        self.discard(u64::MAX);
    }

    /// Drops a connection that broke or hung, and every connection made before it: whatever
    /// broke it (a Redis restart, a failover, a cut network) most likely broke those too, and
    /// finding that out one failed command per connection would keep the circuit breaker's
    /// probes failing. Connections made after it are kept.
    pub(super) fn discard(&self, generation: u64) {
        for slot in &self.slots {
            let mut current = slot.current.lock().unwrap_or_else(PoisonError::into_inner);
            if current
                .as_ref()
                .is_some_and(|held| held.generation <= generation)
            {
                *current = None;
            }
        }
    }

    /// Open connections (each serves any number of callers at once) and callers waiting for
    /// a connect.
    pub(super) fn status(&self) -> PoolStatus {
        let open = self
            .slots
            .iter()
            .filter(|slot| slot.current().is_some())
            .count();
        PoolStatus {
            size: open,
            available: open,
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}
