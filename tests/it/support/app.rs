//! The proxy on a free port, with its own Redis and stub upstream, all stopped on `Drop`.

use super::{FaultProxy, RedisServer, StubUpstream};
use discount_proxy::app::{self, CacheChoice};
use discount_proxy::config::Config;
use discount_proxy::state::AppState;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub redis: RedisServer,
    pub upstream: StubUpstream,
    pub config: Config,
    pub state: Arc<AppState>,
    /// Between the proxy and `redis` when spawned by [`TestApp::spawn_with_faulty_redis`].
    redis_proxy: Option<FaultProxy>,
    shutdown: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    server: Option<JoinHandle<()>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Spawns with the test defaults, after `customize` has had its say.
    pub async fn spawn_with(customize: impl FnOnce(&mut Config)) -> Self {
        super::init_logging();
        let redis = RedisServer::start();
        let upstream = StubUpstream::start().await;
        let mut config = Self::config_for(&redis, &upstream);
        customize(&mut config);
        config.validate().expect("test config is valid");
        Self::spawn_on(config, CacheChoice::Redis, redis, upstream).await
    }

    /// Spawns with a [`FaultProxy`] between the proxy and its Redis, so a test can make that
    /// network slow, silent or resetting. `redis` and the key helpers still reach Redis
    /// directly, so what was written can be checked whatever the fault.
    pub async fn spawn_with_faulty_redis(customize: impl FnOnce(&mut Config)) -> Self {
        super::init_logging();
        let redis = RedisServer::start();
        let upstream = StubUpstream::start().await;
        let redis_proxy = FaultProxy::start(redis.addr()).await;
        let mut config = Self::config_for(&redis, &upstream);
        config.redis.url = redis_proxy.redis_url();
        customize(&mut config);
        config.validate().expect("test config is valid");
        let mut app = Self::spawn_on(config, CacheChoice::Redis, redis, upstream).await;
        app.redis_proxy = Some(redis_proxy);
        app
    }

    /// The fault proxy in front of Redis.
    pub fn redis_proxy(&self) -> &FaultProxy {
        self.redis_proxy
            .as_ref()
            .expect("spawned with TestApp::spawn_with_faulty_redis")
    }

    /// The defaults tests start from: short timeouts, everything on 127.0.0.1.
    pub fn config_for(redis: &RedisServer, upstream: &StubUpstream) -> Config {
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.server.request_timeout = Duration::from_secs(10);
        config.server.shutdown_grace = Duration::from_secs(10);
        config.redis.url = redis.url();
        config.redis.timeout = Duration::from_millis(250);
        config.upstream.url = upstream.url_template();
        config.upstream.timeout = Duration::from_secs(2);
        config.upstream.concurrency = 16;
        // Each test counts upstream calls; the ones about retries turn them on.
        config.upstream.retries = 0;
        config
    }

    pub async fn spawn_on(
        config: Config,
        choice: CacheChoice,
        redis: RedisServer,
        upstream: StubUpstream,
    ) -> Self {
        let listener = app::bind(&config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = app::prepare(&config, listener, choice).await.unwrap();
        let state = Arc::clone(proxy.state());
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(proxy.run(async {
            let _ = stop.await;
        }));
        super::wait_until("the server is ready", Duration::from_secs(5), || async {
            state.health.phase() == discount_proxy::health::Phase::Ready
        })
        .await;
        let client = super::http_client();
        Self {
            addr,
            client,
            redis,
            upstream,
            config,
            state,
            redis_proxy: None,
            shutdown: std::sync::Mutex::new(Some(shutdown)),
            server: Some(server),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST /v1/discounts/lookup` with these SNs; asserts `200` and returns the body.
    pub async fn lookup(&self, sns: &[&str]) -> Value {
        self.lookup_at("/v1/discounts/lookup", sns).await
    }

    pub async fn lookup_at(&self, path: &str, sns: &[&str]) -> Value {
        let response = self
            .post_json(path, &serde_json::json!({ "sns": sns }))
            .await;
        assert_eq!(response.status(), 200, "lookup failed");
        response.json().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.post_raw(path, "application/json", body.to_string())
            .await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    /// The Redis key the proxy uses for `sn`.
    pub fn key(&self, sn: &str) -> String {
        format!("{}{sn}", self.config.redis.key_prefix)
    }

    /// The key's remaining TTL in milliseconds (`-2` missing, `-1` no TTL).
    pub async fn pttl(&self, sn: &str) -> i64 {
        let mut redis = self.redis.client().await;
        redis::cmd("PTTL")
            .arg(self.key(sn))
            .query_async(&mut redis)
            .await
            .unwrap()
    }

    pub async fn redis_value(&self, sn: &str) -> Option<Vec<u8>> {
        let mut redis = self.redis.client().await;
        redis::cmd("GET")
            .arg(self.key(sn))
            .query_async(&mut redis)
            .await
            .unwrap()
    }

    /// Starts the shutdown SIGTERM would start; in-flight requests go on.
    pub fn begin_shutdown(&self) {
        if let Some(shutdown) = self.shutdown.lock().unwrap().take() {
            let _ = shutdown.send(());
        }
    }

    /// Waits for the server to finish draining after [`TestApp::begin_shutdown`].
    pub async fn stopped(&mut self) {
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// The results array of a lookup response.
impl TestApp {
    /// One sample of the proxy's metrics (`name{labels}` as exposed), 0 when it has not been
    /// recorded yet. Values read at scrape time (gauges of connections, pools, circuits)
    /// need a `GET /metrics` instead.
    pub fn metric(&self, sample: &str) -> f64 {
        sample_in(&self.state.metrics.encode(), sample)
    }

    /// One sample of a `GET /metrics` scrape, which also reads the values of the moment
    /// (connections, pools, circuits); 0 when it has not been recorded yet.
    pub async fn scraped(&self, sample: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        sample_in(&text, sample)
    }

    /// `POST /v1/discounts/lookup` of these SNs with `Accept: application/x-ndjson`.
    pub async fn post_ndjson(&self, sns: &[&str]) -> reqwest::Response {
        self.client
            .post(self.url("/v1/discounts/lookup"))
            .header("accept", "application/x-ndjson")
            .json(&serde_json::json!({ "sns": sns }))
            .send()
            .await
            .unwrap()
    }

    /// Redis commands that failed or timed out (not those skipped by the breaker), from
    /// `discount_proxy_redis_commands_total`.
    pub fn redis_failures(&self) -> u64 {
        self.sum_of(
            "discount_proxy_redis_commands_total{",
            &["error", "timeout"],
        )
    }

    /// Upstream requests that failed or timed out, from
    /// `discount_proxy_upstream_requests_total`.
    pub fn upstream_failures(&self) -> u64 {
        self.sum_of(
            "discount_proxy_upstream_requests_total{",
            &["error", "timeout"],
        )
    }

    /// The sum of the samples of a family whose `outcome` is one of `outcomes`.
    fn sum_of(&self, family: &str, outcomes: &[&str]) -> u64 {
        self.state
            .metrics
            .encode()
            .lines()
            .filter(|line| line.starts_with(family))
            .filter(|line| {
                outcomes
                    .iter()
                    .any(|outcome| line.contains(&format!("outcome=\"{outcome}\"")))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

pub fn results(body: &Value) -> &Vec<Value> {
    body["results"].as_array().expect("results is an array")
}

/// `second` copies `sn` into its in-process tier; a `DELETE` on `first` must then reach it
/// and drop that copy, so `second` asks its upstream again instead of answering from memory.
/// Both must follow the invalidation channel already (see [`following_invalidations`]).
pub async fn delete_drops_the_copy(first: &TestApp, second: &TestApp, sn: &str, wait: Duration) {
    const LOCAL_HITS: &str = r#"discount_proxy_local_cache_lookups_total{result="hit"}"#;
    let source = |body: Value| body["results"][0]["source"].clone();
    assert_eq!(source(second.lookup(&[sn]).await), "upstream");
    let hits = second.metric(LOCAL_HITS);
    assert_eq!(source(second.lookup(&[sn]).await), "cache");
    assert_eq!(
        second.metric(LOCAL_HITS),
        hits + 1.0,
        "the second lookup was answered from the copy"
    );
    delete_reaches(first, second, sn, wait).await;
    assert_eq!(second.upstream.calls(sn), 2);
}

/// One sample (`name{labels}` as exposed) of a metrics text, 0 when it is not there.
pub fn sample_in(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits, up to `wait`, until `app` follows the invalidation channel (its subscription is
/// up), so an invalidation sent from now on reaches its in-process tier.
pub async fn following_invalidations(app: &TestApp, wait: Duration) {
    super::wait_until(
        "the instance follows the invalidation channel",
        wait,
        || async { app.metric("discount_proxy_invalidation_channel_up") == 1.0 },
    )
    .await;
}

/// `DELETE`s `sn` on `first` and waits, up to `wait`, for the invalidation to reach
/// `second`'s in-process tier (its received count grows); then `second` looks `sn` up again
/// and must fetch it from its upstream, its copy gone.
pub async fn delete_reaches(first: &TestApp, second: &TestApp, sn: &str, wait: Duration) {
    const RECEIVED: &str = r#"discount_proxy_invalidation_messages_total{event="received"}"#;
    let received = second.metric(RECEIVED);
    let path = format!("/v1/discounts/{sn}");
    assert_eq!(first.delete(&path).await.status(), 204);
    super::wait_until(
        "the invalidation reaches the other instance",
        wait,
        || async { second.metric(RECEIVED) > received },
    )
    .await;
    let again = second.lookup(&[sn]).await;
    assert_eq!(results(&again)[0]["source"], "upstream", "{again}");
}
