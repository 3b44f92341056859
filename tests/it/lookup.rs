//! The read-through batch lookup: order, dedup, one fetch per miss, write-back with TTLs.

use crate::support::{StubUpstream, TestApp, results};
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn results_come_back_in_request_order_with_duplicates_repeated() {
    let app = TestApp::spawn().await;
    app.upstream
        .reply("NOPE-1", crate::support::Reply::Status(404, "{}"));
    let body = app.lookup(&["C2", "C1", "C2", "NOPE-1", "C1"]).await;
    let items = results(&body);
    let sns: Vec<&str> = items
        .iter()
        .map(|item| item["sn"].as_str().unwrap())
        .collect();
    assert_eq!(sns, ["C2", "C1", "C2", "NOPE-1", "C1"]);
    assert_eq!(
        items[0],
        json!({"sn": "C2", "status": "ok", "source": "upstream", "discount": StubUpstream::discount_for("C2")})
    );
    assert_eq!(items[2], items[0]);
    assert_eq!(
        items[3],
        json!({"sn": "NOPE-1", "status": "not_found", "source": "upstream"})
    );
    let summary = &body["summary"];
    assert_eq!(summary["requested"], 5);
    assert_eq!(summary["unique"], 3);
    assert_eq!(summary["upstream_fetches"], 3);
    assert_eq!(summary["cache_hits"], 0);
    assert_eq!(summary["not_found"], 1);
    assert_eq!(summary["errors"], 0);
    assert!(summary["elapsed_ms"].is_u64());
}

#[tokio::test]
async fn each_distinct_miss_is_fetched_once_and_written_back_with_a_jittered_ttl() {
    let app = TestApp::spawn_with(|config| {
        config.cache.ttl = Duration::from_secs(100);
        config.cache.stale_ttl = Duration::from_secs(50);
    })
    .await;
    let sns: Vec<String> = (0..50).map(|i| format!("C-{i}")).collect();
    let mut requested: Vec<&str> = sns.iter().map(String::as_str).collect();
    requested.extend(sns.iter().map(String::as_str)); // every SN twice
    let sent = std::time::Instant::now();
    let body = app.lookup(&requested).await;
    assert_eq!(results(&body).len(), 100);
    assert_eq!(app.upstream.total_calls(), 50);
    let mut pttls = Vec::new();
    for sn in &sns {
        assert_eq!(app.upstream.calls(sn), 1, "{sn}");
        let pttl = app.pttl(sn).await;
        // Fresh 100 s + stale 50 s, plus up to 10% jitter, less the time since it was sent.
        let lowest = 150_000 - i64::try_from(sent.elapsed().as_millis()).unwrap();
        assert!((lowest..=165_000).contains(&pttl), "{sn}: PTTL {pttl}");
        pttls.push(pttl);
    }
    // 50 keys written together: with jitter their TTLs spread over most of 15 s.
    let spread = pttls.iter().max().unwrap() - pttls.iter().min().unwrap();
    assert!(spread > 5_000, "TTLs are jittered, spread {spread} ms");
}

#[tokio::test]
async fn a_second_lookup_is_served_from_the_cache_without_upstream_calls() {
    let app = TestApp::spawn().await;
    let first = app.lookup(&["A", "B", "C"]).await;
    assert_eq!(app.upstream.total_calls(), 3);
    let second = app.lookup(&["C", "A", "B"]).await;
    assert_eq!(
        app.upstream.total_calls(),
        3,
        "no upstream call for cached SNs"
    );
    assert_eq!(
        app.upstream.authorizations(),
        [None, None, None],
        "no token configured, none sent"
    );
    assert_eq!(second["summary"]["cache_hits"], 3);
    assert_eq!(second["summary"]["upstream_fetches"], 0);
    for item in results(&second) {
        assert_eq!(item["source"], "cache");
        let sn = item["sn"].as_str().unwrap();
        assert_eq!(
            item["discount"],
            StubUpstream::discount_for(sn),
            "the value belongs to {sn}"
        );
        let original = results(&first).iter().find(|i| i["sn"] == sn).unwrap();
        assert_eq!(item["discount"], original["discount"]);
    }
}

