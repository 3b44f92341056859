//! The accept loop: HTTP/1.1 connections, at most `server.max_connections` of them, one log
//! line per request, and a graceful shutdown that lets in-flight requests and write-backs
//! finish.
//!
//! HTTP/1.1 only: hyper-util's auto builder sniffs the first bytes to choose HTTP/1 or
//! HTTP/2 with no timer, so a socket that sends nothing (or half the HTTP/2 preface) was
//! held forever. hyper's HTTP/1 server times the whole request head, from the first byte
//! awaited to the last, with `server.header_read_timeout`, idle keep-alive included.

mod stream;

use self::stream::ClientStream;
use crate::admission::{Slot, Unflushed};
use crate::routes::{self, LookupStats};
use crate::state::AppState;
use hyper::Request;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

/// Serves `listener` until `shutdown` resolves, then drains: `/readyz` turns 503 at once, the
/// proxy serves on for `server.drain_delay` (so a load balancer sees it leave), then takes no
/// new connections and gives in-flight requests, refreshes and write-backs
/// `server.shutdown_grace` to finish.
pub async fn run(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.header_read_timeout);
    let graceful = GracefulShutdown::new();
    state.health.mark_ready();
    tokio::pin!(shutdown);
    // Set at the signal: until then, keep serving while `/readyz` answers 503.
    let mut stop_accepting_at: Option<Instant> = None;
    loop {
        let drain_delay_over = async {
            match stop_accepting_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = accept(&listener, &state) => match accepted {
                Ok((tcp, place)) => serve_connection(&builder, &graceful, &state, tcp, place),
                Err(err) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown, if stop_accepting_at.is_none() => {
                state.health.mark_draining();
                if !state.drain_delay.is_zero() {
                    info!(
                        drain_delay = ?state.drain_delay,
                        "shutting down: /readyz answers 503; serving on until the load balancer moves away"
                    );
                }
                stop_accepting_at = Some(Instant::now() + state.drain_delay);
            }
            () = drain_delay_over => break,
        }
    }
    drain(listener, graceful, &state).await;
}

/// The next connection, once there is room for it among `server.max_connections`: at the
/// bound, new connections wait in the kernel's backlog instead of taking descriptors.
async fn accept(listener: &TcpListener, state: &AppState) -> std::io::Result<(TcpStream, Slot)> {
    let place = state.connections.admit().await;
    let (tcp, _peer) = listener.accept().await?;
    Ok((tcp, place))
}

/// Serves one connection on its own task, until the client leaves, a timeout cuts it off,
/// or the drain ends.
fn serve_connection(
    builder: &http1::Builder,
    graceful: &GracefulShutdown,
    state: &Arc<AppState>,
    tcp: TcpStream,
    place: Slot,
) {
    let _ = tcp.set_nodelay(true);
    let unflushed = Arc::new(Unflushed::default());
    let stream = ClientStream::new(
        tcp,
        state.write_timeout,
        Arc::clone(&unflushed),
        Arc::clone(&state.metrics),
        place,
    );
    let state = Arc::clone(state);
    let service = service_fn(move |request: Request<Incoming>| {
        let state = Arc::clone(&state);
        // The admission slot of a `/v1/*` request is parked here until its response is on
        // the socket.
        let unflushed = Arc::clone(&unflushed);
        async move { Ok::<_, Infallible>(handle_logged(&state, request, &unflushed).await) }
    });
    let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
    tokio::spawn(async move {
        // A client that vanishes mid-request, or is cut off by a timeout, is its own
        // business, not an error.
        let _ = connection.await;
    });
}

/// The least time background write-backs get after the in-flight requests are done.
const MIN_FLUSH: Duration = Duration::from_secs(2);

async fn drain(listener: TcpListener, graceful: GracefulShutdown, state: &AppState) {
    state.health.mark_draining();
    drop(listener);
    info!(grace = ?state.shutdown_grace, "shutting down: finishing in-flight requests");
    let deadline = Instant::now() + state.shutdown_grace;
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("grace period over with requests still in flight");
    }
    // Requests that used up the grace still get a moment for their write-backs.
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(MIN_FLUSH);
    if state.lookup.drain(remaining).await {
        info!("shutdown complete: all write-backs finished");
    } else {
        warn!("grace period over with write-backs still running");
    }
}

/// Handles one request inside a `request` span carrying its id, which every log line of the
/// request (and of the fetches and write-backs it starts) inherits, and echoes the id back.
async fn handle_logged(
    state: &AppState,
    request: Request<Incoming>,
    unflushed: &Arc<Unflushed>,
) -> hyper::Response<routes::Body> {
    let started = Instant::now();
    let method = request.method().clone();
    // A Uri clone shares its bytes: no copy of the path per request.
    let uri = request.uri().clone();
    let id = request_id(request.headers());
    let span =
        info_span!("request", id = %id.to_str().unwrap_or_default(), %method, path = uri.path());
    let mut response = routes::handle(state, request, unflushed)
        .instrument(span.clone())
        .await;
    let stats = response
        .extensions()
        .get::<LookupStats>()
        .copied()
        .unwrap_or_default();
    span.in_scope(|| {
        info!(
            status = response.status().as_u16(),
            sns = stats.sns,
            hits = stats.hits,
            misses = stats.misses,
            elapsed = ?started.elapsed(),
            "request"
        );
    });
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The client's `X-Request-Id` when it is a sane one (1 to 128 visible ASCII characters, so
/// it cannot forge log lines), else a fresh random one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID)
        .filter(|id| (1..=128).contains(&id.len()))
        .filter(|id| id.as_bytes().iter().all(|byte| byte.is_ascii_graphic()))
        .cloned()
        .unwrap_or_else(fresh_request_id)
}

/// 16 random lowercase hex digits: ids of one length, easy to grep.
fn fresh_request_id() -> HeaderValue {
    // Hex digits always make a valid header value; the fallback is never taken.
    HeaderValue::from_str(&format!("{:016x}", fastrand::u64(..)))
        .unwrap_or_else(|_| HeaderValue::from_static("0000000000000000"))
}
