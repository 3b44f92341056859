//! Self-tests of the cluster and sentinel support: the topologies the tests of `redis.mode`
//! run against must be what they claim, fail over as Redis does, and leave nothing running.

use crate::support::{ClusterNode, RedisCluster, Role, SLOTS, SentinelSet, Shared, Ttl};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test]
async fn cluster_comes_up_with_three_masters_covering_every_slot_each_with_one_replica() {
    let cluster = RedisCluster::shared();
    assert!(Arc::ptr_eq(&cluster, &RedisCluster::shared()));
    assert_eq!(cluster.nodes().len(), 6);

    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3, "{:?}", cluster.topology().await);
    let mut replicas = Vec::new();
    for &master in &masters {
        let of_master = cluster.replicas_of(master).await;
        assert_eq!(
            of_master.len(),
            1,
            "master {master} has replicas {of_master:?}"
        );
        replicas.extend(of_master);
    }
    replicas.sort_unstable();
    assert_eq!(replicas, cluster.replicas().await);

    let topology = cluster.topology().await;
    let serving = topology.iter().filter(|node| node.role == Role::Master);
    let served: u32 = serving.map(|node| node.slot_count()).sum();
    assert_eq!(served, SLOTS);
    for slot in [0, 5000, 10000, 16383] {
        assert!(masters.contains(&cluster.master_of_slot(slot).await));
    }
    for replica in &replicas {
        assert_eq!(cluster.role(*replica).await, Role::Replica, "{replica}");
    }
}

#[tokio::test]
async fn keys_are_found_on_the_master_owning_their_slot_with_their_ttl() {
    let cluster = RedisCluster::shared();
    let keys: Vec<String> = (0..30).map(|i| format!("topologies:ttl:{i}")).collect();
    for key in &keys {
        let owner = cluster.master_of_key(key).await;
        cluster
            .command(owner, &["SET", key, "v", "EX", "600"])
            .await;
    }

    let counts = cluster.key_counts_by_master().await;
    assert_eq!(counts.len(), 3);
    assert!(counts.values().all(|&count| count > 0), "{counts:?}");
    for key in &keys {
        match cluster.ttl(key).await {
            Ttl::Expires(left) => assert!(left <= Duration::from_secs(600), "{key}: {left:?}"),
            other => panic!("{key} has {other:?}"),
        }
    }
    // A key asked of a master that does not own it is refused with MOVED.
    let owner = cluster.master_of_key(&keys[0]).await;
    let other = *cluster
        .masters()
        .await
        .iter()
        .find(|&&port| port != owner)
        .unwrap();
    let refused = cluster
        .try_command(other, &["GET", &keys[0]])
        .await
        .unwrap_err();
    let redirect = refused.redirect_node();
    let owner_addr = format!("127.0.0.1:{owner}");
    let slot = cluster.slot_of(&keys[0]).await;
    assert_eq!(redirect, Some((owner_addr.as_str(), slot)), "{refused}");

    let forever = "topologies:ttl:forever";
    let mut owner = cluster.client(cluster.master_of_key(forever).await).await;
    let _: () = redis::cmd("SET")
        .arg(forever)
        .arg("v")
        .query_async(&mut owner)
        .await
        .unwrap();
    assert_eq!(cluster.ttl(forever).await, Ttl::Forever);
    assert!(
        cluster
            .keys_without_ttl()
            .await
            .contains(&forever.to_owned())
    );
    assert!(!cluster.keys_without_ttl().await.contains(&keys[0]));
    assert_eq!(
        cluster.ttl("topologies:ttl:never-written").await,
        Ttl::Missing
    );
}

#[tokio::test]
async fn a_killed_cluster_master_is_replaced_by_its_replica_and_the_cluster_heals() {
    let cluster = RedisCluster::start();
    let key = "topologies:failover";
    let victim = cluster.master_of_key(key).await;
    let heir = cluster.replicas_of(victim).await;
    cluster.set_replicated(key, "kept").await;

    let killed_at = Instant::now();
    cluster.kill_master(victim).await;
    cluster.wait_until_healthy(Duration::from_secs(20)).await;
    let took = killed_at.elapsed();

    assert!(took < Duration::from_secs(10), "healed after {took:?}");
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3, "{masters:?}");
    assert!(!masters.contains(&victim));
    assert_eq!(vec![cluster.master_of_key(key).await], heir);
    let value = cluster.command(heir[0], &["GET", key]).await;
    assert_eq!(value, redis::Value::BulkString(b"kept".to_vec()));
    cluster
        .command(heir[0], &["SET", key, "new", "EX", "600"])
        .await;
}