#[tokio::test]
async fn a_cached_discount_is_returned_byte_for_byte() {
    let app = TestApp::spawn().await;
    // Key order and spacing that a re-serialisation would change.
    app.upstream.reply(
        "ODD",
        crate::support::Reply::Status(200, r#"{"z": 1, "a": [1.50, "x"]}"#),
    );
    app.lookup(&["ODD"]).await;
    let text = app
        .post_json("/v1/discounts/lookup", &json!({"sns": ["ODD"]}))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#""discount":{"z": 1, "a": [1.50, "x"]}"#),
        "{text}"
    );
    assert!(text.contains(r#""source":"cache""#), "{text}");
}

#[tokio::test]
async fn a_multi_line_discount_keeps_its_spelling_on_one_line() {
    let app = TestApp::spawn().await;
    let pretty =
        "{\r\n  \"z\": 1.50,\n  \"big\": 12345678901234567890123,\n  \"s\": \"a\\nb\"\n}\n";
    app.upstream
        .reply("PRETTY", crate::support::Reply::Status(200, pretty));
    let expected = r#""discount":{  "z": 1.50,  "big": 12345678901234567890123,  "s": "a\nb"}"#;
    for source in ["upstream", "cache"] {
        let text = app
            .post_json("/v1/discounts/lookup", &json!({"sns": ["PRETTY"]}))
            .await
            .text()
            .await
            .unwrap();
        assert!(text.contains(expected), "{source}: {text}");
        assert!(text.contains(&format!(r#""source":"{source}""#)), "{text}");
    }
}

#[tokio::test]
async fn not_found_is_cached_as_a_negative_entry_with_its_own_ttl() {
    let app =
        TestApp::spawn_with(|config| config.cache.negative_ttl = Duration::from_secs(20)).await;
    app.upstream.reply(
        "GONE",
        crate::support::Reply::Status(404, r#"{"detail":"not found"}"#),
    );
    let sent = std::time::Instant::now();
    app.lookup(&["GONE"]).await;
    let pttl = app.pttl("GONE").await;
    // The negative TTL plus up to 10% jitter: no stale period (stale_ttl is 1 h here).
    let lowest = 20_000 - i64::try_from(sent.elapsed().as_millis()).unwrap();
    assert!((lowest..=22_000).contains(&pttl), "negative TTL {pttl}");
    let again = app.lookup(&["GONE"]).await;
    assert_eq!(
        results(&again)[0],
        json!({"sn": "GONE", "status": "not_found", "source": "cache"})
    );
    assert_eq!(app.upstream.calls("GONE"), 1);
}

#[tokio::test]
async fn the_global_upstream_limit_holds_across_concurrent_batches() {
    let app = TestApp::spawn_with(|config| config.upstream.concurrency = 4).await;
    app.upstream.set_latency(Duration::from_millis(30));
    let app = &app;
    let batch = |prefix: &'static str| {
        let sns: Vec<String> = (0..20).map(|i| format!("{prefix}-{i}")).collect();
        async move {
            let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
            app.lookup(&sns).await
        }
    };
    let (a, b, c) = tokio::join!(batch("A"), batch("B"), batch("C"));
    for body in [a, b, c] {
        assert!(results(&body).iter().all(|item| item["status"] == "ok"));
    }
    assert_eq!(app.upstream.total_calls(), 60);
    assert_eq!(
        app.upstream.peak_in_flight(),
        4,
        "the limit is used fully and never exceeded"
    );
}

#[tokio::test]
async fn invalid_sns_come_back_invalid_and_never_reach_redis_or_the_upstream() {
    // Alone: claims and fenced write-backs read the valid SN's lease and fence too, which
    // would blur the count of keys looked up.
    let app = TestApp::spawn_with(|config| config.coalesce.distributed = false).await;
    let long = "x".repeat(129);
    let bad = [
        "",
        long.as_str(),
        "tab\there",
        "with space",
        "a\r\nFLUSHALL",
        "nul\0",
    ];
    let mut redis = app.redis.client().await;
    let misses_before = keyspace_misses(&mut redis).await;
    let mut sns = vec!["GOOD"];
    sns.extend(bad);
    let body = app.lookup(&sns).await;
    let items = results(&body);
    assert_eq!(items[0]["status"], "ok");
    for (item, sn) in items[1..].iter().zip(bad) {
        assert_eq!(item["sn"], sn);
        assert_eq!(item["status"], "invalid");
        assert_eq!(item["error"]["code"], "invalid_sn");
        assert!(
            item["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    assert_eq!(body["summary"]["invalid"], 6);
    assert_eq!(
        app.upstream.total_calls(),
        1,
        "only the valid SN goes upstream"
    );
    assert_eq!(
        keyspace_misses(&mut redis).await - misses_before,
        1,
        "only the valid SN is read"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(keys, [app.key("GOOD")], "only the valid SN is written");
}

async fn keyspace_misses(redis: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(redis)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("keyspace_misses:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn unicode_sns_round_trip_byte_exact() {
    let app = TestApp::spawn().await;
    let sn = "合同-2024/07·优惠";
    let body = app.lookup(&[sn]).await;
    assert_eq!(results(&body)[0]["sn"], sn);
    assert_eq!(
        results(&body)[0]["discount"],
        StubUpstream::discount_for(sn)
    );
    assert_eq!(app.upstream.calls(sn), 1);
    assert!(
        app.redis_value(sn).await.is_some(),
        "the key is the exact UTF-8 bytes"
    );
    let again = app.lookup(&[sn]).await;
    assert_eq!(results(&again)[0]["source"], "cache");
}

#[tokio::test]
async fn a_percent_encoded_path_sn_reaches_the_upstream_encoded() {
    let app = TestApp::spawn().await;
    let sn = "合同/7#x?&y=1+%";
    let path: String = percent_encode(sn);
    let response = app.get(&format!("/v1/discounts/{path}")).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["sn"], sn);
    assert_eq!(app.upstream.calls(sn), 1, "the stub decoded exactly the SN");
    let queries = app.upstream.raw_queries();
    assert_eq!(
        queries,
        [format!("sn={path}")],
        "every reserved byte percent-encoded"
    );
}

/// Calls of one command since the last `CONFIG RESETSTAT`, from `INFO commandstats`.
fn command_calls(stats: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

fn percent_encode(sn: &str) -> String {
    sn.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn single_gets_answer_with_x_cache_miss_then_hit() {
    let app = TestApp::spawn().await;
    let first = app.get("/v1/discounts/C2024-0001").await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-cache"], "MISS");
    assert_eq!(first.headers()["content-type"], "application/json");
    let body: Value = first.json().await.unwrap();
    assert_eq!(
        body,
        json!({"sn": "C2024-0001", "status": "ok", "source": "upstream", "discount": StubUpstream::discount_for("C2024-0001")})
    );
    let second = app.get("/v1/discounts/C2024-0001").await;
    assert_eq!(second.headers()["x-cache"], "HIT");
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["source"], "cache");
    assert_eq!(app.upstream.total_calls(), 1);
}

#[tokio::test]
async fn a_single_get_of_an_unknown_sn_is_404_with_x_cache() {
    let app = TestApp::spawn().await;
    app.upstream
        .reply("NF-1", crate::support::Reply::Status(404, "{}"));
    let first = app.get("/v1/discounts/NF-1").await;
    assert_eq!(first.status(), 404);
    assert_eq!(first.headers()["x-cache"], "MISS");
    assert_eq!(first.headers()["content-type"], "application/json");
    assert_eq!(
        first.json::<Value>().await.unwrap(),
        json!({"sn": "NF-1", "status": "not_found", "source": "upstream",
               "error": {"code": "not_found", "message": "no discount exists for this SN"}})
    );
    let second = app.get("/v1/discounts/NF-1").await;
    assert_eq!(second.status(), 404);
    assert_eq!(second.headers()["x-cache"], "HIT");
    let body: Value = second.json().await.unwrap();
    assert_eq!(
        (body["source"].as_str(), body["error"]["code"].as_str()),
        (Some("cache"), Some("not_found"))
    );
}

#[tokio::test]
async fn refresh_skips_the_cache_and_overwrites_the_entry() {
    let app = TestApp::spawn().await;
    app.lookup(&["R1"]).await;
    app.upstream.reply(
        "R1",
        crate::support::Reply::Status(200, r#"{"ratio":"0.99"}"#),
    );
    let cached = app.lookup(&["R1"]).await;
    assert_eq!(results(&cached)[0]["source"], "cache");
    let refreshed = app
        .lookup_at("/v1/discounts/lookup?refresh=true", &["R1"])
        .await;
    assert_eq!(results(&refreshed)[0]["source"], "upstream");
    assert_eq!(results(&refreshed)[0]["discount"], json!({"ratio": "0.99"}));
    let response = app.get("/v1/discounts/R1?refresh=true").await;
    assert_eq!(response.headers()["x-cache"], "MISS");
    assert_eq!(app.upstream.calls("R1"), 3);
    let after = app.lookup(&["R1"]).await;
    assert_eq!(
        results(&after)[0]["discount"],
        json!({"ratio": "0.99"}),
        "the refresh was written back"
    );
}

#[tokio::test]
async fn a_foreign_value_under_our_key_is_refetched_and_overwritten() {
    let app = TestApp::spawn().await;
    let mut redis = app.redis.client().await;
    let _: () = redis::cmd("SET")
        .arg(app.key("X1"))
        .arg("not-an-entry")
        .query_async(&mut redis)
        .await
        .unwrap();
    let body = app.lookup(&["X1"]).await;
    assert_eq!(results(&body)[0]["source"], "upstream");
    assert_eq!(
        results(&body)[0]["discount"],
        StubUpstream::discount_for("X1")
    );
    let stored = app.redis_value("X1").await.unwrap();
    assert!(
        stored.starts_with(b"dp1+"),
        "overwritten with a proper entry"
    );
    assert!(app.pttl("X1").await > 0);
}

#[tokio::test]
async fn batches_larger_than_one_redis_chunk_are_read_and_written_whole() {
    let app = TestApp::spawn_with(|config| {
        config.redis.chunk_size = 100;
        config.upstream.concurrency = 64;
    })
    .await;
    let sns: Vec<String> = (0..1_050).map(|i| format!("BIG-{i:04}")).collect();
    let requested: Vec<&str> = sns.iter().map(String::as_str).collect();
    let first = app.lookup(&requested).await;
    assert_eq!(first["summary"]["upstream_fetches"], 1_050);
    let mut redis = app.redis.client().await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut redis)
        .await
        .unwrap();
    let second = app.lookup(&requested).await;
    assert_eq!(second["summary"]["cache_hits"], 1_050);
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis)
        .await
        .unwrap();
    let mget_calls = command_calls(&stats, "mget");
    assert_eq!(
        mget_calls, 11,
        "1,050 keys in MGETs of at most 100: {stats}"
    );
    assert_eq!(
        command_calls(&stats, "get"),
        0,
        "no single-key reads: {stats}"
    );
    for (item, sn) in results(&second).iter().zip(&sns) {
        assert_eq!(item["sn"], sn.as_str());
        assert_eq!(
            item["discount"],
            StubUpstream::discount_for(sn),
            "no value of another SN"
        );
    }
    assert_eq!(app.upstream.total_calls(), 1_050);
}

#[tokio::test]
async fn the_write_back_is_in_redis_when_the_response_arrives() {
    let app = TestApp::spawn().await;
    app.lookup(&["W1", "W2"]).await;
    // No waiting: the response is sent only after the write-back.
    assert!(app.redis_value("W1").await.is_some());
    assert!(app.redis_value("W2").await.is_some());
}

#[tokio::test]
async fn a_client_that_disconnects_mid_batch_does_not_cancel_the_write_back() {
    let app = TestApp::spawn().await;
    app.upstream.hold();
    let lookup = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/v1/discounts/lookup");
        async move {
            client
                .post(url)
                .json(&json!({"sns": ["Q1", "Q2"]}))
                .send()
                .await
        }
    });
    crate::support::wait_until(
        "the batch is at the upstream",
        Duration::from_secs(5),
        || async { app.upstream.in_flight() == 2 },
    )
    .await;
    lookup.abort(); // the client goes away
    let _ = lookup.await;
    app.upstream.release();
    crate::support::wait_until(
        "both SNs are written back",
        Duration::from_secs(5),
        || async { app.redis_value("Q1").await.is_some() && app.redis_value("Q2").await.is_some() },
    )
    .await;
    let body = app.lookup(&["Q1", "Q2"]).await;
    assert_eq!(body["summary"]["cache_hits"], 2);
    assert_eq!(app.upstream.total_calls(), 2);
}
