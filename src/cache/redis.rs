//! The shared cache: Redis through a few shared multiplexed connections (or one cluster
//! connection), every call bounded, broken connections replaced, and a circuit breaker that
//! skips a dead Redis instead of paying its timeout on every request.
//!
//! On a cluster, a batch is split by hash slot before it is chunked: a command's keys must
//! share a slot (redis-rs would split a cross-slot `MGET` by slot itself, but fail the whole
//! call when one part fails, and a pipeline across slots is refused), so each slot's keys
//! go as one command, all of them at once over the shared connection, and a failing shard
//! turns only its own keys into misses.

use super::cluster::ClusterLink;
use super::connections::{Connections, Endpoint, Lease};
use super::sentinel::{self, SentinelEndpoint};
use super::subscription::{SeedRotation, SubscriptionEndpoint};
use super::{Cache, CacheError, CacheKind, PoolStatus, Values, Write};
use crate::circuit::{Circuit, CircuitState};
use crate::config::{RedisConfig, RedisMode};
use crate::metrics::{Metrics, RedisCommand, RedisOutcome};
use ::redis::{self, AsyncConnectionConfig, FromRedisValue};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::future::join_all;
use redis::cluster_routing::Slot;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Redis as a [`Cache`]. Keys are `<key_prefix><sn>`; big batches are split into chunks so one
/// command never carries thousands of keys and blocks Redis for other clients.
pub struct RedisCache {
    route: Route,
    /// Where connections of their own (the invalidation subscription) go, asked per attempt.
    subscription: Arc<SubscriptionEndpoint>,
    key_prefix: String,
    timeout: Duration,
    chunk_size: usize,
    circuit: Circuit,
    metrics: Arc<Metrics>,
}

/// Where commands go.
enum Route {
    /// One Redis (or the master Sentinel names), over a few shared multiplexed connections.
    Standalone(Arc<Connections>),
    /// A Redis Cluster, over one cluster connection that routes each command to its shard.
    Cluster(Box<ClusterLink>),
}

