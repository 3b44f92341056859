//! Redis is optional at run time: down, dying mid-lookup, hung, silent, slow, resetting.
//! Lookups stay correct and on time, and caching resumes by itself once Redis is back.

use crate::support::{Fault, Reply, StubUpstream, TestApp, results, wait_until};
use discount_proxy::cache::{Entry, EntryKind};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

#[tokio::test]
async fn with_redis_down_from_the_start_lookups_come_from_the_upstream() {
    let mut app = TestApp::spawn().await;
    app.redis.stop();
    let body = app.lookup(&["A", "B", "A"]).await;
    let items = results(&body);
    assert!(
        items
            .iter()
            .all(|item| item["status"] == "ok" && item["source"] == "upstream")
    );
    assert_eq!(items[1]["discount"], StubUpstream::discount_for("B"));
    let single = app.get("/v1/discounts/A").await;
    assert_eq!(single.status(), 200);
    assert_eq!(single.headers()["x-cache"], "MISS");
    assert!(
        app.redis_failures() >= 2,
        "the failures are counted, not silent"
    );
}

#[tokio::test]
async fn redis_dying_during_a_lookup_still_gives_a_correct_200() {
    let mut app = TestApp::spawn().await;
    app.upstream.hold();
    let lookup = app.lookup(&["M1", "M2"]);
    let stop_redis_mid_fetch = async {
        wait_until(
            "both fetches are at the upstream",
            Duration::from_secs(5),
            || async { app.upstream.in_flight() == 2 },
        )
        .await;
        // The read is done; now the write-back will find Redis gone.
        let errors_before = app.redis_failures();
        std::process::Command::new("kill")
            .arg("-9")
            .arg(app.redis.pid().to_string())
            .status()
            .unwrap();
        app.upstream.release();
        errors_before
    };
    let (body, errors_before) = tokio::join!(lookup, stop_redis_mid_fetch);
    assert_eq!(
        results(&body)[0]["discount"],
        StubUpstream::discount_for("M1")
    );
    assert_eq!(results(&body)[1]["status"], "ok");
    assert!(
        app.redis_failures() > errors_before,
        "the failed write-back is counted"
    );
    app.redis.stop();
}

#[tokio::test]
async fn caching_resumes_by_itself_when_redis_comes_back() {
    let mut app = TestApp::spawn().await;
    app.lookup(&["R1"]).await;
    app.redis.stop();
    app.lookup(&["R1"]).await;
    assert_eq!(
        app.upstream.calls("R1"),
        2,
        "no Redis, so the upstream answers"
    );
    app.redis.restart();
    // The pool reconnects on its own; the first lookup after the restart may still meet a
    // dead connection, after which the key is written.
    wait_until(
        "the proxy writes to the restarted Redis",
        Duration::from_secs(10),
        || async {
            app.lookup(&["R1"]).await;
            app.redis_value("R1").await.is_some()
        },
    )
    .await;
    let calls = app.upstream.calls("R1");
    let body = app.lookup(&["R1"]).await;
    assert_eq!(results(&body)[0]["source"], "cache");
    assert_eq!(app.upstream.calls("R1"), calls);
}

#[tokio::test]
async fn a_hung_redis_costs_its_timeout_not_the_request() {
    let app = TestApp::spawn_with(|config| {
        config.redis.timeout = Duration::from_millis(200);
        config.server.request_timeout = Duration::from_secs(5);
    })
    .await;
    app.lookup(&["P1"]).await;
    app.redis.signal("STOP");
    let errors_before = app.redis_failures();
    let body = app.lookup(&["P1", "P2"]).await;
    let single = app.get("/v1/discounts/P1").await;
    app.redis.signal("CONT");
    // Had the read waited on the hang, the deadline would have turned these into errors.
    let items = results(&body);
    assert!(
        items
            .iter()
            .all(|item| item["status"] == "ok" && item["source"] == "upstream"),
        "{body}"
    );
    assert_eq!(single.status(), 200);
    assert!(
        app.redis_failures() >= errors_before + 2,
        "read and write-back timed out"
    );
}

