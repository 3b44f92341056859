//! The Redis Cluster connection: redis-rs's `cluster_async::ClusterConnection`, one for the
//! whole proxy. It is multiplexed (every request shares it, as with the standalone
//! connections), follows `MOVED`/`ASK` and topology changes by itself, and reaches each shard
//! over connections of its own, so a failing shard fails only the commands routed to it.
//!
//! Beside it, the proxy keeps its own copy of the slot map (see the `slots` module) and a
//! [`ClusterNode`] per master: a batch is sent as one pipeline per master (chunked), each
//! with that master's own circuit breaker and metrics. So a dead or slow shard is skipped
//! alone, and an operator sees which one it is.
//!
//! Connected lazily, like the standalone connections: a cluster that is down at start is not
//! an error. A connection that broke or timed out is dropped and made anew by the next
//! caller; callers bound their wait for it with `redis.timeout` (see `RedisCache`).
//!
//! The connect runs as a task of its own ([`SharedConnect`]), not in the caller that
//! started it: redis-rs connects to every seed at once and waits for all of them, so one seed
//! that hangs (paused, or a black-holed address) makes each connect take its
//! `connection_timeout`, `redis.timeout` itself. Run in the callers, every attempt would be
//! cut off at their bound, and a proxy started while one node hangs would never connect.

use super::CacheError;
use super::slots::{Address, Owner, SlotMap};
use crate::circuit::{Circuit, CircuitState};
use crate::config::RedisConfig;
use crate::metrics::{Metrics, NodeCounters};
use redis::aio::MultiplexedConnection;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{ConnectionAddr, IntoConnectionInfo};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// Retries of a command the cluster library makes itself (after `MOVED`, a lost node): few,
/// since `redis.timeout` bounds the whole attempt anyway, and its default (16, with waits of
/// up to minutes) would only ever be cut off by that bound.
const CLUSTER_RETRIES: u32 = 2;

/// How long a slot map is used before it is taken again even though nothing failed: a
/// reshard moves slots without failing anything, and a group sent to a former owner is only
/// redirected (at the cost of the library's retries) until the map is new.
const SLOT_MAP_MAX_AGE: Duration = Duration::from_secs(5);

/// The least time between two refreshes of the slot map in the background: a reshard fails
/// many groups at once, and one `CLUSTER SLOTS` answers for all of them.
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_millis(250);

/// The most masters named in metrics over the proxy's life; later ones count as `other`.
/// Masters come and go with failovers and rescheduled pods: their names must not grow the
/// metrics without bound.
const NODE_LABELS: usize = 32;

/// One master: its name (`host:port`), its circuit breaker and its command counters.
pub(super) struct ClusterNode {
    pub(super) name: String,
    pub(super) circuit: Circuit,
    pub(super) counters: NodeCounters,
    /// Turns of its replicas for reads, with `redis.read_from_replicas`.
    next_replica: AtomicUsize,
}

/// The slot map and the master behind each of its node indices.
pub(super) struct Topology {
    slots: SlotMap,
    nodes: Vec<Arc<ClusterNode>>,
    taken: Instant,
}

impl Topology {
    /// The master serving `slot`, if the map knows one.
    pub(super) fn node_of(&self, slot: Slot) -> Option<(usize, &Arc<ClusterNode>)> {
        match self.slots.owner(slot) {
            Owner::Node(index) => self.nodes.get(index).map(|node| (index, node)),
            Owner::Unowned(_) => None,
        }
    }

    /// A replica of the master at `index` of the map to read from, taken in turn; `None`
    /// when it has none.
    pub(super) fn replica_of(
        &self,
        index: usize,
        node: &ClusterNode,
        usable: impl Fn(&Address) -> bool,
    ) -> Option<Address> {
        let replicas: Vec<&Address> = self
            .slots
            .replicas_of(index)
            .iter()
            .filter(|replica| usable(replica))
            .collect();
        if replicas.is_empty() {
            return None;
        }
        let turn = node.next_replica.fetch_add(1, Ordering::Relaxed) % replicas.len();
        replicas.get(turn).map(|replica| (*replica).clone())
    }

    /// The worst state among the masters' circuits.
    fn circuit(&self) -> CircuitState {
        self.nodes
            .iter()
            .map(|node| node.circuit.state())
            .fold(CircuitState::Closed, CircuitState::worst)
    }
}

