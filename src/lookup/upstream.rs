//! The upstream as the lookup core sees it: fetch one SN, how many fetches one lookup may
//! have under way, and the circuit's state. [`UpstreamClient`] is the real one; the core's
//! unit tests script their own.

use crate::circuit::CircuitState;
use crate::upstream::{Fetched, UpstreamClient, UpstreamError};
use futures_util::future::BoxFuture;
use tokio::time::Instant;

/// What the lookup core needs of the upstream, so it can be driven without HTTP.
///
/// Retries, the global concurrency limit and the per-SN circuit tickets stay behind
/// [`Upstream::fetch`]: the core only sees one answer per SN.
pub trait Upstream: Send + Sync + 'static {
    /// Fetches one SN, retrying what is worth retrying while a retry can still start before
    /// `retry_until`.
    ///
    /// # Errors
    /// No definite answer: see [`UpstreamError`]. [`UpstreamError::CircuitOpen`] means no
    /// call was made.
    fn fetch<'a>(
        &'a self,
        sn: &'a str,
        retry_until: Instant,
    ) -> BoxFuture<'a, Result<Fetched, UpstreamError>>;

    /// Most fetches at once (`upstream.concurrency`): one fetch task's bound, and what the
    /// streamed window read keeps outstanding.
    fn concurrency(&self) -> usize;

    /// The circuit's state, for `/readyz`.
    fn circuit(&self) -> CircuitState;
}

impl Upstream for UpstreamClient {
    fn fetch<'a>(
        &'a self,
        sn: &'a str,
        retry_until: Instant,
    ) -> BoxFuture<'a, Result<Fetched, UpstreamError>> {
        // One box per fetch: a 0.5 s network call, so its allocation does not show.
        Box::pin(UpstreamClient::fetch(self, sn, retry_until))
    }

    fn concurrency(&self) -> usize {
        UpstreamClient::concurrency(self)
    }

    fn circuit(&self) -> CircuitState {
        self.circuit_state()
    }
}
