//! A stub of the upstream discount service: a real HTTP server whose latency and answers
//! are set per SN (or queued, or left to a seeded dice roll), and which counts every call,
//! when it came, the calls in flight and their peak.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

/// What the stub answers for one SN.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status and body.
    Status(u16, &'static str),
    /// `200` with a JSON string body of this many bytes, sent chunked with no `Content-Length`.
    ChunkedBody(usize),
    /// `200` with a JSON string body of this many bytes and a `Content-Length`.
    SizedBody(usize),
    /// `200` with a body that never ends (whitespace, forever).
    EndlessBody,
    /// `302` to this path on the stub.
    Redirect(&'static str),
    /// This status (`429`, `503`) with a `Retry-After` header of this value, as rate limiters
    /// and overloaded services answer.
    RetryAfter(u16, String),
    /// Never answers (until the connection is dropped).
    Hang,
}

#[derive(Default)]
struct State {
    replies: Mutex<HashMap<String, Reply>>,
    queued: Mutex<HashMap<String, VecDeque<Reply>>>,
    default_reply: Mutex<Option<Reply>>,
    /// The probability of a `500` for a call nothing else was set for, and the dice.
    failures: Mutex<Option<(f64, fastrand::Rng)>>,
    call_times: Mutex<HashMap<String, Vec<Instant>>>,
    latencies: Mutex<HashMap<String, Duration>>,
    default_latency: Mutex<Duration>,
    calls: Mutex<HashMap<String, usize>>,
    raw_queries: Mutex<Vec<String>>,
    authorizations: Mutex<Vec<Option<String>>>,
    total: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

pub struct StubUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    held: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl StubUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let (held, _) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::clone(&state), held.subscribe()));
        Self {
            addr,
            state,
            held,
            task,
        }
    }

    /// The `upstream.url` template pointing here.
    pub fn url_template(&self) -> String {
        format!("http://{}/contract/?sn={{sn}}", self.addr)
    }

    /// The body the stub sends for a found SN by default.
    pub fn discount_for(sn: &str) -> serde_json::Value {
        serde_json::json!({"sn": sn, "ratio": format!("0.{}", sn.len() % 10)})
    }

    pub fn reply(&self, sn: &str, reply: Reply) {
        self.state
            .replies
            .lock()
            .unwrap()
            .insert(sn.to_owned(), reply);
    }

    /// The next calls for `sn` get these replies, one each, in order; after them, the calls
    /// get what [`StubUpstream::reply`] or the default says. For flapping and "fails once,
    /// then recovers" cases.
    pub fn queue_replies(&self, sn: &str, replies: Vec<Reply>) {
        self.state
            .queued
            .lock()
            .unwrap()
            .entry(sn.to_owned())
            .or_default()
            .extend(replies);
    }

    /// What SNs without a reply of their own get; `None` is the normal `200` discount.
    pub fn set_default_reply(&self, reply: Option<Reply>) {
        *self.state.default_reply.lock().unwrap() = reply;
    }

    /// Makes each call that nothing else was set for answer `500` with probability `ratio`,
    /// drawn from a generator seeded with `seed`, so a failing chaos run can be replayed.
    pub fn set_failure_ratio(&self, ratio: f64, seed: u64) {
        *self.state.failures.lock().unwrap() = Some((ratio, fastrand::Rng::with_seed(seed)));
    }

    pub fn set_latency(&self, latency: Duration) {
        *self.state.default_latency.lock().unwrap() = latency;
    }

    pub fn set_latency_for(&self, sn: &str, latency: Duration) {
        self.state
            .latencies
            .lock()
            .unwrap()
            .insert(sn.to_owned(), latency);
    }

    /// Calls for one SN (as the stub decoded it).
    pub fn calls(&self, sn: &str) -> usize {
        self.state
            .calls
            .lock()
            .unwrap()
            .get(sn)
            .copied()
            .unwrap_or(0)
    }

    /// When each call for `sn` arrived, in order: to check backoff and `Retry-After` spacing.
    pub fn call_times(&self, sn: &str) -> Vec<Instant> {
        self.state
            .call_times
            .lock()
            .unwrap()
            .get(sn)
            .cloned()
            .unwrap_or_default()
    }

    pub fn total_calls(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    pub fn peak_in_flight(&self) -> usize {
        self.state.peak.load(Ordering::SeqCst)
    }

    /// Query strings exactly as they arrived, still percent-encoded.
    pub fn raw_queries(&self) -> Vec<String> {
        self.state.raw_queries.lock().unwrap().clone()
    }

    /// `Authorization` headers as they arrived.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.state.authorizations.lock().unwrap().clone()
    }

    /// Holds every request (after it is counted) until [`StubUpstream::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }
}

