//! The Python export example (`examples/python/export_xlsx.py`) run for real: the venv's
//! Python against the proxy, the workbook opened again with openpyxl (read-only, by
//! `tests/it/python/read_xlsx.py`) and every row checked here.
//!
//! The venv is `target/python-venv`, made by `.ci/run` from `examples/python/requirements.txt`.
//! Without it these tests fail, saying so: the example is part of what the suite checks.

use crate::support::{
    Finished, Process, RedisServer, TestApp, get_json, refusing_port, temp_dir, wait_until,
};
use discount_proxy::secret::Secret;
use discount_proxy::simulator::discount_for;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const RUN_LIMIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "tok-export-5f1c";
/// The example's columns, in the workbook's order.
const COLUMNS: [&str; 7] = [
    "sn",
    "status",
    "source",
    "ratio",
    "currency",
    "apportionment",
    "error",
];

/// The venv's Python, or a failure that says how to make it.
fn python() -> PathBuf {
    let python = repo().join("target/python-venv/bin/python");
    assert!(
        python.exists(),
        "no Python venv for the export example at target/python-venv: run .ci/run, which \
         makes it and installs examples/python/requirements.txt"
    );
    python
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `export_xlsx.py --proxy PROXY ARGS…` to its end, with `token` (if any) in the environment.
async fn export(proxy: &str, args: &[&str], token: Option<&str>) -> Finished {
    let mut command = tokio::process::Command::new(python());
    command
        .arg(repo().join("examples/python/export_xlsx.py"))
        .args(["--proxy", proxy])
        .args(args)
        .env_remove("DISCOUNT_PROXY_CLIENT_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(token) = token {
        command.env("DISCOUNT_PROXY_CLIENT_TOKEN", token);
    }
    let output = tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("export_xlsx.py {args:?} still running after {RUN_LIMIT:?}"))
        .unwrap();
    Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The first sheet's rows, header included, as openpyxl reads them back.
async fn workbook_rows(path: &Path) -> Vec<Vec<Value>> {
    let output = tokio::process::Command::new(python())
        .arg(repo().join("tests/it/python/read_xlsx.py"))
        .arg(path)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "read_xlsx.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let book: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(book["sheets"], json!(["discounts"]), "one sheet");
    serde_json::from_value(book["rows"].clone()).unwrap()
}

/// The row the example must write for an SN the simulator knows.
fn found_row(sn: &str, source: &str) -> Vec<Value> {
    let discount: Value = serde_json::from_str(&discount_for(sn)).unwrap();
    let number = |value: &Value| json!(value.as_str().unwrap().parse::<f64>().unwrap());
    let parts: Vec<String> = discount["apportionment"]
        .as_array()
        .unwrap()
        .iter()
        .map(|part| {
            format!(
                "{}={}",
                part["item"].as_str().unwrap(),
                part["ratio"].as_str().unwrap()
            )
        })
        .collect();
    vec![
        json!(sn),
        json!("ok"),
        json!(source),
        number(&discount["ratio"]),
        discount["currency"].clone(),
        json!(parts.join(";")),
        Value::Null,
    ]
}

/// Checks the header and that the data rows are exactly `expected`, in any order (rows come
/// in the order SNs resolve).
fn assert_rows(rows: &[Vec<Value>], mut expected: Vec<Vec<Value>>) {
    let (header, data) = rows.split_first().expect("a header row");
    assert_eq!(header, &COLUMNS.map(|c| json!(c)).to_vec(), "the header");
    let mut data = data.to_vec();
    let key = |row: &Vec<Value>| row[0].as_str().unwrap_or_default().to_owned();
    data.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(data, expected, "one row per distinct SN, cell by cell");
}

#[tokio::test]
async fn the_export_writes_a_row_per_sn_from_the_stream_and_an_invalid_sn_fails_the_run() {
    let redis = RedisServer::start();
    let simulator = Process::spawn(
        &[
            "simulate-upstream",
            "--listen",
            "127.0.0.1:0",
            "--latency",
            "20ms",
        ],
        &[],
    );
    let simulator_addr = simulator.listening_addr().await;
    let upstream_url = format!("http://{simulator_addr}/contract/?sn={{sn}}");
    let proxy = Process::serve(
        &redis.url(),
        &[
            ("DISCOUNT_PROXY_UPSTREAM__URL", upstream_url.as_str()),
            ("DISCOUNT_PROXY_SERVER__API_TOKENS", TOKEN),
        ],
    );
    let proxy_url = format!("http://{}", proxy.listening_addr().await);
    let dir = temp_dir("python-export");
    let sns = dir.join("sns.txt");
    std::fs::write(&sns, "C1\nC2\nNF-1\n  C3  \nC 1\n\nC1\nNF-2\n").unwrap();
    let cold = dir.join("cold.xlsx");

    let run = export(
        &proxy_url,
        &[sns.to_str().unwrap(), "-o", cold.to_str().unwrap()],
        Some(TOKEN),
    )
    .await;
    assert_eq!(run.code(), Some(1), "an invalid SN fails the run: {run}");
    assert!(run.stderr.contains("export: 6 rows for 6 SNs in "), "{run}");
    assert!(
        !run.stderr.contains(TOKEN),
        "the token is never printed: {run}"
    );
    let not_found = |sn: &str| {
        vec![
            json!(sn),
            json!("not_found"),
            json!("upstream"),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ]
    };
    assert_rows(
        &workbook_rows(&cold).await,
        vec![
            found_row("C1", "upstream"),
            found_row("C2", "upstream"),
            found_row("C3", "upstream"),
            not_found("NF-1"),
            not_found("NF-2"),
            vec![
                json!("C 1"),
                json!("invalid"),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                json!("invalid_sn"),
            ],
        ],
    );

    // The same SNs again, from an export's CSV column: all cached, none failed.
    let csv = dir.join("contracts.csv");
    std::fs::write(
        &csv,
        "customer,contract_sn\r\nAcme,C1\r\nBeta,\"C2\"\r\nGamma,NF-1\r\n",
    )
    .unwrap();
    let warm = dir.join("warm.xlsx");
    let run = export(
        &proxy_url,
        &[
            "--column",
            "contract_sn",
            csv.to_str().unwrap(),
            "-o",
            warm.to_str().unwrap(),
        ],
        Some(TOKEN),
    )
    .await;
    assert_eq!(run.code(), Some(0), "{run}");
    let mut cached_not_found = not_found("NF-1");
    cached_not_found[2] = json!("cache");
    assert_rows(
        &workbook_rows(&warm).await,
        vec![
            found_row("C1", "cache"),
            found_row("C2", "cache"),
            cached_not_found,
        ],
    );
    let stats = get_json(&format!("http://{simulator_addr}/stats")).await;
    assert_eq!(
        stats,
        json!({"requests": 5}),
        "each distinct valid SN fetched once, the second run from the cache"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_refused_lookup_and_a_proxy_that_is_down_end_with_their_exit_codes_and_no_workbook() {
    let app =
        TestApp::spawn_with(|config| config.server.api_tokens = vec![Secret::new(TOKEN)]).await;
    let dir = temp_dir("python-export-refused");
    let sns = dir.join("sns.txt");
    std::fs::write(&sns, "C1\n").unwrap();
    let out = dir.join("out.xlsx");
    let args = [sns.to_str().unwrap(), "-o", out.to_str().unwrap()];

    let wrong = "tok-wrong-91ab";
    let refused = export(&app.url(""), &args, Some(wrong)).await;
    assert_eq!(refused.code(), Some(4), "{refused}");
    assert_eq!(
        refused.stderr.trim(),
        "export: the proxy answered 401 unauthorized",
        "{refused}"
    );
    assert!(!refused.stderr.contains(wrong));
    assert_eq!(app.upstream.total_calls(), 0);

    let (_held, port) = refusing_port();
    let down = export(&format!("http://127.0.0.1:{port}"), &args, None).await;
    assert_eq!(down.code(), Some(3), "{down}");
    assert_eq!(
        down.stderr.lines().count(),
        1,
        "one line, no traceback: {down}"
    );
    assert!(down.stderr.contains("is down"), "{down}");
    assert!(!out.exists(), "no workbook without an answer");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_overloaded_proxy_is_asked_again_after_retry_after_a_bounded_number_of_times() {
    let app = TestApp::spawn_with(|config| {
        config.server.max_in_flight = 1;
        // The held lookup must keep its slot until it is released, however slow Python starts.
        config.upstream.timeout = RUN_LIMIT;
        config.server.request_timeout = RUN_LIMIT;
    })
    .await;
    app.upstream.hold();
    let holder = tokio::spawn(app.client.get(app.url("/v1/discounts/HOLD-1")).send());
    wait_until("one lookup holds the only slot", RUN_LIMIT, || async {
        app.upstream.in_flight() == 1
    })
    .await;
    let dir = temp_dir("python-export-shed");
    let sns = dir.join("sns.txt");
    std::fs::write(&sns, "C7\n").unwrap();
    let out = dir.join("out.xlsx");
    let args = [sns.to_str().unwrap(), "-o", out.to_str().unwrap()];

    let mut one_try = vec!["--tries", "1"];
    one_try.extend_from_slice(&args);
    let gave_up = export(&app.url(""), &one_try, None).await;
    assert_eq!(gave_up.code(), Some(4), "{gave_up}");
    assert!(
        gave_up.stderr.contains("answered 503 overloaded"),
        "{gave_up}"
    );

    let shed = r#"discount_proxy_load_shed_total{reason="in_flight"}"#;
    let url = app.url("");
    let owned: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let retrying = tokio::spawn(async move {
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        export(&url, &args, None).await
    });
    wait_until("the export was shed once more", RUN_LIMIT, || async {
        app.metric(shed) >= 2.0 || retrying.is_finished()
    })
    .await;
    app.upstream.release();
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    let run = retrying.await.unwrap();
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(
        run.stderr
            .contains("export: overloaded, trying again in 1 s (1/5)"),
        "{run}"
    );
    // The stub's discount has a ratio only: the other discount cells stay empty.
    assert_rows(
        &workbook_rows(&out).await,
        vec![vec![
            json!("C7"),
            json!("ok"),
            json!("upstream"),
            json!(0.2),
            Value::Null,
            Value::Null,
            Value::Null,
        ]],
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The example's doctests: `Retry-After` in both forms, and an item flattened into a row.
#[tokio::test]
async fn the_example_s_doctests_pass() {
    let output = tokio::process::Command::new(python())
        .args(["-m", "doctest"])
        .arg(repo().join("examples/python/export_xlsx.py"))
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "python -m doctest examples/python/export_xlsx.py:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
}
