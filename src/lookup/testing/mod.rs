//! What the lookup core's unit tests drive it with: a scripted upstream (per-SN replies,
//! delays, hangs, call counters, an in-flight gauge, a settable circuit), the in-memory cache
//! behind a counting wrapper, and a [`Rig`] that builds a [`Lookup`] over both. Everything
//! runs under `tokio::time::pause()`: a 0.5 s fetch costs no wall-clock time.

mod shared;
mod upstream;

pub(super) use self::shared::FakeRedis;
pub(super) use self::upstream::{LATENCY, Reply, ScriptedUpstream, discount};

use super::{Batch, Lookup, LookupSettings, Outcome, Source, StreamedLookup, Upstream};
use super::{Lifetimes, Overloaded};
use crate::cache::{Cache, CacheError, Entry, MemoryCache, Values, Write};
use crate::health::Health;
use crate::metrics::Metrics;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(super) const HOUR: Duration = Duration::from_secs(3600);

/// The in-memory cache, counting what the core reads and writes, with write-backs that can
/// be made slow.
pub(super) struct CountingCache {
    memory: Arc<dyn Cache>,
    reads: AtomicUsize,
    keys_read: AtomicUsize,
    keys_written: AtomicUsize,
    write_delay: Mutex<Duration>,
}

impl Cache for CountingCache {
    fn get_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Values> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.keys_read.fetch_add(sns.len(), Ordering::SeqCst);
        self.memory.get_many(sns)
    }

    fn set_many<'a>(&'a self, writes: &'a [Write]) -> BoxFuture<'a, Result<(), CacheError>> {
        let delay = *self.write_delay.lock().unwrap();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            self.keys_written.fetch_add(writes.len(), Ordering::SeqCst);
            self.memory.set_many(writes).await
        })
    }

    fn delete_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Result<u64, CacheError>> {
        self.memory.delete_many(sns)
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        self.memory.ping()
    }

    fn kind(&self) -> crate::cache::CacheKind {
        self.memory.kind()
    }
}

/// How a test's lookup core is set up; [`Default`] is a roomy proxy.
pub(super) struct Setup {
    pub(super) concurrency: usize,
    pub(super) max_pending: usize,
    pub(super) request_timeout: Duration,
    /// `write_batch`, which is also a streamed lookup's window.
    pub(super) window: usize,
    pub(super) early_refresh: f64,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            concurrency: 8,
            max_pending: 1000,
            request_timeout: Duration::from_secs(5),
            window: 100,
            early_refresh: 0.0,
        }
    }
}

/// A lookup core over a scripted upstream and a counting in-memory cache.
pub(super) struct Rig {
    pub(super) lookup: Arc<Lookup>,
    pub(super) upstream: Arc<ScriptedUpstream>,
    pub(super) cache: Arc<CountingCache>,
    pub(super) metrics: Arc<Metrics>,
}

impl Rig {
    pub(super) fn new() -> Self {
        Self::with(Setup::default())
    }

    pub(super) fn with(setup: Setup) -> Self {
        Self::build(setup, Arc::new(MemoryCache::new(100_000)), None)
    }

    /// One of several instances sharing `redis` (`coalesce.distributed`), each with its own
    /// upstream script and counters, with `lease_ttl`.
    pub(super) fn instance(setup: Setup, redis: &Arc<FakeRedis>, lease_ttl: Duration) -> Self {
        let distributed = super::Distributed {
            coordination: redis.link(),
            lease_ttl,
        };
        Self::build(
            setup,
            Arc::clone(redis) as Arc<dyn Cache>,
            Some(distributed),
        )
    }

    fn build(
        setup: Setup,
        memory: Arc<dyn Cache>,
        distributed: Option<super::Distributed>,
    ) -> Self {
        let upstream = Arc::new(ScriptedUpstream::new(setup.concurrency));
        let cache = Arc::new(CountingCache {
            memory,
            reads: AtomicUsize::new(0),
            keys_read: AtomicUsize::new(0),
            keys_written: AtomicUsize::new(0),
            write_delay: Mutex::new(Duration::ZERO),
        });
        let metrics = Arc::new(Metrics::new());
        let lookup = Lookup::new(
            Arc::clone(&cache) as Arc<dyn Cache>,
            Arc::clone(&upstream) as Arc<dyn Upstream>,
            Arc::new(Health::default()),
            Arc::clone(&metrics),
            LookupSettings {
                lifetimes: Lifetimes {
                    ttl: HOUR,
                    stale_ttl: HOUR,
                    negative_ttl: Duration::from_secs(300),
                    early_refresh: setup.early_refresh,
                },
                request_timeout: setup.request_timeout,
                max_pending: setup.max_pending,
                write_batch: setup.window,
            },
            distributed,
        );
        Self {
            lookup: Arc::new(lookup),
            upstream,
            cache,
            metrics,
        }
    }

