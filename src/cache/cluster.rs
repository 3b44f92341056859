//! The Redis Cluster connection: redis-rs's `cluster_async::ClusterConnection`, one for the
//! whole proxy. It is multiplexed (every request shares it, as with the standalone
//! connections), follows `MOVED`/`ASK` and topology changes by itself, and reaches each shard
//! over connections of its own, so a failing shard fails only the commands routed to it.
//!
//! Connected lazily, like the standalone connections: a cluster that is down at start is not
//! an error. A connection that broke or timed out is dropped and made anew by the next
//! caller; callers bound their wait for it with `redis.timeout` (see `RedisCache`).

use super::CacheError;
use crate::config::RedisConfig;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_read_routing::RoundRobinReplicaStrategy;
use std::time::Duration;

/// Retries of a command the cluster library makes itself (after `MOVED`, a lost node): few,
/// since `redis.timeout` bounds the whole attempt anyway, and its default (16, with waits of
/// up to minutes) would only ever be cut off by that bound.
const CLUSTER_RETRIES: u32 = 2;

pub(super) struct ClusterLink {
    client: ClusterClient,
    connect_timeout: Duration,
    current: tokio::sync::Mutex<Option<ClusterConnection>>,
}

impl ClusterLink {
    /// A link to the cluster whose seeds are `seeds` (each URL with its own credentials and
    /// TLS).
    ///
    /// # Errors
    /// A seed URL redis-rs cannot use.
    pub(super) fn new(seeds: &[String], config: &RedisConfig) -> Result<Self, CacheError> {
        let mut builder = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(config.timeout)
            .response_timeout(config.timeout)
            .retries(CLUSTER_RETRIES);
        if config.read_from_replicas {
            builder = builder.read_routing_strategy(RoundRobinReplicaStrategy::new());
        }
        let client = builder.build().map_err(CacheError::InvalidUrl)?;
        Ok(Self {
            client,
            connect_timeout: config.timeout,
            current: tokio::sync::Mutex::new(None),
        })
    }

    /// The shared connection, connecting first if there is none.
    ///
    /// # Errors
    /// No node of the cluster could be reached in time.
    pub(super) async fn get(&self) -> Result<ClusterConnection, CacheError> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref() {
            return Ok(conn.clone());
        }
        let connect = self.client.get_async_connection();
        let conn = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| CacheError::Timeout {
                op: "connect",
                timeout: self.connect_timeout,
            })?
            .map_err(CacheError::Connect)?;
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the shared connection after it broke or hung: the next caller makes a new one.
    pub(super) fn discard(&self) {
        if let Ok(mut current) = self.current.try_lock() {
            *current = None;
        }
    }
}
