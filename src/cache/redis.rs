//! The shared cache: Redis through a few shared multiplexed connections (or one cluster
//! connection), every call bounded, broken connections replaced, and a circuit breaker that
//! skips a dead Redis instead of paying its timeout on every request.
//!
//! A batch is cut into groups, each sent as one command or one pipeline, all at once: on one
//! Redis, contiguous chunks of `redis.chunk_size` keys (one `MGET`, one pipeline of `SET`s,
//! one `DEL`). On a cluster, the keys are grouped by the master that serves their hash slot
//! (the proxy's own slot map, see `cluster`), then chunked; a group is one pipeline to its
//! master with one command per slot (a command's keys must share a slot), and it counts
//! against that master's circuit breaker alone. A failing shard turns only its own keys into
//! misses. Measured on a 10,000-key batch against a local 3-master cluster, same run
//! (`cargo test --release --test it cluster_read_strategies -- --ignored --nocapture`): one
//! `MGET` per slot sent through redis-rs's routing 227 ms, one `GET` per key 313 ms, one
//! `MGET` split by redis-rs 77 ms (failing whole when one shard fails), one pipeline per
//! master 9.6 ms, against 3.9 ms on one standalone Redis. The table is in the README.
//!
//! `groups` cuts a batch; `coordination` (with its `scripts`) is the cross-instance side of
//! the same cache (`coalesce.distributed`).

mod coordination;
mod groups;
mod scripts;

