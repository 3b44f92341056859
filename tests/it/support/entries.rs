//! Cache entries written straight into Redis in the proxy's format, as if fetched some time
//! ago: how tests make an entry stale or expired without waiting for its TTL.

use super::TestApp;
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Stores a found entry for `sn` holding `discount`, fetched `age` ago (kept an hour).
pub async fn seed_found(app: &TestApp, sn: &str, age: Duration, discount: &Value) {
    store(app, sn, format!("dp1+{} {discount}", fetched_millis(age))).await;
}

/// Stores a not-found entry for `sn`, fetched `age` ago (kept an hour).
pub async fn seed_not_found(app: &TestApp, sn: &str, age: Duration) {
    store(app, sn, format!("dp1-{} ", fetched_millis(age))).await;
}

/// Stores `value` for `sn` as it is: a value some other writer put under our key.
pub async fn seed_raw(app: &TestApp, sn: &str, value: String) {
    store(app, sn, value).await;
}

/// A found entry's header for an answer fetched now: `dp1+<millis> `.
pub fn fresh_header() -> String {
    format!("dp1+{} ", fetched_millis(Duration::ZERO))
}

fn fetched_millis(age: Duration) -> String {
    let millis = (SystemTime::now() - age)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    format!("{millis:013}")
}

async fn store(app: &TestApp, sn: &str, value: String) {
    let mut redis = app.redis.client().await;
    let _: () = redis::cmd("SET")
        .arg(app.key(sn))
        .arg(value)
        .arg("EX")
        .arg(3600)
        .query_async(&mut redis)
        .await
        .unwrap();
}
