//! A hung Redis under many concurrent operations: every read, write-back, delete and
//! readiness probe is bounded by `redis.timeout`, the wait for a connection included, with
//! the breaker off so nothing but the bound itself is tested.

use crate::support::{TestApp, wait_until};
use futures_util::future::join_all;
use std::time::Duration;
use tokio::time::Instant;

const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// What one operation may take on a hung Redis: its timeout, and scheduling slack for a
/// test binary running many tests on two cores.
const BOUND: Duration = Duration::from_millis(1250);

async fn hung_redis_without_breaker() -> TestApp {
    let app = TestApp::spawn_with(|config| {
        config.redis.timeout = REDIS_TIMEOUT;
        config.redis.breaker_failures = 0;
        config.redis.pool_size = 1;
    })
    .await;
    app.redis.signal("STOP");
    // The shared connection hangs with Redis: the first command to time out discards it, so
    // every operation below has to wait for a new connect.
    assert_eq!(app.delete("/v1/discounts/FIRST").await.status(), 503);
    app
}

#[tokio::test]
async fn fifty_concurrent_deletes_on_a_hung_redis_each_end_within_the_redis_timeout() {
    let app = hung_redis_without_breaker().await;
    let app = &app;
    let deletes = (0..50).map(|i| async move {
        let started = Instant::now();
        let status = app.delete(&format!("/v1/discounts/D{i}")).await.status();
        (status, started.elapsed())
    });
    let answers = join_all(deletes).await;
    app.redis.signal("CONT");
    assert!(
        answers.iter().all(|(status, _)| *status == 503),
        "{answers:?}"
    );
    let slowest = answers.iter().map(|(_, took)| *took).max().unwrap();
    assert!(slowest < BOUND, "the slowest DELETE took {slowest:?}");
}

#[tokio::test]
async fn fifty_concurrent_cold_gets_on_a_hung_redis_are_answered_and_their_write_backs_end() {
    let app = hung_redis_without_breaker().await;
    let app_ref = &app;
    let lookups = (0..50).map(|i| async move {
        let started = Instant::now();
        let status = app_ref.get(&format!("/v1/discounts/W{i}")).await.status();
        (status, started.elapsed())
    });
    let started = Instant::now();
    let answers = join_all(lookups).await;
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    let slowest = answers.iter().map(|(_, took)| *took).max().unwrap();
    assert!(slowest < BOUND, "the slowest GET took {slowest:?}");
    // Each write-back is one more bounded operation after its answer.
    wait_until("every write-back has failed", 2 * BOUND, || async {
        app.metric(r#"discount_proxy_write_backs_total{outcome="failed"}"#) >= 50.0
    })
    .await;
    assert!(
        started.elapsed() < 2 * BOUND,
        "write-backs ended {:?} after the lookups began",
        started.elapsed()
    );
    app.redis.signal("CONT");
}

#[tokio::test]
async fn twenty_concurrent_readiness_probes_on_a_hung_redis_each_end_within_the_redis_timeout() {
    let app = hung_redis_without_breaker().await;
    let app = &app;
    let probes = (0..20).map(|_| async move {
        let started = Instant::now();
        let body: serde_json::Value = app.get("/readyz").await.json().await.unwrap();
        (body["redis"].clone(), started.elapsed())
    });
    let answers = join_all(probes).await;
    app.redis.signal("CONT");
    assert!(
        answers.iter().all(|(redis, _)| redis == "down"),
        "{answers:?}"
    );
    let slowest = answers.iter().map(|(_, took)| *took).max().unwrap();
    assert!(slowest < BOUND, "the slowest /readyz took {slowest:?}");
}

async fn redis_circuit(app: &TestApp) -> String {
    let body: serde_json::Value = app.get("/readyz").await.json().await.unwrap();
    body["redis_circuit"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_redis_that_answers_ping_but_not_writes_keeps_its_circuit_open() {
    let app = TestApp::spawn_with(|config| {
        config.redis.timeout = REDIS_TIMEOUT;
        config.redis.breaker_failures = 1;
        config.redis.breaker_cooldown = Duration::from_millis(200);
    })
    .await;
    // Writes hang, `PING` (and reads) still answer.
    app.redis
        .command(&["CLIENT", "PAUSE", "30000", "WRITE"])
        .await;
    assert_eq!(app.delete("/v1/discounts/P1").await.status(), 503);
    wait_until(
        "the circuit probes again",
        Duration::from_secs(5),
        || async { redis_circuit(&app).await == "half_open" },
    )
    .await;
    // Readiness probes succeed; they must not stand in for the writes that time out.
    for _ in 0..3 {
        assert_eq!(redis_circuit(&app).await, "half_open");
    }
    assert_eq!(app.delete("/v1/discounts/P1").await.status(), 503);
    assert_eq!(redis_circuit(&app).await, "open");
    app.redis.command(&["CLIENT", "UNPAUSE"]).await;
}
