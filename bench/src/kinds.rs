//! What each process of a run is configured as: the simulators' latencies and the proxy
//! kinds, each set up for the scenarios that use it.

use crate::scenarios::Scale;
use std::time::Duration;

/// `redis.timeout` of the cluster row's two proxies.
pub const CLUSTER_ROW_REDIS_TIMEOUT: &str = "2s";

/// `upstream.concurrency` of each of the cross-instance row's proxies: enough for a whole
/// export batch in one round of upstream calls, so a batch's time is one upstream latency
/// plus whatever it waits for, not the proxy's own queue.
pub const INSTANCE_CONCURRENCY: usize = 1_000;

/// The simulated upstreams, by latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// 500 ms, like the real service: the cold-path scenarios.
    Slow,
    /// 50 ms: the throughput and overload scenarios.
    Normal,
    /// No delay: for warming the P7 key set and the cluster row's key sets quickly.
    Fast,
}

impl Upstream {
    /// The simulator's `--latency`.
    pub fn latency(self) -> Duration {
        match self {
            Self::Slow => Duration::from_millis(500),
            Self::Normal => Duration::from_millis(50),
            Self::Fast => Duration::ZERO,
        }
    }
}

/// The proxies of a run, each configured for its scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// Redis only: P1, P3.
    RedisOnly,
    /// With the in-process tier: P2, P3.
    LocalTier,
    /// On the 500 ms upstream: P4, P6.
    Cold,
    /// Concurrency 256 on the 50 ms upstream: P5.
    Wide,
    /// On the instant upstream: fills Redis for P7's stream.
    Warmer,
    /// Batches of 100,000, streamed: P7.
    Stream,
    /// Concurrency 64, 128 pending, on the 50 ms upstream: P8.
    Overload,
    /// Redis only, on one standalone node and the instant upstream: the cluster row's
    /// reference.
    Standalone,
    /// The same on the local 3-master Redis Cluster: the cluster row.
    Cluster,
    /// One of three alike on the standalone Redis and the 500 ms upstream: the
    /// cross-instance row.
    Instance(Peer),
}

/// Which of the cross-instance row's three proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The first.
    A,
    /// The second.
    B,
    /// The third.
    C,
}

impl Peer {
    /// All three, in the order the row addresses them.
    pub const ALL: [Self; 3] = [Self::A, Self::B, Self::C];

    /// Its letter, for figures and notes.
    pub fn letter(self) -> &'static str {
        match self {
            Self::A => "A",
            Self::B => "B",
            Self::C => "C",
        }
    }
}

impl ProxyKind {
    /// A short name for logs and the RSS rows.
    pub fn name(self) -> &'static str {
        match self {
            Self::RedisOnly => "redis-only",
            Self::LocalTier => "local-tier",
            Self::Cold => "cold (500 ms)",
            Self::Wide => "wide (256)",
            Self::Warmer => "warmer",
            Self::Stream => "stream",
            Self::Overload => "overload",
            Self::Standalone => "standalone",
            Self::Cluster => "cluster",
            Self::Instance(Peer::A) => "instance A",
            Self::Instance(Peer::B) => "instance B",
            Self::Instance(Peer::C) => "instance C",
        }
    }

    /// The simulator it fronts.
    pub fn upstream(self) -> Upstream {
        match self {
            Self::Cold | Self::Instance(_) => Upstream::Slow,
            // The cluster row warms 10,000 SNs on each of its proxies; its measurements are
            // all hits, so the upstream's latency is not part of them.
            Self::Warmer | Self::Stream | Self::Standalone | Self::Cluster => Upstream::Fast,
            _ => Upstream::Normal,
        }
    }

    /// Whether it runs on the lab's Redis Cluster rather than its standalone Redis.
    pub fn on_cluster(self) -> bool {
        self == Self::Cluster
    }

    /// The `DISCOUNT_PROXY_…` variables that make this kind (besides listen, Redis, upstream).
    pub fn env(self, scale: &Scale) -> Vec<(&'static str, String)> {
        let (concurrency, max_pending, max_batch) = match self {
            Self::Wide => (256, 100_000, scale.p5_sns.max(10_000)),
            Self::Warmer => (256, 100_000, 10_000),
            Self::Stream => (128, 100_000, 100_000),
            // max_pending must admit one whole batch; P8 sends single GETs only.
            Self::Overload => (64, 128, 128),
            Self::Instance(_) => (INSTANCE_CONCURRENCY, 100_000, 10_000),
            _ => (128, 100_000, 10_000),
        };
        let mut env = vec![
            ("UPSTREAM__CONCURRENCY", concurrency.to_string()),
            ("UPSTREAM__MAX_PENDING", max_pending.to_string()),
            ("SERVER__MAX_BATCH", max_batch.to_string()),
            ("SERVER__MAX_BODY_BYTES", (16 << 20).to_string()),
        ];
        if matches!(self, Self::Standalone | Self::Cluster) {
            // The row measures how fast each topology reads a batch, not whether a 10,000-key
            // read fits the default 250 ms bound: a read cut off by it would turn hits into
            // upstream fetches (and open the Redis breaker). Both get the same bound.
            env.push(("REDIS__TIMEOUT", CLUSTER_ROW_REDIS_TIMEOUT.to_owned()));
        }
        if self == Self::LocalTier {
            env.push(("CACHE__LOCAL__ENABLED", "true".to_owned()));
            env.push(("CACHE__LOCAL__TTL", "5m".to_owned()));
            env.push(("CACHE__LOCAL__MAX_BYTES", (32 << 20).to_string()));
        }
        env
    }
}