use super::cluster::ClusterLink;
use super::connections::{Connections, Endpoint, Lease};
use super::sentinel::{self, SentinelEndpoint, SentinelReplicas, SentinelServerType};
use super::subscription::SeedRotation;
use super::{Cache, CacheError, CacheKind, PoolStatus, Values, Write};
use crate::circuit::{Circuit, CircuitState, Ticket};
use crate::config::{RedisConfig, RedisMode};
use crate::metrics::{Metrics, RedisCommand, RedisOutcome};
use ::redis::{self, AsyncConnectionConfig, Value};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::future::join_all;
use groups::{Destination, Group};
use redis::aio::ConnectionLike;
use redis::cluster_routing::{Route as SlotRoute, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Redis as a [`Cache`]. Keys are `<key_prefix><sn>`; big batches are split into chunks so one
/// command never carries thousands of keys and blocks Redis for other clients.
pub struct RedisCache {
    route: Route,
    /// Where connections of their own (the invalidation subscription) go, asked per attempt.
    subscription: Arc<Endpoint>,
    key_prefix: String,
    timeout: Duration,
    chunk_size: usize,
    /// One Redis's breaker; on a cluster, the breaker of what is not sent to one master
    /// (the slot map, `PUBLISH`), each master having its own.
    circuit: Circuit,
    metrics: Arc<Metrics>,
    /// The scripts of `coordination`, their SHA1s learned as they are loaded.
    scripts: scripts::Scripts,
    /// This instance's waiters for answers other instances fetch.
    wakeups: Arc<super::wakeups::Wakeups>,
    /// Stops following the answers channel when the cache is dropped; set once it
    /// coordinates with other instances (`coordinate`).
    following: std::sync::OnceLock<tokio_util::sync::DropGuard>,
}

/// Where commands go.
enum Route {
    /// One Redis (or the master Sentinel names), over a few shared multiplexed connections;
    /// behind Sentinel with `redis.read_from_replicas`, reads go to its replicas first.
    Standalone {
        primary: Arc<Connections>,
        replicas: Option<SentinelReplicas>,
    },
    /// A Redis Cluster, over one cluster connection that routes each command to its shard.
    Cluster(Arc<ClusterLink>),
}

/// What to send: one command, or a pipeline.
enum Command {
    Single(redis::Cmd),
    Pipeline(redis::Pipeline),
}

impl Command {
    /// The replies, one per command, or the first error Redis answered with.
    async fn send(&self, conn: &mut impl ConnectionLike) -> redis::RedisResult<Vec<Value>> {
        let replies = match self {
            Self::Single(cmd) => vec![conn.req_packed_command(cmd).await?],
            Self::Pipeline(pipe) => conn.req_packed_commands(pipe, 0, pipe.len()).await?,
        };
        without_errors(replies)
    }

    /// Like [`Command::send`], to the cluster node `route` names.
    async fn route(
        self,
        conn: &mut redis::cluster_async::ClusterConnection,
        route: SingleNodeRoutingInfo,
    ) -> redis::RedisResult<Vec<Value>> {
        let replies = match self {
            Self::Single(cmd) => vec![
                conn.route_command(cmd, RoutingInfo::SingleNode(route))
                    .await?,
            ],
            Self::Pipeline(pipe) => {
                let count = pipe.len();
                conn.route_pipeline(pipe, 0, count, route).await?
            }
        };
        without_errors(replies)
    }
}

/// `replies`, unless one of them is an error (`OOM`, `WRONGTYPE`): then that error.
fn without_errors(mut replies: Vec<Value>) -> redis::RedisResult<Vec<Value>> {
    let failed = replies
        .iter()
        .position(|reply| matches!(reply, Value::ServerError(_)));
    if let Some(at) = failed {
        replies.swap_remove(at).extract_error()?;
    }
    Ok(replies)
}

/// The seed URLs: `redis.nodes`, or `redis.url` when that is empty.
fn seeds(config: &RedisConfig) -> Vec<String> {
    match config.mode {
        RedisMode::Cluster if !config.nodes.is_empty() => config.nodes.clone(),
        _ => vec![config.url.clone()],
    }
}

/// A command's result within its deadline; `discard` drops the connection it went over when
/// that connection broke, hung, or (`READONLY`) points at a former primary.
fn settle<T>(
    op: &'static str,
    timeout: Duration,
    queried: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    discard: impl FnOnce(),
) -> Result<T, CacheError> {
    match queried {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => {
            if poisons_connection(&source) {
                discard();
            }
            Err(CacheError::Command { op, source })
        }
        Err(_) => {
            discard();
            Err(CacheError::Timeout { op, timeout })
        }
    }
}

/// `result`, once the circuit whose `ticket` let the call through is told whether Redis
/// could be reached: Redis that answered, even with an error (`OOM`, `READONLY`), was.
fn told<T>(ticket: Ticket<'_>, result: Result<T, CacheError>) -> Result<T, CacheError> {
    match &result {
        Err(err) if err.is_unreachable() => ticket.failure(),
        _ => ticket.success(),
    }
    result
}

/// `command` over the next of `connections`, the wait for it included, by `deadline`
/// (`timeout` from the start); a connection that broke or hung is discarded.
async fn send_over(
    op: &'static str,
    connections: &Connections,
    command: &Command,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<Value>, CacheError> {
    let Lease {
        mut conn,
        generation,
    } = tokio::time::timeout_at(deadline, connections.get())
        .await
        .map_err(|_| CacheError::Timeout {
            op: "connect",
            timeout,
        })??;
    let queried = tokio::time::timeout_at(deadline, command.send(&mut conn)).await;
    settle(op, timeout, queried, || connections.discard(generation))
}

/// A count Redis answered (`DEL`, `PUBLISH`, the fence script), 0 for any other reply.
fn count(reply: &Value) -> u64 {
    match reply {
        Value::Int(count) => u64::try_from(*count).unwrap_or(0),
        _ => 0,
    }
}

/// A duration in whole milliseconds, at least 1: what `PX` and `PEXPIRE` take.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// How a command ended, for metrics.
fn outcome<T>(result: &Result<T, CacheError>) -> RedisOutcome {
    match result {
        Ok(_) => RedisOutcome::Ok,
        Err(CacheError::Timeout { .. }) => RedisOutcome::Timeout,
        Err(CacheError::Skipped) => RedisOutcome::Skipped,
        Err(_) => RedisOutcome::Error,
    }
}

/// Whether a connection that failed this way must be replaced: it is broken, or
/// (`READONLY`) it points at a node that is no longer the primary, so the next connection
/// should be made afresh.
fn poisons_connection(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_unrecoverable_error()
        || err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

impl CacheError {
    /// Whether Redis could not be reached at all (as opposed to answering with an error such
    /// as `OOM`): only these count towards skipping it.
    pub(crate) fn is_unreachable(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Connect(_) | Self::ConnectFailed => true,
            Self::Command { source, .. } => source.is_io_error() || source.is_connection_dropped(),
            Self::InvalidUrl(_) | Self::Skipped => false,
        }
    }
}

/// The value of one key of an `MGET` reply: a string, or nothing.
fn stored(reply: Value) -> Option<Bytes> {
    match reply {
        Value::BulkString(bytes) => Some(Bytes::from(bytes)),
        _ => None,
    }
}

/// The keys an `MGET` reply holds values for, in order.
fn mget_values(reply: Value) -> Vec<Value> {
    match reply {
        Value::Array(values) => values,
        other => vec![other],
    }
}

impl RedisCache {
    /// Prepares the connections; connects lazily, so a Redis that is down now is not an error.
    ///
    /// # Errors
    /// A URL redis-rs cannot use.
    pub fn new(settings: &RedisConfig, metrics: Arc<Metrics>) -> Result<Self, CacheError> {
        // Both redis-rs's own timeouts and ours: a hung Redis must never hang a request.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout));
        let seeds = seeds(settings);
        let first = redis::Client::open(seeds[0].as_str()).map_err(CacheError::InvalidUrl)?;
        let shared = |endpoint| {
            Arc::new(Connections::new(
                endpoint,
                config.clone(),
                settings.timeout,
                settings.pool_size,
            ))
        };
        let fixed = || Endpoint::Fixed(Box::new(first.clone()));
        let (route, subscription) = match settings.mode {
            RedisMode::Cluster => (
                Route::Cluster(Arc::new(ClusterLink::new(
                    &seeds,
                    settings,
                    Arc::clone(&metrics),
                )?)),
                Endpoint::Seeds(SeedRotation::new(&seeds)?),
            ),
            RedisMode::Standalone => (
                Route::Standalone {
                    primary: shared(fixed()),
                    replicas: None,
                },
                fixed(),
            ),
            RedisMode::Sentinel => {
                let master = settings.sentinel_master.as_deref().unwrap_or_default();
                let endpoint = |server| {
                    SentinelEndpoint::new(&settings.nodes, master, &settings.url, server)
                        .map(Arc::new)
                };
                // One client of the sentinels per user: asking them holds it (redis-rs takes
                // it `&mut`), and the 500 ms follow must not hold up a connect.
                let primary = shared(Endpoint::Sentinel(endpoint(SentinelServerType::Master)?));
                let replicas = match settings.read_from_replicas {
                    true => Some(SentinelReplicas::new(
                        shared(Endpoint::Sentinel(endpoint(SentinelServerType::Replica)?)),
                        settings.breaker_cooldown,
                    )),
                    false => None,
                };
                sentinel::follow_master(
                    Arc::downgrade(&primary),
                    replicas
                        .as_ref()
                        .map(|replicas| Arc::downgrade(replicas.connections())),
                    endpoint(SentinelServerType::Master)?,
                );
                (
                    Route::Standalone { primary, replicas },
                    Endpoint::Sentinel(endpoint(SentinelServerType::Master)?),
                )
            }
        };
        Ok(Self {
            route,
            subscription: Arc::new(subscription),
            key_prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
            chunk_size: settings.chunk_size.max(1),
            circuit: Circuit::on_streak(
                "redis",
                settings.breaker_failures,
                settings.breaker_cooldown,
            ),
            metrics,
            scripts: scripts::Scripts::default(),
            wakeups: Arc::default(),
            following: std::sync::OnceLock::new(),
        })
    }

    /// Sends one command or pipeline to `to`, unless its circuit is open, and tells the
    /// circuit how it went. A failed group on a cluster marks the slot map stale.
    async fn run(
        &self,
        name: RedisCommand,
        to: &Destination,
        command: Command,
    ) -> Result<Vec<Value>, CacheError> {
        let started = Instant::now();
        let node = match to {
            Destination::Shard {
                node: Some(node), ..
            } => Some(node),
            _ => None,
        };
        let circuit = node.map_or(&self.circuit, |node| &node.circuit);
        let result = match circuit.try_acquire() {
            None => Err(CacheError::Skipped),
            Some(ticket) => told(ticket, self.send(name, to, command).await),
        };
        if let (Route::Cluster(link), Destination::Shard { .. }, Err(err)) =
            (&self.route, to, &result)
            && !err.is_skipped()
        {
            link.mark_stale();
        }
        let outcome = outcome(&result);
        self.metrics.record_redis(name, outcome, started.elapsed());
        if let Some(node) = node {
            node.counters.record(outcome);
        }
        result
    }

    /// Sends one command or pipeline, the wait for a connection, a connect and the command
    /// all within one `redis.timeout`, however many callers wait with it.
    /// A connection that timed out or broke is discarded: the next caller makes a new one.
    async fn send(
        &self,
        name: RedisCommand,
        to: &Destination,
        command: Command,
    ) -> Result<Vec<Value>, CacheError> {
        let deadline = Instant::now() + self.timeout;
        match &self.route {
            Route::Standalone { primary, replicas } => {
                let replicas = replicas.as_ref();
                self.send_standalone(name, primary, replicas, &command, deadline)
                    .await
            }
            Route::Cluster(link) => self.send_cluster(name, link, to, command, deadline).await,
        }
    }

    /// To the one Redis (or the master Sentinel names); a read goes to a replica first when
    /// there are replicas to read from and none failed lately.
    async fn send_standalone(
        &self,
        name: RedisCommand,
        primary: &Connections,
        replicas: Option<&SentinelReplicas>,
        command: &Command,
        deadline: Instant,
    ) -> Result<Vec<Value>, CacheError> {
        let (op, timeout) = (name.as_str(), self.timeout);
        let replicas = replicas.filter(|replicas| name == RedisCommand::Mget && replicas.usable());
        if let Some(replicas) = replicas {
            // Half the bound for a replica, the rest for the master if it fails.
            let half = timeout / 2;
            let replica = replicas.connections();
            match send_over(op, replica, command, Instant::now() + half, half).await {
                Ok(replies) => return Ok(replies),
                Err(_) => replicas.failed(),
            }
        }
        send_over(op, primary, command, deadline, timeout).await
    }

    /// To the cluster master `to` names (a read to its replica first, with
    /// `redis.read_from_replicas`), or wherever redis-rs routes it.
    async fn send_cluster(
        &self,
        name: RedisCommand,
        link: &ClusterLink,
        to: &Destination,
        command: Command,
        deadline: Instant,
    ) -> Result<Vec<Value>, CacheError> {
        let (op, timeout) = (name.as_str(), self.timeout);
        if let Destination::Shard {
            replica: Some(replica),
            ..
        } = to
            && name == RedisCommand::Mget
        {
            // Half the bound for the replica, the rest for its master if it fails.
            let read = async {
                let mut conn = link.replica(replica).await?;
                command
                    .send(&mut conn)
                    .await
                    .map_err(|source| CacheError::Command { op, source })
            };
            match tokio::time::timeout_at(Instant::now() + timeout / 2, read).await {
                Ok(Ok(replies)) => return Ok(replies),
                Ok(Err(_)) | Err(_) => link.replica_failed(replica),
            }
        }
        let mut conn = tokio::time::timeout_at(deadline, link.get())
            .await
            .map_err(|_| CacheError::Timeout {
                op: "connect",
                timeout,
            })??;
        match to {
            Destination::Any => {
                let queried = tokio::time::timeout_at(deadline, command.send(&mut conn)).await;
                settle(op, timeout, queried, || link.discard())
            }
            // One master failing is that master's: the connection stays, since a new one
            // would have to reach every master again, the failing one included (a hung master
            // would then fail them all). redis-rs reconnects a node whose connection dropped
            // by itself; the master's breaker spares it meanwhile.
            Destination::Shard { slot, .. } => {
                let route = SingleNodeRoutingInfo::SpecificNode(SlotRoute::with_slot(
                    *slot,
                    SlotAddr::Master,
                ));
                let queried =
                    tokio::time::timeout_at(deadline, command.route(&mut conn, route)).await;
                settle(op, timeout, queried, || {})
            }
        }
    }

    fn key_into(&self, buf: &mut Vec<u8>, sn: &str) {
        buf.clear();
        buf.extend_from_slice(self.key_prefix.as_bytes());
        buf.extend_from_slice(sn.as_bytes());
    }

    /// `name` with the key of every SN at `places` as its arguments.
    fn keyed(&self, name: &str, sns: &[&str], places: &[usize]) -> redis::Cmd {
        let mut cmd = redis::cmd(name);
        let mut key = Vec::new();
        for &place in places {
            self.key_into(&mut key, sns[place]);
            cmd.arg(&key[..]);
        }
        cmd
    }

    /// `name` over each run of `group`: one command on one Redis, a pipeline on a cluster.
    fn per_run(&self, name: &str, sns: &[&str], group: &Group) -> Command {
        if group.ends.len() == 1 && matches!(group.to, Destination::Any) {
            return Command::Single(self.keyed(name, sns, &group.places));
        }
        let mut pipe = redis::pipe();
        for run in group.runs() {
            pipe.add_command(self.keyed(name, sns, run));
        }
        Command::Pipeline(pipe)
    }

    /// The `MGET` replies of one group, which hold its SNs' values in the group's order.
    async fn get_group(&self, sns: &[&str], group: &Group) -> Result<Vec<Value>, CacheError> {
        let command = self.per_run("MGET", sns, group);
        self.run(RedisCommand::Mget, &group.to, command).await
    }

    async fn set_group(&self, writes: &[Write], group: &Group) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        let mut key = Vec::new();
        for &place in &group.places {
            let write = &writes[place];
            self.key_into(&mut key, &write.sn);
            // One SET with PX: a key can never be left without its TTL.
            let millis = millis(write.ttl);
            pipe.cmd("SET")
                .arg(&key[..])
                .arg(&write.value[..])
                .arg("PX")
                .arg(millis);
        }
        self.run(RedisCommand::Set, &group.to, Command::Pipeline(pipe))
            .await
            .map(drop)
    }

    async fn delete_group(&self, sns: &[&str], group: &Group) -> Result<u64, CacheError> {
        if self.coordinates() {
            return self.fence_group(sns, group).await;
        }
        let command = self.per_run("DEL", sns, group);
        let replies = self.run(RedisCommand::Del, &group.to, command).await?;
        Ok(replies.iter().map(count).sum())
    }

    /// Publishes `message` on `channel`; returns how many subscribers received it.
    ///
    /// # Errors
    /// Redis could not be reached or refused the command.
    pub async fn publish(&self, channel: &str, message: &[u8]) -> Result<u64, CacheError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(message);
        let replies = self
            .run(
                RedisCommand::Publish,
                &Destination::Any,
                Command::Single(cmd),
            )
            .await?;
        Ok(replies.first().map_or(0, count))
    }

    /// Where connections of its own go, such as a pub/sub subscription, which cannot share
    /// the multiplexed ones: asked for a client at each attempt, since on a cluster or behind
    /// Sentinel the node that answers changes.
    pub(super) fn subscription(&self) -> Arc<Endpoint> {
        Arc::clone(&self.subscription)
    }

    /// The circuit that decides whether Redis is asked at all: one Redis's, or the worst of
    /// a cluster's masters and its own.
    fn state(&self) -> CircuitState {
        let own = self.circuit.state();
        match &self.route {
            Route::Standalone { .. } => own,
            Route::Cluster(link) => own.worst(link.circuit()),
        }
    }
}

