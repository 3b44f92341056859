//! Redis behind Sentinel: the master is whatever the sentinels name now. It is asked for at
//! every connect, and asked again every [`FOLLOW_EVERY`] in the background: when the answer
//! changes (a `SENTINEL FAILOVER`, or a master that died), every open connection is dropped,
//! so the next command goes to the new master within about a second of the sentinels'
//! decision, not only once the old master turns read-only (about 10 s after a manual
//! failover) or dies.
//!
//! `redis.nodes` are the sentinels' URLs; `redis.url` supplies the master's database number,
//! credentials and TLS (its host and port are not used).
//!
//! With `redis.read_from_replicas`, cache reads go to [`SentinelReplicas`]: connections of
//! their own, each made to a replica the sentinels list as healthy (redis-rs picks one at
//! random and checks its `ROLE`), dropped with the master's when the master moves. A replica
//! read that fails is answered by the master (see `RedisCache::send`), and the replicas are
//! left alone for `redis.breaker_cooldown`.

use super::CacheError;
use super::connections::Connections;
pub(super) use redis::sentinel::SentinelServerType;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo};
use redis::{Client, ConnectionAddr, IntoConnectionInfo, TlsMode};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// How often the sentinels are asked who the master is.
pub(super) const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// The sentinels, asked for the master of one service (or for one of its replicas).
pub(super) struct SentinelEndpoint {
    client: tokio::sync::Mutex<SentinelClient>,
}

impl SentinelEndpoint {
    /// Sentinels at `sentinels` watching `master`, asked for the master or for a replica
    /// (`server`); connections to either take their database, credentials and TLS from
    /// `node_url`.
    ///
    /// # Errors
    /// A URL redis-rs cannot use.
    pub(super) fn new(
        sentinels: &[String],
        master: &str,
        node_url: &str,
        server: SentinelServerType,
    ) -> Result<Self, CacheError> {
        let node = node_url
            .into_connection_info()
            .map_err(CacheError::InvalidUrl)?;
        let mut node_info = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(node.redis_settings().clone());
        if let ConnectionAddr::TcpTls { insecure, .. } = node.addr() {
            let mode = if *insecure {
                TlsMode::Insecure
            } else {
                TlsMode::Secure
            };
            node_info = node_info.set_tls_mode(mode);
        }
        let client = SentinelClient::build(
            sentinels.iter().map(String::as_str).collect(),
            master,
            Some(node_info),
            server,
        )
        .map_err(CacheError::InvalidUrl)?;
        Ok(Self {
            client: tokio::sync::Mutex::new(client),
        })
    }

    /// A client for the node the sentinels name now: the master, or a healthy replica of it
    /// taken at random.
    ///
    /// # Errors
    /// No sentinel answered, or none knows the master (or a healthy replica).
    pub(super) async fn client(&self) -> Result<Client, CacheError> {
        self.client
            .lock()
            .await
            .async_get_client()
            .await
            .map_err(CacheError::Connect)
    }
}

/// Reads on the master's replicas (`redis.read_from_replicas`), over connections of their own.
pub(super) struct SentinelReplicas {
    connections: Arc<Connections>,
    /// Until when reads leave the replicas alone after one failed.
    avoided_until: Mutex<Option<Instant>>,
    /// How long that is: `redis.breaker_cooldown`.
    cooldown: Duration,
}

impl SentinelReplicas {
    /// Reads over `connections` (to replicas), left alone for `cooldown` after a failure.
    pub(super) fn new(connections: Arc<Connections>, cooldown: Duration) -> Self {
        Self {
            connections,
            avoided_until: Mutex::new(None),
            cooldown,
        }
    }

    /// The connections, for sending and for [`follow_master`].
    pub(super) fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    /// Whether reads may go to the replicas now (none failed lately).
    pub(super) fn usable(&self) -> bool {
        let mut avoided = self
            .avoided_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *avoided {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                *avoided = None;
                true
            }
            None => true,
        }
    }

    /// After a failed read: the replicas are left alone for the cool-down, their
    /// connections dropped, so the next read after it asks the sentinels for a replica
    /// afresh.
    pub(super) fn failed(&self) {
        *self
            .avoided_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + self.cooldown);
        self.connections.discard_all();
    }
}

/// Asks the sentinels for the master every [`FOLLOW_EVERY`] while `connections` (the
/// master's) lives, and drops every connection of `connections` and of `followers` (the
/// replicas', whose roles a failover changed too) when the master moves. Ends with the cache.
///
/// The sentinels themselves drop the clients of a node they promote or demote (`CLIENT KILL
/// TYPE normal` with the `REPLICAOF`), when they can reach it: this does not count on it.
pub(super) fn follow_master(
    connections: Weak<Connections>,
    followers: Option<Weak<Connections>>,
    endpoint: Arc<SentinelEndpoint>,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut known: Option<String> = None;
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            let Some(connections) = connections.upgrade() else {
                return;
            };
            let asked = tokio::time::timeout(FOLLOW_EVERY, endpoint.client()).await;
            let master = match asked {
                Ok(Ok(client)) => client.get_connection_info().addr().to_string(),
                Ok(Err(err)) => {
                    warn!(error = %err, "the sentinels did not name a master");
                    continue;
                }
                Err(_) => continue,
            };
            if known.as_ref().is_some_and(|known| *known != master) {
                info!(%master, "redis master moved: reconnecting to the new one");
                connections.discard_all();
                if let Some(followers) = followers.as_ref().and_then(Weak::upgrade) {
                    followers.discard_all();
                }
            }
            known = Some(master);
        }
    });
}