/// Connections of the proxy's own to replicas, for reads with `redis.read_from_replicas`.
///
/// Why not redis-rs's replica routing: its cluster connection (1.8), given a replica read
/// strategy, still connects to the masters only. Reads routed to a replica fell back to the
/// master (a replica's `INFO commandstats` stayed at 0 `MGET`s), and a pipeline addressed to
/// a replica failed with `ClusterConnectionNotFound`. So reads go over a multiplexed
/// connection per replica made here, with `READONLY`, and the seeds' credentials and TLS.
struct ReplicaConnections {
    /// The first seed's connection settings; each replica's host and port replace its own.
    seed: redis::ConnectionInfo,
    config: redis::AsyncConnectionConfig,
    /// Held only to look up, insert or remove, never across a connect.
    open: Mutex<HashMap<Address, MultiplexedConnection>>,
    /// One gate per replica, held while connecting to it: callers of one replica wait for
    /// the same connect, and a replica that hangs at connect holds up no other.
    connecting: Mutex<HashMap<Address, Arc<tokio::sync::Mutex<()>>>>,
    /// Replicas that failed a read, and until when reads leave them alone (their masters
    /// answer instead).
    avoided: Mutex<HashMap<Address, Instant>>,
    /// How long a replica that failed is left alone: `redis.breaker_cooldown`.
    cooldown: Duration,
}

impl ReplicaConnections {
    /// The connection to `replica`, made first if there is none.
    async fn get(&self, replica: &Address) -> Result<MultiplexedConnection, CacheError> {
        if let Some(conn) = self.opened(replica) {
            return Ok(conn);
        }
        let gate = Arc::clone(
            self.connecting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(replica.clone())
                .or_default(),
        );
        let _connecting = gate.lock().await;
        // Whoever held the gate before may have connected it.
        if let Some(conn) = self.opened(replica) {
            return Ok(conn);
        }
        let addr = match self.seed.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: replica.host.clone(),
                port: replica.port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(replica.host.clone(), replica.port),
        };
        let client = redis::Client::open(self.seed.clone().set_addr(addr))
            .map_err(CacheError::InvalidUrl)?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
            .map_err(CacheError::Connect)?;
        let () = redis::cmd("READONLY")
            .query_async(&mut conn)
            .await
            .map_err(CacheError::Connect)?;
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(replica.clone(), conn.clone());
        Ok(conn)
    }

    /// The open connection to `replica`, if any.
    fn opened(&self, replica: &Address) -> Option<MultiplexedConnection> {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(replica).cloned()
    }

    /// Drops the connection to `replica` after it broke or hung.
    fn discard(&self, replica: &Address) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.remove(replica);
    }

    /// Leaves `replica` alone for a cool-down: reads go to its master meanwhile.
    fn avoid(&self, replica: &Address) {
        let mut avoided = self.avoided.lock().unwrap_or_else(PoisonError::into_inner);
        avoided.insert(replica.clone(), Instant::now() + self.cooldown);
    }

    /// Whether reads may go to `replica` now.
    fn usable(&self, replica: &Address) -> bool {
        let mut avoided = self.avoided.lock().unwrap_or_else(PoisonError::into_inner);
        match avoided.get(replica) {
            Some(until) if Instant::now() < *until => false,
            Some(_) => {
                avoided.remove(replica);
                true
            }
            None => true,
        }
    }
}

/// How many times `redis.timeout` a connect to the cluster may take in all: redis-rs's own
/// bound applies to each of its steps (the seeds, `CLUSTER SLOTS`, the masters).
const CONNECT_BOUND: u32 = 3;

/// The shared cluster connection, made by one connect at a time, run as a task of its own
/// (see the module doc): a caller that gives up waiting does not cancel it, so it is there
/// for the callers after it.
struct SharedConnect {
    client: ClusterClient,
    /// The bound on one connect.
    bound: Duration,
    current: Arc<Mutex<Option<ClusterConnection>>>,
    /// Whether a connect is under way.
    connecting: Arc<AtomicBool>,
    /// Sent when a connect ends, made or not: callers wait for it.
    ended: Arc<tokio::sync::watch::Sender<()>>,
}

impl SharedConnect {
    fn new(client: ClusterClient, bound: Duration) -> Self {
        Self {
            client,
            bound,
            current: Arc::default(),
            connecting: Arc::default(),
            ended: Arc::new(tokio::sync::watch::Sender::new(())),
        }
    }

