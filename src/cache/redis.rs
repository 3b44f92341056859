//! The shared cache: Redis through a few shared multiplexed connections, every call bounded,
//! broken connections replaced, and a circuit breaker that skips a dead Redis instead of
//! paying its timeout on every request.

use super::connections::{Connections, Lease};
use super::{Cache, CacheError, CacheKind, PoolStatus, Values, Write};
use crate::circuit::{Circuit, CircuitState};
use crate::config::RedisConfig;
use crate::metrics::{Metrics, RedisCommand, RedisOutcome};
use ::redis::{self, AsyncConnectionConfig, FromRedisValue};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::future::join_all;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Redis as a [`Cache`]. Keys are `<key_prefix><sn>`; big batches are split into chunks so one
/// command never carries thousands of keys and blocks Redis for other clients.
pub struct RedisCache {
    connections: Connections,
    key_prefix: String,
    timeout: Duration,
    chunk_size: usize,
    circuit: Circuit,
    metrics: Arc<Metrics>,
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
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<T> {
        match self {
            Self::Single(cmd) => cmd.query_async(conn).await,
            Self::Pipeline(pipe) => pipe.query_async(conn).await,
        }
    }
}

/// How a command ended, for metrics.
fn outcome<T>(result: &Result<T, CacheError>) -> RedisOutcome {
    match result {
        Ok(_) => RedisOutcome::Ok,
        Err(CacheError::Timeout { .. }) => RedisOutcome::Timeout,
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
        let client = redis::Client::open(settings.url.as_str()).map_err(CacheError::InvalidUrl)?;
        let connections = Connections::new(client, config, settings.timeout, settings.pool_size);
        Ok(Self {
            connections,
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
        let Some(ticket) = self.circuit.try_acquire() else {
            self.metrics
                .record_redis(name, RedisOutcome::Skipped, started.elapsed());
            return Err(CacheError::Skipped);
        };
        let result = self.run_shared(name.as_str(), command).await;
        match &result {
            Err(err) if err.is_unreachable() => ticket.failure(),
            // Redis answered, even if with an error (`OOM`, `READONLY`): it is reachable.
            _ => ticket.success(),
        }
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
        let Lease {
            mut conn,
            generation,
        } = tokio::time::timeout_at(deadline, self.connections.get())
            .await
            .map_err(|_| CacheError::Timeout {
                op: "connect",
                timeout,
            })??;
        match tokio::time::timeout_at(deadline, command.query(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => {
                if poisons_connection(&source) {
                    self.connections.discard(generation);
                }
                Err(CacheError::Command { op, source })
            }
            Err(_) => {
                self.connections.discard(generation);
                Err(CacheError::Timeout { op, timeout })
            }
        }
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

    async fn set_chunk(&self, writes: &[Write]) -> Result<(), CacheError> {
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

    /// A client for connections of its own, such as a pub/sub subscription, which cannot
    /// share the multiplexed ones.
    pub fn client(&self) -> &redis::Client {
        self.connections.client()
    }

    async fn delete_chunk(&self, sns: &[&str]) -> Result<u64, CacheError> {
        let cmd = self.keyed("DEL", sns);
        self.run(RedisCommand::Del, Command::Single(&cmd)).await
    }
}

impl Cache for RedisCache {
    fn get_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Values> {
        Box::pin(async move {
            let chunks = sns.chunks(self.chunk_size);
            let reads = join_all(chunks.clone().map(|chunk| self.get_chunk(chunk))).await;
            let mut found = Values {
                values: Vec::with_capacity(sns.len()),
                failures: Vec::new(),
            };
            for (chunk, read) in chunks.zip(reads) {
                match read {
                    Ok(values) => found.values.extend(values),
                    Err(err) => {
                        found.values.extend(std::iter::repeat_n(None, chunk.len()));
                        found.failures.push(err);
                    }
                }
            }
            found
        })
    }

    fn set_many<'a>(&'a self, writes: &'a [Write]) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let chunks = writes
                .chunks(self.chunk_size)
                .map(|chunk| self.set_chunk(chunk));
            join_all(chunks).await.into_iter().collect()
        })
    }

    fn delete_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Result<u64, CacheError>> {
        Box::pin(async move {
            // Every chunk runs to its end, even after one fails: no DEL is cut off half-sent.
            let chunks = sns
                .chunks(self.chunk_size)
                .map(|chunk| self.delete_chunk(chunk));
            join_all(chunks).await.into_iter().sum()
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
            if self.circuit.state() == CircuitState::Open {
                self.metrics
                    .record_redis(ping, RedisOutcome::Skipped, started.elapsed());
                return Err(CacheError::Skipped);
            }
            let result = self
                .run_shared::<String>(ping.as_str(), Command::Single(&redis::cmd("PING")))
                .await
                .map(drop);
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
        Some(self.connections.status())
    }
}
