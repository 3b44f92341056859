//! `deploy/prometheus` and `deploy/grafana`: every metric the alerting and recording rules,
//! their unit tests and the dashboard name is one a running proxy exports, and every recorded
//! series they use is one the rules define. A renamed metric breaks this test, not a
//! dashboard nobody looks at until the night it is needed.
//!
//! What is exported is read from the `# TYPE` lines of `/metrics`. prometheus-client writes
//! them for a labelled family only once it has a sample (a plain counter, gauge or histogram
//! always has one), so the proxy is first made to produce every family: a cluster-mode
//! proxy (per-master counters) with the in-process tier on (its lookups, the invalidation
//! channel) and one request slot (shedding) serves a miss, a delete and a shed request. A
//! family's sample names follow from its type: a counter's is `<name>_total`, a histogram's
//! `<name>_bucket`, `_sum` and `_count`, a gauge's its own name; a bare counter or histogram
//! name is no series at all.

use crate::support::{RedisCluster, TestApp, wait_until};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use std::collections::BTreeSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

const RULES: &str = "deploy/prometheus/discount-proxy.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/discount-proxy.rules.test.yml";
const DASHBOARD: &str = "deploy/grafana/discount-proxy.json";

/// The prefix of every metric the proxy exports.
const PREFIX: &str = "discount_proxy_";

fn read(path: &str) -> String {
    let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|err| panic!("{path}: {err}"))
}

/// The sample names the families of a scrape can have, from its `# TYPE` lines.
fn exported_series(scrape: &str) -> BTreeSet<String> {
    let mut series = BTreeSet::new();
    for line in scrape.lines() {
        let Some(declaration) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = declaration.split_once(' ').unwrap();
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "gauge" => &[""],
            other => panic!("{family}: a family of type {other} this test does not know"),
        };
        series.extend(suffixes.iter().map(|suffix| format!("{family}{suffix}")));
    }
    series
}

/// Every word of `text` that names a series of ours: `[A-Za-z0-9_:]` runs containing the
/// prefix, less a trailing `:` (prose punctuation; no name ends with one). Those with a `:`
/// are recorded series (`level:metric:operations`), the others metrics. Anything a string
/// says counts: an expression, a template query, a description.
fn series_names(text: &str, metrics: &mut BTreeSet<String>, recorded: &mut BTreeSet<String>) {
    let words = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .map(|word| word.trim_end_matches(':'));
    for word in words.filter(|word| word.contains(PREFIX)) {
        if word.contains(':') {
            recorded.insert(word.to_owned());
        } else {
            metrics.insert(word.to_owned());
        }
    }
}

/// Every string value of a YAML document (keys are field names, not queries).
fn yaml_strings<'a>(value: &'a Yaml, out: &mut Vec<&'a str>) {
    match value {
        Yaml::String(text) => out.push(text),
        Yaml::Sequence(items) => items.iter().for_each(|item| yaml_strings(item, out)),
        Yaml::Mapping(map) => map.values().for_each(|item| yaml_strings(item, out)),
        Yaml::Tagged(tagged) => yaml_strings(&tagged.value, out),
        _ => {}
    }
}

/// Every string value of a JSON document.
fn json_strings<'a>(value: &'a Json, out: &mut Vec<&'a str>) {
    match value {
        Json::String(text) => out.push(text),
        Json::Array(items) => items.iter().for_each(|item| json_strings(item, out)),
        Json::Object(map) => map.values().for_each(|item| json_strings(item, out)),
        _ => {}
    }
}

/// The names the rules file records.
fn recorded_by(rules: &Yaml) -> BTreeSet<String> {
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_sequence().unwrap())
        .filter_map(|rule| rule.get("record"))
        .map(|name| name.as_str().unwrap().to_owned())
        .collect()
}

/// A proxy that has recorded a sample of every family: see the module doc.
async fn proxy_with_every_family(cluster: &RedisCluster) -> TestApp {
    let app = TestApp::spawn_with(|config| {
        cluster.point(config);
        config.cache.local.enabled = true;
        config.server.max_in_flight = 1;
    })
    .await;
    // A miss: lookups, latency, SN outcomes, upstream, both tiers, a master's commands and,
    // once the write-back is done, its outcome.
    app.lookup(&["OBS-1"]).await;
    wait_until("the miss is written back", WAIT, || async {
        app.metric(r#"discount_proxy_write_backs_total{outcome="ok"}"#) == 1.0
    })
    .await;
    // A delete publishes on the invalidation channel.
    assert_eq!(app.delete("/v1/discounts/OBS-1").await.status(), 204);
    // The one slot held by a lookup at the upstream: the next request is shed.
    app.upstream.hold();
    let held = tokio::spawn(app.client.get(app.url("/v1/discounts/OBS-2")).send());
    wait_until("a lookup holds the slot", WAIT, || async {
        app.upstream.in_flight() == 1
    })
    .await;
    assert_eq!(app.get("/v1/discounts/OBS-3").await.status(), 503);
    app.upstream.release();
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    app
}

#[tokio::test]
async fn rules_and_dashboard_use_only_metrics_the_proxy_exports() {
    let cluster = RedisCluster::shared();
    let app = proxy_with_every_family(&cluster).await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let exported = exported_series(&response.text().await.unwrap());

    let rules: Yaml = serde_yaml_ng::from_str(&read(RULES)).unwrap();
    let rule_tests: Yaml = serde_yaml_ng::from_str(&read(RULE_TESTS)).unwrap();
    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let mut strings = Vec::new();
    yaml_strings(&rules, &mut strings);
    yaml_strings(&rule_tests, &mut strings);
    json_strings(&dashboard, &mut strings);

    let (mut metrics, mut recorded) = (BTreeSet::new(), BTreeSet::new());
    for text in strings {
        series_names(text, &mut metrics, &mut recorded);
    }
    assert!(
        metrics.len() >= 10,
        "the files name our metrics: {metrics:?}"
    );
    let unknown: Vec<_> = metrics.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "named in the rules or the dashboard but not exported: {unknown:?}"
    );
    let defined = recorded_by(&rules);
    let undefined: Vec<_> = recorded.difference(&defined).collect();
    assert!(
        undefined.is_empty(),
        "recorded series used but not recorded: {undefined:?}"
    );
}

#[test]
fn the_dashboard_imports_anywhere() {
    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).unwrap();
    assert!(
        dashboard["uid"].is_null(),
        "no fixed UID: Grafana assigns one on import"
    );
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|variable| variable["name"] == "datasource" && variable["type"] == "datasource"),
        "a datasource variable"
    );
    let panels = dashboard["panels"].as_array().unwrap();
    let mut with_queries = 0;
    for panel in panels.iter().filter(|panel| panel["type"] != "row") {
        let title = &panel["title"];
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title} reads the chosen data source"
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            with_queries += 1;
        }
    }
    assert!(with_queries > 0);
}
