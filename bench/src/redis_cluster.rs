//! A local 3-master Redis Cluster for the cluster row: three `redis-server`s in cluster mode
//! on free ports, joined by `redis-cli --cluster create` (no replicas: the row measures the
//! read path across shards, not failover), ready once every node reports `cluster_state:ok`.
//! Its nodes are [`Service`]s, so they are stopped by pid with the rest of the lab.

use crate::processes::Service;
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Masters of the cluster, each with a third of the 16,384 slots.
pub const MASTERS: usize = 3;

/// A node's cluster bus listens on its port + 10000.
const BUS_OFFSET: u16 = 10_000;

/// Client ports are picked here: below Linux's ephemeral range (32768 up) together with their
/// bus ports, so no outgoing connection can be given either port between our check and the
/// node's bind.
const PORTS: Range<u16> = 10_000..22_768;

/// The port walk's step: 7,919 is prime and does not divide the range's length (12,768),
/// so the walk visits every port once.
const STRIDE: u64 = 7_919;

/// How often a node is started on another port when it exits at start (its port was taken).
const LAUNCH_ATTEMPTS: usize = 5;

/// How long a node may take to answer, and the cluster to report `cluster_state:ok`.
const READY: Duration = Duration::from_secs(20);

/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(50);

/// The longest one `redis-cli` call may take.
const CLI_LIMIT: Duration = Duration::from_secs(30);

/// A running 3-master cluster; dropping it stops its nodes by pid.
pub struct RedisCluster {
    nodes: Vec<(SocketAddr, Service)>,
}

impl RedisCluster {
    /// Starts three nodes in `dir`, joins them into one cluster and waits until every node
    /// reports `cluster_state:ok`.
    ///
    /// # Errors
    /// A node does not start, `redis-cli --cluster create` fails, or the cluster is not `ok`
    /// within 20 s.
    pub async fn start(server: &Path, cli: &Path, dir: &Path) -> Result<Self> {
        let mut cluster = Self { nodes: Vec::new() };
        let mut ports = candidate_ports(seed());
        while cluster.nodes.len() < MASTERS {
            let node = launch(server, cli, dir, &mut ports).await?;
            cluster.nodes.push(node);
        }
        cluster.create(cli).await?;
        cluster.wait_until_ok(cli).await?;
        Ok(cluster)
    }