#[tokio::test]
async fn reshard_moves_slots_and_their_keys_to_the_other_master() {
    let cluster = RedisCluster::start();
    let masters = cluster.masters().await;
    let (from, to) = (masters[0], masters[1]);
    let keys: Vec<String> = (0..300)
        .map(|i| format!("topologies:reshard:{i}"))
        .collect();
    let mut on_from = Vec::new();
    for key in &keys {
        let owner = cluster.master_of_key(key).await;
        cluster
            .command(owner, &["SET", key, key, "EX", "600"])
            .await;
        if owner == from {
            on_from.push(key);
        }
    }
    let slots_of = |port: u16, topology: &[ClusterNode]| {
        let node = topology.iter().find(|node| node.port == port);
        node.map(|node| node.slot_count()).unwrap()
    };
    let before = cluster.topology().await;

    cluster.reshard(from, to, 1000).await;
    cluster.wait_until_healthy(Duration::from_secs(10)).await;

    let after = cluster.topology().await;
    assert_eq!(slots_of(from, &after), slots_of(from, &before) - 1000);
    assert_eq!(slots_of(to, &after), slots_of(to, &before) + 1000);
    let mut moved = 0;
    for key in &on_from {
        let owner = cluster.master_of_key(key).await;
        let value = cluster.command(owner, &["GET", key]).await;
        assert_eq!(value, redis::Value::BulkString(key.as_bytes().to_vec()));
        moved += usize::from(owner == to);
    }
    // 300 keys over 16384 slots: ~18 of them in the 1000 moved slots.
    assert!(moved > 0, "no key moved with its slot");
}

#[test]
fn a_shared_cluster_is_one_for_concurrent_users_and_stopped_after_the_last_drop() {
    static SLOT: Shared<RedisCluster> = Shared::new();
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| SLOT.get_or_start(RedisCluster::start));
        let second = scope.spawn(|| SLOT.get_or_start(RedisCluster::start));
        (first.join().unwrap(), second.join().unwrap())
    });
    assert!(Arc::ptr_eq(&first, &second));
    let pids = first.pids();
    let dir = first.dir().to_owned();
    assert!(pids.iter().all(|&pid| is_running(pid)));

    drop(first);
    assert!(
        pids.iter().all(|&pid| is_running(pid)),
        "stopped while in use"
    );
    drop(second);
    let running: Vec<u32> = pids.into_iter().filter(|&pid| is_running(pid)).collect();
    assert!(running.is_empty(), "still running: {running:?}");
    assert!(!dir.exists(), "{dir:?} left behind");
}

#[tokio::test]
async fn sentinels_name_the_master_and_after_a_failover_the_former_replica() {
    let set = SentinelSet::start();
    let [first, second] = set.data_ports()[..] else {
        panic!("a master and a replica")
    };
    assert_eq!(set.master_name(), "mymaster");
    assert_eq!(set.sentinel_urls().len(), 3);
    assert_eq!(set.master_port().await, first);
    set.set_replicated("topologies:sentinel", "kept").await;

    let asked_at = Instant::now();
    set.failover().await;
    let new = set
        .wait_for_new_master(first, Duration::from_secs(10))
        .await;

    assert!(
        asked_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked_at.elapsed()
    );
    assert_eq!(new, second);
    assert_eq!(set.master_port().await, second);
    assert_eq!(set.role(second).await, Role::Master);
    let value = set.command(second, &["GET", "topologies:sentinel"]).await;
    assert_eq!(value, redis::Value::BulkString(b"kept".to_vec()));
    set.command(second, &["SET", "topologies:sentinel", "new"])
        .await;
}

#[tokio::test]
async fn a_killed_sentinel_master_is_replaced_by_its_replica() {
    let set = SentinelSet::start();
    let [first, second] = set.data_ports()[..] else {
        panic!("a master and a replica")
    };
    let pids = set.pids();
    assert_eq!(pids.len(), 5);

    let killed_at = Instant::now();
    let killed = set.kill_master().await;
    let new = set
        .wait_for_new_master(killed, Duration::from_secs(20))
        .await;

    assert_eq!((killed, new), (first, second));
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed_at.elapsed()
    );
    assert_eq!(pids.iter().filter(|&&pid| is_running(pid)).count(), 4);
}

#[tokio::test]
async fn a_shared_sentinel_set_is_one_for_concurrent_users() {
    let set = SentinelSet::shared();
    assert!(Arc::ptr_eq(&set, &SentinelSet::shared()));
    let [first, second] = set.data_ports()[..] else {
        panic!("a master and a replica")
    };
    assert_eq!(set.master_port().await, first);
    assert_eq!(set.role(first).await, Role::Master);
    assert_eq!(set.role(second).await, Role::Replica);
}

fn is_running(pid: u32) -> bool {
    let status = std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
    status.is_ok_and(|status| status.success())
}
