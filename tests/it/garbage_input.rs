//! Random malformed input, from a fixed seed: never a 5xx, never a panic, never a bad cache entry.

use crate::support::TestApp;
use serde_json::Value;

/// A valid batch body with a few bytes changed, dropped or inserted.
fn mutated_body(rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut body = br#"{"sns": ["C2024-0001", "C2024-0002", "NF-1", "\u5408"]}"#.to_vec();
    for _ in 0..rng.usize(1..6) {
        let at = rng.usize(..body.len());
        match rng.u8(..3) {
            0 => body[at] = rng.u8(..),
            1 => {
                body.remove(at);
            }
            _ => body.insert(at, rng.u8(..)),
        }
    }
    body
}

fn random_path_segment(rng: &mut fastrand::Rng) -> String {
    (0..rng.usize(0..40))
        .map(|_| match rng.u8(..4) {
            0 => format!("%{:02X}", rng.u8(..)),
            1 => ["/", "..", "%2F", "?", "#", "%00", "%E5%90"][rng.usize(..7)].to_owned(),
            _ => char::from(rng.u8(b'!'..=b'~')).to_string(),
        })
        .collect()
}

#[tokio::test]
async fn random_bodies_and_paths_get_4xx_or_answers_never_5xx() {
    let app = TestApp::spawn().await;
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for round in 0..300 {
        let (what, response) = match round % 3 {
            0 => {
                let body = mutated_body(&mut rng);
                let what = format!("POST body {:?}", String::from_utf8_lossy(&body));
                (
                    what,
                    app.post_raw("/v1/discounts/lookup", "application/json", body)
                        .await,
                )
            }
            1 => {
                let body: Vec<u8> = (0..rng.usize(0..200)).map(|_| rng.u8(..)).collect();
                let what = format!("POST random bytes {body:?}");
                (
                    what,
                    app.post_raw("/v1/discounts/invalidate", "application/json", body)
                        .await,
                )
            }
            _ => {
                let path = format!("/v1/discounts/{}", random_path_segment(&mut rng));
                let method = ["GET", "DELETE", "PUT"][rng.usize(..3)];
                let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
                let Ok(response) = app
                    .client
                    .request(method.clone(), app.url(&path))
                    .send()
                    .await
                else {
                    continue; // reqwest itself refused to send this URL
                };
                (format!("{method} {path}"), response)
            }
        };
        let status = response.status();
        assert!(status.as_u16() < 500, "{what}: {status}");
        if status != 204 {
            let body: Result<Value, _> = response.json().await;
            assert!(body.is_ok(), "{what}: a JSON body");
        }
    }
    assert_eq!(app.get("/healthz").await.status(), 200);
    // Whatever reached Redis is a well-formed entry (or a claim's lease or an invalidation's
    // fence, see `coalesce.distributed`) with a TTL.
    let mut redis = app.redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis)
        .await
        .unwrap();
    for key in keys {
        let value: Vec<u8> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let companion = ["discount:v1:lease:", "discount:v1:fence:"]
            .iter()
            .any(|kind| key.starts_with(kind));
        assert!(companion || value.starts_with(b"dp1"), "{key}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} has a TTL");
    }
}
