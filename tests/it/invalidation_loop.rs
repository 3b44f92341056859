//! Invalidations are no way around `upstream.max_pending`: a fetch detached by an
//! invalidation counts until it ends (issue 10, point 6).

use crate::support::{TestApp, wait_until};
use serde_json::json;
use std::time::Duration;

const MAX_PENDING: usize = 100;
const ROUNDS: usize = 10;
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn looking_up_and_invalidating_cold_sns_in_a_loop_never_queues_more_than_max_pending() {
    let app = TestApp::spawn_with(|config| {
        config.server.max_batch = MAX_PENDING;
        config.upstream.max_pending = MAX_PENDING;
        config.upstream.concurrency = 4;
    })
    .await;
    app.upstream.hold();
    let mut lookups = Vec::new();
    for round in 0..ROUNDS {
        let sns: Vec<String> = (0..MAX_PENDING)
            .map(|i| format!("LOOP-{round}-{i}"))
            .collect();
        let request = app
            .client
            .post(app.url("/v1/discounts/lookup"))
            .json(&json!({ "sns": sns }))
            .send();
        let lookup = tokio::spawn(request);
        wait_until("the lookup is queued or refused", WAIT, || async {
            lookup.is_finished() || app.state.lookup.pending_fetches() >= MAX_PENDING
        })
        .await;
        lookups.push(lookup);
        let response = app
            .post_json("/v1/discounts/invalidate", &json!({ "sns": sns }))
            .await;
        assert_eq!(response.status(), 200);
        let pending = app.state.lookup.pending_fetches();
        assert!(pending <= MAX_PENDING, "round {round}: {pending} pending");
    }
    let pending_after_loop = app.state.lookup.pending_fetches();

    app.upstream.release();
    let mut statuses = Vec::new();
    for lookup in lookups {
        statuses.push(lookup.await.unwrap().unwrap().status().as_u16());
    }
    wait_until("every fetch has ended", WAIT, || async {
        app.state.lookup.pending_fetches() == 0
    })
    .await;
    let calls = app.upstream.total_calls();
    assert!(
        calls <= MAX_PENDING,
        "{calls} upstream calls for {ROUNDS} rounds with max_pending {MAX_PENDING} \
         (pending_fetches after the loop: {pending_after_loop}, statuses {statuses:?})"
    );
    assert_eq!(
        pending_after_loop, MAX_PENDING,
        "pending_fetches counts the detached fetches still queued"
    );
    assert_eq!(statuses[0], 200);
    assert!(
        statuses[1..].iter().all(|status| *status == 503),
        "the later rounds are refused while the detached fetches are pending: {statuses:?}"
    );
}
