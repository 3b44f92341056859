//! Clients that hold sockets without using them: sockets that send nothing or half a request
//! head, more connections than `server.max_connections`, and clients that stop reading their
//! responses. None of them may keep a well-behaved client from being served.

use crate::support::{TestApp, seed_found, wait_until};
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Opens `count` connections that each send `prefix` (possibly nothing) and then nothing more.
async fn silent_sockets(app: &TestApp, count: usize, prefix: &[u8]) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let mut socket = TcpStream::connect(app.addr).await.unwrap();
        if !prefix.is_empty() {
            socket.write_all(prefix).await.unwrap();
        }
        sockets.push(socket);
    }
    sockets
}

/// Waits until the server closes `socket` (end of stream or reset), failing after `within`.
async fn closed_by_server(mut socket: TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A `408`-like answer before closing is fine: keep reading to the close.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn thousands_of_idle_or_half_sent_sockets_are_closed_within_the_header_timeout() {
    let header_timeout = Duration::from_secs(1);
    let app =
        TestApp::spawn_with(|config| config.server.header_read_timeout = header_timeout).await;
    let mut sockets = silent_sockets(&app, 1000, b"").await;
    // Half of the HTTP/2 preface: a protocol sniffer waits for the rest forever.
    sockets.extend(silent_sockets(&app, 500, b"PRI * HTTP/2.0\r\n").await);
    sockets.extend(silent_sockets(&app, 500, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await);
    let opened = Instant::now();

    assert_eq!(app.get("/healthz").await.status(), 200);
    assert!(
        opened.elapsed() < header_timeout,
        "a client was served only after the idle sockets were gone"
    );
    let closes = sockets
        .into_iter()
        .map(|socket| closed_by_server(socket, header_timeout + Duration::from_secs(3)));
    let closed = futures_util::future::join_all(closes).await;
    let still_open = closed.iter().filter(|closed| !**closed).count();
    assert_eq!(still_open, 0, "sockets left open past the header timeout");
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn connections_past_max_connections_wait_until_idle_ones_are_closed() {
    let app = TestApp::spawn_with(|config| {
        config.server.max_connections = 50;
        config.server.header_read_timeout = Duration::from_millis(500);
    })
    .await;
    let sockets = silent_sockets(&app, 200, b"").await;
    // Served once the idle sockets ahead of it time out, a few rounds of 50 at most.
    let open = app.scraped("discount_proxy_connections_open").await;
    assert!(
        (1.0..=50.0).contains(&open),
        "{open} connections open at once, past max_connections"
    );
    let closes = sockets
        .into_iter()
        .map(|socket| closed_by_server(socket, Duration::from_secs(10)));
    let closed = futures_util::future::join_all(closes).await;
    assert!(
        closed.iter().all(|closed| *closed),
        "an idle socket outlived its timeout"
    );
}

/// `count` SNs whose cached discounts are `bytes` long each, so that a response to all of
/// them is far larger than what the kernel buffers between proxy and client can hold.
async fn big_cached_sns(app: &TestApp, count: usize, bytes: usize) -> Vec<String> {
    let blob = "x".repeat(bytes);
    let mut sns = Vec::with_capacity(count);
    for i in 0..count {
        let sn = format!("BIG-{i}");
        seed_found(app, &sn, Duration::ZERO, &json!({ "blob": blob })).await;
        sns.push(sn);
    }
    sns
}

/// Sends a lookup of `sns` on a socket with a tiny receive buffer, and never reads.
async fn stuck_reader(app: &TestApp, sns: &[String], accept: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(app.addr).await.unwrap();
    let body = json!({ "sns": sns }).to_string();
    let head = format!(
        "POST /v1/discounts/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: {accept}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn clients_that_stop_reading_hold_their_slots_only_until_the_write_timeout() {
    let write_timeout = Duration::from_secs(1);
    let app = TestApp::spawn_with(|config| {
        config.server.max_in_flight = 2;
        config.server.write_timeout = write_timeout;
    })
    .await;
    let sns = big_cached_sns(&app, 50, 200_000).await;
    let started = Instant::now();
    let _json = stuck_reader(&app, &sns, "application/json").await;
    let _ndjson = stuck_reader(&app, &sns, "application/x-ndjson").await;

    // Both responses are stuck in the proxy: their slots are taken until written.
    wait_until(
        "both stuck responses hold a slot",
        Duration::from_secs(5),
        || async { app.get("/v1/discounts/BIG-0").await.status() == 503 },
    )
    .await;
    wait_until(
        "a third client is served",
        write_timeout + Duration::from_secs(5),
        || async { app.get("/v1/discounts/BIG-0").await.status() == 200 },
    )
    .await;
    assert!(
        started.elapsed() >= write_timeout,
        "served before the stuck responses timed out"
    );
    wait_until(
        "both stuck responses were abandoned",
        Duration::from_secs(5),
        || async { app.scraped("discount_proxy_write_timeouts_total").await == 2.0 },
    )
    .await;
}

#[tokio::test]
async fn a_response_the_client_stops_reading_is_abandoned_and_its_connection_closed() {
    let write_timeout = Duration::from_millis(500);
    let app = TestApp::spawn_with(|config| config.server.write_timeout = write_timeout).await;
    let sns = big_cached_sns(&app, 50, 200_000).await;
    let mut stuck = stuck_reader(&app, &sns, "application/json").await;
    wait_until(
        "the write timeout fires",
        Duration::from_secs(10),
        || async { app.scraped("discount_proxy_write_timeouts_total").await == 1.0 },
    )
    .await;
    // What the socket buffers held arrives, then the connection ends short of the body.
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stuck.read_to_end(&mut received));
    let _ = read.await.expect("the abandoned connection was closed");
    assert!(
        received.len() < 50 * 200_000,
        "the whole response arrived: {} bytes",
        received.len()
    );
    assert_eq!(app.get("/v1/discounts/BIG-1").await.status(), 200);
}

#[tokio::test]
async fn fetches_an_abandoned_response_started_go_on_and_are_written_back() {
    let app = TestApp::spawn_with(|config| {
        config.server.write_timeout = Duration::from_millis(300);
    })
    .await;
    let mut sns = big_cached_sns(&app, 50, 200_000).await;
    let cold: Vec<String> = (0..5).map(|i| format!("COLD-{i}")).collect();
    sns.extend(cold.iter().cloned());
    // Slower than the write timeout: the fetches are under way when the response is dropped.
    app.upstream.set_latency(Duration::from_secs(1));
    let _stuck = stuck_reader(&app, &sns, "application/x-ndjson").await;
    wait_until(
        "the response is abandoned",
        Duration::from_secs(10),
        || async { app.scraped("discount_proxy_write_timeouts_total").await == 1.0 },
    )
    .await;
    for sn in &cold {
        wait_until(
            "the fetch is written back",
            Duration::from_secs(10),
            || async { app.redis_value(sn).await.is_some() },
        )
        .await;
    }
    assert_eq!(app.upstream.total_calls(), 5);
}
