//! SNs that always fail are that SNs' problem: they never open the upstream's circuit for
//! everyone, while an upstream that fails as a whole still opens it (issue 10, point 5).

use crate::support::{Reply, TestApp, results, sns};
use serde_json::Value;

/// The default circuit (20 failures in a row, or half of at least 50 calls in 10 s).
async fn app_with_default_circuit() -> TestApp {
    TestApp::spawn_with(|_| {}).await
}

async fn codes(app: &TestApp, sns: &[String]) -> Vec<String> {
    let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
    let body = app.lookup(&sns).await;
    results(&body)
        .iter()
        .map(|item| match item["error"]["code"].as_str() {
            Some(code) => code.to_owned(),
            None => item["status"].as_str().unwrap().to_owned(),
        })
        .collect()
}

fn count(codes: &[String], code: &str) -> usize {
    codes.iter().filter(|c| *c == code).count()
}

async fn circuit(app: &TestApp) -> Value {
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    ready["upstream_circuit"].clone()
}

/// 30 SNs the upstream always fails, first seen amid healthy traffic: two healthy SNs for
/// each failing one, so the upstream as a whole is fine.
async fn introduce_failing_sns(app: &TestApp) -> Vec<String> {
    let failing = sns("BROKEN", 0..30);
    for sn in &failing {
        app.upstream.reply(sn, Reply::Status(503, "{}"));
    }
    let healthy = sns("WARM", 0..60);
    let mut mixed = Vec::new();
    for (pair, bad) in healthy.chunks(2).zip(&failing) {
        mixed.extend_from_slice(pair);
        mixed.push(bad.clone());
    }
    let codes = codes(app, &mixed).await;
    assert_eq!(
        (count(&codes, "ok"), count(&codes, "upstream_error")),
        (60, 30),
        "{codes:?}"
    );
    assert_eq!(circuit(app).await, "closed");
    failing
}

#[tokio::test]
async fn sns_that_keep_failing_do_not_make_healthy_sns_upstream_unavailable() {
    let app = app_with_default_circuit().await;
    let failing = introduce_failing_sns(&app).await;

    // Clients retry their failed SNs: each lookup fetches them again, and they fail again.
    for round in 0..5 {
        let codes = codes(&app, &failing).await;
        assert_eq!(
            count(&codes, "upstream_error"),
            30,
            "round {round}: {codes:?}"
        );
        assert_eq!(circuit(&app).await, "closed", "round {round}");
    }
    assert_eq!(
        app.upstream.calls("BROKEN-0"),
        6,
        "each lookup asked the upstream"
    );

    let calls = app.upstream.total_calls();
    let fresh = sns("FRESH", 0..5);
    assert_eq!(codes(&app, &fresh).await, vec!["ok"; 5]);
    assert_eq!(app.upstream.total_calls(), calls + 5);
}

#[tokio::test]
async fn an_upstream_failing_for_every_sn_still_opens_the_circuit_when_some_sns_always_fail() {
    let app = app_with_default_circuit().await;
    let failing = introduce_failing_sns(&app).await;
    codes(&app, &failing).await;

    // A real outage: every SN fails now. At most 20 failures of distinct SNs open it.
    app.upstream
        .set_default_reply(Some(Reply::Status(500, "{}")));
    for sn in sns("OUTAGE", 0..20) {
        assert_eq!(codes(&app, &[sn]).await, ["upstream_error"]);
        if circuit(&app).await == "open" {
            break;
        }
    }
    assert_eq!(circuit(&app).await, "open");
    let calls = app.upstream.total_calls();
    assert_eq!(
        codes(&app, &sns("AFTER", 0..5)).await,
        vec!["upstream_unavailable"; 5]
    );
    assert_eq!(
        app.upstream.total_calls(),
        calls,
        "an open circuit makes no calls"
    );
}
