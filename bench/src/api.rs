//! The proxy's and the simulator's HTTP APIs as the scenarios use them: a batch lookup with
//! its summary, the simulator's request counter.

use anyhow::{Context, Result, bail};
use serde_json::Value;
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
#[derive(Debug, Clone, Copy)]
pub struct Lookup {
    /// From sending the request to having read the whole response.
    pub wall: Duration,
    /// The response's summary.
    pub summary: Summary,
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
        Ok(Lookup { wall, summary })
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
}

/// `count` SNs named `<label>-<n>`, distinct from every other label's.
pub fn sns(label: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{label}-{n:06}")).collect()
}
