//! Prometheus metrics: one [`Metrics`] per proxy, made at start and handed to every part that
//! counts, never a process global, so a test reads exactly its own proxy's numbers.
//!
//! Served at `GET /metrics` in the OpenMetrics text format (counters end in `_total`).
//! Every label value is a type (see the `labels` module), re-exported here.

mod labels;

use self::labels::{ClaimLabel, LeaseLabel, RefusalLabel, WaitLabel};
pub use self::labels::{ClaimResult, LeaseEvent, RefusalReason, WaitOutcome};
use self::labels::{
    CommandLabel, DependencyLabel, EndpointLabel, EndpointStatus, InvalidationLabel, LocalLabel,
    NodeLabels, PoolLabel, RedisLabels, ShedLabel, SnLabel, UpstreamLabel, WriteBackLabel,
};
pub use self::labels::{
    Dependency, Endpoint, InvalidationEvent, LocalResult, PoolState, RedisCommand, RedisOutcome,
    ShedReason, SnOutcome, UpstreamOutcome, WriteBackOutcome,
};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::time::Duration;

/// Every metric family of the proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    lookups: Family<EndpointStatus, Counter>,
    request_duration: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    sns: Family<SnLabel, Counter>,
    upstream_requests: Family<UpstreamLabel, Counter>,
    upstream_duration: Histogram,
    upstream_in_flight: Gauge,
    upstream_retries: Counter,
    coalesced_joins: Counter,
    pending_fetches: Gauge,
    write_backs: Family<WriteBackLabel, Counter>,
    redis_commands: Family<RedisLabels, Counter>,
    redis_node_commands: Family<NodeLabels, Counter>,
    redis_duration: Family<CommandLabel, Histogram, fn() -> Histogram>,
    redis_pool: Family<PoolLabel, Gauge>,
    load_shed: Family<ShedLabel, Counter>,
    circuit_state: Family<DependencyLabel, Gauge>,
    local_lookups: Family<LocalLabel, Counter>,
    local_bytes: Gauge,
    invalidation_messages: Family<InvalidationLabel, Counter>,
    invalidation_channel: Gauge,
    connections_open: Gauge,
    write_timeouts: Counter,
    rejected_entries: Counter,
    claims: Family<ClaimLabel, Counter>,
    waits: Family<WaitLabel, Counter>,
    leases: Family<LeaseLabel, Counter>,
    refused_writes: Family<RefusalLabel, Counter>,
}

