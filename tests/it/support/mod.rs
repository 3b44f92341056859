//! Test support: a real Redis (standalone, cluster or sentinel set, plain or over TLS with ACL
//! users), a stub upstream, a fault-injecting TCP proxy, the proxy under test, and waiting on
//! conditions.

mod app;
mod cluster;
mod cluster_data;
mod cluster_view;
mod entries;
mod faulty;
mod node;
mod process;
mod redis;
mod sentinel;
mod shared;
mod tls;
mod upstream;

pub use self::app::{TestApp, delete_drops_the_copy, following_invalidations, results, sample_in};
pub use self::cluster::RedisCluster;
pub use self::cluster_data::Ttl;
pub use self::cluster_view::{ClusterNode, Role, SLOTS};
pub use self::entries::{fresh_header, seed_found, seed_not_found, seed_raw};
pub use self::faulty::{Fault, FaultProxy};
pub use self::node::temp_dir;
pub use self::process::{Finished, Process, run_to_end};
pub use self::redis::RedisServer;
pub use self::sentinel::SentinelSet;
pub use self::shared::Shared;
pub use self::tls::{PROXY_PASSWORD, PROXY_USER, with_user};
pub use self::upstream::{Reply, StubUpstream};

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// `<prefix>-<i>` for each `i` of `range`: distinct SNs for a test.
pub fn sns(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

/// Polls `condition` until it holds, failing the test with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Installs a log subscriber when `TEST_LOG` is set; tests are silent otherwise.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".to_owned()),
                ))
                .with_test_writer()
                .try_init();
        }
    });
}

/// An HTTP client for talking to the proxy. reqwest is built without a default TLS crypto
/// provider (see `upstream.rs`), so one is installed first.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// `GET url`, any status, the body as JSON.
pub async fn get_json(url: &str) -> serde_json::Value {
    json_of(http_client().get(url)).await
}

/// `POST url` with a JSON body, any status, the answer as JSON.
pub async fn post_json(url: &str, body: &serde_json::Value) -> serde_json::Value {
    json_of(http_client().post(url).json(body)).await
}

async fn json_of(request: reqwest::RequestBuilder) -> serde_json::Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// A port on 127.0.0.1 that refuses connections for as long as the returned socket lives:
/// bound, so no other test can take it, but not listening. What [`free_port`] gives may be
/// taken by another test's server before it is used, so a "nothing there" test needs this.
pub fn refusing_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// A free TCP port on 127.0.0.1 (free now; the caller binds it right away).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
