//! `discount-proxy warm`: the real binary against a `TestApp` (real Redis, stub upstream).

use crate::support::{Finished, Process, Reply, TestApp, run_to_end};
use discount_proxy::secret::Secret;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A file of SNs, removed on `Drop`.
struct InputFile(PathBuf);

impl InputFile {
    fn new(contents: &str) -> Self {
        Self::named("txt", contents)
    }

    /// A file whose name ends in `.extension`.
    fn named(extension: &str, contents: &str) -> Self {
        // One name per file in this run: a counter, not a port number that can come twice.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("dp-warm-{}-{n}.{extension}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for InputFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `warm --proxy <app> ARGS…` with `stdin` as its input.
async fn warm(app: &TestApp, args: &[&str], envs: &[(&str, &str)], stdin: &str) -> Finished {
    let proxy = app.url("");
    let mut all = vec!["warm", "--proxy", proxy.as_str()];
    all.extend_from_slice(args);
    run_to_end(&all, envs, stdin, Duration::from_secs(60)).await
}

/// The summary's first line, with the elapsed time cut out: `warmed … SNs: counts`.
fn counts(run: &Finished) -> String {
    let first = run.stdout.lines().next().unwrap_or_default();
    let (start, rest) = first
        .split_once(" in ")
        .unwrap_or_else(|| panic!("no summary: {run}"));
    let (_, counts) = rest.split_once(" s: ").unwrap();
    format!("{start}: {counts}")
}

/// C0…C29, two of them twice, two SNs the upstream does not know, one with a space.
fn mixed_input() -> (Vec<String>, String) {
    let found: Vec<String> = (0..30).map(|i| format!("C{i}")).collect();
    let mut lines = found.clone();
    lines.extend(["C1", "NF-1", "  C2  ", "", "NF-2", "C 1"].map(str::to_owned));
    (found, lines.join("\n"))
}

#[tokio::test]
async fn warm_fetches_each_distinct_sn_once_then_finds_them_cached_and_refresh_fetches_again() {
    let app = TestApp::spawn().await;
    for sn in ["NF-1", "NF-2"] {
        app.upstream.reply(sn, Reply::Status(404, "{}"));
    }
    let (found, contents) = mixed_input();
    let file = InputFile::new(&contents);
    let args = ["--batch-size", "7", "--parallel", "3", file.path()];

    let first = warm(&app, &args, &[], "").await;
    assert_eq!(
        first.code(),
        Some(1),
        "an invalid SN fails the run: {first}"
    );
    assert_eq!(
        counts(&first),
        "warmed 33 SNs (35 read, 2 duplicates): 30 fetched, 0 already cached, 2 not found, \
         1 invalid, 0 errors",
        "{first}"
    );
    assert!(first.stdout.contains("\n  C 1: invalid_sn"), "{first}");
    assert!(
        first
            .stderr
            .contains("warm: 33/33 SNs (100%), 30 fetched, 0 cached, 2 not found"),
        "plain progress lines when stderr is not a terminal: {first}"
    );
    assert!(first.stderr.lines().all(|line| line.starts_with("warm: ")));
    assert_eq!(app.upstream.total_calls(), 32);
    for sn in found.iter().map(String::as_str).chain(["NF-1", "NF-2"]) {
        assert_eq!(app.upstream.calls(sn), 1, "{sn}");
        assert!(app.redis_value(sn).await.is_some(), "{sn} is cached");
        assert!(app.pttl(sn).await > 0, "{sn} has a TTL");
    }

    let second = warm(&app, &args, &[], "").await;
    assert_eq!(
        counts(&second),
        "warmed 33 SNs (35 read, 2 duplicates): 0 fetched, 30 already cached, 2 not found, \
         1 invalid, 0 errors",
        "{second}"
    );
    assert_eq!(app.upstream.total_calls(), 32, "no new upstream calls");

    let mut refresh_args = vec!["--refresh"];
    refresh_args.extend_from_slice(&args);
    let refreshed = warm(&app, &refresh_args, &[], "").await;
    assert!(
        counts(&refreshed)
            .ends_with(": 30 fetched, 0 already cached, 2 not found, 1 invalid, 0 errors"),
        "{refreshed}"
    );
    assert_eq!(app.upstream.total_calls(), 64, "every SN fetched again");
    assert!(found.iter().all(|sn| app.upstream.calls(sn) == 2));
}

#[tokio::test]
async fn a_csv_with_a_header_gives_its_first_column() {
    let app = TestApp::spawn().await;
    let file = InputFile::new(
        "\"sn\",\"customer\"\r\nA1,Acme\r\n\"A,2\",\"Beta, Inc\"\r\n\r\nA1,again\r\n",
    );
    let run = warm(&app, &[file.path()], &[], "").await;
    assert!(run.status.success(), "{run}");
    assert_eq!(
        counts(&run),
        "warmed 2 SNs (3 read, 1 duplicates): 2 fetched, 0 already cached, 0 not found, \
         0 invalid, 0 errors"
    );
    assert_eq!(app.upstream.calls("A1"), 1);
    assert_eq!(
        app.upstream.calls("A,2"),
        1,
        "the quoted comma is part of the SN"
    );
    assert_eq!(app.upstream.total_calls(), 2);
}

/// An export as reporting tools write it: the SN in the second column, a row cut short,
/// a row without an SN.
const EXPORT: &str = "customer,contract_sn,amount\r\nAcme,E1,10\r\nBeta,\"E,2\",20\r\nGamma\r\nDelta,,30\r\nAcme,E1,11\r\n";

#[tokio::test]
async fn an_export_gives_the_column_named_by_header_or_number_and_says_what_it_skipped() {
    let app = TestApp::spawn().await;
    let file = InputFile::named("csv", EXPORT);
    for column in ["contract_sn", "2"] {
        let run = warm(&app, &["--column", column, file.path()], &[], "").await;
        assert!(run.status.success(), "{run}");
        let named = if column == "2" {
            "2".to_owned()
        } else {
            format!("\"{column}\"")
        };
        assert!(
            run.stdout.contains(&format!(
                "skipped 3 rows: 1 header, 1 with no SN in column {named}, \
                 1 too short to have column {named}"
            )),
            "{run}"
        );
    }
    assert_eq!(app.upstream.calls("E1"), 1);
    assert_eq!(
        app.upstream.calls("E,2"),
        1,
        "the quoted comma is part of the SN"
    );
    assert_eq!(
        app.upstream.total_calls(),
        2,
        "no header or customer fetched"
    );
}

#[tokio::test]
async fn without_a_header_the_first_row_is_an_sn_too() {
    let app = TestApp::spawn().await;
    let file = InputFile::named("csv", "H1,Acme\nH2,Beta\n");
    let run = warm(&app, &["--no-header", file.path()], &[], "").await;
    assert!(run.status.success(), "{run}");
    assert!(counts(&run).starts_with("warmed 2 SNs"), "{run}");
    assert!(!run.stdout.contains("skipped"), "{run}");
    assert_eq!(app.upstream.calls("H1"), 1);
    let with_header = warm(&app, &[file.path()], &[], "").await;
    assert!(
        with_header.stdout.contains("skipped 1 row: 1 header"),
        "the same file read with its first row as a header: {with_header}"
    );
}

#[tokio::test]
async fn sns_are_read_from_stdin_without_a_file_or_with_a_dash() {
    let app = TestApp::spawn().await;
    let run = warm(&app, &[], &[], "B1\nB2\n").await;
    assert!(run.status.success(), "{run}");
    assert!(counts(&run).starts_with("warmed 2 SNs: 2 fetched"), "{run}");
    let run = warm(&app, &["-"], &[], "B2\nB3\n").await;
    assert!(run.status.success(), "{run}");
    assert!(
        counts(&run).starts_with("warmed 2 SNs: 1 fetched, 1 already cached"),
        "{run}"
    );
    assert_eq!(app.upstream.total_calls(), 3);
}

#[tokio::test]
async fn an_sn_the_upstream_fails_exits_1_and_is_named() {
    let app = TestApp::spawn().await;
    app.upstream.reply("C-bad", Reply::Status(500, "{}"));
    let run = warm(&app, &[], &[], "C-ok1\nC-bad\nC-ok2\n").await;
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(
        counts(&run).ends_with(": 2 fetched, 0 already cached, 0 not found, 0 invalid, 1 errors"),
        "{run}"
    );
    assert!(run.stdout.contains("\n  C-bad: upstream_error"), "{run}");
    assert!(
        app.redis_value("C-bad").await.is_none(),
        "errors are not cached"
    );
}

#[tokio::test]
async fn the_token_comes_from_the_flag_or_the_environment_and_never_shows() {
    let token = "tok-warm-5150";
    let app =
        TestApp::spawn_with(|config| config.server.api_tokens = vec![Secret::new(token)]).await;
    let without = warm(&app, &[], &[], "T1\nT2\n").await;
    assert_eq!(without.code(), Some(1), "{without}");
    assert!(
        counts(&without)
            .ends_with(": 0 fetched, 0 already cached, 0 not found, 0 invalid, 2 errors"),
        "{without}"
    );
    assert!(
        without.stderr.contains("unauthorized")
            && without
                .stderr
                .contains("pass --token or set DISCOUNT_PROXY_CLIENT_TOKEN"),
        "a clear message: {without}"
    );
    assert_eq!(app.upstream.total_calls(), 0);

    let wrong = warm(&app, &["--token", "tok-wrong"], &[], "T1\n").await;
    assert_eq!(wrong.code(), Some(1), "{wrong}");
    assert!(
        wrong.stderr.contains("does not accept the token"),
        "{wrong}"
    );

    let flag = warm(&app, &["--token", token], &[], "T1\n").await;
    assert!(flag.status.success(), "{flag}");
    let env = warm(&app, &[], &[("DISCOUNT_PROXY_CLIENT_TOKEN", token)], "T2\n").await;
    assert!(env.status.success(), "{env}");
    assert_eq!(app.upstream.total_calls(), 2);
    for run in [&without, &wrong, &flag, &env] {
        assert!(!run.to_string().contains(token), "the token leaked: {run}");
    }
}

#[tokio::test]
async fn a_batch_the_proxy_turns_away_as_overloaded_is_resent() {
    // Two pending fetches at most: while the first batch's are held at the upstream, the
    // second batch needs two more and is turned away with `Retry-After: 1`.
    let app = TestApp::spawn_with(|config| {
        config.server.max_batch = 2;
        config.upstream.max_pending = 2;
    })
    .await;
    app.upstream.hold();
    let file = InputFile::new("O1\nO2\nO3\nO4\n");
    let proxy = app.url("");
    let mut run = Process::spawn(
        &[
            "warm",
            "--proxy",
            &proxy,
            "--batch-size",
            "2",
            "--parallel",
            "2",
            file.path(),
        ],
        &[],
    );
    run.wait_for_line(
        "overloaded; resending 2 SNs in 1 s (1 of 5)",
        Duration::from_secs(20),
    )
    .await;
    app.upstream.release();
    let status = run.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", run.output());
    assert!(run.output().contains("warmed 4 SNs"), "{}", run.output());
    for sn in ["O1", "O2", "O3", "O4"] {
        assert_eq!(app.upstream.calls(sn), 1, "{sn}");
    }
}

#[tokio::test]
async fn an_unreachable_proxy_makes_every_sn_an_error() {
    let (_refusing, port) = crate::support::refusing_port();
    let proxy = format!("http://127.0.0.1:{port}");
    let run = run_to_end(
        &["warm", "--proxy", &proxy],
        &[],
        "U1\nU2\n",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(run.stdout.contains("2 errors"), "{run}");
    assert!(run.stdout.contains("U1: connection_failed"), "{run}");
}

#[tokio::test]
async fn bad_flags_and_unreadable_input_exit_2_with_a_message() {
    let app = TestApp::spawn().await;
    for (args, says) in [
        (&["--batch-size", "0"][..], "--batch-size"),
        (&["--batch-size", "10001"], "--batch-size"),
        (&["--parallel", "0"], "--parallel"),
        (
            &["no/such/file.txt"],
            "could not read SNs from no/such/file.txt",
        ),
        (&["--column", "0"], "--column"),
        (
            &["--column", "sn", "--no-header"],
            "--column sn names a header",
        ),
    ] {
        let run = warm(&app, args, &[], "C1\n").await;
        assert_eq!(run.code(), Some(2), "{args:?}: {run}");
        assert!(run.stderr.contains(says), "{args:?}: {run}");
    }
    let no_proxy = run_to_end(&["warm"], &[], "", Duration::from_secs(10)).await;
    assert_eq!(no_proxy.code(), Some(2), "{no_proxy}");
    assert!(no_proxy.stderr.contains("--proxy"), "{no_proxy}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = warm(&app, &[dir.to_str().unwrap()], &[], "").await;
    assert_eq!(run.code(), Some(2), "a folder is not a file: {run}");
    assert_eq!(app.upstream.total_calls(), 0);
}
