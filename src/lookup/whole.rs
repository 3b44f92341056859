//! A lookup answered whole (a JSON response): the cache read once, every miss joined at
//! once, and the batch summed up when the last answer and its write-back are in, or at the
//! deadline.

use super::resolving::{Next, Resolving};
use super::{Batch, Core, Overloaded};
use std::sync::Arc;
use tokio::time::Instant;
use tracing::{Instrument, info_span};

/// A lookup whose misses are all being fetched.
pub(super) struct WholeLookup {
    resolving: Resolving,
}

impl WholeLookup {
    /// Validates, reads the cache (not with `refresh`: every SN is fetched then), and joins
    /// or starts the fetches of the misses, queuing the ones no task has started in a task
    /// of this lookup.
    ///
    /// # Errors
    /// [`Overloaded`]: the misses would need more new fetches than may be pending. Nothing
    /// was started then.
    pub(super) async fn start(
        core: &Arc<Core>,
        requested: Vec<String>,
        refresh: bool,
        arrived: Instant,
    ) -> Result<Self, Overloaded> {
        let (mut resolving, valid) = Resolving::new(core, requested, arrived);
        let (misses, read_failed) = if refresh {
            (valid, false)
        } else {
            resolving.read(core, valid).await
        };
        if !misses.is_empty() {
            let unclaimed = resolving.join(&core.flights, &misses, refresh)?;
            if read_failed {
                core.skip_claims(&unclaimed);
            }
            if !unclaimed.is_empty() {
                // Retries never start past the deadline of the request whose task fetches
                // it. A child of the request's span: its log lines carry the request id.
                let span = info_span!("upstream_fetch", sns = unclaimed.len());
                let fetch = Arc::clone(core).fetch(unclaimed, resolving.deadline(), None);
                core.tasks.spawn(fetch.instrument(span));
            }
        }
        Ok(Self { resolving })
    }

    /// Waits for every answer (until the deadline) and their write-backs, and returns the
    /// batch.
    pub(super) async fn finish(mut self) -> Batch {
        while let Next::Answered(_) = self.resolving.next_answer().await {}
        self.resolving.write_backs().await;
        self.resolving.into_batch()
    }
}
