//! The proxy's and the simulator's HTTP APIs as the scenarios use them: a batch lookup with
//! its summary, the simulator's request counter, a proxy's own count of upstream requests.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The `summary` object of a lookup response (the fields the targets are judged on).
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// SNs in the request.
    pub requested: u64,
    /// Fresh answers served from a cache tier.
    pub cache_hits: u64,
    /// SNs sent to the upstream.
    pub upstream_fetches: u64,
    /// SNs that got no answer.
    pub errors: u64,
}

impl Summary {
    /// Reads the counters out of a `summary` object.
    ///
    /// # Errors
    /// A counter is missing or not a number.
    pub fn from_json(summary: &Value) -> Result<Self> {
        let field = |name: &str| {
            summary[name]
                .as_u64()
                .with_context(|| format!("summary has no numeric {name:?}: {summary}"))
        };
        Ok(Self {
            requested: field("requested")?,
            cache_hits: field("cache_hits")?,
            upstream_fetches: field("upstream_fetches")?,
            errors: field("errors")?,
        })
    }
}

/// A batch lookup's outcome as the client saw it.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// From sending the request to having read the whole response.
    pub wall: Duration,
    /// The response's summary.
    pub summary: Summary,
    /// Results whose `status` is `ok` (the summary counts `not_found` and errors, not these).
    pub ok: u64,
    /// The other results, by status and error code (`error/upstream_timeout`), so a row that
    /// misses its count can say why.
    pub not_ok: BTreeMap<String, u64>,
}

impl Lookup {
    /// `; 22 × error/upstream_timeout` for the results that are not `ok`; empty when all are.
    pub fn not_ok_note(&self) -> String {
        self.not_ok
            .iter()
            .map(|(outcome, count)| format!("; {count} × {outcome}"))
            .collect()
    }
}

/// An HTTP client for the proxies and simulators of a run.
pub struct Api {
    http: reqwest::Client,
}