#[tokio::test]
async fn a_tls_redis_is_used_through_rediss() {
    let redis = crate::support::RedisServer::start_tls();
    let upstream = StubUpstream::start().await;
    let config = TestApp::config_for(&redis, &upstream);
    assert!(config.redis.url.starts_with("rediss://"));
    let app = TestApp::spawn_on(
        config,
        discount_proxy::app::CacheChoice::Redis,
        redis,
        upstream,
    )
    .await;
    app.lookup(&["TLS1"]).await;
    let again = app.lookup(&["TLS1"]).await;
    assert_eq!(results(&again)[0]["source"], "cache");
    assert_eq!(app.upstream.calls("TLS1"), 1);
    assert!(app.redis_value("TLS1").await.is_some(), "written over TLS");
    assert_eq!(app.redis_failures(), 0);
}

/// Asserts the answer has one item per requested SN, in order, each `ok` with its own SN's
/// discount: a Redis reply handed to the wrong caller would show up as another SN's value.
fn assert_each_ok_with_its_own_discount(sns: &[&str], body: &Value) {
    let items = results(body);
    assert_eq!(items.len(), sns.len(), "{body}");
    for (item, sn) in items.iter().zip(sns) {
        assert_eq!(item["sn"], *sn, "{body}");
        assert_eq!(item["status"], "ok", "{body}");
        assert_eq!(item["discount"], StubUpstream::discount_for(sn), "{body}");
    }
}

/// Waits until a lookup of the fresh SN `sn` is written back to Redis (read there directly,
/// never through a fault proxy), then checks the next lookup is a hit.
async fn wait_until_cached_again(app: &TestApp, sn: &str) {
    wait_until(
        &format!("{sn} is written back to Redis"),
        Duration::from_secs(10),
        || async {
            app.lookup(&[sn]).await;
            app.redis_value(sn).await.is_some()
        },
    )
    .await;
    let body = app.lookup(&[sn]).await;
    assert_eq!(results(&body)[0]["source"], "cache", "{body}");
}

/// A lookup that must answer within `limit`; past it, the test fails rather than hangs.
async fn lookup_within(app: &TestApp, limit: Duration, sns: &[&str]) -> Value {
    tokio::time::timeout(limit, app.lookup(sns))
        .await
        .unwrap_or_else(|_| panic!("no answer for {sns:?} within {limit:?}"))
}

#[tokio::test]
async fn a_silent_redis_network_delays_no_lookup_past_its_deadline_and_caching_resumes() {
    let app = TestApp::spawn_with_faulty_redis(|config| {
        config.server.request_timeout = Duration::from_secs(2);
        config.redis.timeout = Duration::from_millis(200);
    })
    .await;
    let limit = app.config.server.request_timeout + Duration::from_secs(1);
    app.lookup(&["S1", "S2"]).await;
    assert!(
        app.redis_value("S1").await.is_some(),
        "cached before the fault"
    );
    assert!(
        app.redis_proxy().accepted() >= 1,
        "Redis is reached through the fault proxy"
    );
    app.redis_proxy().set_mode(Fault::Blackhole);
    let errors_before = app.redis_failures();
    let (mixed, cold, single) = tokio::join!(
        lookup_within(&app, limit, &["S1", "S3", "S2"]),
        lookup_within(&app, limit, &["S4"]),
        tokio::time::timeout(limit, app.get("/v1/discounts/S2")),
    );
    assert_each_ok_with_its_own_discount(&["S1", "S3", "S2"], &mixed);
    assert_each_ok_with_its_own_discount(&["S4"], &cold);
    assert_eq!(
        single.expect("the single GET answers in time").status(),
        200
    );
    assert!(
        results(&mixed)
            .iter()
            .all(|item| item["source"] == "upstream"),
        "the cached SNs could not be read, so the upstream answered: {mixed}"
    );
    assert!(
        app.redis_failures() > errors_before,
        "the silence is counted"
    );
    app.redis_proxy().set_mode(Fault::Pass);
    wait_until_cached_again(&app, "S5").await;
}

