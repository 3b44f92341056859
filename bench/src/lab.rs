//! What a run starts and owns: redis-server, a 3-master Redis Cluster, the simulated
//! upstreams, the proxies and nginx, each started when a scenario first needs it (redis-server
//! at once) and stopped when the lab is dropped.

use crate::api::Api;
use crate::http1::Conn;
use crate::kinds::{ProxyKind, Upstream};
use crate::nginx;
use crate::processes::{self, Service, TempDir};
use crate::redis_cluster::RedisCluster;
use crate::scenarios::Scale;
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The Redis key prefix every proxy of the run uses; SNs are distinct per scenario.
pub const KEY_PREFIX: &str = "bench:v1:";

/// How long a started process may take to answer.
const READY: Duration = Duration::from_secs(20);

/// Why a row cannot be measured in this run (a missing tool, a proxy without a feature).
#[derive(Debug, Clone)]
pub struct Na(pub String);

/// A started proxy, as the scenarios address it.
#[derive(Debug, Clone, Copy)]
pub struct ProxyRef {
    /// Which configuration it runs.
    pub kind: ProxyKind,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id, for `/proc/<pid>/status`.
    pub pid: u32,
}

/// The external programs the reference rows need; `Err` says why one is unavailable.
pub struct Tools {
    /// `wrk`, for P1–P3 and the nginx reference.
    pub wrk: Result<PathBuf, Na>,
    /// `nginx`, for the P3 reference.
    pub nginx: Result<PathBuf, Na>,
    /// `redis-benchmark`, for the Redis ceiling.
    pub redis_benchmark: Result<PathBuf, Na>,
    /// `redis-cli`, to find the keys the proxy stored.
    pub redis_cli: Result<PathBuf, Na>,
}

impl Tools {
    fn find() -> Self {
        let find = |name: &str, package: &str| {
            processes::find_program(name).ok_or_else(|| Na(format!("no {name}: install {package}")))
        };
        Self {
            wrk: find("wrk", "wrk"),
            nginx: find("nginx", "nginx-light"),
            redis_benchmark: find("redis-benchmark", "redis-tools"),
            redis_cli: find("redis-cli", "redis-tools"),
        }
    }
}

/// Everything a run has started. Fields drop in order: proxies before what they use, and
/// the temp dir after every process that writes into it.
pub struct Lab {
    proxies: Vec<(ProxyRef, Service)>,
    unsupported: Vec<(ProxyKind, Na)>,
    nginx: Option<(SocketAddr, Service)>,
    simulators: Vec<(Upstream, SocketAddr, Service)>,
    cluster: Option<RedisCluster>,
    _redis: Service,
    /// Where the run's redis-server listens.
    pub redis_addr: SocketAddr,
    /// The optional external programs.
    pub tools: Tools,
    /// The HTTP client of the run.
    pub api: Api,
    /// The sizes and durations of this run.
    pub scale: Scale,
    proxy_bin: PathBuf,
    redis_server: PathBuf,
    dir: TempDir,
}

impl Lab {
    /// Creates the temp dir and starts redis-server.
    ///
    /// # Errors
    /// No proxy binary next to this one, no `redis-server`, or Redis does not start.
    pub async fn start(scale: Scale) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let proxy_bin = exe.with_file_name("discount-proxy");
        if !proxy_bin.is_file() {
            bail!(
                "{} is missing: build it with `cargo build --release --bins` (bench/run does)",
                proxy_bin.display()
            );
        }
        let redis_server = processes::find_program("redis-server")
            .context("redis-server is not installed (Debian package redis-server)")?;
        let dir = TempDir::create()?;
        std::fs::write(dir.path().join("empty.toml"), "").context("writing the empty config")?;
        let redis_addr = processes::free_port()?;
        let mut command = Command::new(&redis_server);
        command
            .args(["--port", &redis_addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path());
        let mut redis = Service::spawn("redis-server", command, dir.path().join("redis.log"))?;
        redis.wait_for_port(redis_addr, READY).await?;
        Ok(Self {
            proxies: Vec::new(),
            unsupported: Vec::new(),
            nginx: None,
            simulators: Vec::new(),
            cluster: None,
            _redis: redis,
            redis_addr,
            tools: Tools::find(),
            api: Api::new()?,
            scale,
            proxy_bin,
            redis_server,
            dir,
        })
    }

    /// The run's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The simulated upstream with this latency, started on first use.
    ///
    /// # Errors
    /// The simulator does not start.
    pub async fn simulator(&mut self, upstream: Upstream) -> Result<SocketAddr> {
        if let Some((_, addr, _)) = self.simulators.iter().find(|(u, ..)| *u == upstream) {
            return Ok(*addr);
        }
        let addr = processes::free_port()?;
        let latency = format!("{}ms", upstream.latency().as_millis());
        let mut command = Command::new(&self.proxy_bin);
        command
            .arg("simulate-upstream")
            .args(["--listen", &addr.to_string(), "--latency", &latency])
            .env("RUST_LOG", "warn");
        let log = self.dir().join(format!("simulator-{latency}.log"));
        let mut service = Service::spawn(&format!("simulator ({latency})"), command, log)?;
        service.wait_for_port(addr, READY).await?;
        self.simulators.push((upstream, addr, service));
        Ok(addr)
    }