/// Buckets from 0.5 ms to about 33 s: a Redis round trip at the bottom, a slow upstream at
/// the top.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family, registered once under the `discount_proxy_` prefix.
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("discount_proxy"),
            lookups: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            sns: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: latency_histogram(),
            upstream_in_flight: Gauge::default(),
            upstream_retries: Counter::default(),
            coalesced_joins: Counter::default(),
            pending_fetches: Gauge::default(),
            write_backs: Family::default(),
            redis_commands: Family::default(),
            redis_node_commands: Family::default(),
            redis_duration: Family::new_with_constructor(latency_histogram),
            redis_pool: Family::default(),
            load_shed: Family::default(),
            circuit_state: Family::default(),
            local_lookups: Family::default(),
            local_bytes: Gauge::default(),
            invalidation_messages: Family::default(),
            invalidation_channel: Gauge::default(),
            connections_open: Gauge::default(),
            write_timeouts: Counter::default(),
            rejected_entries: Counter::default(),
            claims: Family::default(),
            waits: Family::default(),
            leases: Family::default(),
            refused_writes: Family::default(),
        };
        metrics.register();
        metrics
    }

    fn register(&mut self) {
        self.register_distributed();
        let registry = &mut self.registry;
        registry.register(
            "lookups",
            "Requests to /v1/*, by endpoint and HTTP status",
            self.lookups.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from a request's arrival to its response head, by endpoint",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        registry.register(
            "sns",
            "Distinct SNs of lookups, by outcome: hit, miss, stale, not_found, invalid, error",
            self.sns.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests sent to the upstream, by outcome: ok, not_found, error, timeout",
            self.upstream_requests.clone(),
        );
        registry.register_with_unit(
            "upstream_request_duration",
            "Time of one upstream request, body included",
            Unit::Seconds,
            self.upstream_duration.clone(),
        );
        registry.register(
            "upstream_in_flight",
            "Upstream requests in flight now",
            self.upstream_in_flight.clone(),
        );
        registry.register(
            "upstream_retries",
            "Retries of failed upstream requests",
            self.upstream_retries.clone(),
        );
        registry.register(
            "coalesced_joins",
            "Lookups of an SN that joined a fetch already under way instead of fetching again",
            self.coalesced_joins.clone(),
        );
        registry.register(
            "pending_fetches",
            "Upstream fetches queued, in flight or being written back (at the last scrape)",
            self.pending_fetches.clone(),
        );
        registry.register(
            "write_backs",
            "Answers written back to the cache, by outcome: ok, failed, skipped, fenced, abandoned (left unwritten when the shutdown grace ran out)",
            self.write_backs.clone(),
        );
        registry.register(
            "redis_commands",
            "Redis commands, by command and outcome: ok, error, timeout, skipped",
            self.redis_commands.clone(),
        );
        registry.register(
            "redis_node_commands",
            "Redis commands sent to one master of a cluster, by node (host:port; past 32 masters, other) and outcome",
            self.redis_node_commands.clone(),
        );
        registry.register_with_unit(
            "redis_command_duration",
            "Time of one Redis command, a connect included when one was needed, by command",
            Unit::Seconds,
            self.redis_duration.clone(),
        );
        registry.register(
            "redis_pool_connections",
            "Shared Redis connections, by state: size (open), available (usable), waiting (callers waiting for a connect)",
            self.redis_pool.clone(),
        );
        registry.register(
            "load_shed",
            "Requests answered 503 overloaded, by reason: in_flight, pending",
            self.load_shed.clone(),
        );
        registry.register(
            "circuit_state",
            "Circuit breaker state by dependency: 0 closed, 1 half-open, 2 open",
            self.circuit_state.clone(),
        );
        registry.register(
            "local_cache_lookups",
            "SNs looked up in the in-process tier, by result: hit, miss",
            self.local_lookups.clone(),
        );
        registry.register_with_unit(
            "local_cache",
            "Bytes the in-process tier holds, as its bound counts them",
            Unit::Bytes,
            self.local_bytes.clone(),
        );
        registry.register(
            "invalidation_messages",
            "Invalidation messages on the Redis pub/sub channel, by event: published, publish_failed, received",
            self.invalidation_messages.clone(),
        );
        registry.register(
            "invalidation_channel_up",
            "1 while this instance is subscribed to the invalidation channel, else 0",
            self.invalidation_channel.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections open (at the last scrape); at most server.max_connections",
            self.connections_open.clone(),
        );
        registry.register(
            "write_timeouts",
            "Responses abandoned because the client took no bytes for server.write_timeout",
            self.write_timeouts.clone(),
        );
        registry.register(
            "cache_entries_rejected",
            "Values read from the cache that are not entries this proxy writes (another format, or JSON on more than one line): misses, overwritten by the write-back",
            self.rejected_entries.clone(),
        );
    }

    /// The OpenMetrics text of every family.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    /// One `/v1/*` request answered.
    pub fn record_lookup(&self, endpoint: Endpoint, status: u16, took: Duration) {
        self.lookups
            .get_or_create(&EndpointStatus { endpoint, status })
            .inc();
        self.request_duration
            .get_or_create(&EndpointLabel { endpoint })
            .observe(took.as_secs_f64());
    }

    /// `count` distinct SNs came to `outcome`: one update per outcome, not one per SN, on
    /// the hit path that counts a hundred SNs per request.
    pub fn record_sns(&self, outcome: SnOutcome, count: u64) {
        if count > 0 {
            self.sns.get_or_create(&SnLabel { outcome }).inc_by(count);
        }
    }

    /// One upstream request ended with `outcome` after `took`.
    pub fn record_upstream(&self, outcome: UpstreamOutcome, took: Duration) {
        self.upstream_requests
            .get_or_create(&UpstreamLabel { outcome })
            .inc();
        self.upstream_duration.observe(took.as_secs_f64());
    }

    /// The gauge of upstream requests in flight.
    pub fn upstream_in_flight(&self) -> &Gauge {
        &self.upstream_in_flight
    }

    /// One retry of an upstream request.
    pub fn record_retry(&self) {
        self.upstream_retries.inc();
    }

    /// The families of instances coalescing together (`coalesce.distributed`).
    fn register_distributed(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "claims",
            "Claims on missed SNs' fetches across instances, by result: won, lost, skipped, present, took_over",
            self.claims.clone(),
        );
        registry.register(
            "distributed_waits",
            "SNs waited for while another instance fetched them, by outcome: notified, polled, took_over, deadline_passed",
            self.waits.clone(),
        );
        registry.register(
            "leases",
            "Leases on fetches by event: renewed, expired (found lost at renewal), yielded (queued, taken over before its fetch started)",
            self.leases.clone(),
        );
        registry.register(
            "refused_writes",
            "Fenced write-backs Redis refused, by reason: fenced (invalidated since the claim), newer (a later answer is stored)",
            self.refused_writes.clone(),
        );
    }

    /// `count` claims came to `result`.
    pub fn record_claims(&self, result: ClaimResult, count: usize) {
        add(&self.claims, &ClaimLabel { result }, count);
    }

    /// `count` waits for another instance's fetch ended with `outcome`.
    pub fn record_waits(&self, outcome: WaitOutcome, count: usize) {
        add(&self.waits, &WaitLabel { outcome }, count);
    }

    /// `count` leases came to `event`.
    pub fn record_leases(&self, event: LeaseEvent, count: usize) {
        add(&self.leases, &LeaseLabel { event }, count);
    }

    /// `count` fenced write-backs were refused for `reason`.
    pub fn record_refused_writes(&self, reason: RefusalReason, count: usize) {
        add(&self.refused_writes, &RefusalLabel { reason }, count);
    }

    /// One lookup joined a fetch under way.
    pub fn record_join(&self) {
        self.coalesced_joins.inc();
    }

    /// `count` answers came to `outcome` at the write-back.
    pub fn record_write_backs(&self, outcome: WriteBackOutcome, count: usize) {
        self.write_backs
            .get_or_create(&WriteBackLabel { outcome })
            .inc_by(count as u64);
    }

    /// One Redis command (`command`) ended with `outcome` after `took`.
    pub fn record_redis(&self, command: RedisCommand, outcome: RedisOutcome, took: Duration) {
        self.redis_commands
            .get_or_create(&RedisLabels { command, outcome })
            .inc();
        if outcome != RedisOutcome::Skipped {
            self.redis_duration
                .get_or_create(&CommandLabel { command })
                .observe(took.as_secs_f64());
        }
    }

    /// The counters of the cluster master `node`, made once per master so a command counts
    /// without building its labels again.
    pub fn redis_node(&self, node: &str) -> NodeCounters {
        let counter = |outcome| {
            self.redis_node_commands
                .get_or_create(&NodeLabels {
                    node: node.to_owned(),
                    outcome,
                })
                .clone()
        };
        NodeCounters {
            ok: counter(RedisOutcome::Ok),
            error: counter(RedisOutcome::Error),
            timeout: counter(RedisOutcome::Timeout),
            skipped: counter(RedisOutcome::Skipped),
        }
    }

    /// SNs the in-process tier had (`hits`) and lacked (`misses`) in one read.
    pub fn record_local_lookups(&self, hits: usize, misses: usize) {
        for (result, count) in [(LocalResult::Hit, hits), (LocalResult::Miss, misses)] {
            add(&self.local_lookups, &LocalLabel { result }, count);
        }
    }

    /// One invalidation message `event`: published, publish_failed or received.
    pub fn record_invalidation_message(&self, event: InvalidationEvent) {
        self.invalidation_messages
            .get_or_create(&InvalidationLabel { event })
            .inc();
    }

    /// Whether the instance follows the invalidation channel now.
    pub fn set_invalidation_channel_up(&self, up: bool) {
        self.invalidation_channel.set(i64::from(up));
    }

    /// A response was abandoned: its client stopped reading.
    pub fn record_write_timeout(&self) {
        self.write_timeouts.inc();
    }

    /// A value read from the cache was not an entry we write, and was treated as a miss.
    pub fn record_rejected_entry(&self) {
        self.rejected_entries.inc();
    }

    /// A request was shed for `reason`.
    pub fn record_shed(&self, reason: ShedReason) {
        self.load_shed.get_or_create(&ShedLabel { reason }).inc();
    }

    /// The values read at scrape time: pool, pending fetches, circuits.
    pub fn set_current(&self, current: &Current) {
        self.pending_fetches.set(gauge(current.pending_fetches));
        self.connections_open.set(gauge(current.connections_open));
        self.local_bytes
            .set(i64::try_from(current.local_bytes).unwrap_or(i64::MAX));
        for (state, value) in [
            (PoolState::Size, current.pool_size),
            (PoolState::Available, current.pool_available),
            (PoolState::Waiting, current.pool_waiting),
        ] {
            self.redis_pool
                .get_or_create(&PoolLabel { state })
                .set(gauge(value));
        }
        for (dependency, state) in [
            (Dependency::Upstream, current.upstream_circuit),
            (Dependency::Redis, current.redis_circuit),
        ] {
            self.circuit_state
                .get_or_create(&DependencyLabel { dependency })
                .set(state.level());
        }
    }
}

