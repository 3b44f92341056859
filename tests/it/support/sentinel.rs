//! A real Redis Sentinel set: a master, its replica and three sentinels watching them, on
//! free ports, stopped by pid on `Drop`; which node is master is asked of the sentinels.
//! Plain, or secured: every process serves TLS only, the data nodes take only ACL users.

use super::node::{
    RedisNode, Role, calls_of, info_field, log_tails, query, query_async, role_of, set_replicated,
    temp_dir,
};
use super::shared::Shared;
use super::tls::{Access, TestCertificate, as_args, as_config};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MASTER_NAME: &str = "mymaster";
const SENTINELS: usize = 3;

static SHARED: Shared<SentinelSet> = Shared::new();
static SHARED_SECURED: Shared<SentinelSet> = Shared::new();

/// A master, one replica of it, and three sentinels (quorum 2) that fail over within seconds.
pub struct SentinelSet {
    dir: PathBuf,
    /// How the master and the replica are reached.
    access: Access,
    /// How the sentinels are reached: the same TLS, no users.
    sentinel_access: Access,
    /// The master and the replica as started; a failover swaps their roles.
    data: Vec<RedisNode>,
    sentinels: Vec<RedisNode>,
}

impl SentinelSet {
    /// Starts a private set and waits until every sentinel knows the master, the replica (in
    /// sync) and the two other sentinels, so that a failover can happen. Blocks for a few
    /// seconds. A test that fails over or kills the master needs its own; the others should
    /// use [`SentinelSet::shared`].
    pub fn start() -> Self {
        Self::start_in(temp_dir("sentinel"), Access::plain())
    }

    /// [`SentinelSet::start`], but every process serves TLS only (`--port 0`), replication
    /// and the sentinels' links included; the master and the replica take only ACL users
    /// (the replica and the sentinels log in as one), the sentinels take anyone. Clients
    /// reach the sentinels over `rediss://…#insecure` and the master as
    /// [`super::PROXY_USER`].
    pub fn start_secured() -> Self {
        let dir = temp_dir("sentinel-tls");
        let certificate = TestCertificate::make(&dir);
        Self::start_in(dir, Access::tls_acl(certificate))
    }

