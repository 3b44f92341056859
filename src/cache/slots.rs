//! Which master serves which hash slot, as the cluster's `CLUSTER SLOTS` says: the proxy's
//! own copy of the slot map, so a batch can be grouped by node before it is sent.
//!
//! Why a copy of our own: redis-rs keeps a slot map too, but does not expose it, and routes
//! each command by itself. Handing it one command per slot (a random 10,000-key batch
//! touches about 7,700 slots) costs 30–40 µs of its routing per command; one pipeline per
//! node costs that once per pipeline. The pipelines still go through redis-rs, addressed by
//! one slot of the node (see `ClusterLink`), so its connections, credentials, TLS and
//! redirects are used as they are (replica reads go over connections of the proxy's own).
//!
//! The copy may be behind the cluster (a failover, a reshard): a key then reaches a node that
//! no longer owns it, that node answers `MOVED`, and the group fails as a whole: its keys are
//! misses, nothing is written to the wrong node (a node refuses keys of slots it does not
//! own), and the map is taken again.

use redis::Value;
use redis::cluster_routing::Slot;
use std::collections::HashMap;
use std::fmt;

/// Hash slots in a Redis Cluster: fixed by its protocol.
const SLOT_COUNT: u16 = 16_384;

/// Who serves a slot: a master of [`SlotMap::nodes`], by index, or nobody the map knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Owner {
    /// The master at this index of the map's nodes.
    Node(usize),
    /// No master serves the slot (the cluster is failing it over, or it is unassigned).
    Unowned(Slot),
}

/// The slot map: every slot's master.
pub(super) struct SlotMap {
    owners: HashMap<Slot, u16, ahash::RandomState>,
    nodes: Vec<String>,
    /// The replicas of each master (same order as `nodes`), as the master's first range
    /// lists them.
    replicas: Vec<Vec<Address>>,
}

/// A node's address as the cluster announces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Address {
    pub(super) host: String,
    pub(super) port: u16,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A `CLUSTER SLOTS` reply that is not what Redis sends.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Malformed(&'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unexpected CLUSTER SLOTS reply: {}", self.0)
    }
}

impl SlotMap {
    /// The map a `CLUSTER SLOTS` reply describes. Masters are named `host:port`; a master
    /// whose host Redis leaves empty (it does not know its own address) is named by its port
    /// alone, which is still one name per node.
    ///
    /// # Errors
    /// A reply that is not an array of slot ranges with a master each.
    pub(super) fn from_cluster_slots(reply: &Value) -> Result<Self, Malformed> {
        let Value::Array(ranges) = reply else {
            return Err(Malformed("not an array"));
        };
        let mut owners = HashMap::with_capacity_and_hasher(
            usize::from(SLOT_COUNT),
            ahash::RandomState::default(),
        );
        let mut nodes: Vec<String> = Vec::new();
        let mut replicas: Vec<Vec<Address>> = Vec::new();
        let mut index: HashMap<String, u16> = HashMap::new();
        for range in ranges {
            let (start, end, master, range_replicas) = parse_range(range)?;
            let next = u16::try_from(nodes.len()).map_err(|_| Malformed("too many masters"))?;
            let node = *index.entry(master.to_string()).or_insert_with(|| {
                nodes.push(master.to_string());
                replicas.push(range_replicas);
                next
            });
            for slot in (start..=end).filter_map(Slot::new) {
                owners.insert(slot, node);
            }
        }
        Ok(Self {
            owners,
            nodes,
            replicas,
        })
    }

    /// The master serving `slot`.
    pub(super) fn owner(&self, slot: Slot) -> Owner {
        match self.owners.get(&slot) {
            Some(&node) => Owner::Node(usize::from(node)),
            None => Owner::Unowned(slot),
        }
    }

    /// The masters, each named `host:port`, in the order [`Owner::Node`] counts them.
    pub(super) fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The replicas of the master at `index` of [`SlotMap::nodes`].
    pub(super) fn replicas_of(&self, index: usize) -> &[Address] {
        self.replicas.get(index).map_or(&[], Vec::as_slice)
    }
}