/// One cluster master's command counters, by outcome.
#[derive(Debug, Clone)]
pub struct NodeCounters {
    ok: Counter,
    error: Counter,
    timeout: Counter,
    skipped: Counter,
}

impl NodeCounters {
    /// One command to the master ended with `outcome`.
    pub fn record(&self, outcome: RedisOutcome) {
        match outcome {
            RedisOutcome::Ok => &self.ok,
            RedisOutcome::Error => &self.error,
            RedisOutcome::Timeout => &self.timeout,
            RedisOutcome::Skipped => &self.skipped,
        }
        .inc();
    }
}

/// What a scrape reads off the running parts.
#[derive(Debug, Clone, Copy)]
pub struct Current {
    /// Upstream fetches queued, in flight or being written back.
    pub pending_fetches: usize,
    /// Connections the Redis pool holds.
    pub pool_size: usize,
    /// Of those, idle ones.
    pub pool_available: usize,
    /// Callers waiting for a connection.
    pub pool_waiting: usize,
    /// The upstream's circuit.
    pub upstream_circuit: crate::circuit::CircuitState,
    /// Redis's circuit.
    pub redis_circuit: crate::circuit::CircuitState,
    /// Bytes the in-process tier holds (0 when it is off).
    pub local_bytes: u64,
    /// Client connections open.
    pub connections_open: usize,
}