#[tokio::test]
async fn a_slow_or_resetting_redis_network_changes_where_answers_come_from_never_whether() {
    let app = TestApp::spawn_with_faulty_redis(|config| {
        config.redis.timeout = Duration::from_millis(200);
    })
    .await;
    app.lookup(&["N1"]).await;
    // Well within redis.timeout: still a hit.
    app.redis_proxy()
        .set_mode(Fault::Delay(Duration::from_millis(20)));
    let body = app.lookup(&["N1"]).await;
    assert_eq!(results(&body)[0]["source"], "cache", "{body}");
    // Past redis.timeout: the upstream answers. The late replies still arrive afterwards and
    // must not be taken for the answers of later commands.
    app.redis_proxy()
        .set_mode(Fault::Delay(Duration::from_millis(500)));
    let body = app.lookup(&["N1", "N2"]).await;
    assert_each_ok_with_its_own_discount(&["N1", "N2"], &body);
    assert_eq!(results(&body)[0]["source"], "upstream", "{body}");
    app.redis_proxy().set_mode(Fault::Reset);
    let accepted = app.redis_proxy().accepted();
    let body = app.lookup(&["N1", "N3"]).await;
    assert_each_ok_with_its_own_discount(&["N1", "N3"], &body);
    assert_eq!(results(&body)[0]["source"], "upstream", "{body}");
    assert!(
        app.redis_proxy().accepted() > accepted,
        "the proxy reconnected and was reset"
    );
    app.redis_proxy().set_mode(Fault::Pass);
    wait_until_cached_again(&app, "N4").await;
    let body = app.lookup(&["N1", "N4"]).await;
    assert_each_ok_with_its_own_discount(&["N1", "N4"], &body);
}

#[tokio::test]
async fn redis_out_of_memory_still_serves_hits_caches_nothing_new_and_recovers() {
    let app = TestApp::spawn().await;
    app.lookup(&["O1", "O2"]).await;
    app.redis.config_set("maxmemory-policy", "noeviction").await;
    app.redis.config_set("maxmemory", "1").await;
    let errors_before = app.redis_failures();
    let body = app.lookup(&["O1", "O3", "O2", "O4"]).await;
    assert_each_ok_with_its_own_discount(&["O1", "O3", "O2", "O4"], &body);
    let sources: Vec<_> = results(&body).iter().map(|item| &item["source"]).collect();
    assert_eq!(
        sources,
        ["cache", "upstream", "cache", "upstream"],
        "{body}"
    );
    let single = app.get("/v1/discounts/O5").await;
    assert_eq!(single.status(), 200);
    for sn in ["O3", "O4", "O5"] {
        assert_eq!(
            app.redis_value(sn).await,
            None,
            "{sn} was written despite OOM"
        );
    }
    assert!(
        app.redis_failures() > errors_before,
        "the refused write-backs are counted"
    );
    app.redis.config_set("maxmemory", "0").await;
    wait_until_cached_again(&app, "O6").await;
}

#[tokio::test]
async fn a_read_only_replica_still_serves_hits_caches_nothing_new_and_recovers() {
    let app = TestApp::spawn().await;
    app.lookup(&["RO1"]).await;
    // A master on a port nobody listens on: the sync never succeeds, so Redis keeps its data
    // and serves reads, and refuses every write with READONLY.
    let (_refusing, dead_master) = crate::support::refusing_port();
    app.redis.replica_of(Some(dead_master)).await;
    let errors_before = app.redis_failures();
    let body = app.lookup(&["RO1", "RO2"]).await;
    assert_each_ok_with_its_own_discount(&["RO1", "RO2"], &body);
    assert_eq!(results(&body)[0]["source"], "cache", "{body}");
    assert_eq!(app.get("/v1/discounts/RO3").await.status(), 200);
    for sn in ["RO2", "RO3"] {
        assert_eq!(
            app.redis_value(sn).await,
            None,
            "{sn} was written to a replica"
        );
    }
    assert!(
        app.redis_failures() > errors_before,
        "the refused write-backs are counted"
    );
    app.redis.replica_of(None).await;
    wait_until_cached_again(&app, "RO4").await;
}

#[tokio::test]
async fn connections_killed_mid_use_never_fail_a_lookup() {
    let app = TestApp::spawn().await;
    let warm = ["K0", "K1", "K2", "K3", "K4"];
    app.lookup(&warm).await;
    let done = AtomicBool::new(false);
    let lookups = async {
        for round in 0..40 {
            let cold = format!("KC{round}");
            let sns = [
                warm[round % warm.len()],
                cold.as_str(),
                warm[(round + 2) % warm.len()],
            ];
            let body = app.lookup(&sns).await;
            assert_each_ok_with_its_own_discount(&sns, &body);
        }
        done.store(true, Ordering::SeqCst);
    };
    let killer = async {
        let mut killed = 0;
        while !done.load(Ordering::SeqCst) {
            killed += app.redis.kill_clients().await;
        }
        killed
    };
    let ((), killed) = tokio::join!(lookups, killer);
    assert!(
        killed > 0,
        "no connection was ever killed: the test proved nothing"
    );
    wait_until_cached_again(&app, "KAFTER").await;
}

