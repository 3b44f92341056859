//! A stand-in for the upstream discount service, speaking its contract exactly: a
//! deterministic discount per SN, `404` for SNs starting with `NF`, a fixed latency.

use crate::secret::Secret;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::warn;

/// The simulated service's behaviour and counters.
#[derive(Debug, Default)]
pub struct Simulator {
    latency: Duration,
    token: Option<Secret>,
    requests: AtomicU64,
}

impl Simulator {
    /// A simulator answering after `latency`; with a `token`, requests must carry
    /// `Authorization: Token <token>` or get `401`.
    pub fn new(latency: Duration, token: Option<Secret>) -> Arc<Self> {
        Arc::new(Self {
            latency,
            token,
            requests: AtomicU64::new(0),
        })
    }

    /// Discount requests answered so far (what benchmarks compare with SN counts).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let simulator = Arc::clone(&self);
                        tokio::spawn(async move {
                            let service = service_fn(move |request| {
                                let simulator = Arc::clone(&simulator);
                                async move { Ok::<_, Infallible>(simulator.answer(request).await) }
                            });
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Err(err) => {
                        warn!(error = %err, "simulator accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = &mut shutdown => return,
            }
        }
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.uri().path() == "/stats" {
            return json(
                StatusCode::OK,
                format!(r#"{{"requests":{}}}"#, self.requests()),
            );
        }
        if let Some(token) = &self.token {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|value| value.as_bytes().strip_prefix(b"Token "));
            if !presented.is_some_and(|presented| token.matches(presented)) {
                return json(
                    StatusCode::UNAUTHORIZED,
                    r#"{"detail":"invalid token"}"#.to_owned(),
                );
            }
        }
        let Some(sn) = requested_sn(&request) else {
            return json(
                StatusCode::BAD_REQUEST,
                r#"{"detail":"no sn given"}"#.to_owned(),
            );
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.latency).await;
        if sn.starts_with("NF") {
            return json(
                StatusCode::NOT_FOUND,
                r#"{"detail":"not found"}"#.to_owned(),
            );
        }
        json(StatusCode::OK, discount_for(&sn))
    }
}

/// The `sn` query parameter, or else the last path segment.
fn requested_sn(request: &Request<Incoming>) -> Option<String> {
    let from_query = request.uri().query().and_then(|query| {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "sn")
            .map(|(_, value)| value.into_owned())
    });
    from_query.or_else(|| {
        let segment = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .filter(|s| !s.is_empty())?;
        percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .ok()
            .map(|s| s.into_owned())
    })
}

/// A discount object that depends only on the SN, so answers can be checked anywhere.
pub fn discount_for(sn: &str) -> String {
    // FNV-1a: stable across runs and platforms, unlike std's hasher.
    let hash = sn.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let ratio = hash % 60;
    let base = ratio / 2;
    serde_json::json!({
        "sn": sn,
        "ratio": format!("0.{ratio:02}"),
        "currency": "CNY",
        "apportionment": [
            {"item": "base", "ratio": format!("0.{base:02}")},
            {"item": "promotion", "ratio": format!("0.{:02}", ratio - base)},
        ],
    })
    .to_string()
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discounts_are_deterministic_json_per_sn() {
        assert_eq!(discount_for("C2024-0001"), discount_for("C2024-0001"));
        assert_ne!(discount_for("C2024-0001"), discount_for("C2024-0002"));
        let value: serde_json::Value = serde_json::from_str(&discount_for("合同")).unwrap();
        assert_eq!(value["sn"], "合同");
    }
}
