//! How long caching stops while Redis fails over: measured, not run in the normal suite.
//!
//! `cargo test --test it failover_windows -- --ignored --nocapture --test-threads 1`
//!
//! Under a steady load of cold lookups (so every answer is written back), a failover is
//! caused and the proxy's `discount_proxy_write_backs_total` is sampled every few
//! milliseconds. The window is the time from the first write-back that did not land
//! (`failed`, or `skipped` while Redis's breaker was open) to the first one after it that
//! did (`ok`). Three failovers, each on a topology of its own, stopped by pid when dropped:
//! a cluster master killed (the load only touches that master's slots, so an `ok` means its
//! promoted replica took writes), `SENTINEL FAILOVER`, and a sentinel-watched master killed.
//! Every lookup meanwhile must answer `200` with every SN `ok`.

use crate::support::{RedisCluster, Role, SentinelSet, TestApp, results};
use redis::cluster_routing::Slot;
use std::collections::HashSet;
use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Concurrent lookup loops, each with this many fresh SNs per lookup.
const LOADERS: usize = 4;
const BATCH: usize = 4;
/// How often the write-back counters are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// How long a failover may take before the measurement gives up.
const GIVE_UP: Duration = Duration::from_secs(30);
/// How long the load goes on after the new master took its first write-back.
const QUIET: Duration = Duration::from_secs(2);

/// Whether [`QUIET`] has passed since the new master took its first write-back.
fn timeline_quiet(settled: &OnceLock<Instant>) -> bool {
    settled.get().is_some_and(|at| at.elapsed() > QUIET)
}

/// The write-back counters at one moment.
#[derive(Clone, Copy, Default, Debug)]
struct WriteBacks {
    ok: f64,
    not_landed: f64,
}

impl WriteBacks {
    fn of(app: &TestApp) -> Self {
        let sample = |outcome: &str| {
            app.metric(&format!(
                r#"discount_proxy_write_backs_total{{outcome="{outcome}"}}"#
            ))
        };
        Self {
            ok: sample("ok"),
            not_landed: sample("failed") + sample("skipped"),
        }
    }
}

/// What one failover looked like, every time counted from the moment it was caused.
#[derive(Default)]
struct Timeline {
    first_not_landed: Option<Duration>,
    first_ok_after: Option<Duration>,
    not_landed: f64,
    /// When the replica reported itself master, and when the first write-back reached it
    /// after that.
    promoted: Option<Duration>,
    first_write_on_new_master: Option<Duration>,
}

impl Timeline {
    fn window(&self) -> Option<Duration> {
        Some(self.first_ok_after? - self.first_not_landed?)
    }

    fn print(&self, scenario: &str, lookups: usize) {
        let ms =
            |at: Option<Duration>| at.map_or("-".to_owned(), |at| format!("{}", at.as_millis()));
        println!(
            "{scenario}: window {} ms (first not landed at +{} ms, first ok after it at +{} ms; {} answers not written); promoted +{} ms, first write on the new master +{} ms; {lookups} lookups, all 200",
            ms(self.window()),
            ms(self.first_not_landed),
            ms(self.first_ok_after),
            self.not_landed,
            ms(self.promoted),
            ms(self.first_write_on_new_master),
        );
    }
}

/// Fresh SNs (`prefix-n`) for the loaders, only those `wanted` keeps.
struct Sns<'a> {
    prefix: &'static str,
    next: AtomicUsize,
    wanted: Box<dyn Fn(&str) -> bool + Send + Sync + 'a>,
}

impl Sns<'_> {
    fn take(&self, app: &TestApp, count: usize) -> Vec<String> {
        let mut sns = Vec::with_capacity(count);
        while sns.len() < count {
            let sn = format!(
                "{}-{}",
                self.prefix,
                self.next.fetch_add(1, Ordering::Relaxed)
            );
            if (self.wanted)(&app.key(&sn)) {
                sns.push(sn);
            }
        }
        sns
    }
}

/// Cold lookups from [`LOADERS`] loops until `stop`; returns how many were made.
async fn load(app: &TestApp, sns: &Sns<'_>, stop: &AtomicBool) -> usize {
    let loops = (0..LOADERS).map(|_| async {
        let mut lookups = 0;
        while !stop.load(Ordering::Relaxed) {
            let batch = sns.take(app, BATCH);
            let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
            let body = app.lookup(&refs).await;
            let items = results(&body);
            assert!(items.iter().all(|item| item["status"] == "ok"), "{body}");
            lookups += 1;
        }
        lookups
    });
    futures_util::future::join_all(loops)
        .await
        .into_iter()
        .sum()
}