/// Lookups sent by the restart test; Redis is restarted after a third and after two thirds.
const LOAD_REQUESTS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_load_never_fails_a_lookup_nor_mixes_up_values() {
    let mut app = TestApp::spawn().await;
    let warm: Vec<String> = (0..20).map(|i| format!("L{i}")).collect();
    app.lookup(&warm.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let answered = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(load(
        app.client.clone(),
        app.url("/v1/discounts/lookup"),
        warm,
        Arc::clone(&answered),
    ));
    for restart in 1..=2 {
        // A load task that failed ends the wait too; awaiting it below reports why.
        wait_until("the load is under way", Duration::from_secs(10), || async {
            answered.load(Ordering::SeqCst) >= restart * LOAD_REQUESTS / 3 || load.is_finished()
        })
        .await;
        // Blocking, but off the runtime's back: the load goes on during the restart.
        tokio::task::block_in_place(|| app.redis.restart());
    }
    load.await.expect("every lookup under load was correct");
    assert!(
        app.redis_failures() > 0,
        "no lookup met the restarts: the test proved nothing"
    );
    assert_eq!(answered.load(Ordering::SeqCst), LOAD_REQUESTS);
    wait_until_cached_again(&app, "LAFTER").await;
}

/// Sends [`LOAD_REQUESTS`] lookups, four at a time, each of two warm SNs and two cold ones
/// (one of them shared with a neighbouring request), checking every answer.
async fn load(client: reqwest::Client, url: String, warm: Vec<String>, answered: Arc<AtomicUsize>) {
    let one = |round: usize| {
        let (client, url) = (client.clone(), url.clone());
        let sns = [
            warm[round % warm.len()].clone(),
            format!("LC{round}"),
            warm[(round * 7) % warm.len()].clone(),
            format!("LC{}", round / 2),
        ];
        let answered = Arc::clone(&answered);
        async move {
            let response = client
                .post(&url)
                .json(&serde_json::json!({ "sns": sns }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
            assert_each_ok_with_its_own_discount(&sns, &body);
            answered.fetch_add(1, Ordering::SeqCst);
        }
    };
    futures_util::stream::iter(0..LOAD_REQUESTS)
        .for_each_concurrent(4, one)
        .await;
}

#[tokio::test]
async fn a_chaos_run_with_a_flaky_upstream_and_killed_connections_caches_no_error() {
    let app = TestApp::spawn().await;
    app.upstream.set_failure_ratio(0.3, 7);
    // Rate-limited, then overloaded: neither answer may stick.
    app.upstream.queue_replies(
        "Q",
        vec![
            Reply::RetryAfter(429, "1".to_owned()),
            Reply::RetryAfter(503, "2".to_owned()),
        ],
    );
    let pool: Vec<String> = (0..12).map(|i| format!("X{i}")).collect();
    let done = AtomicBool::new(false);
    let lookups = async {
        let mut q_statuses = Vec::new();
        for round in 0..30 {
            let sns = [
                pool[round % 12].as_str(),
                "Q",
                pool[(round * 5 + 3) % 12].as_str(),
                pool[round % 12].as_str(),
            ];
            let body = app.lookup(&sns).await;
            assert_each_answered_with_its_own_discount_or_an_upstream_error(&sns, &body);
            q_statuses.push(results(&body)[1]["status"].clone());
        }
        done.store(true, Ordering::SeqCst);
        q_statuses
    };
    let killer = async {
        while !done.load(Ordering::SeqCst) {
            app.redis.kill_clients().await;
        }
    };
    let (q_statuses, ()) = tokio::join!(lookups, killer);
    assert_eq!(
        q_statuses[..2],
        ["error", "error"],
        "the queued 429 and 503"
    );
    assert!(
        app.upstream_failures() > 2,
        "the dice failed some calls besides Q's queued ones"
    );
    let q_calls = app.upstream.call_times("Q");
    assert_eq!(q_calls.len(), app.upstream.calls("Q"));
    assert!(
        q_calls.len() >= 3,
        "an error is never served from the cache"
    );
    for sn in pool.iter().map(String::as_str).chain(["Q"]) {
        assert_cached_only_as_its_own_discount(&app, sn).await;
    }
    // The kills may have tripped Redis's circuit: wait until it reads again. Only real
    // commands close it (a readiness `PING` never does), so keep looking up.
    wait_until("Redis answers again", Duration::from_secs(10), || async {
        app.lookup(&["X0"]).await;
        let ready: Value = app.get("/readyz").await.json().await.unwrap();
        ready["redis"] == "ok" && ready["redis_circuit"] == "closed"
    })
    .await;
    // The upstream goes down entirely: what is cached is still served, the rest is an error.
    app.upstream
        .set_default_reply(Some(Reply::Status(503, "down")));
    let sns: Vec<&str> = pool.iter().map(String::as_str).collect();
    let body = app.lookup(&sns).await;
    assert_each_answered_with_its_own_discount_or_an_upstream_error(&sns, &body);
    for item in results(&body) {
        let cached = app
            .redis_value(item["sn"].as_str().unwrap())
            .await
            .is_some();
        assert_eq!(item["status"] == "ok", cached, "{body}");
    }
}

/// Asserts one item per requested SN, in order, each `ok` with its own SN's discount or an
/// `upstream_error` without one.
fn assert_each_answered_with_its_own_discount_or_an_upstream_error(sns: &[&str], body: &Value) {
    let items = results(body);
    assert_eq!(items.len(), sns.len(), "{body}");
    for (item, sn) in items.iter().zip(sns) {
        assert_eq!(item["sn"], *sn, "{body}");
        match item["status"].as_str() {
            Some("ok") => assert_eq!(item["discount"], StubUpstream::discount_for(sn), "{body}"),
            Some("error") => {
                assert_eq!(item["error"]["code"], "upstream_error", "{body}");
                assert!(item.get("discount").is_none(), "{body}");
            }
            _ => panic!("neither ok nor an upstream error: {body}"),
        }
    }
}

/// Asserts `sn` is either not in Redis or stored as its own discount with a TTL: never an
/// error, never another SN's value, never kept forever.
async fn assert_cached_only_as_its_own_discount(app: &TestApp, sn: &str) {
    let Some(raw) = app.redis_value(sn).await else {
        return;
    };
    let entry = Entry::decode(raw.into()).expect("a well-formed entry");
    assert_eq!(entry.kind(), EntryKind::Found, "{sn}");
    let discount: Value = serde_json::from_slice(&entry.into_discount().unwrap()).unwrap();
    assert_eq!(discount, StubUpstream::discount_for(sn));
    assert!(app.pttl(sn).await > 0, "{sn} has no TTL");
}

#[tokio::test]
async fn a_dead_redis_is_skipped_instead_of_costing_its_timeout_on_every_lookup() {
    let app = TestApp::spawn_with_faulty_redis(|config| {
        config.redis.timeout = Duration::from_millis(200);
        config.redis.breaker_failures = 3;
        // Long enough that no probe comes during the test.
        config.redis.breaker_cooldown = Duration::from_secs(60);
    })
    .await;
    app.lookup(&["DEAD-0"]).await;
    app.redis_proxy().set_mode(Fault::Blackhole);
    let mut n = 0;
    wait_until("Redis's circuit opened", Duration::from_secs(10), || {
        n += 1;
        let sn = format!("DEAD-{n}");
        let app = &app;
        async move {
            assert_each_ok_with_its_own_discount(&[&sn], &app.lookup(&[&sn]).await);
            let ready: Value = app.get("/readyz").await.json().await.unwrap();
            ready["redis_circuit"] == "open"
        }
    })
    .await;
    let sent = app.redis_proxy().bytes_from_clients();
    for i in 0..20 {
        let sn = format!("SKIPPED-{i}");
        assert_each_ok_with_its_own_discount(&[&sn], &app.lookup(&[&sn]).await);
    }
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        (&ready["redis"], &ready["status"]),
        (&json!("down"), &json!("degraded"))
    );
    assert_eq!(
        app.redis_proxy().bytes_from_clients(),
        sent,
        "while its circuit is open, not one command is sent to the dead Redis"
    );
}