impl Drop for StubUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>, held: watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let state = Arc::clone(&state);
        let held = held.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                let held = held.clone();
                async move { Ok::<_, Infallible>(answer(&state, held, request).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type StubBody = BoxBody<Bytes, Infallible>;

async fn answer(
    state: &State,
    mut held: watch::Receiver<bool>,
    request: Request<Incoming>,
) -> Response<StubBody> {
    let query = request.uri().query().unwrap_or_default().to_owned();
    let sn = url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "sn")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    let authorization = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    state.raw_queries.lock().unwrap().push(query);
    state.authorizations.lock().unwrap().push(authorization);
    let queued = record_call(state, &sn);
    state.total.fetch_add(1, Ordering::SeqCst);
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.peak.fetch_max(now, Ordering::SeqCst);
    let _ = held.wait_for(|held| !held).await;
    let latency = state.latencies.lock().unwrap().get(&sn).copied();
    let latency = latency.unwrap_or_else(|| *state.default_latency.lock().unwrap());
    tokio::time::sleep(latency).await;
    let reply = queued.or_else(|| configured_reply(state, &sn));
    let response = match reply {
        None => full(200, StubUpstream::discount_for(&sn).to_string()),
        Some(Reply::Status(status, body)) => full(status, body.to_owned()),
        Some(Reply::ChunkedBody(len)) => chunked(json_string_of(len)),
        Some(Reply::SizedBody(len)) => full(200, String::from_utf8(json_string_of(len)).unwrap()),
        Some(Reply::EndlessBody) => endless(),
        Some(Reply::Redirect(location)) => {
            with_header(full(302, String::new()), "location", location)
        }
        Some(Reply::RetryAfter(status, retry_after)) => with_header(
            full(status, r#"{"error":"try again later"}"#.to_owned()),
            "retry-after",
            &retry_after,
        ),
        Some(Reply::Hang) => std::future::pending().await,
    };
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

/// Counts a call for `sn` and when it came; returns its queued reply, taken on arrival so
/// concurrent calls consume the queue in the order they came.
fn record_call(state: &State, sn: &str) -> Option<Reply> {
    *state
        .calls
        .lock()
        .unwrap()
        .entry(sn.to_owned())
        .or_default() += 1;
    let mut times = state.call_times.lock().unwrap();
    times.entry(sn.to_owned()).or_default().push(Instant::now());
    let mut queued = state.queued.lock().unwrap();
    queued.get_mut(sn).and_then(VecDeque::pop_front)
}

/// The reply set for `sn`, else the default, else a `500` if the dice say so; `None` is the
/// normal `200` discount. Read after the latency, so a test may change it meanwhile.
fn configured_reply(state: &State, sn: &str) -> Option<Reply> {
    let own = state.replies.lock().unwrap().get(sn).cloned();
    own.or_else(|| state.default_reply.lock().unwrap().clone())
        .or_else(|| {
            let mut failures = state.failures.lock().unwrap();
            let (ratio, rng) = failures.as_mut()?;
            (rng.f64() < *ratio).then_some(Reply::Status(500, "chaos"))
        })
}

fn full(status: u16, body: String) -> Response<StubBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response
}

fn with_header(
    mut response: Response<StubBody>,
    name: &'static str,
    value: &str,
) -> Response<StubBody> {
    response.headers_mut().insert(name, value.parse().unwrap());
    response
}

/// A JSON string of `len` bytes: `"aaa…a"`.
fn json_string_of(len: usize) -> Vec<u8> {
    let mut body = vec![b'a'; len.max(2)];
    body[0] = b'"';
    *body.last_mut().unwrap() = b'"';
    body
}

fn chunked(body: Vec<u8>) -> Response<StubBody> {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = body
        .chunks(16 * 1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed())
}

fn endless() -> Response<StubBody> {
    let chunk = Bytes::from(vec![b' '; 16 * 1024]);
    let frames = futures_util::stream::repeat_with(move || Ok(Frame::data(chunk.clone())));
    Response::new(StreamBody::new(frames).boxed())
}