/// Waits for write-backs to land, runs `cause`, then samples the counters until the first
/// `ok` after the first write-back that did not land, or until [`QUIET`] after `settled`
/// without any that did not land (a failover that cost no write-back), or [`GIVE_UP`].
async fn watch(
    app: &TestApp,
    stop: &AtomicBool,
    settled: &OnceLock<Instant>,
    cause: impl Future<Output = ()>,
) -> Timeline {
    let mut timeline = Timeline::default();
    let mut interval = tokio::time::interval(SAMPLE_EVERY);
    while WriteBacks::of(app).ok == 0.0 {
        interval.tick().await;
    }
    let mut last = WriteBacks::of(app);
    let base = last;
    let caused = Instant::now();
    cause.await;
    while caused.elapsed() < GIVE_UP && timeline.first_ok_after.is_none() {
        if timeline.first_not_landed.is_none() && timeline_quiet(settled) {
            break;
        }
        interval.tick().await;
        let now = WriteBacks::of(app);
        let at = caused.elapsed();
        if timeline.first_not_landed.is_none() && now.not_landed > last.not_landed {
            timeline.first_not_landed = Some(at);
        } else if timeline.first_not_landed.is_some() && now.ok > last.ok {
            timeline.first_ok_after = Some(at);
        }
        last = now;
    }
    timeline.not_landed = last.not_landed - base.not_landed;
    stop.store(true, Ordering::Relaxed);
    timeline
}

async fn cluster_master_killed() {
    let cluster = RedisCluster::start();
    let app = TestApp::spawn_with(|config| {
        cluster.point(config);
        config.redis.key_prefix = "fw-cluster:".to_owned();
    })
    .await;
    let victim = cluster.masters().await[0];
    let topology = cluster.topology().await;
    let owner = topology.iter().find(|node| node.port == victim).unwrap();
    let slots: HashSet<Slot> = owner
        .slots
        .iter()
        .flat_map(|range| range.clone().filter_map(Slot::new))
        .collect();
    let sns = Sns {
        prefix: "FW",
        next: AtomicUsize::new(0),
        wanted: Box::new(move |key: &str| slots.contains(&Slot::for_key(key))),
    };
    let replica = cluster.replicas_of(victim).await[0];
    under_load(
        &app,
        &sns,
        "cluster, master killed",
        cluster.kill_master(victim),
        || cluster.role(replica),
        || async { key_count(cluster.command(replica, &["DBSIZE"]).await) },
    )
    .await;
}

/// Lookups under load while `cause` fails Redis over, the write-backs watched and the
/// promotion followed (the replica's `role` and its key count, `keys`); prints the timeline
/// as `scenario`.
async fn under_load<R, K>(
    app: &TestApp,
    sns: &Sns<'_>,
    scenario: &str,
    cause: impl Future<Output = ()>,
    role: impl Fn() -> R,
    keys: impl Fn() -> K,
) where
    R: Future<Output = Role>,
    K: Future<Output = i64>,
{
    let stop = AtomicBool::new(false);
    let caused = OnceLock::new();
    let settled = OnceLock::new();
    let cause = async {
        let _ = caused.set(Instant::now());
        cause.await;
    };
    let follow = promotion(role, keys, &caused, &settled);
    let (lookups, mut timeline, (promoted, written)) = tokio::join!(
        load(app, sns, &stop),
        watch(app, &stop, &settled, cause),
        follow
    );
    timeline.promoted = Some(promoted);
    timeline.first_write_on_new_master = Some(written);
    timeline.print(scenario, lookups);
}

/// The number of keys in a `DBSIZE` reply.
fn key_count(reply: redis::Value) -> i64 {
    match reply {
        redis::Value::Int(count) => count,
        other => panic!("DBSIZE answered {other:?}"),
    }
}

/// From the moment `caused` is set: when the replica reports itself master (`role`), then
/// when its key count (`keys`) first grows after that (a write-back of the proxy: it no
/// longer replicates), which is also the moment `settled`.
async fn promotion<R, K>(
    role: impl Fn() -> R,
    keys: impl Fn() -> K,
    caused: &OnceLock<Instant>,
    settled: &OnceLock<Instant>,
) -> (Duration, Duration)
where
    R: Future<Output = Role>,
    K: Future<Output = i64>,
{
    let mut interval = tokio::time::interval(SAMPLE_EVERY);
    let caused = loop {
        match caused.get() {
            Some(at) => break *at,
            None => interval.tick().await,
        };
    };
    while role().await != Role::Master {
        assert!(caused.elapsed() < GIVE_UP, "the replica was not promoted");
        interval.tick().await;
    }
    let promoted = caused.elapsed();
    let at_promotion = keys().await;
    while keys().await == at_promotion {
        assert!(
            caused.elapsed() < GIVE_UP,
            "nothing written on the new master"
        );
        interval.tick().await;
    }
    let written = Instant::now();
    let _ = settled.set(written);
    (promoted, written - caused)
}

/// A sentinel failover under load, caused by `kill` (the master killed) or not
/// (`SENTINEL FAILOVER`).
async fn sentinel_failover(kill: bool) {
    let sentinels = SentinelSet::start();
    let app = sentinels.proxy("fw-sentinel:").await;
    let replica = sentinels.replica_port().await;
    let sns = Sns {
        prefix: "FS",
        next: AtomicUsize::new(0),
        wanted: Box::new(|_: &str| true),
    };
    let cause = async {
        if kill {
            sentinels.kill_master().await;
        } else {
            sentinels.failover().await;
        }
    };
    let scenario = if kill {
        "sentinel, master killed"
    } else {
        "sentinel, SENTINEL FAILOVER"
    };
    under_load(
        &app,
        &sns,
        scenario,
        cause,
        || sentinels.role(replica),
        || async { key_count(sentinels.command(replica, &["DBSIZE"]).await) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn failover_windows() {
    cluster_master_killed().await;
    sentinel_failover(false).await;
    sentinel_failover(true).await;
}
