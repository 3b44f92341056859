//! One node's view of a Redis Cluster, parsed from `CLUSTER NODES`: who is master of which
//! slots, who replicates whom, who is failing.

pub use super::node::Role;
use std::ops::RangeInclusive;

/// Every key hashes to one of these many slots.
pub const SLOTS: u32 = 16384;

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub role: Role,
    /// Flagged `fail` or `fail?`: the asking node thinks it is down.
    pub failing: bool,
    /// The id of the master it replicates, for a replica.
    pub master_id: Option<String>,
    /// The slots it serves (stable ones; slots being migrated are not listed).
    pub slots: Vec<RangeInclusive<u16>>,
}

impl ClusterNode {
    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|range| range.contains(&slot))
    }

    pub fn slot_count(&self) -> u32 {
        self.slots
            .iter()
            .map(|range| u32::from(*range.end()) - u32::from(*range.start()) + 1)
            .sum()
    }
}

/// Parses a `CLUSTER NODES` reply, failing the test on a line it does not understand.
pub fn parse_nodes(reply: &str) -> Vec<ClusterNode> {
    reply
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| parse_line(line).unwrap_or_else(|| panic!("odd CLUSTER NODES line {line:?}")))
        .collect()
}

// <id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent> <pong-recv> <epoch> <link> <slot>…
fn parse_line(line: &str) -> Option<ClusterNode> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (id, address, flags, master) = (
        fields.first()?,
        fields.get(1)?,
        fields.get(2)?,
        fields.get(3)?,
    );
    let port = address
        .split_once(':')?
        .1
        .split(['@', ','])
        .next()?
        .parse()
        .ok()?;
    let flags: Vec<&str> = flags.split(',').collect();
    let role = if flags.contains(&"master") {
        Role::Master
    } else if flags.contains(&"slave") {
        Role::Replica
    } else {
        return None;
    };
    let slots = fields
        .get(8..)
        .unwrap_or_default()
        .iter()
        .filter(|field| !field.starts_with('['))
        .map(|field| parse_slots(field))
        .collect::<Option<_>>()?;
    Some(ClusterNode {
        id: (*id).to_owned(),
        port,
        role,
        failing: flags.iter().any(|flag| flag.starts_with("fail")),
        master_id: (*master != "-").then(|| (*master).to_owned()),
        slots,
    })
}

fn parse_slots(field: &str) -> Option<RangeInclusive<u16>> {
    match field.split_once('-') {
        Some((start, end)) => Some(start.parse().ok()?..=end.parse().ok()?),
        None => {
            let slot = field.parse().ok()?;
            Some(slot..=slot)
        }
    }
}

#[test]
fn cluster_nodes_lines_are_read_with_roles_failures_and_slot_ranges() {
    let reply = "\
e1d1 127.0.0.1:17005@27005 slave dfe7 0 1795984196608 1 connected
dfe7 127.0.0.1:17001@27001 master,fail - 0 1795984196709 1 disconnected
6929 127.0.0.1:17003@27003,host myself,master - 0 0 3 connected 10923-16383 42 [43->-e1d1]
";
    let nodes = parse_nodes(reply);
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[0].role, Role::Replica);
    assert_eq!(nodes[0].master_id.as_deref(), Some("dfe7"));
    assert!(nodes[1].failing && nodes[1].slots.is_empty());
    assert_eq!(nodes[2].port, 17003);
    assert_eq!(nodes[2].slots, vec![10923..=16383, 42..=42]);
    assert_eq!(nodes[2].slot_count(), 5462);
    assert!(nodes[2].owns(42) && !nodes[2].owns(43));
}
