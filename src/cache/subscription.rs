//! Where the invalidation subscription connects. A subscription needs a connection of its own
//! (it cannot share the multiplexed ones), and on a cluster or behind Sentinel no one address
//! stays right: so a client is asked for at every attempt to subscribe, and a lost
//! subscription comes back on whichever node answers now.

use super::CacheError;
use super::sentinel::SentinelEndpoint;
use redis::Client;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The Redis to subscribe on, asked again at each attempt.
pub(super) enum SubscriptionEndpoint {
    /// `redis.url`: the one Redis.
    Fixed(Box<Client>),
    /// A cluster's seeds, one per attempt in turn: a `PUBLISH` on a cluster reaches the
    /// subscribers of every node, so any node that answers will do, and a dead one must not
    /// keep the channel down while the others are up.
    Seeds(SeedRotation),
    /// The master the sentinels name now, where `PUBLISH` goes: asked again at each attempt,
    /// so after a failover the subscription follows the new master once the old one is lost.
    Sentinel(Arc<SentinelEndpoint>),
}

impl SubscriptionEndpoint {
    /// A client for the next attempt to subscribe.
    ///
    /// # Errors
    /// Sentinel only: no sentinel answered, or none names a master that says it is one.
    pub(super) async fn client(&self) -> Result<Client, CacheError> {
        match self {
            Self::Fixed(client) => Ok(Client::clone(client)),
            Self::Seeds(seeds) => Ok(seeds.next()),
            Self::Sentinel(sentinels) => sentinels.client().await,
        }
    }
}

/// Seed nodes taken in turn, one per attempt.
pub(super) struct SeedRotation {
    /// Never empty.
    seeds: Box<[Client]>,
    next: AtomicUsize,
}

impl SeedRotation {
    /// Clients for the seed URLs in `seeds`; `None` when there are none.
    ///
    /// # Errors
    /// A URL redis-rs cannot use.
    pub(super) fn new(seeds: &[String]) -> Result<Option<Self>, CacheError> {
        let seeds = seeds
            .iter()
            .map(|seed| Client::open(seed.as_str()))
            .collect::<Result<Box<[Client]>, _>>()
            .map_err(CacheError::InvalidUrl)?;
        Ok((!seeds.is_empty()).then(|| Self {
            seeds,
            next: AtomicUsize::new(0),
        }))
    }

    fn next(&self) -> Client {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.seeds.len();
        Client::clone(&self.seeds[turn])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port_of(client: &Client) -> String {
        client.get_connection_info().addr().to_string()
    }

    #[test]
    fn seeds_are_taken_in_turn_and_start_again_after_the_last() {
        let urls = ["redis://127.0.0.1:7001", "redis://127.0.0.1:7002"].map(str::to_owned);
        let seeds = SeedRotation::new(&urls).unwrap().unwrap();
        let turns: Vec<String> = (0..3).map(|_| port_of(&seeds.next())).collect();
        assert_eq!(
            turns,
            ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7001"]
        );
    }

    #[test]
    fn no_seeds_make_no_rotation() {
        assert!(SeedRotation::new(&[]).unwrap().is_none());
    }
}
