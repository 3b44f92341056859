//! `server.max_batch` is enforced while the body is parsed: a body of millions of tiny
//! strings is refused with `413 batch_too_large` at the first SN past the bound, without
//! the rest of the body being turned into strings.

use crate::support::TestApp;
use serde_json::Value;

async fn expect_code(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status(), status, "expected {code}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
}

/// `{"sns": [` and `count` SNs, each `sn`, comma-separated, with no end.
fn open_batch(sn: &str, count: usize) -> String {
    let mut body = String::with_capacity(count * (sn.len() + 3) + 16);
    body.push_str("{\"sns\":[");
    for index in 0..count {
        if index > 0 {
            body.push(',');
        }
        body.push('"');
        body.push_str(sn);
        body.push('"');
    }
    body
}

#[tokio::test]
async fn a_batch_past_max_batch_is_refused_before_the_rest_of_the_body_is_parsed() {
    let app = TestApp::spawn_with(|config| config.server.max_batch = 3).await;
    // The fourth SN is past the bound: whatever follows is never looked at.
    let past = format!("{}, this is not JSON", open_batch("C1", 4));
    let response = app
        .post_raw("/v1/discounts/lookup", "application/json", past)
        .await;
    expect_code(response, 413, "batch_too_large").await;
    // Within the bound, the same garbage is still what it is.
    let within = format!("{}, this is not JSON", open_batch("C1", 3));
    let response = app
        .post_raw("/v1/discounts/lookup", "application/json", within)
        .await;
    expect_code(response, 400, "invalid_json").await;
    assert_eq!(app.upstream.total_calls(), 0, "no work for a refused body");
}

#[tokio::test]
async fn a_body_of_a_million_empty_strings_is_batch_too_large_without_reading_them_all() {
    let app = TestApp::spawn().await;
    let max_body = app.config.server.max_body_bytes;
    // `"",` is three bytes: about 1.4 M empty strings fill the default 4 MiB.
    let count = (max_body - 64) / 3;
    let complete = format!("{}]}}", open_batch("", count));
    assert!(complete.len() <= max_body && count > 1_000_000);
    let response = app
        .post_raw("/v1/discounts/lookup", "application/json", complete)
        .await;
    expect_code(response, 413, "batch_too_large").await;
    // Cut short: only a parser that stops at the bound answers 413 here rather than 400.
    let truncated = open_batch("", count);
    let response = app
        .post_raw("/v1/discounts/invalidate", "application/json", truncated)
        .await;
    expect_code(response, 413, "batch_too_large").await;
    assert_eq!(app.upstream.total_calls(), 0, "no work for a refused body");
}