fn gauge(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Adds `count` to the counter of `labels` in `family`; a zero creates no series.
fn add<L>(family: &Family<L, Counter>, labels: &L, count: usize)
where
    L: Clone + std::hash::Hash + Eq,
{
    if count > 0 {
        family.get_or_create(labels).inc_by(count as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_named_with_units_and_counters_end_in_total() {
        let metrics = Metrics::new();
        metrics.record_lookup(Endpoint::Batch, 200, Duration::from_millis(3));
        metrics.record_sns(SnOutcome::Hit, 1);
        metrics.record_upstream(UpstreamOutcome::Ok, Duration::from_millis(500));
        metrics.record_redis(
            RedisCommand::Mget,
            RedisOutcome::Ok,
            Duration::from_micros(300),
        );
        let text = metrics.encode();
        for line in [
            r#"discount_proxy_lookups_total{endpoint="batch",status="200"} 1"#,
            r#"discount_proxy_sns_total{outcome="hit"} 1"#,
            r#"discount_proxy_upstream_requests_total{outcome="ok"} 1"#,
            r#"discount_proxy_redis_commands_total{command="MGET",outcome="ok"} 1"#,
            "# TYPE discount_proxy_upstream_request_duration_seconds histogram",
            "# TYPE discount_proxy_request_duration_seconds histogram",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }
}
