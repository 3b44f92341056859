//! The binary's life: SIGTERM lets in-flight batches finish and their write-backs land.

use crate::support::{
    Process, RedisServer, StubUpstream, TestApp, results, seed_found, wait_until,
};
use discount_proxy::health::Phase;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn sigterm_during_a_slow_batch_finishes_the_response_and_the_write_back() {
    let redis = RedisServer::start();
    let upstream = StubUpstream::start().await;
    upstream.set_latency(Duration::from_millis(800));
    let mut proxy = Process::spawn(
        &["serve", "--listen", "127.0.0.1:0"],
        &[
            ("DISCOUNT_PROXY_REDIS__URL", &redis.url()),
            ("DISCOUNT_PROXY_UPSTREAM__URL", &upstream.url_template()),
            ("DISCOUNT_PROXY_SERVER__SHUTDOWN_GRACE", "20s"),
        ],
    );
    let addr = proxy.listening_addr().await;
    let client = crate::support::http_client();
    let sns = ["T1", "T2", "T3", "T4", "T5"];
    let lookup = client
        .post(format!("http://{addr}/v1/discounts/lookup"))
        .json(&json!({ "sns": sns }))
        .send();
    let terminate_mid_batch = async {
        wait_until(
            "the batch is at the upstream",
            Duration::from_secs(10),
            || async { upstream.in_flight() == 5 },
        )
        .await;
        proxy.signal("TERM");
    };
    let (response, ()) = tokio::join!(lookup, terminate_mid_batch);
    let response = response.expect("the in-flight request is answered");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(
        results(&body).iter().all(|item| item["status"] == "ok"),
        "{body}"
    );
    let status = proxy.wait(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "exit status {status:?}; output:\n{}",
        proxy.output()
    );
    let mut conn = redis.client().await;
    for sn in sns {
        let key = format!("discount:v1:{sn}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} written back with a TTL before exit");
    }
    assert!(
        proxy.output().contains("shutdown complete"),
        "{}",
        proxy.output()
    );
}

#[tokio::test]
async fn after_sigterm_new_connections_are_refused_while_in_flight_ones_finish() {
    let redis = RedisServer::start();
    let upstream = StubUpstream::start().await;
    let mut proxy = Process::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            &redis.url(),
            "--upstream-url",
            &upstream.url_template(),
        ],
        &[],
    );
    let addr = proxy.listening_addr().await;
    let client = crate::support::http_client();
    let response = client
        .get(format!("http://{addr}/v1/discounts/C1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "plain `discount-proxy` serves, flags override"
    );
    upstream.hold();
    let in_flight = client.get(format!("http://{addr}/v1/discounts/C2")).send();
    let terminate = async {
        wait_until("C2 is at the upstream", Duration::from_secs(5), || async {
            upstream.in_flight() == 1
        })
        .await;
        proxy.signal("TERM");
        proxy
            .wait_for_line("shutting down", Duration::from_secs(5))
            .await;
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(
            refused.is_err(),
            "a new connection while draining was accepted"
        );
        assert!(
            proxy.is_running(),
            "the held request keeps the process draining"
        );
        upstream.release();
    };
    let (response, ()) = tokio::join!(in_flight, terminate);
    assert_eq!(
        response.unwrap().status(),
        200,
        "the in-flight request finishes"
    );
    assert!(proxy.wait(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn draining_turns_unready_at_once_and_still_finishes_in_flight_lookups() {
    let mut app = TestApp::spawn().await;
    assert_eq!(app.state.health.phase(), Phase::Ready);
    app.upstream.hold();
    let lookup = app.lookup(&["G1", "G2"]);
    let drain = async {
        wait_until(
            "the lookup is at the upstream",
            Duration::from_secs(5),
            || async { app.upstream.in_flight() == 2 },
        )
        .await;
        app.begin_shutdown();
        wait_until("draining", Duration::from_secs(5), || async {
            app.state.health.phase() == Phase::Draining
        })
        .await;
        app.upstream.release();
    };
    let (body, ()) = tokio::join!(lookup, drain);
    app.stopped().await;
    assert!(results(&body).iter().all(|item| item["status"] == "ok"));
    assert!(app.redis_value("G1").await.is_some() && app.redis_value("G2").await.is_some());
}

#[tokio::test]
async fn during_the_drain_delay_readyz_is_503_while_lookups_are_still_served() {
    let mut app =
        TestApp::spawn_with(|config| config.server.drain_delay = Duration::from_secs(3)).await;
    app.begin_shutdown();
    wait_until("/readyz answers 503", Duration::from_secs(5), || async {
        app.get("/readyz").await.status() == 503
    })
    .await;
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["status"], "draining");
    // New connections are still accepted and served: the load balancer is moving away.
    let body = app.lookup(&["DRAIN-1"]).await;
    assert_eq!(results(&body)[0]["status"], "ok");
    // Then it stops by itself.
    app.stopped().await;
}

#[tokio::test]
async fn shutdown_waits_for_background_refreshes_to_be_written() {
    let mut app = TestApp::spawn_with(|config| {
        config.cache.ttl = Duration::from_secs(60);
        config.cache.stale_ttl = Duration::from_secs(600);
    })
    .await;
    seed_found(
        &app,
        "REFRESH-1",
        Duration::from_secs(120),
        &json!({"ratio": "old"}),
    )
    .await;
    app.upstream.hold();
    let body = app.lookup(&["REFRESH-1"]).await;
    assert_eq!(results(&body)[0]["source"], "stale");
    wait_until(
        "the refresh is at the upstream",
        Duration::from_secs(5),
        || async { app.upstream.in_flight() == 1 },
    )
    .await;
    app.begin_shutdown();
    wait_until("draining", Duration::from_secs(5), || async {
        app.state.health.phase() == Phase::Draining
    })
    .await;
    app.upstream.release();
    app.stopped().await;
    let stored = app.redis_value("REFRESH-1").await.unwrap();
    assert!(
        !String::from_utf8_lossy(&stored).contains("old"),
        "the refresh was written back before the server stopped"
    );
}