/// One range of the reply: `[start, end, [host, port, id, …], replicas…]`.
fn parse_range(range: &Value) -> Result<(u16, u16, Address, Vec<Address>), Malformed> {
    let Value::Array(parts) = range else {
        return Err(Malformed("a range is not an array"));
    };
    let [start, end, master, replicas @ ..] = parts.as_slice() else {
        return Err(Malformed("a range without a master"));
    };
    let slot = |value: &Value| match value {
        Value::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|slot| *slot < SLOT_COUNT)
            .ok_or(Malformed("a slot out of range")),
        _ => Err(Malformed("a slot that is not a number")),
    };
    let (start, end) = (slot(start)?, slot(end)?);
    if start > end {
        return Err(Malformed("a range that ends before it starts"));
    }
    let replicas = replicas.iter().map(address).collect::<Result<_, _>>()?;
    Ok((start, end, address(master)?, replicas))
}

/// The address of a node entry `[host, port, …]`.
fn address(node: &Value) -> Result<Address, Malformed> {
    let Value::Array(fields) = node else {
        return Err(Malformed("a node is not an array"));
    };
    let [host, port, ..] = fields.as_slice() else {
        return Err(Malformed("a node without host and port"));
    };
    let host = match host {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(text) => text.clone(),
        _ => return Err(Malformed("a host that is not a string")),
    };
    let Value::Int(port) = port else {
        return Err(Malformed("a port that is not a number"));
    };
    let port = u16::try_from(*port).map_err(|_| Malformed("a port out of range"))?;
    Ok(Address { host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(n: u16) -> Slot {
        Slot::new(n).unwrap()
    }

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"0123456789abcdef".to_vec()),
        ])
    }

    fn range(start: i64, end: i64, master: Value, replicas: Vec<Value>) -> Value {
        let mut parts = vec![Value::Int(start), Value::Int(end), master];
        parts.extend(replicas);
        Value::Array(parts)
    }

    #[test]
    fn every_slot_gets_the_master_of_its_range_and_replicas_are_not_owners() {
        let reply = Value::Array(vec![
            range(
                0,
                5460,
                node("10.0.0.1", 7000),
                vec![node("10.0.0.4", 7003)],
            ),
            range(5461, 10922, node("10.0.0.2", 7001), vec![]),
            range(10923, 16383, node("10.0.0.3", 7002), vec![]),
        ]);
        let map = SlotMap::from_cluster_slots(&reply).unwrap();
        assert_eq!(
            map.nodes(),
            ["10.0.0.1:7000", "10.0.0.2:7001", "10.0.0.3:7002"]
        );
        assert_eq!(map.owner(slot(0)), Owner::Node(0));
        assert_eq!(map.owner(slot(5460)), Owner::Node(0));
        assert_eq!(map.owner(slot(5461)), Owner::Node(1));
        assert_eq!(map.owner(slot(16383)), Owner::Node(2));
        let replica = Address {
            host: "10.0.0.4".to_owned(),
            port: 7003,
        };
        assert_eq!(map.replicas_of(0), [replica]);
        assert!(map.replicas_of(1).is_empty());
    }

    #[test]
    fn a_master_with_several_ranges_is_one_node() {
        let reply = Value::Array(vec![
            range(0, 99, node("a", 1), vec![]),
            range(100, 199, node("b", 2), vec![]),
            range(200, 299, node("a", 1), vec![]),
        ]);
        let map = SlotMap::from_cluster_slots(&reply).unwrap();
        assert_eq!(map.nodes().len(), 2);
        assert_eq!(map.owner(slot(250)), map.owner(slot(50)));
    }

    #[test]
    fn slots_no_range_names_are_unowned_not_given_to_a_neighbour() {
        let reply = Value::Array(vec![range(0, 99, node("a", 1), vec![])]);
        let map = SlotMap::from_cluster_slots(&reply).unwrap();
        assert_eq!(map.owner(slot(100)), Owner::Unowned(slot(100)));
        assert_eq!(map.owner(slot(16383)), Owner::Unowned(slot(16383)));
    }

    #[test]
    fn a_reply_that_is_not_a_slot_map_is_an_error_not_a_panic() {
        for reply in [
            Value::Nil,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(1)])]),
            Value::Array(vec![range(0, 16384, node("a", 1), vec![])]),
            Value::Array(vec![range(-1, 5, node("a", 1), vec![])]),
            Value::Array(vec![range(9, 5, node("a", 1), vec![])]),
            Value::Array(vec![range(0, 5, Value::Array(vec![]), vec![])]),
        ] {
            assert!(SlotMap::from_cluster_slots(&reply).is_err(), "{reply:?}");
        }
    }
}