    /// One sample of the metrics (`name{labels}`), 0 when not recorded yet.
    pub(super) fn metric(&self, sample: &str) -> f64 {
        self.metrics
            .encode()
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Lookups that joined a fetch under way, as `discount_proxy_coalesced_joins_total` counts.
    pub(super) fn joins(&self) -> u64 {
        self.metric("discount_proxy_coalesced_joins_total") as u64
    }

    /// A JSON lookup of `sns` arriving now.
    pub(super) async fn resolve(&self, sns: &[&str]) -> Batch {
        self.try_resolve(sns, false).await.expect("not overloaded")
    }

    pub(super) async fn try_resolve(
        &self,
        sns: &[&str],
        refresh: bool,
    ) -> Result<Batch, Overloaded> {
        let sns = sns.iter().map(|sn| (*sn).to_owned()).collect();
        self.lookup.resolve(sns, refresh, Instant::now()).await
    }

    /// The same lookup, as a task of its own (a request that may go away).
    pub(super) fn spawn_resolve(&self, sns: &[&str]) -> tokio::task::JoinHandle<Batch> {
        let lookup = Arc::clone(&self.lookup);
        let sns: Vec<String> = sns.iter().map(|sn| (*sn).to_owned()).collect();
        tokio::spawn(async move {
            let batch = lookup.resolve(sns, false, Instant::now()).await;
            batch.expect("not overloaded")
        })
    }

    /// A streamed lookup of `sns` arriving now, with the token its client's going away fires.
    pub(super) async fn stream(
        &self,
        sns: &[String],
        cancel: CancellationToken,
    ) -> Result<StreamedLookup, Overloaded> {
        self.lookup
            .stream(sns.to_vec(), false, Instant::now(), cancel)
            .await
    }

    /// A streamed lookup of `sns` whose client stays, which must not be refused.
    pub(super) async fn open_stream(&self, sns: &[String]) -> StreamedLookup {
        self.stream(sns, CancellationToken::new())
            .await
            .expect("not overloaded")
    }

    /// Stores `entry` for `sn`, as an earlier fetch would have.
    pub(super) async fn store(&self, sn: &str, entry: &Entry) {
        self.store_raw(sn, entry.encoded().clone()).await;
    }

    /// Stores `value` for `sn` as it is, as another writer might have.
    pub(super) async fn store_raw(&self, sn: &str, value: Bytes) {
        let write = Write {
            sn: sn.to_owned(),
            value,
            ttl: 10 * HOUR,
        };
        self.cache.memory.set_many(&[write]).await.unwrap();
    }

    /// Stores a discount fetched `age` ago.
    pub(super) async fn store_found(&self, sn: &str, age: Duration) {
        let entry = Entry::found(&discount(sn), SystemTime::now() - age);
        self.store(sn, &entry).await;
    }

    /// What the cache holds for `sn`, decoded.
    pub(super) async fn stored(&self, sn: &str) -> Option<Entry> {
        let value = self.cache.memory.get_many(&[sn]).await.values.pop()??;
        Some(Entry::decode(value).unwrap())
    }

    pub(super) fn cache_reads(&self) -> usize {
        self.cache.reads.load(Ordering::SeqCst)
    }

    pub(super) fn keys_read(&self) -> usize {
        self.cache.keys_read.load(Ordering::SeqCst)
    }

    pub(super) fn keys_written(&self) -> usize {
        self.cache.keys_written.load(Ordering::SeqCst)
    }

    /// Every write-back from now on takes `delay` before it reaches the cache.
    pub(super) fn slow_writes(&self, delay: Duration) {
        *self.cache.write_delay.lock().unwrap() = delay;
    }

    /// Waits (in paused time, so at no cost) until no fetch or write-back is pending.
    pub(super) async fn settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.lookup.pending_fetches() > 0 {
            assert!(
                Instant::now() < deadline,
                "fetches still pending after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// `discount_proxy_write_backs_total{outcome}`, 0 when never counted.
    pub(super) fn write_backs(&self, outcome: &str) -> u64 {
        self.metric(&format!(
            "discount_proxy_write_backs_total{{outcome=\"{outcome}\"}}"
        )) as u64
    }
}

/// One line per distinct SN, in request order of first sight: `"A ok upstream"`,
/// `"B not_found cache"`, `"C error upstream_timeout"`, `"D invalid"`.
pub(super) fn described(batch: &Batch) -> Vec<String> {
    batch
        .distinct
        .iter()
        .zip(&batch.outcomes)
        .map(|(sn, outcome)| describe(sn, outcome))
        .collect()
}

pub(super) fn describe(sn: &str, outcome: &Outcome) -> String {
    let source = |source: &Source| source.as_str();
    match outcome {
        Outcome::Found { source: from, .. } => format!("{sn} ok {}", source(from)),
        Outcome::NotFound { source: from } => format!("{sn} not_found {}", source(from)),
        Outcome::Invalid(_) => format!("{sn} invalid"),
        Outcome::Failed(err) => format!("{sn} error {}", err.code()),
    }
}

/// `count` SNs named `prefix-0`, `prefix-1`…
pub(super) fn sns(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

/// Borrows each string, for [`Rig::resolve`].
pub(super) fn strs(sns: &[String]) -> Vec<&str> {
    sns.iter().map(String::as_str).collect()
}
