//! A real Redis Cluster of six `redis-server`s (3 masters, 3 replicas) on free ports, formed
//! by `redis-cli --cluster create`, stopped by pid on `Drop`; its topology read at call time.
//! Plain, or serving TLS only to ACL users (client, bus and replication links alike).

use super::cluster_view::{ClusterNode, Role, SLOTS, parse_nodes};
use super::node::{RedisNode, info_field, log_tails, query, query_async, temp_dir};
use super::shared::Shared;
use super::tls::{Access, TestCertificate, as_args};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MASTERS: usize = 3;
const NODES: usize = 2 * MASTERS;

/// Client ports are picked here. Linux hands out ephemeral ports from 32768 up, so neither a
/// node's port nor its cluster bus port (port + 10000, which must stay below 65536) can be
/// given to some other socket between our check and the node's bind. 6379 is not in it.
const PORTS: Range<u16> = 10000..22768;

/// Long enough that a busy CI machine does not see false failures, short enough that a
/// killed master is replaced within a few seconds.
const NODE_TIMEOUT_MS: u32 = 2000;

static SHARED: Shared<RedisCluster> = Shared::new();
static SHARED_SECURED: Shared<RedisCluster> = Shared::new();

/// Six nodes: 3 masters sharing the 16384 slots, each with one replica.
pub struct RedisCluster {
    dir: PathBuf,
    access: Access,
    nodes: Vec<RedisNode>,
}

impl RedisCluster {
    /// Starts a private cluster and waits until every node reports `cluster_state:ok`, every
    /// slot is served and every replica is in sync. Blocks for a few seconds: call it before
    /// spawning anything that needs the test's runtime. A test that kills, reshards or
    /// fails over nodes needs its own; the others should use [`RedisCluster::shared`].
    pub fn start() -> Self {
        Self::start_in(temp_dir("cluster"), Access::plain())
    }

    /// [`RedisCluster::start`], but every node serves TLS only (`--port 0`), on the cluster
    /// bus and for replication too, and takes only ACL users (replicas log in to their
    /// masters as one): clients log in as [`super::PROXY_USER`] over `rediss://…#insecure`.
    pub fn start_secured() -> Self {
        let dir = temp_dir("cluster-tls");
        let certificate = TestCertificate::make(&dir);
        Self::start_in(dir, Access::tls_acl(certificate))
    }

