//! Streaming lookups (`Accept: application/x-ndjson`): hits at once, misses as they resolve,
//! the summary last; a client that goes away stops the fetches it had queued.

use crate::support::{StubUpstream, TestApp, wait_until};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// The lines of a streamed response, read one at a time.
struct Lines {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: Vec<u8>,
}

impl Lines {
    fn of(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/x-ndjson");
        Self {
            body: response.bytes_stream().boxed(),
            buffer: Vec::new(),
        }
    }

    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            match self.body.next().await {
                Some(chunk) => self.buffer.extend_from_slice(&chunk.unwrap()),
                None => {
                    assert!(self.buffer.is_empty(), "a line without its newline");
                    return None;
                }
            }
        }
    }
}

async fn stream(app: &TestApp, sns: &[&str]) -> Lines {
    Lines::of(app.post_ndjson(sns).await)
}

#[tokio::test]
async fn hits_come_at_once_misses_as_they_resolve_and_the_summary_last() {
    let app = TestApp::spawn().await;
    app.lookup(&["HIT-1", "HIT-2"]).await;
    app.upstream
        .set_latency_for("SLOW-1", Duration::from_millis(500));
    app.upstream.hold();
    let mut lines = stream(
        &app,
        &["SLOW-1", "HIT-1", "FAST-1", "bad sn", "HIT-2", "HIT-1"],
    )
    .await;
    // What needs no fetch comes first, in request order, while both fetches are held.
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(lines.next().await.unwrap());
    }
    // Held, so not resolved: both reach the upstream (after their claims, when
    // coalesce.distributed asks Redis first) and stay there.
    wait_until("both misses are held at the upstream", WAIT, || async {
        app.upstream.in_flight() == 2
    })
    .await;
    assert_eq!(
        first[0],
        json!({"sn": "HIT-1", "status": "ok", "source": "cache", "discount": StubUpstream::discount_for("HIT-1")})
    );
    assert_eq!(
        (&first[1]["sn"], &first[1]["status"]),
        (&json!("bad sn"), &json!("invalid"))
    );
    assert_eq!(
        (&first[2]["sn"], &first[2]["source"]),
        (&json!("HIT-2"), &json!("cache"))
    );
    app.upstream.release();
    // Then the misses in the order they resolve: the fast one before the slow one.
    let fast = lines.next().await.unwrap();
    let slow = lines.next().await.unwrap();
    assert_eq!(
        (&fast["sn"], &fast["source"]),
        (&json!("FAST-1"), &json!("upstream"))
    );
    assert_eq!(slow["discount"], StubUpstream::discount_for("SLOW-1"));
    let summary = lines.next().await.unwrap();
    assert_eq!(summary["summary"]["requested"], 6);
    assert_eq!(summary["summary"]["unique"], 5);
    assert_eq!(summary["summary"]["cache_hits"], 2);
    assert_eq!(summary["summary"]["upstream_fetches"], 2);
    assert_eq!(summary["summary"]["invalid"], 1);
    assert_eq!(lines.next().await, None);
    // Written back before the summary: the next lookup is all hits.
    let again = app.lookup(&["SLOW-1", "FAST-1"]).await;
    assert_eq!(again["summary"]["cache_hits"], 2);
}

#[tokio::test]
async fn past_the_deadline_the_rest_are_deadline_exceeded_and_still_written_back() {
    let app = TestApp::spawn_with(|config| {
        config.server.request_timeout = Duration::from_millis(800);
        config.upstream.timeout = Duration::from_secs(10);
    })
    .await;
    app.upstream
        .set_latency_for("LATE-1", Duration::from_millis(2000));
    let mut lines = stream(&app, &["LATE-1", "QUICK-1"]).await;
    assert_eq!(lines.next().await.unwrap()["sn"], "QUICK-1");
    let late = lines.next().await.unwrap();
    assert_eq!(late["error"]["code"], "deadline_exceeded", "{late}");
    assert_eq!(lines.next().await.unwrap()["summary"]["errors"], 1);
    assert_eq!(lines.next().await, None);
    wait_until("the late fetch is written back", WAIT, || async {
        app.redis_value("LATE-1").await.is_some()
    })
    .await;
}

