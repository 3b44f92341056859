//! How a batch is cut into groups, each sent as one command or one pipeline (see
//! `RedisCache`'s module doc): on one Redis, contiguous chunks of `redis.chunk_size` keys;
//! on a cluster, the keys of each master (by the proxy's own slot map, see `cluster`), in
//! runs that share a hash slot, chunked.

use super::{RedisCache, Route, outcome, told};
use crate::cache::CacheError;
use crate::cache::cluster::{ClusterLink, ClusterNode, Topology};
use crate::cache::slots::{Address, Owner};
use crate::metrics::RedisCommand;
use redis::cluster_routing::Slot;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::time::Instant;

/// Where a group of a batch goes.
#[derive(Clone)]
pub(super) enum Destination {
    /// The one Redis; on a cluster, wherever redis-rs routes the command (`PUBLISH`, `PING`).
    Any,
    /// A cluster master, addressed through one slot it serves (so redis-rs's connections,
    /// credentials, TLS and redirects apply), with its own breaker when the slot
    /// map knows the master.
    Shard {
        slot: Slot,
        node: Option<Arc<ClusterNode>>,
        /// With `redis.read_from_replicas`: the replica this group's reads go to (over a
        /// connection of the proxy's own, see `cluster`), counted against its master's
        /// breaker.
        replica: Option<Address>,
    },
}

/// One command or pipeline of a batch: the places of its SNs in the batch, in runs that share
/// a hash slot (`ends` are where the runs end), and where it goes.
pub(super) struct Group {
    pub(super) places: Vec<usize>,
    pub(super) ends: Vec<usize>,
    pub(super) to: Destination,
}

impl Group {
    /// The runs of places that share a slot, each a command of its own.
    pub(super) fn runs(&self) -> impl Iterator<Item = &[usize]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.places[start..end])
    }
}

/// A place in a batch with its slot's number (numbered in order of first sight).
type SlotPlace = (u32, usize);

impl RedisCache {
    /// The groups a batch of `sns` is sent in (see the module doc). On a cluster with no
    /// slot map yet, the map is asked for first, through the cluster's own breaker.
    pub(super) async fn groups<'s>(
        &self,
        sns: impl ExactSizeIterator<Item = &'s str>,
    ) -> Result<Vec<Group>, CacheError> {
        let Route::Cluster(link) = &self.route else {
            let count = sns.len();
            return Ok((0..count)
                .step_by(self.chunk_size)
                .map(|start| {
                    let places: Vec<usize> = (start..count.min(start + self.chunk_size)).collect();
                    Group {
                        ends: vec![places.len()],
                        places,
                        to: Destination::Any,
                    }
                })
                .collect());
        };
        let topology = match link.topology_now() {
            Some(topology) => topology,
            None => self.first_topology(link).await?,
        };
        // Per master (or, for a slot no master serves, per slot): the places, each with its
        // slot's number in order of first sight (`Slot` itself has no order to sort by).
        let mut slot_ids: HashMap<Slot, u32, ahash::RandomState> = HashMap::default();
        let mut shards: HashMap<Owner, (Destination, Vec<SlotPlace>), ahash::RandomState> =
            HashMap::default();
        let mut key = Vec::new();
        for (place, sn) in sns.enumerate() {
            self.key_into(&mut key, sn);
            let slot = Slot::for_key(&key);
            let next = u32::try_from(slot_ids.len()).unwrap_or(u32::MAX);
            let slot_id = *slot_ids.entry(slot).or_insert(next);
            let (owner, node) = match topology.node_of(slot) {
                Some((index, node)) => (Owner::Node(index), Some((index, node))),
                None => (Owner::Unowned(slot), None),
            };
            let (_, places) = shards.entry(owner).or_insert_with(|| {
                let replica = node.and_then(|(index, node)| {
                    topology.replica_of(index, node, |replica| link.replica_usable(replica))
                });
                let node = node.map(|(_, node)| Arc::clone(node));
                let to = Destination::Shard {
                    slot,
                    node,
                    replica,
                };
                (to, Vec::new())
            });
            places.push((slot_id, place));
        }
        let mut groups = Vec::new();
        for (to, mut places) in shards.into_values() {
            places.sort_unstable_by_key(|&(slot_id, _)| slot_id);
            for chunk in places.chunks(self.chunk_size) {
                groups.push(Self::slot_runs(chunk, to.clone()));
            }
        }
        Ok(groups)
    }

    /// A group of `places` (sorted by slot) with a run per slot.
    fn slot_runs(places: &[SlotPlace], to: Destination) -> Group {
        let mut ends = Vec::new();
        for (at, pair) in places.windows(2).enumerate() {
            if pair[0].0 != pair[1].0 {
                ends.push(at + 1);
            }
        }
        ends.push(places.len());
        Group {
            places: places.iter().map(|&(_, place)| place).collect(),
            ends,
            to,
        }
    }

    /// The first slot map, asked for through the cluster's breaker, within `redis.timeout`.
    async fn first_topology(&self, link: &ClusterLink) -> Result<Arc<Topology>, CacheError> {
        let started = Instant::now();
        let result = match self.circuit.try_acquire() {
            None => Err(CacheError::Skipped),
            Some(ticket) => {
                let asked = tokio::time::timeout(self.timeout, link.first_topology()).await;
                let asked = asked.unwrap_or(Err(CacheError::Timeout {
                    op: "CLUSTER SLOTS",
                    timeout: self.timeout,
                }));
                told(ticket, asked)
            }
        };
        self.metrics.record_redis(
            RedisCommand::ClusterSlots,
            outcome(&result),
            started.elapsed(),
        );
        result
    }
}
