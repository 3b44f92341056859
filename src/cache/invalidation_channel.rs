//! The Redis pub/sub channels every instance follows: invalidations for the in-process tier,
//! and (`coalesce.distributed`) announcements of answers written, for the waiters of
//! `wakeups`.
//!
//! Each instance subscribes on a connection of its own, on the node its
//! [`Endpoint`] names for each attempt, and hands each message to the channel's
//! [`Handler`]. The subscription is checked with a `PING` every second; when it is lost, the
//! handler is told on the way back (a message may have been missed meanwhile): the tier is
//! emptied, and while it is down no copy outlives `cache.local.ttl`, which is the staleness
//! bound; every waiter looks again.

use super::LocalTier;
use super::connections::Endpoint;
use crate::metrics::{InvalidationEvent, Metrics};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the subscription is checked, and how long its `PING` may take.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Bounds on the wait between two attempts to subscribe.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The channel of one key prefix: instances that share a cache share its invalidations.
pub(super) struct InvalidationChannel {
    name: String,
}

/// A message: the SNs, one per line (a valid SN holds no whitespace).
pub(super) fn encode(sns: &[&str]) -> Vec<u8> {
    sns.join("\n").into_bytes()
}

/// What a message asks for: dropping these SNs, or (a message this proxy did not write)
/// dropping everything, since there is no telling what it meant.
#[derive(Debug, PartialEq)]
pub(super) enum Invalidate<'a> {
    These(Vec<&'a str>),
    All,
}

pub(super) fn decode(message: &[u8]) -> Invalidate<'_> {
    match std::str::from_utf8(message) {
        Ok(text) => Invalidate::These(text.split('\n').filter(|sn| !sn.is_empty()).collect()),
        Err(_) => Invalidate::All,
    }
}

impl InvalidationChannel {
    pub(super) fn new(key_prefix: &str) -> Self {
        Self {
            name: format!("{key_prefix}invalidations"),
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Follows the channel in a task of its own, resubscribing whenever the subscription is
    /// lost, until the returned token is cancelled.
    pub(super) fn follow(
        &self,
        endpoint: Arc<Endpoint>,
        local: Arc<LocalTier>,
        metrics: Arc<Metrics>,
    ) -> CancellationToken {
        follow(
            endpoint,
            self.name.clone(),
            Arc::new(Invalidations { local, metrics }),
        )
    }
}

/// What a followed channel's messages are for.
pub(super) trait Handler: Send + Sync + 'static {
    /// Subscribed (again), or not any more: while not, messages may be missed.
    fn subscribed(&self, up: bool);
    /// A message arrived.
    fn message(&self, payload: &[u8]);
}

/// Follows `channel` in a task of its own, resubscribing whenever the subscription is lost,
/// until the returned token is cancelled.
pub(super) fn follow(
    endpoint: Arc<Endpoint>,
    channel: String,
    handler: Arc<dyn Handler>,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let follower = Follower {
        endpoint,
        channel,
        handler,
    };
    let stopped = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = follower.run() => {}
            () = stopped.cancelled() => {}
        }
    });
    stop
}

/// Invalidations for the in-process tier.
struct Invalidations {
    local: Arc<LocalTier>,
    metrics: Arc<Metrics>,
}

impl Handler for Invalidations {
    fn subscribed(&self, up: bool) {
        if up {
            // Whatever was copied while not subscribed may have missed its invalidation.
            self.local.clear();
        }
        self.metrics.set_invalidation_channel_up(up);
    }

    fn message(&self, message: &[u8]) {
        self.metrics
            .record_invalidation_message(InvalidationEvent::Received);
        match decode(message) {
            Invalidate::These(sns) => {
                debug!(sns = sns.len(), "invalidation received");
                self.local.invalidate(sns);
            }
            Invalidate::All => {
                warn!("unreadable invalidation message; dropping every local copy");
                self.local.clear();
            }
        }
    }
}

struct Follower {
    /// Asked for a client at each attempt: on a cluster or behind Sentinel, where to
    /// subscribe changes.
    endpoint: Arc<Endpoint>,
    channel: String,
    handler: Arc<dyn Handler>,
}

impl Follower {
    async fn run(self) {
        let mut retry = RETRY_MIN;
        loop {
            let started = Instant::now();
            let lost = self.session().await;
            self.handler.subscribed(false);
            // A subscription that lasted was a good one: the next attempt starts quick again.
            if started.elapsed() > RETRY_MAX * 2 {
                retry = RETRY_MIN;
            }
            warn!(
                channel = %self.channel, error = %lost, retry_in = ?retry,
                "not following the channel; missed messages are made up for when it is back"
            );
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// Subscribes and applies messages until the subscription is lost; returns why.
    async fn session(&self) -> String {
        let (pubsub, node) = match tokio::time::timeout(HEARTBEAT * 5, self.subscribe()).await {
            Ok(Ok(subscribed)) => subscribed,
            Ok(Err(err)) => return err,
            Err(_) => return "subscribing timed out".to_owned(),
        };
        self.handler.subscribed(true);
        info!(channel = %self.channel, %node, "following the channel");
        let (mut sink, mut messages) = pubsub.split();
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => self.handler.message(message.get_payload_bytes()),
                    None => return "the subscription connection closed".to_owned(),
                },
                _ = heartbeat.tick() => {
                    // Subscribed, Redis answers a PING with `["pong", ""]`: any answer will do.
                    let ping = sink.ping::<redis::Value>();
                    match tokio::time::timeout(HEARTBEAT, ping).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => return err.to_string(),
                        Err(_) => return "the subscription stopped answering".to_owned(),
                    }
                }
            }
        }
    }

    /// Subscribes on the node the endpoint names for this attempt; returns the subscription
    /// and that node's address (host and port only: no credentials).
    async fn subscribe(&self) -> Result<(redis::aio::PubSub, String), String> {
        let client = self
            .endpoint
            .client()
            .await
            .map_err(|err| err.to_string())?;
        let node = client.get_connection_info().addr().to_string();
        let failed = |err: redis::RedisError| format!("{node}: {err}");
        let mut pubsub = client.get_async_pubsub().await.map_err(failed)?;
        pubsub.subscribe(&self.channel).await.map_err(failed)?;
        Ok((pubsub, node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_sns_one_per_line() {
        let message = encode(&["A-1", "B\u{e9}", "C"]);
        assert_eq!(
            decode(&message),
            Invalidate::These(vec!["A-1", "B\u{e9}", "C"])
        );
        assert_eq!(decode(b""), Invalidate::These(vec![]));
    }

    #[test]
    fn an_unreadable_message_drops_everything() {
        assert_eq!(decode(&[0xff, 0xfe, b'A']), Invalidate::All);
    }
}