    /// The 3-master Redis Cluster, started on first use; `Na` without `redis-cli`, which
    /// forms it.
    ///
    /// # Errors
    /// A node does not start or the cluster does not become ready.
    pub async fn cluster(&mut self) -> Result<Result<&RedisCluster, Na>> {
        let cluster = match self.cluster.take() {
            Some(cluster) => cluster,
            None => {
                let cli = match &self.tools.redis_cli {
                    Ok(cli) => cli.clone(),
                    Err(na) => return Ok(Err(na.clone())),
                };
                RedisCluster::start(&self.redis_server, &cli, self.dir.path()).await?
            }
        };
        Ok(Ok(self.cluster.insert(cluster)))
    }

    /// The proxy of this kind, started on first use; `Na` when this build cannot run it.
    ///
    /// # Errors
    /// The proxy does not start for another reason than a missing feature.
    pub async fn proxy(&mut self, kind: ProxyKind) -> Result<Result<ProxyRef, Na>> {
        if let Some((proxy, _)) = self.proxies.iter().find(|(p, _)| p.kind == kind) {
            return Ok(Ok(*proxy));
        }
        if let Some((_, na)) = self.unsupported.iter().find(|(k, _)| *k == kind) {
            return Ok(Err(na.clone()));
        }
        let redis = if kind.on_cluster() {
            match self.cluster().await? {
                Ok(cluster) => vec![
                    ("REDIS__MODE", "cluster".to_owned()),
                    ("REDIS__NODES", cluster.nodes_env()),
                ],
                Err(na) => return Ok(Err(na)),
            }
        } else {
            vec![("REDIS__URL", format!("redis://{}/0", self.redis_addr))]
        };
        let upstream = self.simulator(kind.upstream()).await?;
        let addr = processes::free_port()?;
        let command = self.proxy_command(kind, addr, upstream, redis);
        let log = self.dir().join(format!("proxy-{kind:?}.log"));
        let mut service = Service::spawn(&format!("proxy {}", kind.name()), command, log)?;
        let ready = service.wait_until(READY, || healthy(addr)).await;
        if let Err(err) = ready {
            let tail = service.log_tail(30);
            // Only `cache.local` itself being unknown means "not built yet"; an unknown key
            // inside it is a real error, shown with the log.
            if kind == ProxyKind::LocalTier && tail.contains("unknown field: found `local`") {
                let na = Na("proxy without cache.local".to_owned());
                self.unsupported.push((kind, na.clone()));
                return Ok(Err(na));
            }
            return Err(err);
        }
        let proxy = ProxyRef {
            kind,
            addr,
            pid: service.pid(),
        };
        self.proxies.push((proxy, service));
        Ok(Ok(proxy))
    }

    /// Every proxy started so far, in start order.
    pub fn proxies(&self) -> Vec<ProxyRef> {
        self.proxies.iter().map(|(proxy, _)| *proxy).collect()
    }

    /// The proxy's command line and environment; `redis` says which Redis it uses.
    fn proxy_command(
        &self,
        kind: ProxyKind,
        addr: SocketAddr,
        upstream: SocketAddr,
        redis: Vec<(&'static str, String)>,
    ) -> Command {
        let mut command = Command::new(&self.proxy_bin);
        command
            .arg("serve")
            .arg("--config")
            .arg(self.dir().join("empty.toml"));
        // Only the run's own settings: a DISCOUNT_PROXY_ variable in the caller's shell would
        // change what is measured, or fail the start as an unknown key.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("DISCOUNT_PROXY_") {
                command.env_remove(key);
            }
        }
        let base = [
            ("SERVER__LISTEN", addr.to_string()),
            ("SERVER__SHUTDOWN_GRACE", "2s".to_owned()),
            ("REDIS__KEY_PREFIX", KEY_PREFIX.to_owned()),
            (
                "UPSTREAM__URL",
                format!("http://{upstream}/contract/?sn={{sn}}"),
            ),
            ("UPSTREAM__RETRIES", "0".to_owned()),
        ];
        let settings = base.into_iter().chain(redis).chain(kind.env(&self.scale));
        for (key, value) in settings {
            command.env(format!("DISCOUNT_PROXY_{key}"), value);
        }
        command.env("RUST_LOG", "warn");
        command
    }

    /// nginx `proxy_cache` in front of the 50 ms simulator, started on first use.
    ///
    /// # Errors
    /// nginx is installed but does not start.
    pub async fn nginx(&mut self) -> Result<Result<SocketAddr, Na>> {
        if let Some((addr, _)) = &self.nginx {
            return Ok(Ok(*addr));
        }
        let program = match &self.tools.nginx {
            Ok(program) => program.clone(),
            Err(na) => return Ok(Err(na.clone())),
        };
        let upstream = self.simulator(Upstream::Normal).await?;
        let addr = processes::free_port()?;
        let mut service = nginx::spawn(&program, self.dir(), addr, upstream)?;
        service.wait_for_port(addr, READY).await?;
        self.nginx = Some((addr, service));
        Ok(Ok(addr))
    }
}

/// Whether `GET /healthz` answers `200`.
async fn healthy(addr: SocketAddr) -> bool {
    let limit = Duration::from_secs(2);
    match Conn::connect(addr, limit).await {
        Ok(mut conn) => conn
            .get("/healthz", limit)
            .await
            .is_ok_and(|reply| reply.status == 200),
        Err(_) => false,
    }
}
