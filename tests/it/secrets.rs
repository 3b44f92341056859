//! Secrets never reach the logs, even at `RUST_LOG=trace`: not the Redis password, not the
//! query values of `upstream.url` (an API key there is common), not the tokens.

use crate::support::{Process, RedisServer, StubUpstream, http_client};
use serde_json::json;
use std::time::Duration;

const REDIS_PASSWORD: &str = "SEKRET-redis-pw";
const API_KEY: &str = "SEKRET-api-key";
const UPSTREAM_TOKEN: &str = "SEKRET-upstream-token";
const CLIENT_TOKEN: &str = "SEKRET-client-token";
const WRONG_TOKEN: &str = "SEKRET-wrong-token";

#[tokio::test]
async fn no_secret_appears_in_the_output_at_trace_level_and_query_values_show_as_stars() {
    let redis = RedisServer::start();
    let acl = format!(">{REDIS_PASSWORD}");
    redis
        .command(&["ACL", "SETUSER", "proxy", "on", &acl, "~*", "&*", "+@all"])
        .await;
    let redis_url = redis
        .url()
        .replace("redis://", &format!("redis://proxy:{REDIS_PASSWORD}@"));
    let upstream = StubUpstream::start().await;
    let upstream_url = format!("{}&api_key={API_KEY}", upstream.url_template());
    let mut proxy = Process::spawn(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            &redis_url,
            "--upstream-url",
            &upstream_url,
        ],
        &[
            ("RUST_LOG", "trace"),
            ("DISCOUNT_PROXY_UPSTREAM__TOKEN", UPSTREAM_TOKEN),
            ("DISCOUNT_PROXY_SERVER__API_TOKENS", CLIENT_TOKEN),
        ],
    );
    let base = format!("http://{}", proxy.listening_addr().await);
    let client = http_client();
    let lookup = |token: &'static str| {
        client
            .post(format!("{base}/v1/discounts/lookup"))
            .bearer_auth(token)
            .json(&json!({"sns": ["C1", "C2"]}))
            .send()
    };
    assert_eq!(lookup(WRONG_TOKEN).await.unwrap().status(), 401);
    // A miss (upstream call, write-back), then a hit (Redis read).
    for _ in 0..2 {
        assert_eq!(lookup(CLIENT_TOKEN).await.unwrap().status(), 200);
    }
    assert_eq!(upstream.calls("C1"), 1, "the second lookup was a hit");
    assert!(
        upstream
            .raw_queries()
            .iter()
            .all(|query| query.contains(API_KEY)),
        "the key still reaches the upstream"
    );
    proxy.signal("TERM");
    assert!(proxy.wait(Duration::from_secs(20)).await.success());
    let output = proxy.output();
    assert!(
        output.contains(" TRACE "),
        "logging at trace level: {output}"
    );
    for secret in [
        REDIS_PASSWORD,
        API_KEY,
        UPSTREAM_TOKEN,
        CLIENT_TOKEN,
        WRONG_TOKEN,
    ] {
        assert!(
            !output.contains(secret),
            "{secret} is in the output:\n{output}"
        );
    }
    assert!(output.contains("api_key=***"), "{output}");
    assert!(output.contains("sn={sn}"), "{output}");
}
