//! Redis behind Sentinel: the master is whatever the sentinels name now. It is asked for at
//! every connect, and asked again every [`FOLLOW_EVERY`] in the background: when the answer
//! changes (a `SENTINEL FAILOVER`, or a master that died), every open connection is dropped,
//! so the next command goes to the new master within about a second of the sentinels'
//! decision, not only once the old master turns read-only (about 10 s after a manual
//! failover) or dies.
//!
//! `redis.nodes` are the sentinels' URLs; `redis.url` supplies the master's database number,
//! credentials and TLS (its host and port are not used).

use super::CacheError;
use super::connections::Connections;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, ConnectionAddr, IntoConnectionInfo, TlsMode};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tracing::{info, warn};

/// How often the sentinels are asked who the master is.
pub(super) const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// The sentinels, asked for the master of one service.
pub(super) struct SentinelEndpoint {
    client: tokio::sync::Mutex<SentinelClient>,
}

impl SentinelEndpoint {
    /// Sentinels at `sentinels` watching `master`; connections to the master (and replicas)
    /// take their database, credentials and TLS from `node_url`.
    ///
    /// # Errors
    /// A URL redis-rs cannot use.
    pub(super) fn new(
        sentinels: &[String],
        master: &str,
        node_url: &str,
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
            SentinelServerType::Master,
        )
        .map_err(CacheError::InvalidUrl)?;
        Ok(Self {
            client: tokio::sync::Mutex::new(client),
        })
    }

    /// A client for the master the sentinels name now.
    ///
    /// # Errors
    /// No sentinel answered, or none knows the master.
    pub(super) async fn master(&self) -> Result<Client, CacheError> {
        self.client
            .lock()
            .await
            .async_get_client()
            .await
            .map_err(CacheError::Connect)
    }
}

/// Asks the sentinels for the master every [`FOLLOW_EVERY`] while `connections` lives, and
/// drops every connection when the master moves. Ends with the cache.
pub(super) fn follow_master(connections: Weak<Connections>, endpoint: Arc<SentinelEndpoint>) {
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
            let asked = tokio::time::timeout(FOLLOW_EVERY, endpoint.master()).await;
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
            }
            known = Some(master);
        }
    });
}