    fn opened(&self) -> Option<ClusterConnection> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.clone()
    }

    /// The connection, waiting for a connect (started if none is under way) when there is
    /// none. Callers bound the wait themselves.
    ///
    /// # Errors
    /// The connect ended without a connection.
    async fn get(&self) -> Result<ClusterConnection, CacheError> {
        if let Some(conn) = self.opened() {
            return Ok(conn);
        }
        let mut ended = self.ended.subscribe();
        // Made between the look above and the subscription: no need to wait.
        if let Some(conn) = self.opened() {
            return Ok(conn);
        }
        self.start();
        // The sender lives with `self`: this returns when the connect under way ends.
        let _ = ended.changed().await;
        self.opened().ok_or(CacheError::ConnectFailed)
    }

    /// Starts a connect unless one is under way.
    fn start(&self) {
        if self.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (client, bound) = (self.client.clone(), self.bound);
        let current = Arc::clone(&self.current);
        let connecting = Arc::clone(&self.connecting);
        let ended = Arc::clone(&self.ended);
        tokio::spawn(async move {
            match tokio::time::timeout(bound, client.get_async_connection()).await {
                Ok(Ok(conn)) => {
                    *current.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
                }
                Ok(Err(err)) => warn!(error = %err, "could not connect to the redis cluster"),
                Err(_) => warn!(?bound, "connecting to the redis cluster took too long"),
            }
            connecting.store(false, Ordering::Release);
            ended.send_replace(());
        });
    }

    /// Drops the connection after it broke or hung: the next caller makes a new one.
    fn discard(&self) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

pub(super) struct ClusterLink {
    replicas: ReplicaConnections,
    connect_timeout: Duration,
    current: SharedConnect,
    topology: RwLock<Option<Arc<Topology>>>,
    /// A group failed: the map may be behind the cluster, take it again.
    stale: AtomicBool,
    refreshing: Arc<tokio::sync::Mutex<()>>,
    last_refresh: Mutex<Option<Instant>>,
    /// The master names used as metric labels so far.
    labelled: Mutex<HashSet<String>>,
    breaker_failures: u32,
    breaker_cooldown: Duration,
    /// `redis.read_from_replicas`.
    read_from_replicas: bool,
    metrics: Arc<Metrics>,
}