    fn start_in(dir: PathBuf, access: Access) -> Self {
        let sentinel_access = access.without_acl();
        let launch_data = |master: Option<u16>| {
            RedisNode::launch(&dir, &access, super::free_port, |port| {
                data_args(&dir, port, master, &access)
            })
        };
        let master = launch_data(None);
        let master_port = master.port();
        let replica = launch_data(Some(master_port));
        let sentinels = (0..SENTINELS)
            .map(|_| {
                RedisNode::launch(&dir, &sentinel_access, super::free_port, |port| {
                    sentinel_args(&dir, port, master_port, &access)
                })
            })
            .collect();
        let set = Self {
            dir,
            access,
            sentinel_access,
            data: vec![master, replica],
            sentinels,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match set.check_ready(master_port) {
                Ok(()) => return set,
                Err(why) if Instant::now() > deadline => set.fail(&why),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The set the tests running right now share, started if none is running; stopped when
    /// the last of them drops it. Its users must not fail it over or kill nodes.
    pub fn shared() -> Arc<Self> {
        SHARED.get_or_start(Self::start)
    }

    /// [`SentinelSet::shared`] for the secured set of [`SentinelSet::start_secured`].
    pub fn shared_secured() -> Arc<Self> {
        SHARED_SECURED.get_or_start(Self::start_secured)
    }

    /// `redis://127.0.0.1:S` (or `rediss://…#insecure`) for each sentinel: what a sentinel
    /// client is configured with.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisNode::url).collect()
    }

    /// Points `config` at these sentinels (`redis.mode = sentinel`). `redis.url` is a port
    /// nothing listens on: its host and port are not used in sentinel mode, which this proves.
    pub fn point(&self, config: &mut discount_proxy::config::Config) {
        config.redis.mode = discount_proxy::config::RedisMode::Sentinel;
        config.redis.nodes = self.sentinel_urls();
        config.redis.sentinel_master = Some(MASTER_NAME.to_owned());
        config.redis.url = "redis://127.0.0.1:1/0".to_owned();
    }

    /// A proxy pointed at these sentinels, its keys under `prefix`.
    pub async fn proxy(&self, prefix: &str) -> super::TestApp {
        super::TestApp::spawn_with(|config| {
            self.point(config);
            config.redis.key_prefix = prefix.to_owned();
        })
        .await
    }

    /// The name the sentinels monitor the master under.
    pub fn master_name(&self) -> &'static str {
        MASTER_NAME
    }

    /// The ports of the master and the replica as started (a failover swaps their roles).
    pub fn data_ports(&self) -> Vec<u16> {
        self.data.iter().map(RedisNode::port).collect()
    }

    /// The pids of every process of the set, sentinels included.
    pub fn pids(&self) -> Vec<u32> {
        self.all_nodes().map(RedisNode::pid).collect()
    }

    /// The master's port, as a sentinel tells a client (`SENTINEL get-master-addr-by-name`).
    pub async fn master_port(&self) -> u16 {
        let sentinel = self.sentinel_port();
        let asked = query_async(&self.sentinel_access, sentinel, &master_addr_query()).await;
        let (_, port): (String, u16) = asked.unwrap();
        port
    }

    /// Asks a sentinel to fail over now (`SENTINEL FAILOVER`), without agreement of the
    /// others; the replica is promoted about a second later.
    pub async fn failover(&self) {
        let args = ["SENTINEL", "FAILOVER", MASTER_NAME];
        let _: () = query_async(&self.sentinel_access, self.sentinel_port(), &args)
            .await
            .unwrap();
    }

    /// SIGKILLs the current master (by pid, like a crash) and returns its port; the sentinels
    /// notice after a second and promote the replica.
    pub async fn kill_master(&self) -> u16 {
        let port = self.master_port().await;
        let master = self.data.iter().find(|node| node.port() == port);
        master.expect("the master is a node of this set").kill();
        port
    }

    /// SIGKILLs the data node on `port` (by pid, like a crash), whatever its role now: after a
    /// `SENTINEL FAILOVER`, the old master, which would otherwise go on as a replica.
    pub fn kill_data_node(&self, port: u16) {
        let node = self.data.iter().find(|node| node.port() == port);
        node.expect("a data node of this set").kill();
    }

    /// Waits until every running sentinel names a master other than `old_port` and that node
    /// accepts writes (`role:master`); returns its port. Fails the test after `timeout`.
    pub async fn wait_for_new_master(&self, old_port: u16, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        let sentinels: Vec<u16> = self.sentinels.iter().map(RedisNode::port).collect();
        loop {
            let sentinels = sentinels.clone();
            let access = [self.sentinel_access.clone(), self.access.clone()];
            let new = tokio::task::spawn_blocking(move || agreed_master(&access, &sentinels))
                .await
                .unwrap();
            match new {
                Ok(port) if port != old_port => return port,
                _ if Instant::now() > deadline => {
                    self.fail(&format!("no new master within {timeout:?}: {new:?}"))
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The role the node on `port` reports of itself.
    pub async fn role(&self, port: u16) -> Role {
        assert!(
            self.data_ports().contains(&port),
            "{port} is not a data node"
        );
        role_of(&self.access, port).await
    }

    /// Sets `key` to `value` on the current master and waits until the replica has it: a
    /// write a failover must keep.
    pub async fn set_replicated(&self, key: &str, value: &str) {
        set_replicated(&self.access, self.master_port().await, key, value).await;
    }

    /// The port of the data node that is not the master the sentinels name now: the
    /// replica (the set has two data nodes).
    pub async fn replica_port(&self) -> u16 {
        let master = self.master_port().await;
        let replica = self.data_ports().into_iter().find(|&port| port != master);
        replica.expect("the set has a replica")
    }

    /// How many times the data node on `port` has run `command` (`INFO commandstats`).
    pub async fn calls_of(&self, port: u16, command: &str) -> u64 {
        assert!(
            self.data_ports().contains(&port),
            "{port} is not a data node"
        );
        calls_of(&self.access, port, command).await
    }

    /// Runs a raw command on the node (or sentinel) on `port` and returns the reply; an error
    /// reply fails the test.
    pub async fn command(&self, port: u16, args: &[&str]) -> redis::Value {
        let access = match self.sentinels.iter().any(|node| node.port() == port) {
            true => &self.sentinel_access,
            false => &self.access,
        };
        assert!(
            self.all_nodes().any(|node| node.port() == port),
            "{port} is not ours"
        );
        query_async(access, port, args)
            .await
            .unwrap_or_else(|err| panic!("redis :{port} {args:?} failed: {err}"))
    }

    fn all_nodes(&self) -> impl Iterator<Item = &RedisNode> {
        self.data.iter().chain(&self.sentinels)
    }

    fn sentinel_port(&self) -> u16 {
        let running = self.sentinels.iter().find(|node| node.is_running());
        running.expect("a sentinel is running").port()
    }

    /// Every sentinel knows `master_port` as master, its replica in sync, and its peers.
    fn check_ready(&self, master_port: u16) -> Result<(), String> {
        let failed = |err: redis::RedisError| err.to_string();
        let access = &self.sentinel_access;
        for sentinel in &self.sentinels {
            let port = sentinel.port();
            let (_, master): (String, u16) =
                query(access, port, &master_addr_query()).map_err(failed)?;
            let state: HashMap<String, String> =
                query(access, port, &["SENTINEL", "MASTER", MASTER_NAME]).map_err(failed)?;
            let replicas: Vec<HashMap<String, String>> =
                query(access, port, &["SENTINEL", "REPLICAS", MASTER_NAME]).map_err(failed)?;
            let field = |name: &str| state.get(name).map(String::as_str);
            let replica_ok = replicas.iter().any(|replica| {
                replica.get("flags").map(String::as_str) == Some("slave")
                    && replica.get("master-link-status").map(String::as_str) == Some("ok")
            });
            let ready = master == master_port
                && field("flags") == Some("master")
                && field("num-other-sentinels") == Some("2")
                && replica_ok;
            if !ready {
                return Err(format!("sentinel {port} not ready: {state:?} {replicas:?}"));
            }
        }
        Ok(())
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "sentinel set unhealthy: {why}\n{}",
            log_tails(self.all_nodes())
        );
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for node in self.all_nodes() {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn master_addr_query() -> [&'static str; 3] {
    ["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]
}

/// The master all running `sentinels` name, once that node says it is master; `access`
/// reaches the sentinels, then the data nodes.
fn agreed_master(
    [sentinel_access, access]: &[Access; 2],
    sentinels: &[u16],
) -> Result<u16, String> {
    let mut named = Vec::new();
    for &port in sentinels {
        if let Ok((_, master)) = query::<(String, u16)>(sentinel_access, port, &master_addr_query())
        {
            named.push(master);
        }
    }
    named.dedup();
    let [master] = named[..] else {
        return Err(format!("sentinels name {named:?}"));
    };
    let replication: String =
        query(access, master, &["INFO", "replication"]).map_err(|e| e.to_string())?;
    match info_field(&replication, "role") {
        Some("master") => Ok(master),
        role => Err(format!("{master} named master but has role {role:?}")),
    }
}

fn data_args(dir: &Path, port: u16, master: Option<u16>, access: &Access) -> Vec<String> {
    let mut args: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        .map(String::from)
        .to_vec();
    // A replica syncs at once instead of waiting 5 s for more replicas to share the RDB.
    args.extend(["--repl-diskless-sync-delay".into(), "0".into()]);
    args.extend(as_args(&access.server_directives(port)));
    args.extend(["--dir".into(), dir.to_string_lossy().into_owned()]);
    args.extend(["--dbfilename".into(), format!("dump-{port}.rdb")]);
    if let Some(master) = master {
        args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
    }
    args
}

/// Writes the sentinel's own config file (sentinels rewrite it) and returns the arguments.
/// `access` is the data nodes': the sentinel serves the same TLS without users, and logs in
/// to the data nodes as their admin user.
fn sentinel_args(dir: &Path, port: u16, master: u16, access: &Access) -> Vec<String> {
    let config = dir.join(format!("sentinel-{port}.conf"));
    let listen = as_config(&access.without_acl().server_directives(port));
    let auth = as_config(&access.sentinel_auth(MASTER_NAME));
    let text = format!(
        "{listen}bind 127.0.0.1\ndir {dir}\n\
         sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
         {auth}\
         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
         sentinel failover-timeout {MASTER_NAME} 3000\n",
        dir = dir.display()
    );
    std::fs::write(&config, text).unwrap();
    vec![config.to_string_lossy().into_owned(), "--sentinel".into()]
}
