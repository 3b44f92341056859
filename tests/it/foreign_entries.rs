//! Values under our keys that we did not write: never spliced into a response, never kept in
//! the in-process tier; a miss, fetched once and overwritten with a proper entry.

use crate::support::{Reply, StubUpstream, TestApp, fresh_header, results, seed_raw, wait_until};
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// In our format, but its JSON runs over three lines, the last one an item of its own.
fn line_breaking_value() -> String {
    format!(
        "{}{{\"ratio\":\n\"0.99\"}}\n{{\"sn\":\"INJECTED\",\"status\":\"ok\"}}",
        fresh_header()
    )
}

async fn ndjson_lookup(app: &TestApp, sns: &[&str]) -> Vec<Value> {
    let response = app.post_ndjson(sns).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    text.lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("a line that is not JSON ({err}): {line:?}\n{text}"))
        })
        .collect()
}

#[tokio::test]
async fn a_cached_value_whose_json_breaks_lines_is_refetched_and_never_splits_ndjson() {
    let app = TestApp::spawn().await;
    seed_raw(&app, "C7", line_breaking_value()).await;
    let lines = ndjson_lookup(&app, &["C7", "C8"]).await;
    assert_eq!(lines.len(), 3, "two items and the summary: {lines:?}");
    let c7 = lines.iter().find(|line| line["sn"] == "C7").unwrap();
    assert_eq!(c7["source"], "upstream", "{c7}");
    assert_eq!(c7["discount"], StubUpstream::discount_for("C7"));
    assert!(lines.iter().all(|line| line["sn"] != "INJECTED"));
    assert_eq!(app.upstream.calls("C7"), 1);
    wait_until("the value is overwritten with our entry", WAIT, || async {
        app.redis_value("C7")
            .await
            .is_some_and(|value| value.starts_with(b"dp1+") && !value.contains(&b'\n'))
    })
    .await;
    let again = app.lookup(&["C7"]).await;
    assert_eq!(results(&again)[0]["source"], "cache");
    assert_eq!(app.upstream.calls("C7"), 1, "the proper entry is a hit");
    assert_eq!(
        app.scraped("discount_proxy_cache_entries_rejected_total")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_value_we_did_not_write_is_never_kept_in_the_in_process_tier() {
    let app = TestApp::spawn_with(|config| config.cache.local.enabled = true).await;
    // The upstream fails, so no write-back replaces what the tier may have copied.
    app.upstream.reply("C9", Reply::Status(500, "down"));
    seed_raw(&app, "C9", line_breaking_value()).await;
    let lines = ndjson_lookup(&app, &["C9"]).await;
    assert_eq!(lines[0]["status"], "error", "{lines:?}");
    assert_eq!(
        app.scraped("discount_proxy_local_cache_bytes").await,
        0.0,
        "the in-process tier holds nothing"
    );
}
