//! What a test checks or changes in a [`RedisCluster`]'s data: raw commands on one node, keys
//! and their TTLs per master, and moving slots between masters.

use super::RedisCluster;
use super::node::{Role, calls_of, connect, query_async, role_of, set_replicated};
use super::tls::Access;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

/// What `PTTL` says about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl {
    Missing,
    /// The key never expires: what the proxy must never leave behind.
    Forever,
    Expires(Duration),
}

impl Ttl {
    /// What a `PTTL` reply of `millis` says.
    fn from_pttl(millis: i64) -> Self {
        match millis {
            -2 => Self::Missing,
            -1 => Self::Forever,
            millis => Self::Expires(Duration::from_millis(millis.unsigned_abs())),
        }
    }
}

impl RedisCluster {
    /// Runs a raw command on the node on `port` and returns the reply; an error reply (such
    /// as `MOVED` from a node that does not own the key) fails the test.
    pub async fn command(&self, port: u16, args: &[&str]) -> redis::Value {
        self.try_command(port, args)
            .await
            .unwrap_or_else(|err| panic!("redis :{port} {args:?} failed: {err}"))
    }

    /// Waits until `CLUSTER SLOTS` names a replica for every range, so a client reading from
    /// replicas finds them: Redis lists a replica only once it has replicated something, so
    /// a key under `prefix` is first written through each master.
    pub async fn wait_until_replicas_listed(&self, prefix: &str) {
        let masters = self.masters().await;
        let mut warmed = std::collections::BTreeSet::new();
        for i in 0.. {
            let key = format!("{prefix}warm-{i}");
            if warmed.insert(self.master_of_key(&key).await) {
                self.set_replicated(&key, "x").await;
            }
            if warmed.len() == masters.len() {
                break;
            }
        }
        super::wait_until(
            "CLUSTER SLOTS names every replica",
            Duration::from_secs(10),
            || async {
                let slots = self.command(masters[0], &["CLUSTER", "SLOTS"]).await;
                let redis::Value::Array(ranges) = slots else {
                    return false;
                };
                ranges
                    .iter()
                    .all(|range| matches!(range, redis::Value::Array(parts) if parts.len() > 3))
            },
        )
        .await;
    }

    /// How many times the node on `port` has run `command` (`INFO commandstats`).
    pub async fn calls_of(&self, port: u16, command: &str) -> u64 {
        self.node(port);
        calls_of(self.access(), port, command).await
    }

    /// Runs a raw command on the node on `port`, an error reply included in the result.
    pub async fn try_command(&self, port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
        self.node(port);
        query_async(self.access(), port, args).await
    }

