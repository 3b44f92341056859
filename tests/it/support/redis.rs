//! A real `redis-server` on a free port, stopped on `Drop`. Never the shared instance.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// With TLS: the folder holding a fresh self-signed certificate and its key.
    tls: Option<PathBuf>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts `redis-server` speaking only TLS, with a self-signed certificate made by the
    /// `openssl` command. Clients connect with `rediss://…#insecure`.
    pub fn start_tls() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "dp-redis-tls-{}-{}",
            std::process::id(),
            super::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        super::tls::TestCertificate::make(&dir);
        Self::start_with(Some(dir))
    }

    fn start_with(tls: Option<PathBuf>) -> Self {
        for _ in 0..5 {
            let mut server = Self {
                port: super::free_port(),
                child: None,
                tls: tls.clone(),
            };
            if server.launch() {
                return server;
            }
            server.tls = None; // the folder stays for the next try
        }
        panic!("redis-server did not start; is it installed (apt-get install redis-server)?");
    }

    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://127.0.0.1:{}/0#insecure", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// Where the server listens, for a [`super::FaultProxy`] to forward to.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// A client connection for inspecting what the proxy wrote.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        discount_proxy::tls::install_crypto_provider();
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Runs one admin command on a connection of its own (so `CLIENT KILL … SKIPME yes` spares
    /// only it) and returns the reply; an error reply fails the test.
    pub async fn command(&self, args: &[&str]) -> redis::Value {
        let mut admin = self.client().await;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut admin)
            .await
            .unwrap_or_else(|err| panic!("redis {args:?} failed: {err}"))
    }

    /// How many times `command` (lower case, like `mget`) ran since start, from
    /// `INFO commandstats`.
    pub async fn command_calls(&self, command: &str) -> u64 {
        let info = match self.command(&["INFO", "commandstats"]).await {
            redis::Value::BulkString(bytes) => String::from_utf8(bytes).unwrap(),
            redis::Value::VerbatimString { text, .. } => text,
            other => panic!("INFO answered {other:?}"),
        };
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |calls| calls.parse().unwrap())
    }

    /// `CONFIG SET parameter value`, e.g. `maxmemory 1` to make every write fail with `OOM`.
    pub async fn config_set(&self, parameter: &str, value: &str) {
        self.command(&["CONFIG", "SET", parameter, value]).await;
    }

    /// Closes every client connection but the one asking (`CLIENT KILL TYPE normal`), as an
    /// admin or a proxy in between might; returns how many were closed.
    pub async fn kill_clients(&self) -> i64 {
        match self
            .command(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
            .await
        {
            redis::Value::Int(killed) => killed,
            other => panic!("CLIENT KILL answered {other:?}"),
        }
    }

    /// `REPLICAOF 127.0.0.1 port`, or `REPLICAOF NO ONE` with `None`. A replica of a master
    /// that never answers keeps its data and serves reads, but refuses writes with `READONLY`,
    /// like a demoted primary after a failover.
    pub async fn replica_of(&self, master_port: Option<u16>) {
        let port = master_port.map(|port| port.to_string());
        let args = match &port {
            Some(port) => vec!["REPLICAOF", "127.0.0.1", port],
            None => vec!["REPLICAOF", "NO", "ONE"],
        };
        self.command(&args).await;
    }

    /// Kills the server (like a crash) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.launch(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// Sends a signal to the server process (`STOP` to hang it, `CONT` to resume).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} failed");
    }

    fn launch(&mut self) -> bool {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match &self.tls {
            None => command.args(["--port", &port]),
            Some(dir) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .args(["--tls-cert-file", &dir.join("cert.pem").to_string_lossy()])
                .args(["--tls-key-file", &dir.join("key.pem").to_string_lossy()])
                .args([
                    "--tls-ca-cert-file",
                    &dir.join("cert.pem").to_string_lossy(),
                ]),
        };
        let Ok(child) = command.spawn() else {
            return false;
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some())
            {
                self.child = None;
                return false; // exited: most likely the port was taken meanwhile
            }
            if self.answers_ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
        false
    }

    fn answers_ping(&self) -> bool {
        if self.tls.is_none() {
            return ping(self.port);
        }
        let output = Command::new("redis-cli")
            .args(["--tls", "--insecure", "-p", &self.port.to_string(), "ping"])
            .stderr(Stdio::null())
            .output();
        output.is_ok_and(|out| out.stdout.starts_with(b"PONG"))
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.tls.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
