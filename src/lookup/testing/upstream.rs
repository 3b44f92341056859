//! The scripted upstream: per-SN replies in turn (a discount, not found, an error, a hang,
//! each after a delay), call counters, an in-flight gauge and a circuit state set by the test.

use super::super::Upstream;
use crate::circuit::CircuitState;
use crate::upstream::{Fetched, UpstreamError};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// What the real upstream takes per SN.
pub(in crate::lookup) const LATENCY: Duration = Duration::from_millis(500);

/// One scripted answer, given `after` the call starts.
#[derive(Debug, Clone)]
pub(in crate::lookup) enum Reply {
    /// `200` with the SN's own [`discount`].
    Discount,
    NotFound,
    Fail(UpstreamError),
    /// Never answers (until the fetch is dropped).
    Hang,
}

/// The discount the upstream gives an SN it has no script for.
pub(in crate::lookup) fn discount(sn: &str) -> Bytes {
    Bytes::from(format!(r#"{{"sn":"{sn}"}}"#))
}

/// An upstream that answers by script: each SN's replies in turn, the last one repeated;
/// an SN without a script is found, with [`discount`], after [`LATENCY`].
pub(in crate::lookup) struct ScriptedUpstream {
    concurrency: usize,
    script: Mutex<HashMap<String, VecDeque<(Duration, Reply)>>>,
    calls: Mutex<HashMap<String, usize>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    circuit: Mutex<CircuitState>,
}

impl ScriptedUpstream {
    pub(super) fn new(concurrency: usize) -> Self {
        Self {
            concurrency,
            script: Mutex::default(),
            calls: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
            circuit: Mutex::new(CircuitState::Closed),
        }
    }

    /// The replies `sn` gets from now on, in turn; the last one repeats.
    pub(in crate::lookup) fn script(
        &self,
        sn: &str,
        replies: impl IntoIterator<Item = (Duration, Reply)>,
    ) {
        let replies = replies.into_iter().collect();
        self.script.lock().unwrap().insert(sn.to_owned(), replies);
    }

    /// Calls made for `sn` (a call refused by an open circuit is none).
    pub(in crate::lookup) fn calls(&self, sn: &str) -> usize {
        self.calls.lock().unwrap().get(sn).copied().unwrap_or(0)
    }

    pub(in crate::lookup) fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }

    pub(in crate::lookup) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(in crate::lookup) fn most_in_flight(&self) -> usize {
        self.most_in_flight.load(Ordering::SeqCst)
    }

    pub(in crate::lookup) fn set_circuit(&self, state: CircuitState) {
        *self.circuit.lock().unwrap() = state;
    }

    fn next_reply(&self, sn: &str) -> (Duration, Reply) {
        let mut script = self.script.lock().unwrap();
        match script.get_mut(sn) {
            Some(replies) if replies.len() > 1 => replies.pop_front().unwrap(),
            Some(replies) if !replies.is_empty() => replies[0].clone(),
            _ => (LATENCY, Reply::Discount),
        }
    }
}

/// Counts a fetch as in flight until it ends or is dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Upstream for ScriptedUpstream {
    fn fetch<'a>(
        &'a self,
        sn: &'a str,
        _retry_until: Instant,
    ) -> BoxFuture<'a, Result<Fetched, UpstreamError>> {
        Box::pin(async move {
            if self.circuit() == CircuitState::Open {
                return Err(UpstreamError::CircuitOpen);
            }
            *self.calls.lock().unwrap().entry(sn.to_owned()).or_default() += 1;
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            let _in_flight = InFlight(&self.in_flight);
            let (after, reply) = self.next_reply(sn);
            tokio::time::sleep(after).await;
            match reply {
                Reply::Discount => Ok(Fetched::Found(discount(sn))),
                Reply::NotFound => Ok(Fetched::NotFound),
                Reply::Fail(err) => Err(err),
                Reply::Hang => std::future::pending().await,
            }
        })
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn circuit(&self) -> CircuitState {
        *self.circuit.lock().unwrap()
    }
}