    /// A client connection to the node on `port`, such as the master of a key to seed.
    pub async fn client(&self, port: u16) -> redis::aio::MultiplexedConnection {
        self.node(port);
        discount_proxy::tls::install_crypto_provider();
        redis::Client::open(self.access().admin_url(port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The role the node on `port` reports of itself, which may lag what the others think.
    pub async fn role(&self, port: u16) -> Role {
        self.node(port);
        role_of(self.access(), port).await
    }

    /// Sets `key` to `value` on its master and waits until the replica has it: a write a
    /// failover must keep.
    pub async fn set_replicated(&self, key: &str, value: &str) {
        let master = self.master_of_key(key).await;
        set_replicated(self.access(), master, key, value).await;
    }

    /// How many keys each master holds now (`DBSIZE`), by port: keys spread over every master
    /// when each count is above zero.
    pub async fn key_counts_by_master(&self) -> BTreeMap<u16, u64> {
        let mut counts = BTreeMap::new();
        for port in self.masters().await {
            let count = query_async(self.access(), port, &["DBSIZE"]).await;
            counts.insert(port, count.unwrap());
        }
        counts
    }

    /// The TTL of `key`, asked of the master that owns it.
    pub async fn ttl(&self, key: &str) -> Ttl {
        let port = self.master_of_key(key).await;
        let millis: i64 = query_async(self.access(), port, &["PTTL", key])
            .await
            .unwrap();
        Ttl::from_pttl(millis)
    }

    /// The TTL of each of `keys`, asked of the masters that own them over one connection
    /// each: a batch's keys checked over TLS cost a few handshakes, not three per key.
    pub async fn ttls(&self, keys: &[String]) -> Vec<Ttl> {
        let topology = self.topology().await;
        let port = *self
            .live_ports()
            .first()
            .expect("a cluster node is running");
        let slots: Vec<u16> = self
            .pipelined(port, keys, |key| {
                redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).to_owned()
            })
            .await;
        let mut by_master: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (index, slot) in slots.into_iter().enumerate() {
            let owner = topology
                .iter()
                .find(|node| node.role == Role::Master && !node.failing && node.owns(slot));
            let owner = owner.unwrap_or_else(|| panic!("no master serves slot {slot}"));
            by_master.entry(owner.port).or_default().push(index);
        }
        let mut ttls = vec![Ttl::Missing; keys.len()];
        for (master, indices) in by_master {
            let owned: Vec<String> = indices.iter().map(|&index| keys[index].clone()).collect();
            let millis: Vec<i64> = self
                .pipelined(master, &owned, |key| redis::cmd("PTTL").arg(key).to_owned())
                .await;
            for (index, millis) in indices.into_iter().zip(millis) {
                ttls[index] = Ttl::from_pttl(millis);
            }
        }
        ttls
    }

    /// `command(key)` for every key in one pipeline on the node on `port`.
    async fn pipelined<T: redis::FromRedisValue + Send + 'static>(
        &self,
        port: u16,
        keys: &[String],
        command: impl Fn(&str) -> redis::Cmd,
    ) -> Vec<T> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.add_command(command(key));
        }
        let access = self.access().clone();
        let replies = tokio::task::spawn_blocking(move || -> redis::RedisResult<Vec<T>> {
            pipe.query(&mut connect(&access, port)?)
        });
        replies.await.unwrap().unwrap()
    }

    /// Every key on any master that has no TTL, sorted.
    pub async fn keys_without_ttl(&self) -> Vec<String> {
        let mut found = Vec::new();
        for port in self.masters().await {
            let access = self.access().clone();
            let on_master = tokio::task::spawn_blocking(move || keys_without_ttl_on(&access, port));
            found.extend(on_master.await.unwrap().unwrap());
        }
        found.sort();
        found
    }

    /// Moves `slots` slots (and their keys) from the master on `from` to the master on `to`
    /// with `redis-cli --cluster reshard`, on the blocking pool so the test's runtime goes
    /// on meanwhile; returns when it is done.
    pub async fn reshard(&self, from: u16, to: u16, slots: u16) {
        let (from_id, to_id) = (self.node_id(from).await, self.node_id(to).await);
        let access = self.access().clone();
        tokio::task::spawn_blocking(move || run_reshard(&access, from, &from_id, &to_id, slots))
            .await
            .unwrap();
    }

    async fn node_id(&self, port: u16) -> String {
        query_async(self.access(), port, &["CLUSTER", "MYID"])
            .await
            .unwrap()
    }
}

fn run_reshard(access: &Access, entry: u16, from_id: &str, to_id: &str, slots: u16) {
    let output = Command::new("redis-cli")
        .args(["--cluster", "reshard", &format!("127.0.0.1:{entry}")])
        .args(["--cluster-from", from_id, "--cluster-to", to_id])
        .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
        .args(access.cli_args())
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    assert!(
        output.status.success(),
        "redis-cli --cluster reshard failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn keys_without_ttl_on(access: &Access, port: u16) -> redis::RedisResult<Vec<String>> {
    let mut connection = connect(access, port)?;
    let mut without = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query(&mut connection)?;
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("PTTL").arg(key);
        }
        let ttls: Vec<i64> = match keys.is_empty() {
            true => Vec::new(),
            false => pipe.query(&mut connection)?,
        };
        let persistent = keys.into_iter().zip(ttls).filter(|(_, ttl)| *ttl == -1);
        without.extend(persistent.map(|(key, _)| key));
        cursor = next;
        if cursor == 0 {
            return Ok(without);
        }
    }
}