#[tokio::test]
async fn a_client_that_goes_away_stops_the_fetches_it_had_queued_but_not_those_under_way() {
    let app = TestApp::spawn_with(|config| config.upstream.concurrency = 2).await;
    app.upstream.hold();
    let sns: Vec<String> = (0..20).map(|i| format!("GONE-{i:02}")).collect();
    let refs: Vec<&str> = sns.iter().map(String::as_str).collect();
    let lines = stream(&app, &refs).await;
    wait_until("two fetches are at the upstream", WAIT, || async {
        app.upstream.in_flight() == 2
    })
    .await;
    drop(lines);
    // The proxy notices the closed connection when it next polls the body; the queued
    // fetches are dropped once a slot frees up.
    app.upstream.release();
    wait_until("nothing is pending any more", WAIT, || async {
        app.state.lookup.pending_fetches() == 0
    })
    .await;
    let called: Vec<&String> = sns.iter().filter(|sn| app.upstream.calls(sn) > 0).collect();
    assert!(
        called.len() < 20,
        "the 18 queued fetches were not all made after the client left"
    );
    for sn in called {
        assert!(
            app.redis_value(sn).await.is_some(),
            "{sn}: fetched, so written back"
        );
    }
}

#[tokio::test]
async fn without_the_ndjson_accept_header_the_answer_is_one_json_document() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .post(app.url("/v1/discounts/lookup"))
        .header("accept", "application/json, text/plain;q=0.5")
        .json(&json!({"sns": ["J-1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["results"][0]["sn"], "J-1");
}

/// Every line of a stream up to the summary, which is returned apart.
async fn all_lines(mut lines: Lines) -> (Vec<Value>, Value) {
    let mut items = Vec::new();
    while let Some(line) = lines.next().await {
        if line.get("summary").is_some() {
            assert!(lines.next().await.is_none(), "a line after the summary");
            return (items, line);
        }
        items.push(line);
    }
    panic!("the stream ended without its summary");
}

#[tokio::test]
async fn a_stream_longer_than_one_window_reports_each_sn_once_with_its_source() {
    let app = TestApp::spawn_with(|config| config.redis.chunk_size = 10).await;
    let cached: Vec<String> = (0..20).map(|i| format!("W-HIT-{i}")).collect();
    let cached: Vec<&str> = cached.iter().map(String::as_str).collect();
    app.lookup(&cached).await;
    let reads_before = app.redis.command_calls("mget").await;
    let mut sns: Vec<String> = Vec::new();
    for i in 0..35 {
        sns.push(match i % 7 {
            0 => format!("W-COLD-{i}"),
            1 => "bad sn".to_owned(),
            _ => format!("W-HIT-{}", i % 20),
        });
    }
    let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
    let (items, summary) = all_lines(stream(&app, &sns).await).await;

    let mut distinct: Vec<&str> = sns.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let mut reported: Vec<&str> = items
        .iter()
        .map(|item| item["sn"].as_str().unwrap())
        .collect();
    reported.sort_unstable();
    assert_eq!(reported, distinct, "each distinct SN exactly once");
    let valid = distinct.iter().filter(|sn| **sn != "bad sn").count();
    assert_eq!(
        app.redis.command_calls("mget").await - reads_before,
        valid.div_ceil(10) as u64,
        "one MGET per window of redis.chunk_size SNs"
    );
    for item in &items {
        let sn = item["sn"].as_str().unwrap();
        match sn {
            "bad sn" => assert_eq!(item["status"], "invalid"),
            _ if sn.starts_with("W-COLD") => assert_eq!(item["source"], "upstream", "{item}"),
            _ => assert_eq!(item["source"], "cache", "{item}"),
        }
        if item["status"] == "ok" {
            assert_eq!(item["discount"], StubUpstream::discount_for(sn));
        }
    }
    assert_eq!(summary["summary"]["requested"], 35);
    assert_eq!(summary["summary"]["unique"], distinct.len());
    let hits = distinct.iter().filter(|sn| sn.starts_with("W-HIT")).count();
    let cold = distinct
        .iter()
        .filter(|sn| sn.starts_with("W-COLD"))
        .count();
    assert_eq!(summary["summary"]["cache_hits"], hits);
    assert_eq!(summary["summary"]["upstream_fetches"], cold);
    assert_eq!(summary["summary"]["invalid"], 1);
}

#[tokio::test]
async fn a_later_window_without_room_under_max_pending_waits_for_it_instead_of_failing() {
    let app = TestApp::spawn_with(|config| {
        config.server.max_batch = 10;
        config.upstream.max_pending = 10;
        config.redis.chunk_size = 4;
    })
    .await;
    app.upstream.hold();
    // Another lookup holds 5 of the 10 pending fetches.
    let other: Vec<String> = (0..5).map(|i| format!("ROOM-OTHER-{i}")).collect();
    let other_lookup = {
        let (client, url) = (app.client.clone(), app.url("/v1/discounts/lookup"));
        tokio::spawn(async move { client.post(url).json(&json!({ "sns": other })).send().await })
    };
    wait_until("the other lookup's fetches are pending", WAIT, || async {
        app.state.lookup.pending_fetches() == 5
    })
    .await;
    let sns: Vec<String> = (0..10).map(|i| format!("ROOM-{i}")).collect();
    let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
    let streamed = tokio::spawn(all_lines(stream(&app, &sns).await));
    // The first window of 4 fits (9 pending); the second would not, so it waits.
    wait_until("the first window's fetches are pending", WAIT, || async {
        app.state.lookup.pending_fetches() == 9
    })
    .await;
    assert!(!streamed.is_finished());
    app.upstream.release();

    let (items, summary) = streamed.await.unwrap();
    assert_eq!(items.len(), 10);
    assert!(items.iter().all(|item| item["status"] == "ok"), "{items:?}");
    assert_eq!(summary["summary"]["upstream_fetches"], 10);
    for sn in &sns {
        assert_eq!(app.upstream.calls(sn), 1, "{sn}");
    }
    assert_eq!(other_lookup.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn at_the_deadline_unread_windows_are_reported_once_each() {
    let app = TestApp::spawn_with(|config| {
        config.upstream.concurrency = 1;
        config.upstream.timeout = Duration::from_secs(60);
        config.redis.chunk_size = 2;
        config.server.request_timeout = Duration::from_secs(1);
    })
    .await;
    app.upstream.hold();
    // One upstream slot: the first window's two fetches are all a stream may wait on, so the
    // later windows are still unread when the deadline passes.
    let sns = ["LATE-1", "LATE-2", "LATE-3", "bad sn", "LATE-4", "LATE-1"];
    let (items, summary) = all_lines(stream(&app, &sns).await).await;
    app.upstream.release();

    let mut reported: Vec<&str> = items
        .iter()
        .map(|item| item["sn"].as_str().unwrap())
        .collect();
    reported.sort_unstable();
    assert_eq!(reported, ["LATE-1", "LATE-2", "LATE-3", "LATE-4", "bad sn"]);
    for item in &items {
        let expected = if item["sn"] == "bad sn" {
            "invalid_sn"
        } else {
            "deadline_exceeded"
        };
        assert_eq!(item["error"]["code"], expected, "{item}");
    }
    assert_eq!(summary["summary"]["errors"], 4);
    assert_eq!(summary["summary"]["invalid"], 1);
    assert_eq!(
        app.upstream.calls("LATE-3"),
        0,
        "an unread window is never fetched"
    );
}