    fn start_in(dir: PathBuf, access: Access) -> Self {
        let nodes = (0..NODES)
            .map(|_| {
                RedisNode::launch(&dir, &access, cluster_port, |port| {
                    node_args(&dir, port, &access)
                })
            })
            .collect();
        let cluster = Self { dir, access, nodes };
        cluster.create();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match check_health(&cluster.access, &cluster.live_ports())
                .and_then(|()| cluster.check_shape())
            {
                Ok(()) => return cluster,
                Err(why) if Instant::now() > deadline => cluster.fail(&why),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The cluster the tests running right now share, started if none is running; stopped
    /// when the last of them drops it. Its users must not change the topology (kill, reshard,
    /// fail over) and must keep to keys of their own: other tests use it at the same time.
    pub fn shared() -> Arc<Self> {
        SHARED.get_or_start(Self::start)
    }

    /// [`RedisCluster::shared`] for the secured cluster of [`RedisCluster::start_secured`].
    pub fn shared_secured() -> Arc<Self> {
        SHARED_SECURED.get_or_start(Self::start_secured)
    }

    /// Every node's URL (`redis://127.0.0.1:P`, or `rediss://127.0.0.1:P#insecure` when
    /// secured), without credentials, killed ones too: a client's seed list.
    pub fn nodes(&self) -> Vec<String> {
        self.nodes.iter().map(RedisNode::url).collect()
    }

    /// The pids of the node processes, running or not.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(RedisNode::pid).collect()
    }

    /// The folder with the nodes' configs, logs and dumps; removed on `Drop`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Points `config` at this cluster (`redis.mode = cluster`, every node a seed).
    pub fn point(&self, config: &mut discount_proxy::config::Config) {
        config.redis.mode = discount_proxy::config::RedisMode::Cluster;
        config.redis.nodes = self.nodes();
    }

    /// The cluster as a running node sees it now (`CLUSTER NODES`).
    pub async fn topology(&self) -> Vec<ClusterNode> {
        let port = *self
            .live_ports()
            .first()
            .expect("a cluster node is running");
        let reply: String = query_async(&self.access, port, &["CLUSTER", "NODES"])
            .await
            .unwrap();
        parse_nodes(&reply)
    }

    /// The ports of the masters serving slots now, ascending. Failovers move them.
    pub async fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = self
            .topology()
            .await
            .iter()
            .filter(|node| node.role == Role::Master && !node.slots.is_empty() && !node.failing)
            .map(|node| node.port)
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The ports of the replicas not known to be failing, ascending.
    pub async fn replicas(&self) -> Vec<u16> {
        let mut replicas: Vec<u16> = self
            .topology()
            .await
            .iter()
            .filter(|node| node.role == Role::Replica && !node.failing)
            .map(|node| node.port)
            .collect();
        replicas.sort_unstable();
        replicas
    }

    /// The ports of the replicas of the master on `port`.
    pub async fn replicas_of(&self, port: u16) -> Vec<u16> {
        let topology = self.topology().await;
        let master = topology.iter().find(|node| node.port == port);
        let id = master.map(|node| node.id.as_str()).expect("a known node");
        topology
            .iter()
            .filter(|node| node.master_id.as_deref() == Some(id) && !node.failing)
            .map(|node| node.port)
            .collect()
    }

    /// The slot `key` hashes to (`CLUSTER KEYSLOT`).
    pub async fn slot_of(&self, key: &str) -> u16 {
        let port = *self
            .live_ports()
            .first()
            .expect("a cluster node is running");
        query_async(&self.access, port, &["CLUSTER", "KEYSLOT", key])
            .await
            .unwrap()
    }

    /// The port of the master serving `slot` now.
    pub async fn master_of_slot(&self, slot: u16) -> u16 {
        let topology = self.topology().await;
        let owner = topology
            .iter()
            .find(|node| node.role == Role::Master && !node.failing && node.owns(slot));
        owner
            .map(|node| node.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// The port of the master that holds `key` now.
    pub async fn master_of_key(&self, key: &str) -> u16 {
        self.master_of_slot(self.slot_of(key).await).await
    }

    /// SIGKILLs the master on `port` (by pid, like a crash); its replica takes over after
    /// the node timeout. Fails the test if `port` is not a master now.
    pub async fn kill_master(&self, port: u16) {
        assert!(
            self.masters().await.contains(&port),
            "{port} is not a master now"
        );
        self.node(port).kill();
    }

    /// SIGKILLs the replica on `port` (by pid, like a crash): a node lost without a failover,
    /// every slot still served. Fails the test if `port` is not a replica now.
    pub async fn kill_replica(&self, port: u16) {
        assert!(
            self.replicas().await.contains(&port),
            "{port} is not a replica now"
        );
        self.node(port).kill();
    }

    /// Waits until every running node reports `cluster_state:ok`, sees all slots served by
    /// running, non-failing masters and has its replicas in sync: after a failover, until
    /// clients can use the cluster again. Fails the test with the nodes' logs after `timeout`.
    pub async fn wait_until_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let live = self.live_ports();
            let access = self.access.clone();
            let health = tokio::task::spawn_blocking(move || check_health(&access, &live))
                .await
                .unwrap();
            match health {
                Ok(()) => return,
                Err(why) if Instant::now() > deadline => self.fail(&why),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub(super) fn node(&self, port: u16) -> &RedisNode {
        let node = self.nodes.iter().find(|node| node.port() == port);
        node.unwrap_or_else(|| panic!("no node of this cluster on port {port}"))
    }

    /// How the support reaches the nodes.
    pub(super) fn access(&self) -> &Access {
        &self.access
    }

    pub(super) fn live_ports(&self) -> Vec<u16> {
        let live = self.nodes.iter().filter(|node| node.is_running());
        live.map(RedisNode::port).collect()
    }

    fn create(&self) {
        let addresses = self
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()));
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .args(self.access.cli_args())
            .stdin(Stdio::null())
            .output();
        match output {
            Ok(out) if out.status.success() => {}
            Ok(out) => self.fail(&format!(
                "redis-cli --cluster create failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(err) => panic!("redis-cli does not run ({err}); install redis-tools"),
        }
    }

    /// What `redis-cli --cluster create` promises, as every node sees it.
    fn check_shape(&self) -> Result<(), String> {
        for port in self.live_ports() {
            let reply: String =
                query(&self.access, port, &["CLUSTER", "NODES"]).map_err(|err| err.to_string())?;
            let view = parse_nodes(&reply);
            let masters: Vec<&ClusterNode> =
                view.iter().filter(|n| n.role == Role::Master).collect();
            let replicated = masters.iter().all(|master| {
                let of_master = |node: &&ClusterNode| node.master_id.as_ref() == Some(&master.id);
                view.iter().filter(of_master).count() == 1
            });
            if masters.len() != MASTERS || !replicated {
                return Err(format!(
                    "node {port} does not see 3 replicated masters yet:\n{reply}"
                ));
            }
        }
        Ok(())
    }

    fn fail(&self, why: &str) -> ! {
        panic!("redis cluster unhealthy: {why}\n{}", log_tails(&self.nodes));
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the nodes on `live` ports agree that the cluster serves every slot from running
/// masters whose replicas are in sync; the first reason it does not, otherwise.
fn check_health(access: &Access, live: &[u16]) -> Result<(), String> {
    for &port in live {
        let text = |args: &[&str]| {
            query::<String>(access, port, args).map_err(|err| format!("{port}: {err}"))
        };
        let info = text(&["CLUSTER", "INFO"])?;
        if info_field(&info, "cluster_state") != Some("ok") {
            return Err(format!("node {port} reports {info}"));
        }
        let view = parse_nodes(&text(&["CLUSTER", "NODES"])?);
        let served: u32 = view.iter().map(ClusterNode::slot_count).sum();
        let dead_owner = view
            .iter()
            .find(|node| !node.slots.is_empty() && (node.failing || !live.contains(&node.port)));
        if served != SLOTS || dead_owner.is_some() {
            return Err(format!(
                "node {port} sees {served} slots served, owner {dead_owner:?}"
            ));
        }
        let replication = text(&["INFO", "replication"])?;
        if info_field(&replication, "role") == Some("slave")
            && info_field(&replication, "master_link_status") != Some("up")
        {
            return Err(format!("replica {port} is not in sync with its master"));
        }
    }
    Ok(())
}

fn node_args(dir: &Path, port: u16, access: &Access) -> Vec<String> {
    let file = |name: String| dir.join(name).to_string_lossy().into_owned();
    let mut args: Vec<String> = [
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
        // A replica syncs at once instead of waiting 5 s for more replicas to share the RDB.
        "--repl-diskless-sync-delay",
        "0",
        // Lets a test hang a node (`DEBUG SLEEP`).
        "--enable-debug-command",
        "local",
    ]
    .map(String::from)
    .to_vec();
    args.extend(as_args(&access.server_directives(port)));
    args.extend(["--cluster-node-timeout".into(), NODE_TIMEOUT_MS.to_string()]);
    args.extend([
        "--cluster-config-file".into(),
        file(format!("nodes-{port}.conf")),
    ]);
    args.extend(["--dir".into(), file(String::new())]);
    args.extend(["--dbfilename".into(), format!("dump-{port}.rdb")]);
    args
}

/// A port from [`PORTS`] that is free now, with its cluster bus port (+10000) free too.
fn cluster_port() -> u16 {
    let bindable = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    (0..1000)
        .map(|_| fastrand::u16(PORTS))
        .find(|&port| bindable(port) && bindable(port + 10000))
        .expect("a free port pair below the ephemeral range")
}