/// A command to send: one, or a pipeline.
#[derive(Clone, Copy)]
enum Command<'a> {
    Single(&'a redis::Cmd),
    Pipeline(&'a redis::Pipeline),
}

impl Command<'_> {
    async fn query<T: FromRedisValue>(
        self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<T> {
        match self {
            Self::Single(cmd) => cmd.query_async(conn).await,
            Self::Pipeline(pipe) => pipe.query_async(conn).await,
        }
    }
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
    fn is_unreachable(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Connect(_) | Self::ConnectFailed => true,
            Self::Command { source, .. } => source.is_io_error() || source.is_connection_dropped(),
            Self::InvalidUrl(_) | Self::Skipped => false,
        }
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
        let fixed = || SubscriptionEndpoint::Fixed(Box::new(first.clone()));
        let (route, subscription) = match settings.mode {
            RedisMode::Cluster => (
                Route::Cluster(Box::new(ClusterLink::new(&seeds, settings)?)),
                SeedRotation::new(&seeds)?.map_or_else(fixed, SubscriptionEndpoint::Seeds),
            ),
            RedisMode::Standalone => (
                Route::Standalone(shared(Endpoint::Fixed(Box::new(first.clone())))),
                fixed(),
            ),
            RedisMode::Sentinel => {
                let master = settings.sentinel_master.as_deref().unwrap_or_default();
                let sentinels = Arc::new(SentinelEndpoint::new(
                    &settings.nodes,
                    master,
                    &settings.url,
                )?);
                let connections = shared(Endpoint::Sentinel(Arc::clone(&sentinels)));
                sentinel::follow_master(Arc::downgrade(&connections), Arc::clone(&sentinels));
                (
                    Route::Standalone(connections),
                    SubscriptionEndpoint::Sentinel(sentinels),
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
        })
    }

    /// Runs one command, unless Redis's circuit is open, and tells the circuit how it went.
    async fn run<T: FromRedisValue>(
        &self,
        name: RedisCommand,
        command: Command<'_>,
    ) -> Result<T, CacheError> {
        let started = Instant::now();
        let result = match self.circuit.try_acquire() {
            None => Err(CacheError::Skipped),
            Some(ticket) => {
                let result = self.run_shared(name.as_str(), command).await;
                match &result {
                    Err(err) if err.is_unreachable() => ticket.failure(),
                    // Redis answered, even if with an error (`OOM`, `READONLY`): reachable.
                    _ => ticket.success(),
                }
                result
            }
        };
        self.metrics
            .record_redis(name, outcome(&result), started.elapsed());
        result
    }

    /// Runs one command on a shared connection, the wait for a connection, a connect and the
    /// command all within one `redis.timeout`, however many callers wait with it.
    /// A connection that timed out or broke is discarded: the next caller makes a new one.
    async fn run_shared<T: FromRedisValue>(
        &self,
        op: &'static str,
        command: Command<'_>,
    ) -> Result<T, CacheError> {
        let timeout = self.timeout;
        let deadline = Instant::now() + timeout;
        let timed_out = |op| CacheError::Timeout { op, timeout };
        match &self.route {
            Route::Standalone(connections) => {
                let Lease {
                    mut conn,
                    generation,
                } = tokio::time::timeout_at(deadline, connections.get())
                    .await
                    .map_err(|_| timed_out("connect"))??;
                let queried = tokio::time::timeout_at(deadline, command.query(&mut conn)).await;
                settle(op, timeout, queried, || connections.discard(generation))
            }
            Route::Cluster(link) => {
                let mut conn = tokio::time::timeout_at(deadline, link.get())
                    .await
                    .map_err(|_| timed_out("connect"))??;
                let queried = tokio::time::timeout_at(deadline, command.query(&mut conn)).await;
                settle(op, timeout, queried, || link.discard())
            }
        }
    }

    /// The SNs of each command, as places in the batch: contiguous chunks of `chunk_size`
    /// on one Redis; on a cluster, grouped by hash slot first (a command's keys must share
    /// one), so a failing shard fails only its own commands.
    fn commands<'s>(&self, sns: impl ExactSizeIterator<Item = &'s str>) -> Vec<Vec<usize>> {
        let chunks = |indices: Vec<usize>| -> Vec<Vec<usize>> {
            indices
                .chunks(self.chunk_size)
                .map(<[usize]>::to_vec)
                .collect()
        };
        if !matches!(self.route, Route::Cluster(_)) {
            return chunks((0..sns.len()).collect());
        }
        let mut slots: HashMap<Slot, Vec<usize>, ahash::RandomState> = HashMap::default();
        let mut key = Vec::new();
        for (index, sn) in sns.enumerate() {
            self.key_into(&mut key, sn);
            slots.entry(Slot::for_key(&key)).or_default().push(index);
        }
        slots.into_values().flat_map(chunks).collect()
    }

    /// The SNs at `places`.
    fn at<'s>(sns: &[&'s str], places: &[usize]) -> Vec<&'s str> {
        places.iter().map(|&place| sns[place]).collect()
    }

    fn key_into(&self, buf: &mut Vec<u8>, sn: &str) {
        buf.clear();
        buf.extend_from_slice(self.key_prefix.as_bytes());
        buf.extend_from_slice(sn.as_bytes());
    }

    /// `name` with the key of every SN as its arguments.
    fn keyed(&self, name: &str, sns: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd(name);
        let mut key = Vec::new();
        for sn in sns {
            self.key_into(&mut key, sn);
            cmd.arg(&key[..]);
        }
        cmd
    }

    async fn get_chunk(&self, sns: &[&str]) -> Result<Vec<Option<Bytes>>, CacheError> {
        let cmd = self.keyed("MGET", sns);
        let values: Vec<Option<Vec<u8>>> =
            self.run(RedisCommand::Mget, Command::Single(&cmd)).await?;
        Ok(values
            .into_iter()
            .map(|value| value.map(Bytes::from))
            .collect())
    }

    async fn set_chunk<'w>(
        &self,
        writes: impl IntoIterator<Item = &'w Write>,
    ) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        let mut key = Vec::new();
        for write in writes {
            self.key_into(&mut key, &write.sn);
            // One SET with PX: a key can never be left without its TTL.
            let millis = u64::try_from(write.ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            pipe.cmd("SET")
                .arg(&key[..])
                .arg(&write.value[..])
                .arg("PX")
                .arg(millis)
                .ignore();
        }
        self.run(RedisCommand::Set, Command::Pipeline(&pipe)).await
    }

    /// Publishes `message` on `channel`; returns how many subscribers received it.
    ///
    /// # Errors
    /// Redis could not be reached or refused the command.
    pub async fn publish(&self, channel: &str, message: &[u8]) -> Result<u64, CacheError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(message);
        self.run(RedisCommand::Publish, Command::Single(&cmd)).await
    }

    /// Where connections of its own go, such as a pub/sub subscription, which cannot share
    /// the multiplexed ones: asked for a client at each attempt, since on a cluster or behind
    /// Sentinel the node that answers changes.
    pub(super) fn subscription(&self) -> Arc<SubscriptionEndpoint> {
        Arc::clone(&self.subscription)
    }

    async fn delete_chunk(&self, sns: &[&str]) -> Result<u64, CacheError> {
        let cmd = self.keyed("DEL", sns);
        self.run(RedisCommand::Del, Command::Single(&cmd)).await
    }
}

impl Cache for RedisCache {
    /// One command per group of `RedisCache::commands`, all at once; a failed one leaves
    /// only its own keys missing.
    fn get_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Values> {
        Box::pin(async move {
            let groups = self.commands(sns.iter().copied());
            let reads = groups.iter().map(|places| {
                let keys = Self::at(sns, places);
                async move { self.get_chunk(&keys).await }
            });
            let reads = join_all(reads).await;
            let mut found = Values {
                values: vec![None; sns.len()],
                failures: Vec::new(),
            };
            for (places, read) in groups.iter().zip(reads) {
                match read {
                    Ok(values) => {
                        for (&place, value) in places.iter().zip(values) {
                            found.values[place] = value;
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
            let groups = self.commands(writes.iter().map(|write| write.sn.as_str()));
            let sets = groups
                .iter()
                .map(|places| self.set_chunk(places.iter().map(|&place| &writes[place])));
            join_all(sets).await.into_iter().collect()
        })
    }

    fn delete_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Result<u64, CacheError>> {
        Box::pin(async move {
            // Every command runs to its end, even after one fails: no DEL is cut off half-sent.
            let groups = self.commands(sns.iter().copied());
            let deletes = groups.iter().map(|places| {
                let keys = Self::at(sns, places);
                async move { self.delete_chunk(&keys).await }
            });
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
            let result = if self.circuit.state() == CircuitState::Open {
                Err(CacheError::Skipped)
            } else {
                self.run_shared::<String>(ping.as_str(), Command::Single(&redis::cmd("PING")))
                    .await
                    .map(drop)
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
        self.circuit.state()
    }

    fn pool(&self) -> Option<PoolStatus> {
        match &self.route {
            Route::Standalone(connections) => Some(connections.status()),
            Route::Cluster(_) => None,
        }
    }
}
