//! Where the invalidation subscription connects on a cluster. A subscription needs a
//! connection of its own (it cannot share the multiplexed ones), and no one node stays
//! right: a client is asked for at every attempt to subscribe (see `connections::Endpoint`),
//! and a lost subscription comes back on whichever seed answers now.

use super::CacheError;
use redis::Client;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Seed nodes taken in turn, one per attempt.
pub(super) struct SeedRotation {
    /// Never empty.
    seeds: Box<[Client]>,
    next: AtomicUsize,
}

impl SeedRotation {
    /// Clients for the seed URLs in `seeds`.
    ///
    /// # Errors
    /// A URL redis-rs cannot use, or no URL at all.
    pub(super) fn new(seeds: &[String]) -> Result<Self, CacheError> {
        let seeds = seeds
            .iter()
            .map(|seed| Client::open(seed.as_str()))
            .collect::<Result<Box<[Client]>, _>>()
            .map_err(CacheError::InvalidUrl)?;
        if seeds.is_empty() {
            return Err(CacheError::InvalidUrl(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no seed node",
            ))));
        }
        Ok(Self {
            seeds,
            next: AtomicUsize::new(0),
        })
    }

    /// The next seed's client.
    pub(super) fn next(&self) -> Client {
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
        let seeds = SeedRotation::new(&urls).unwrap();
        let turns: Vec<String> = (0..3).map(|_| port_of(&seeds.next())).collect();
        assert_eq!(
            turns,
            ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7001"]
        );
    }

    #[test]
    fn no_seeds_are_refused_rather_than_divided_by() {
        assert!(SeedRotation::new(&[]).is_err());
    }
}