impl Api {
    /// A client with keep-alive connections, so a timed request does not pay a connect.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new() -> Result<Self> {
        // reqwest is built without a default crypto provider; plain HTTP still wants one set.
        discount_proxy::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(64)
            .build()
            .context("building the HTTP client")?;
        Ok(Self { http })
    }

    /// The underlying client, for streamed requests.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `GET /healthz`, so the pooled connection is open before a timed request.
    ///
    /// # Errors
    /// No `200` within a few seconds.
    pub async fn touch(&self, proxy: SocketAddr) -> Result<()> {
        let response = self
            .http
            .get(format!("http://{proxy}/healthz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .with_context(|| format!("GET /healthz on {proxy}"))?;
        if !response.status().is_success() {
            bail!("GET /healthz on {proxy}: {}", response.status());
        }
        response.bytes().await.context("reading /healthz")?;
        Ok(())
    }

    /// `POST /v1/discounts/lookup` with `sns`, timed from send to the last byte read.
    ///
    /// # Errors
    /// A transport error, a non-`200` status, no response within `limit`, or a body without
    /// a summary.
    pub async fn lookup(
        &self,
        proxy: SocketAddr,
        sns: &[String],
        limit: Duration,
    ) -> Result<Lookup> {
        let body = serde_json::json!({ "sns": sns }).to_string();
        let start = Instant::now();
        let response = self
            .http
            .post(format!("http://{proxy}/v1/discounts/lookup"))
            .header("content-type", "application/json")
            .body(body)
            .timeout(limit)
            .send()
            .await
            .with_context(|| format!("POST lookup of {} SNs to {proxy}", sns.len()))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .context("reading a lookup response")?;
        let wall = start.elapsed();
        if !status.is_success() {
            bail!(
                "lookup of {} SNs: {status}: {}",
                sns.len(),
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            );
        }
        let value: Value = serde_json::from_slice(&bytes).context("lookup response is not JSON")?;
        let summary = Summary::from_json(&value["summary"])?;
        let (ok, not_ok) = outcomes(&value["results"]);
        Ok(Lookup {
            wall,
            summary,
            ok,
            not_ok,
        })
    }

    /// The simulator's count of discount requests answered so far (`GET /stats`).
    ///
    /// # Errors
    /// The simulator does not answer with `{"requests": N}`.
    pub async fn upstream_requests(&self, simulator: SocketAddr) -> Result<u64> {
        let bytes = self
            .http
            .get(format!("http://{simulator}/stats"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .with_context(|| format!("GET /stats on the simulator at {simulator}"))?
            .bytes()
            .await
            .context("reading the simulator's /stats")?;
        let value: Value = serde_json::from_slice(&bytes).context("/stats is not JSON")?;
        value["requests"]
            .as_u64()
            .with_context(|| format!("/stats has no request count: {value}"))
    }

    /// The proxy's own count of upstream requests, every outcome (`GET /metrics`): which
    /// instance made the calls a simulator counted.
    ///
    /// # Errors
    /// The proxy does not answer `/metrics` with `200`.
    pub async fn proxy_upstream_requests(&self, proxy: SocketAddr) -> Result<u64> {
        let response = self
            .http
            .get(format!("http://{proxy}/metrics"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .with_context(|| format!("GET /metrics on {proxy}"))?;
        if !response.status().is_success() {
            bail!("GET /metrics on {proxy}: {}", response.status());
        }
        let bytes = response.bytes().await.context("reading /metrics")?;
        Ok(counter_total(
            &String::from_utf8_lossy(&bytes),
            UPSTREAM_REQUESTS,
        ))
    }
}

/// The proxy's counter of upstream requests, labelled by outcome.
const UPSTREAM_REQUESTS: &str = "discount_proxy_upstream_requests_total";

/// The sum of every sample of counter `name` in Prometheus text (all label sets).
fn counter_total(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(name))
        .filter(|rest| rest.starts_with(['{', ' ']))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// How many items of a lookup's `results` array have `"status": "ok"`, and the others by
/// status and error code.
fn outcomes(results: &Value) -> (u64, BTreeMap<String, u64>) {
    let mut ok = 0;
    let mut not_ok = BTreeMap::new();
    for item in results.as_array().into_iter().flatten() {
        let status = item["status"].as_str().unwrap_or("no status");
        if status == "ok" {
            ok += 1;
            continue;
        }
        let outcome = match item["error"]["code"].as_str() {
            Some(code) => format!("{status}/{code}"),
            None => status.to_owned(),
        };
        *not_ok.entry(outcome).or_insert(0) += 1;
    }
    (ok, not_ok)
}

/// `count` SNs named `<label>-<n>`, distinct from every other label's.
pub fn sns(label: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{label}-{n:06}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_is_summed_over_its_label_sets_only() {
        let text = "# TYPE discount_proxy_upstream_requests counter\n\
            discount_proxy_upstream_requests_total{outcome=\"ok\"} 998\n\
            discount_proxy_upstream_requests_total{outcome=\"not_found\"} 2\n\
            discount_proxy_upstream_requests_total_other 50\n\
            discount_proxy_lookups_total 7\n";
        assert_eq!(counter_total(text, UPSTREAM_REQUESTS), 1_000);
        assert_eq!(counter_total("", UPSTREAM_REQUESTS), 0);
    }

    #[test]
    fn ok_results_are_counted_and_the_others_named_by_code() {
        let results = serde_json::json!([
            {"sn": "A", "status": "ok"},
            {"sn": "NF-1", "status": "not_found"},
            {"sn": "B", "status": "error", "error": {"code": "upstream_timeout"}},
            {"sn": "D", "status": "error", "error": {"code": "upstream_timeout"}},
            {"sn": "C", "status": "ok"},
        ]);
        let (ok, not_ok) = outcomes(&results);
        assert_eq!(ok, 2);
        let lookup = Lookup {
            wall: Duration::ZERO,
            summary: Summary::default(),
            ok,
            not_ok,
        };
        assert_eq!(
            lookup.not_ok_note(),
            "; 2 × error/upstream_timeout; 1 × not_found"
        );
        assert_eq!(outcomes(&Value::Null), (0, BTreeMap::new()));
    }
}
