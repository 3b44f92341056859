//! One `redis-server` process of a topology (cluster node, sentinel, replica): started on a
//! port the caller picks, proven to be ours by its pid, killed by pid; plus the blocking
//! one-command client the topologies use to inspect their nodes.

use super::tls::Access;
use redis::FromRedisValue;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a node is started on a fresh port before the test gives up: a port can be taken
/// by someone else between our check and the server's bind.
const LAUNCH_ATTEMPTS: usize = 5;

/// A `redis-server` child process; SIGKILLed on `Drop` (or by [`RedisNode::kill`]).
pub struct RedisNode {
    port: u16,
    pid: u32,
    log: PathBuf,
    access: Access,
    child: Mutex<Option<Child>>,
}

impl RedisNode {
    /// Starts `redis-server` with the arguments `args(port)` gives for a port from
    /// `pick_port`, logging to a file in `dir`, and waits until that very process answers
    /// (reached as `access` says). Retries on a fresh port when the server exits (most
    /// likely: its port was taken).
    pub fn launch(
        dir: &Path,
        access: &Access,
        pick_port: impl Fn() -> u16,
        args: impl Fn(u16) -> Vec<String>,
    ) -> Self {
        let mut failures = Vec::new();
        for _ in 0..LAUNCH_ATTEMPTS {
            let port = pick_port();
            let log = dir.join(format!("redis-{port}.log"));
            let spawned = Command::new("redis-server")
                .args(args(port))
                .args(["--logfile", &log.to_string_lossy()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match spawned {
                Ok(child) => child,
                Err(err) => panic!("redis-server does not run ({err}); is it installed?"),
            };
            let node = Self {
                port,
                pid: child.id(),
                log,
                access: access.clone(),
                child: Mutex::new(Some(child)),
            };
            if node.wait_until_answering(Duration::from_secs(10)) {
                return node;
            }
            failures.push(format!("port {port}:\n{}", node.log_tail(20)));
        }
        panic!(
            "redis-server did not start in {LAUNCH_ATTEMPTS} attempts:\n{}",
            failures.join("\n")
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `redis://127.0.0.1:port` (or `rediss://…#insecure`), without credentials: what a
    /// client is configured with.
    pub fn url(&self) -> String {
        self.access.url(self.port)
    }

    /// Whether the process still runs (false once killed or crashed).
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// SIGKILLs the process by its pid, like a crash, and reaps it.
    pub fn kill(&self) {
        let taken = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut child) = taken {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `lines` lines of the node's log file, for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the server on our port is our process: `INFO server` names our pid, so a
    /// server someone else started on the port in the meantime does not count.
    fn wait_until_answering(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.is_running() {
                return false;
            }
            let info =
                query::<String>(&self.access, self.port, &["INFO", "server"]).unwrap_or_default();
            if info_field(&info, "process_id") == Some(self.pid.to_string().as_str()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        false
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs one command against the node on `port` (reached as `access` says), over a
/// connection of its own, with short timeouts so that a killed or hung node is an error and
/// not a hang.
pub fn query<T: FromRedisValue>(
    access: &Access,
    port: u16,
    args: &[&str],
) -> redis::RedisResult<T> {
    let mut connection = connect(access, port)?;
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(&mut connection)
}

/// A blocking connection to the node on `port`, with the timeouts of [`query`].
pub fn connect(access: &Access, port: u16) -> redis::RedisResult<redis::Connection> {
    discount_proxy::tls::install_crypto_provider();
    let client = redis::Client::open(access.admin_url(port))?;
    let connection = client.get_connection_with_timeout(Duration::from_secs(1))?;
    connection.set_read_timeout(Some(Duration::from_secs(5)))?;
    connection.set_write_timeout(Some(Duration::from_secs(1)))?;
    Ok(connection)
}

/// [`query`] from async code: on the blocking pool, so the test's runtime (and a proxy
/// running in it) keeps going meanwhile.
pub async fn query_async<T: FromRedisValue + Send + 'static>(
    access: &Access,
    port: u16,
    args: &[&str],
) -> redis::RedisResult<T> {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let access = access.clone();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        query(&access, port, &args)
    })
    .await
    .unwrap()
}

/// Whether a node takes writes or copies a master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Master,
    Replica,
}

/// The role the node on `port` reports of itself (`INFO replication`).
/// A node in the middle of a failover may refuse a moment (a dropped connection, `LOADING`):
/// it is asked again until it answers, for a few seconds.
pub async fn role_of(access: &Access, port: u16) -> Role {
    let deadline = Instant::now() + Duration::from_secs(5);
    let info: String = loop {
        match query_async(access, port, &["INFO", "replication"]).await {
            Ok(info) => break info,
            Err(err) if Instant::now() > deadline => {
                panic!("node {port} did not say its role: {err}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    match info_field(&info, "role") {
        Some("master") => Role::Master,
        Some("slave") => Role::Replica,
        other => panic!("node {port} reports role {other:?}"),
    }
}

/// Sets `key` to `value` (for ten minutes) on the master on `port`, and waits until a replica
/// has acknowledged it (`WAIT`, on the same connection as the write): a write a failover
/// must not lose. Fails the test if no replica acknowledges it within two seconds.
pub async fn set_replicated(access: &Access, port: u16, key: &str, value: &str) {
    let (key, value) = (key.to_owned(), value.to_owned());
    let access = access.clone();
    let acknowledged = tokio::task::spawn_blocking(move || -> redis::RedisResult<i64> {
        let mut connection = connect(&access, port)?;
        let set = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .arg("EX")
            .arg(600)
            .to_owned();
        set.query::<()>(&mut connection)?;
        redis::cmd("WAIT").arg(1).arg(2000).query(&mut connection)
    });
    let replicas = acknowledged.await.unwrap().unwrap();
    assert_eq!(replicas, 1, "no replica of {port} acknowledged the write");
}

/// The value of `field` in an `INFO` reply (`field:value` lines).
/// How many times the node on `port` has run `command` (`INFO commandstats`).
pub async fn calls_of(access: &Access, port: u16, command: &str) -> u64 {
    let info: String = query_async(access, port, &["INFO", "commandstats"])
        .await
        .unwrap();
    let field = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
    info.lines()
        .find_map(|line| line.strip_prefix(&field))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim_end)
}

/// A fresh folder under the system temp dir for one topology's configs, logs and dumps.
pub fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dp-{kind}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The log tails of `nodes`, one block per node, for a failure message.
pub fn log_tails<'a>(nodes: impl IntoIterator<Item = &'a RedisNode>) -> String {
    nodes
        .into_iter()
        .map(|node| {
            format!(
                "--- redis-server :{} log:\n{}",
                node.port,
                node.log_tail(15)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
