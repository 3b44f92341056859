//! The command line: bad config stops the start, `simulate-upstream`, `demo`.

use crate::support::{Process, RedisServer, Reply, StubUpstream};
use serde_json::{Value, json};
use std::time::Duration;

/// Runs the binary expecting a config error: non-zero exit, a message naming `key`, and
/// no attempt to bind (the port we hold would make binding fail with another message).
async fn expect_config_error(args: &[&str], envs: &[(&str, &str)], key: &str) {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let mut all_args = vec!["serve", "--listen", listen.as_str()];
    all_args.extend_from_slice(args);
    let mut process = Process::spawn(&all_args, envs);
    let status = process.wait(Duration::from_secs(20)).await;
    let output = process.output();
    assert!(!status.success(), "started despite {key}: {output}");
    assert!(
        output.to_lowercase().contains(&key.to_lowercase()),
        "the message names {key}: {output}"
    );
    assert!(
        !output.contains("could not listen"),
        "failed before binding: {output}"
    );
}

#[tokio::test]
async fn bad_config_stops_the_start_with_a_message_naming_the_key() {
    expect_config_error(
        &[],
        &[("DISCOUNT_PROXY_SERVER__MAX_BATCH", "lots")],
        "max_batch",
    )
    .await;
    expect_config_error(&[], &[("DISCOUNT_PROXY_SERVER__NOPE", "1")], "nope").await;
    expect_config_error(&[], &[("DISCOUNT_PROXY_CACHE__TTL", "forever")], "ttl").await;
    expect_config_error(
        &[],
        &[("DISCOUNT_PROXY_UPSTREAM__URL", "http://x/no-placeholder")],
        "upstream.url",
    )
    .await;
    expect_config_error(
        &[],
        &[("DISCOUNT_PROXY_REDIS__URL", "mysql://x")],
        "redis.url",
    )
    .await;
    expect_config_error(
        &["--config", "does/not/exist.toml"],
        &[],
        "does/not/exist.toml",
    )
    .await;
    let dir = std::env::temp_dir().join(format!("dp-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[upstream]\nconcurency = 4\n").unwrap();
    expect_config_error(&["--config", file.to_str().unwrap()], &[], "concurency").await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn tokens_never_appear_in_the_logs() {
    let redis = RedisServer::start();
    let upstream = StubUpstream::start().await;
    upstream.reply("C1", Reply::Status(500, "{}"));
    let mut proxy = Process::serve(
        &redis.url(),
        &[
            ("RUST_LOG", "trace"),
            ("DISCOUNT_PROXY_UPSTREAM__TOKEN", "tok-upstream-123"),
            ("DISCOUNT_PROXY_SERVER__API_TOKENS", "tok-client-456"),
            ("DISCOUNT_PROXY_UPSTREAM__URL", &upstream.url_template()),
            ("DISCOUNT_PROXY_UPSTREAM__RETRIES", "0"),
        ],
    );
    let addr = proxy.listening_addr().await;
    let client = crate::support::http_client();
    let url = format!("http://{addr}/v1/discounts/C1");
    let response = client
        .get(&url)
        .header("authorization", "Bearer tok-client-456")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        502,
        "the upstream fails, yet the request was authorised"
    );
    assert_eq!(
        upstream.authorizations(),
        [Some("Token tok-upstream-123".to_owned())],
        "the token was sent, so it was there to leak"
    );
    let response = client
        .get(&url)
        .header("authorization", "Bearer tok-wrong-789")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    proxy.signal("TERM");
    proxy.wait(Duration::from_secs(10)).await;
    let output = proxy.output();
    let request_line = output
        .lines()
        .find(|line| line.contains(" request ") && line.contains("status=502"))
        .unwrap_or_else(|| panic!("one log line per request: {output}"));
    for field in [
        "method=GET",
        "path=\"/v1/discounts/C1\"",
        "sns=1",
        "hits=0",
        "misses=1",
        "elapsed=",
    ] {
        assert!(request_line.contains(field), "{field} in {request_line}");
    }
    assert!(
        output.contains("status=401"),
        "rejected requests are logged too: {output}"
    );
    for secret in ["tok-upstream-123", "tok-client-456", "tok-wrong-789"] {
        assert!(!output.contains(secret), "{secret} leaked into the log");
    }
}

#[tokio::test]
async fn simulate_upstream_speaks_the_upstream_contract() {
    let sim = Process::spawn(
        &[
            "simulate-upstream",
            "--listen",
            "127.0.0.1:0",
            "--latency",
            "300ms",
        ],
        &[],
    );
    let listen = sim.listening_addr().await;
    let started = std::time::Instant::now();
    let client = crate::support::http_client();
    let found = client
        .get(format!("http://{listen}/contract/?sn=C2024-0001"))
        .send()
        .await
        .unwrap();
    assert_eq!(found.status(), 200);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "--latency is applied"
    );
    let body: Value = found.json().await.unwrap();
    assert_eq!(body["sn"], "C2024-0001");
    assert!(body["ratio"].is_string());
    let again: Value =
        crate::support::get_json(&format!("http://{listen}/contract/?sn=C2024-0001")).await;
    assert_eq!(again, body, "deterministic per SN");
    let missing = client
        .get(format!("http://{listen}/contract/?sn=NF-0001"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let stats: Value = crate::support::get_json(&format!("http://{listen}/stats")).await;
    assert_eq!(stats, json!({"requests": 3}));
}

#[tokio::test]
async fn demo_without_redis_serves_from_the_in_process_cache() {
    // A port held by a listener that never answers: nothing else can take it meanwhile.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_redis = format!("redis://{}/0", silent.local_addr().unwrap());
    let demo = Process::spawn(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            &dead_redis,
        ],
        &[],
    );
    let addr = demo.listening_addr().await;
    demo.wait_for_line("in-process", Duration::from_secs(5))
        .await;
    demo.wait_for_line("curl", Duration::from_secs(5)).await;
    let output = demo.output();
    let cache_line = output.find("cache: in-process").unwrap();
    assert!(
        cache_line < output.find("curl").unwrap(),
        "the cache is stated first: {output}"
    );
    let url = format!("http://{addr}/v1/discounts/lookup");
    let body = json!({"sns": ["C2024-0001", "NF-1"]});
    let first: Value = crate::support::post_json(&url, &body).await;
    assert_eq!(first["results"][0]["source"], "upstream");
    assert_eq!(first["results"][1]["status"], "not_found");
    let second: Value = crate::support::post_json(&url, &body).await;
    assert_eq!(second["summary"]["cache_hits"], 2);
    let ready: Value = crate::support::get_json(&format!("http://{addr}/readyz")).await;
    assert_eq!(ready["status"], "ok");
    assert_eq!(ready["cache"], "memory");
    assert_eq!(ready["redis"], "unused");
}

#[tokio::test]
async fn demo_with_redis_uses_it_with_the_in_process_tier_when_enabled() {
    let redis = RedisServer::start();
    let demo = Process::spawn(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            &redis.url(),
        ],
        &[("DISCOUNT_PROXY_CACHE__LOCAL__ENABLED", "true")],
    );
    let addr = demo.listening_addr().await;
    demo.wait_for_line("redis answers", Duration::from_secs(5))
        .await;
    demo.wait_for_line("in-process tier in front of redis", Duration::from_secs(5))
        .await;
    let response = crate::support::http_client()
        .get(format!("http://{addr}/v1/discounts/C2024-0001"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut conn = redis.client().await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg("discount:v1:C2024-0001")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 1);
}

#[tokio::test]
async fn json_logs_are_one_json_object_per_line() {
    let redis = RedisServer::start();
    let mut proxy = Process::serve(&redis.url(), &[("DISCOUNT_PROXY_LOG__FORMAT", "json")]);
    let line = proxy
        .wait_for_line("listening", Duration::from_secs(20))
        .await;
    let event: Value = serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line}"));
    assert_eq!(event["fields"]["message"], "listening");
    assert_eq!(event["level"], "INFO");
    let addr = event["fields"]["addr"].as_str().unwrap().to_owned();
    assert_eq!(
        crate::support::get_json(&format!("http://{addr}/healthz")).await["status"],
        "ok"
    );
    proxy.signal("TERM");
    assert!(proxy.wait(Duration::from_secs(10)).await.success());
    for line in proxy.output().lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
}

#[tokio::test]
async fn help_and_version_answer_and_exit_zero() {
    let mut version = Process::spawn(&["--version"], &[]);
    assert!(version.wait(Duration::from_secs(10)).await.success());
    assert_eq!(
        version.output().trim(),
        format!("discount-proxy {}", env!("CARGO_PKG_VERSION"))
    );
    let mut help = Process::spawn(&["--help"], &[]);
    assert!(help.wait(Duration::from_secs(10)).await.success());
    for command in ["serve", "simulate-upstream", "demo", "--config"] {
        assert!(help.output().contains(command), "--help mentions {command}");
    }
}
