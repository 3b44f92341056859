//! What a test checks or changes in a [`RedisCluster`]'s data: raw commands on one node, keys
//! and their TTLs per master, and moving slots between masters.

use super::RedisCluster;
use super::node::{Role, connect, query_async, role_of, set_replicated};
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

impl RedisCluster {
    /// Runs a raw command on the node on `port` and returns the reply; an error reply (such
    /// as `MOVED` from a node that does not own the key) fails the test.
    pub async fn command(&self, port: u16, args: &[&str]) -> redis::Value {
        self.try_command(port, args)
            .await
            .unwrap_or_else(|err| panic!("redis :{port} {args:?} failed: {err}"))
    }

    /// Runs a raw command on the node on `port`, an error reply included in the result.
    pub async fn try_command(&self, port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
        self.node(port);
        query_async(port, args).await
    }

    /// A client connection to the node on `port`, such as the master of a key to seed.
    pub async fn client(&self, port: u16) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.node(port).url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The role the node on `port` reports of itself, which may lag what the others think.
    pub async fn role(&self, port: u16) -> Role {
        self.node(port);
        role_of(port).await
    }

    /// Sets `key` to `value` on its master and waits until the replica has it: a write a
    /// failover must keep.
    pub async fn set_replicated(&self, key: &str, value: &str) {
        set_replicated(self.master_of_key(key).await, key, value).await;
    }

    /// How many keys each master holds now (`DBSIZE`), by port: keys spread over every master
    /// when each count is above zero.
    pub async fn key_counts_by_master(&self) -> BTreeMap<u16, u64> {
        let mut counts = BTreeMap::new();
        for port in self.masters().await {
            counts.insert(port, query_async(port, &["DBSIZE"]).await.unwrap());
        }
        counts
    }

    /// The TTL of `key`, asked of the master that owns it.
    pub async fn ttl(&self, key: &str) -> Ttl {
        let port = self.master_of_key(key).await;
        let millis: i64 = query_async(port, &["PTTL", key]).await.unwrap();
        match millis {
            -2 => Ttl::Missing,
            -1 => Ttl::Forever,
            millis => Ttl::Expires(Duration::from_millis(millis.unsigned_abs())),
        }
    }

    /// Every key on any master that has no TTL, sorted.
    pub async fn keys_without_ttl(&self) -> Vec<String> {
        let mut found = Vec::new();
        for port in self.masters().await {
            let on_master = tokio::task::spawn_blocking(move || keys_without_ttl_on(port));
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
        tokio::task::spawn_blocking(move || run_reshard(from, &from_id, &to_id, slots))
            .await
            .unwrap();
    }

    async fn node_id(&self, port: u16) -> String {
        query_async(port, &["CLUSTER", "MYID"]).await.unwrap()
    }
}

fn run_reshard(entry: u16, from_id: &str, to_id: &str, slots: u16) {
    let output = Command::new("redis-cli")
        .args(["--cluster", "reshard", &format!("127.0.0.1:{entry}")])
        .args(["--cluster-from", from_id, "--cluster-to", to_id])
        .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
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

fn keys_without_ttl_on(port: u16) -> redis::RedisResult<Vec<String>> {
    let mut connection = connect(port)?;
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