    /// The nodes' addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|(addr, _)| *addr).collect()
    }

    /// `redis.nodes` for a proxy: every node's URL, comma-separated as the environment takes
    /// a list.
    pub fn nodes_env(&self) -> String {
        nodes_env(&self.addrs())
    }

    /// The number of keys each node holds (`DBSIZE`), in node order: whether a key set is
    /// spread over every master.
    ///
    /// # Errors
    /// redis-cli fails or answers something else than a number.
    pub async fn key_counts(&self, cli: &Path) -> Result<Vec<u64>> {
        let mut counts = Vec::with_capacity(self.nodes.len());
        for addr in self.addrs() {
            let reply = redis_cli(cli, addr, &["DBSIZE"]).await?;
            let count = reply
                .trim()
                .parse()
                .with_context(|| format!("DBSIZE on {addr} answered {reply:?}"))?;
            counts.push(count);
        }
        Ok(counts)
    }

    async fn create(&self, cli: &Path) -> Result<()> {
        let mut command = tokio::process::Command::new(cli);
        command
            .args(["--cluster", "create"])
            .args(self.addrs().iter().map(SocketAddr::to_string))
            .args(["--cluster-replicas", "0", "--cluster-yes"]);
        output(command)
            .await
            .map(drop)
            .context("redis-cli --cluster create")
    }

    /// Polls `CLUSTER INFO` on every node until all say `cluster_state:ok`: a node that has
    /// not yet heard of the others' slots would answer `CLUSTERDOWN`.
    async fn wait_until_ok(&mut self, cli: &Path) -> Result<()> {
        let deadline = Instant::now() + READY;
        loop {
            let mut pending = None;
            for addr in self.addrs() {
                let info = redis_cli(cli, addr, &["CLUSTER", "INFO"]).await?;
                if cluster_state(&info) != Some("ok") {
                    pending = Some((addr, info));
                    break;
                }
            }
            let Some((addr, info)) = pending else {
                return Ok(());
            };
            if let Some(exited) = self.exited_node() {
                bail!("{exited}");
            }
            if Instant::now() >= deadline {
                bail!("the cluster is not ok after {READY:?}: node {addr} reports\n{info}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Why the cluster cannot become ready: a node that exited, with its log.
    fn exited_node(&mut self) -> Option<String> {
        self.nodes.iter_mut().find_map(|(addr, node)| {
            node.exited().map(|status| {
                format!(
                    "cluster node {addr} exited ({status}); its log ends:\n{}",
                    node.log_tail(15)
                )
            })
        })
    }
}

/// Starts one node on the next free port pair from `ports`, trying another when it exits
/// (someone took its port between our check and its bind), and waits until the server on
/// that port is this very process.
async fn launch(
    server: &Path,
    cli: &Path,
    dir: &Path,
    ports: &mut impl Iterator<Item = u16>,
) -> Result<(SocketAddr, Service)> {
    let mut failures = Vec::new();
    for _ in 0..LAUNCH_ATTEMPTS {
        let port = ports
            .find(|&port| bindable(port) && bindable(port + BUS_OFFSET))
            .context("no free port pair for a cluster node")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.join(format!("cluster-{port}.log"));
        let mut node = Service::spawn("cluster node", node_command(server, dir, port), log)?;
        let pid = node.pid().to_string();
        let ours = node
            .wait_until(READY, || {
                let pid = pid.clone();
                async move {
                    let info = redis_cli(cli, addr, &["INFO", "server"]).await;
                    info.is_ok_and(|info| info_field(&info, "process_id") == Some(pid.as_str()))
                }
            })
            .await;
        match ours {
            Ok(()) => return Ok((addr, node)),
            Err(err) => failures.push(format!("port {port}: {err:#}")),
        }
    }
    bail!(
        "a cluster node did not start in {LAUNCH_ATTEMPTS} attempts:\n{}",
        failures.join("\n")
    )
}

fn node_command(server: &Path, dir: &Path, port: u16) -> Command {
    let mut command = Command::new(server);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes"])
        .arg("--cluster-config-file")
        .arg(dir.join(format!("nodes-{port}.conf")))
        .args(["--save", "", "--appendonly", "no"])
        .args(["--dbfilename", &format!("dump-{port}.rdb")])
        .arg("--dir")
        .arg(dir);
    command
}

fn bindable(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A seed for the port walk, different per run, so two runs at once rarely try the same
/// ports first.
fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_nanos())
        .unwrap_or_default();
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// Every port of [`PORTS`] once, starting at a place `seed` picks and walking with a stride
/// prime to the range's length.
fn candidate_ports(seed: u64) -> impl Iterator<Item = u16> {
    let len = u64::from(PORTS.end - PORTS.start);
    (0..len).map(move |step| {
        let offset = (seed.wrapping_add(step.wrapping_mul(STRIDE))) % len;
        PORTS.start + u16::try_from(offset).unwrap_or_default()
    })
}

/// `redis://127.0.0.1:p1,redis://127.0.0.1:p2,…`.
fn nodes_env(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|addr| format!("redis://{addr}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The `cluster_state` field of a `CLUSTER INFO` reply.
fn cluster_state(info: &str) -> Option<&str> {
    info_field(info, "cluster_state")
}

/// A `name:value` field of an `INFO`-style reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
}

/// `redis-cli -h <ip> -p <port> <args…>`, its output as text.
async fn redis_cli(cli: &Path, addr: SocketAddr, args: &[&str]) -> Result<String> {
    let mut command = tokio::process::Command::new(cli);
    command
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args);
    output(command).await
}

async fn output(mut command: tokio::process::Command) -> Result<String> {
    command.kill_on_drop(true);
    let output = tokio::time::timeout(CLI_LIMIT, command.output())
        .await
        .with_context(|| format!("redis-cli did not finish within {CLI_LIMIT:?}"))?
        .context("running redis-cli")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "redis-cli failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_port_walk_visits_every_port_once_and_every_bus_port_fits() {
        let ports: Vec<u16> = candidate_ports(123_456_789).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(ports.len(), usize::from(PORTS.end - PORTS.start));
        assert_eq!(distinct.len(), ports.len());
        assert!(ports.iter().all(|port| PORTS.contains(port)));
        let highest_bus = ports.iter().map(|port| port + BUS_OFFSET).max().unwrap();
        assert!(highest_bus < 32_768, "bus port {highest_bus} is ephemeral");
    }

    #[test]
    fn different_seeds_start_at_different_ports() {
        let first = |seed| candidate_ports(seed).next().unwrap();
        assert_ne!(first(1), first(2));
    }

    #[test]
    fn the_cluster_state_is_read_from_cluster_info() {
        let info = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_known_nodes:3\r\n";
        assert_eq!(cluster_state(info), Some("ok"));
        assert_eq!(cluster_state("cluster_state:fail\r\n"), Some("fail"));
        assert_eq!(cluster_state("cluster_statex:ok\r\n"), None);
        assert_eq!(cluster_state(""), None);
    }

    #[test]
    fn the_nodes_setting_lists_every_node_url() {
        let addrs = [
            SocketAddr::from(([127, 0, 0, 1], 10_001)),
            SocketAddr::from(([127, 0, 0, 1], 10_002)),
        ];
        assert_eq!(
            nodes_env(&addrs),
            "redis://127.0.0.1:10001,redis://127.0.0.1:10002"
        );
    }
}