impl Cache for RedisCache {
    /// One command or pipeline per group of `RedisCache::groups`, all at once; a failed one
    /// leaves only its own keys missing.
    fn get_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Values> {
        Box::pin(async move {
            let mut found = Values {
                values: vec![None; sns.len()],
                failures: Vec::new(),
            };
            let groups = match self.groups(sns.iter().copied()).await {
                Ok(groups) => groups,
                Err(err) => {
                    found.failures.push(err);
                    return found;
                }
            };
            let reads = groups.iter().map(|group| self.get_group(sns, group));
            let reads = join_all(reads).await;
            for (group, read) in groups.iter().zip(reads) {
                match read {
                    Ok(replies) => {
                        let values = replies.into_iter().flat_map(mget_values);
                        for (&place, value) in group.places.iter().zip(values) {
                            found.values[place] = stored(value);
                        }
                    }
                    Err(err) => found.failures.push(err),
                }
            }
            found
        })
    }

    fn set_many<'a>(&'a self, writes: &'a [Write]) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let groups = self
                .groups(writes.iter().map(|write| write.sn.as_str()))
                .await?;
            let sets = groups.iter().map(|group| self.set_group(writes, group));
            join_all(sets).await.into_iter().collect()
        })
    }

    fn delete_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Result<u64, CacheError>> {
        Box::pin(async move {
            // Every command runs to its end, even after one fails: no DEL is cut off half-sent.
            let groups = self.groups(sns.iter().copied()).await?;
            let deletes = groups.iter().map(|group| self.delete_group(sns, group));
            join_all(deletes).await.into_iter().sum()
        })
    }

    /// Beside the circuit, not through it: `/readyz` asks whether Redis answers a `PING`,
    /// which says nothing of whether reads and writes go through (a paused or read-only
    /// Redis answers `PING`). Only real commands decide the circuit, so a probe never closes
    /// it while they fail. While it is open, Redis is not asked at all.
    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(async move {
            let started = Instant::now();
            let ping = RedisCommand::Ping;
            let result = if self.state() == CircuitState::Open {
                Err(CacheError::Skipped)
            } else {
                let command = Command::Single(redis::cmd("PING"));
                self.send(ping, &Destination::Any, command).await.map(drop)
            };
            self.metrics
                .record_redis(ping, outcome(&result), started.elapsed());
            result
        })
    }

    fn kind(&self) -> CacheKind {
        CacheKind::Redis
    }

    fn circuit(&self) -> CircuitState {
        self.state()
    }

    fn pool(&self) -> Option<PoolStatus> {
        match &self.route {
            Route::Standalone { primary, .. } => Some(primary.status()),
            Route::Cluster(_) => None,
        }
    }
}
