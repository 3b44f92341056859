//! The shared connections of the proxy's `cache/connections.rs` (through `RedisCache`)
//! against redis-rs's own `aio::ConnectionManager`, measured for the verdict in that module's
//! doc: hit-path throughput, and recovery from a silent network fault in which the flows
//! open at the fault stay dead while new ones work (a NAT or load balancer that lost its
//! state, a failover behind the same address). Starts its own `redis-server` on a free port
//! and a relay in front of it that can cut the flows it has open; stops both at the end.
//!
//! `cargo run --release -p bench --example connection_manager`

use anyhow::{Context, Result};
use discount_proxy::cache::{Cache, RedisCache};
use discount_proxy::config::RedisConfig;
use discount_proxy::metrics::Metrics;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};

const TIMEOUT: Duration = Duration::from_millis(250);
const KEYS: usize = 100;
const TASKS: usize = 64;

#[tokio::main]
async fn main() -> Result<()> {
    let port = free_port()?;
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("redis-server runs")?;
    let outcome = measure(port).await;
    let _ = redis.kill();
    let _ = redis.wait();
    outcome
}

async fn measure(port: u16) -> Result<()> {
    let direct = format!("redis://127.0.0.1:{port}/0");
    wait_for_redis(&direct).await?;
    seed(&direct).await?;
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("k:{i}")).collect());
    println!("hit path: {TASKS} tasks, MGET of {KEYS} keys, 3 s each");
    for pool in [1, 2] {
        let ours = Client::Ours(Arc::new(ours(&direct, pool)?));
        println!(
            "  ours, {pool} connection(s): {:>8.0} MGET/s",
            throughput(&ours, &keys).await
        );
    }
    let theirs = Client::Manager(manager(&direct).await?);
    println!(
        "  ConnectionManager:       {:>8.0} MGET/s",
        throughput(&theirs, &keys).await
    );

    println!("recovery after the open flows are cut silently (new flows work), GET every 10 ms:");
    for kind in ["ours", "ConnectionManager"] {
        let relay = Relay::start(port).await?;
        let url = format!("redis://{}/0", relay.addr);
        let client = match kind {
            "ours" => Client::Ours(Arc::new(ours(&url, 2)?)),
            _ => Client::Manager(manager(&url).await?),
        };
        let recovered = recovery(&client, &relay, &keys).await;
        match recovered {
            Some(took) => println!("  {kind:<18} answers again {took:?} after the cut"),
            None => println!("  {kind:<18} still failing 10 s after the cut"),
        }
    }
    Ok(())
}

#[derive(Clone)]
enum Client {
    Ours(Arc<RedisCache>),
    Manager(ConnectionManager),
}

impl Client {
    async fn mget(&self, keys: &[String]) -> bool {
        match self {
            Self::Ours(cache) => {
                let sns: Vec<&str> = keys.iter().map(String::as_str).collect();
                cache.get_many(&sns).await.failures.is_empty()
            }
            Self::Manager(manager) => {
                let mut manager = manager.clone();
                let mut cmd = redis::cmd("MGET");
                for key in keys {
                    cmd.arg(format!("discount:v1:{key}"));
                }
                let query = cmd.query_async::<Vec<Option<Vec<u8>>>>(&mut manager);
                matches!(timeout(TIMEOUT, query).await, Ok(Ok(_)))
            }
        }
    }
}

fn ours(url: &str, pool_size: usize) -> Result<RedisCache> {
    let settings = RedisConfig {
        url: url.to_owned(),
        pool_size,
        timeout: TIMEOUT,
        // The breaker's cool-down would hide how fast the connections themselves recover.
        breaker_failures: 0,
        ..RedisConfig::default()
    };
    Ok(RedisCache::new(&settings, Arc::new(Metrics::new()))?)
}

async fn manager(url: &str) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT))
        .set_number_of_retries(1);
    Ok(ConnectionManager::new_with_config(redis::Client::open(url)?, config).await?)
}

async fn throughput(client: &Client, keys: &Arc<Vec<String>>) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(3);
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (client, keys, done) = (client.clone(), Arc::clone(keys), Arc::clone(&done));
            tokio::spawn(async move {
                while Instant::now() < until {
                    if client.mget(&keys).await {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    done.load(Ordering::Relaxed) as f64 / 3.0
}

async fn recovery(client: &Client, relay: &Relay, keys: &[String]) -> Option<Duration> {
    let few = &keys[..1];
    for _ in 0..20 {
        client.mget(few).await;
        sleep(Duration::from_millis(10)).await;
    }
    relay.cut();
    let cut = Instant::now();
    while cut.elapsed() < Duration::from_secs(10) {
        if client.mget(few).await {
            return Some(cut.elapsed());
        }
        sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A TCP relay to Redis whose [`Relay::cut`] silences every flow open at that moment (bytes
/// are swallowed, nothing is closed) while flows opened later pass.
struct Relay {
    addr: SocketAddr,
    epoch: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    async fn start(redis_port: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let epoch = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (epochs, stopped) = (Arc::clone(&epoch), Arc::clone(&stop));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let born = epochs.load(Ordering::Relaxed);
                let epochs = Arc::clone(&epochs);
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await {
                        relay(client, server, born, epochs).await;
                    }
                });
            }
        });
        Ok(Self { addr, epoch, stop })
    }

    fn cut(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn relay(client: TcpStream, server: TcpStream, born: u64, epoch: Arc<AtomicU64>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let alive = {
        let epoch = Arc::clone(&epoch);
        move || epoch.load(Ordering::Relaxed) == born
    };
    let alive_too = alive.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
            if alive() && server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = server_read.read(&mut buf).await {
            if alive_too() && client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(up, down);
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for_redis(url: &str) -> Result<()> {
    let client = redis::Client::open(url)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            if redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not answer");
        sleep(Duration::from_millis(20)).await;
    }
}

async fn seed(url: &str) -> Result<()> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut cmd = redis::cmd("MSET");
    for i in 0..KEYS {
        cmd.arg(format!("discount:v1:k:{i}"))
            .arg(format!("dp1+0000000000000 {{\"i\":{i}}}"));
    }
    cmd.query_async::<()>(&mut conn).await?;
    Ok(())
}