impl ClusterLink {
    /// A link to the cluster whose seeds are `seeds` (each URL with its own credentials and
    /// TLS).
    ///
    /// # Errors
    /// A seed URL redis-rs cannot use.
    pub(super) fn new(
        seeds: &[String],
        config: &RedisConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CacheError> {
        let builder = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(config.timeout)
            .response_timeout(config.timeout)
            .retries(CLUSTER_RETRIES);
        let client = builder.build().map_err(CacheError::InvalidUrl)?;
        let seed = seeds
            .first()
            .map(String::as_str)
            .unwrap_or_default()
            .into_connection_info()
            .map_err(CacheError::InvalidUrl)?;
        let replicas = ReplicaConnections {
            seed,
            config: redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.timeout))
                .set_response_timeout(Some(config.timeout)),
            open: Mutex::default(),
            connecting: Mutex::default(),
            avoided: Mutex::new(HashMap::new()),
            cooldown: config.breaker_cooldown,
        };
        Ok(Self {
            replicas,
            connect_timeout: config.timeout,
            current: SharedConnect::new(client, CONNECT_BOUND * config.timeout),
            topology: RwLock::new(None),
            stale: AtomicBool::new(false),
            refreshing: Arc::new(tokio::sync::Mutex::new(())),
            last_refresh: Mutex::new(None),
            labelled: Mutex::new(HashSet::new()),
            breaker_failures: config.breaker_failures,
            breaker_cooldown: config.breaker_cooldown,
            read_from_replicas: config.read_from_replicas,
            metrics,
        })
    }

    /// The shared connection, connecting first if there is none.
    ///
    /// # Errors
    /// No node of the cluster could be reached in time.
    pub(super) async fn get(&self) -> Result<ClusterConnection, CacheError> {
        self.current.get().await
    }

    /// The connection to `replica` for reads, made first if there is none.
    ///
    /// # Errors
    /// The replica could not be reached.
    pub(super) async fn replica(
        &self,
        replica: &Address,
    ) -> Result<MultiplexedConnection, CacheError> {
        self.replicas.get(replica).await
    }

    /// After a failed read on `replica`: its connection dropped, and the replica left alone
    /// for `redis.breaker_cooldown`, its master answering its reads meanwhile.
    pub(super) fn replica_failed(&self, replica: &Address) {
        self.replicas.discard(replica);
        self.replicas.avoid(replica);
    }

    /// Whether reads may go to `replica` now: reads go to replicas at all
    /// (`redis.read_from_replicas`), and this one has not failed lately.
    pub(super) fn replica_usable(&self, replica: &Address) -> bool {
        self.read_from_replicas && self.replicas.usable(replica)
    }

    /// Drops the shared connection after it broke or hung: the next caller makes a new one.
    pub(super) fn discard(&self) {
        self.current.discard();
    }

    /// Marks the slot map as possibly behind the cluster: the next batch takes it again.
    pub(super) fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    fn current_topology(&self) -> Option<Arc<Topology>> {
        self.topology
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The worst state among the masters' circuits (closed before the first map).
    pub(super) fn circuit(&self) -> CircuitState {
        self.current_topology()
            .map_or(CircuitState::Closed, |topology| topology.circuit())
    }

    /// The slot map to group a batch by, if there is one. One that is stale or old is used
    /// all the same, and taken again in the background (by one task at a time, at most once
    /// per [`REFRESH_AT_MOST_EVERY`]), so no batch waits for a refresh.
    pub(super) fn topology_now(self: &Arc<Self>) -> Option<Arc<Topology>> {
        let topology = self.current_topology()?;
        let fresh =
            !self.stale.load(Ordering::Relaxed) && topology.taken.elapsed() < SLOT_MAP_MAX_AGE;
        if !fresh {
            self.refresh_in_background(&topology);
        }
        Some(topology)
    }

    fn refresh_in_background(self: &Arc<Self>, topology: &Arc<Topology>) {
        let Ok(refreshing) = Arc::clone(&self.refreshing).try_lock_owned() else {
            return;
        };
        {
            let mut last = self
                .last_refresh
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|last| last.elapsed() < REFRESH_AT_MOST_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let (link, old) = (Arc::clone(self), Arc::clone(topology));
        tokio::spawn(async move {
            let _refreshing = refreshing;
            if let Err(err) = link.refresh(Some(&old)).await {
                // The old map stays: most of it is likely still right.
                warn!(error = %err, "redis cluster slot map not taken again");
            }
        });
    }

    /// The first slot map, taken now; callers wait for the one taking it.
    ///
    /// # Errors
    /// The cluster could not be asked for it.
    pub(super) async fn first_topology(&self) -> Result<Arc<Topology>, CacheError> {
        let _refreshing = self.refreshing.lock().await;
        match self.current_topology() {
            Some(topology) => Ok(topology),
            None => self.refresh(None).await,
        }
    }

    /// Asks a master for `CLUSTER SLOTS` and installs the map, keeping the circuit and
    /// counters of every master the old map had.
    async fn refresh(&self, old: Option<&Arc<Topology>>) -> Result<Arc<Topology>, CacheError> {
        let mut conn = self.get().await?;
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let ask = conn.route_command(
            cmd,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        );
        let reply = tokio::time::timeout(self.connect_timeout, ask)
            .await
            .map_err(|_| CacheError::Timeout {
                op: "CLUSTER SLOTS",
                timeout: self.connect_timeout,
            })?
            .map_err(|source| CacheError::Command {
                op: "CLUSTER SLOTS",
                source,
            })?;
        let slots =
            SlotMap::from_cluster_slots(&reply).map_err(|malformed| CacheError::Command {
                op: "CLUSTER SLOTS",
                source: redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "unexpected CLUSTER SLOTS reply",
                    malformed.to_string(),
                )),
            })?;
        let known: HashMap<&str, &Arc<ClusterNode>> = old
            .map(|old| {
                old.nodes
                    .iter()
                    .map(|node| (node.name.as_str(), node))
                    .collect()
            })
            .unwrap_or_default();
        let nodes = slots
            .nodes()
            .iter()
            .map(|name| match known.get(name.as_str()) {
                Some(node) => Arc::clone(node),
                None => self.new_node(name),
            })
            .collect::<Vec<_>>();
        if old.is_none_or(|old| old.slots.nodes() != slots.nodes()) {
            info!(masters = ?slots.nodes(), "redis cluster slot map taken");
        }
        let topology = Arc::new(Topology {
            slots,
            nodes,
            taken: Instant::now(),
        });
        self.stale.store(false, Ordering::Relaxed);
        *self
            .topology
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&topology));
        Ok(topology)
    }

    fn new_node(&self, name: &str) -> Arc<ClusterNode> {
        let label = {
            let mut labelled = self.labelled.lock().unwrap_or_else(PoisonError::into_inner);
            if labelled.contains(name) || labelled.len() < NODE_LABELS {
                labelled.insert(name.to_owned());
                name
            } else {
                "other"
            }
        };
        Arc::new(ClusterNode {
            name: name.to_owned(),
            circuit: Circuit::on_streak(
                "redis cluster node",
                self.breaker_failures,
                self.breaker_cooldown,
            ),
            counters: self.metrics.redis_node(label),
            next_replica: AtomicUsize::new(0),
        })
    }
}
