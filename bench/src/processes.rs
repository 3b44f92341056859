//! The child processes of a run (redis-server, simulators, proxies, nginx) and the temp dir
//! they write to: each stopped by its pid on `Drop`, so an error or Ctrl-C never leaves one
//! listening.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a stopped child gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(20);

/// A running child process, stopped (SIGTERM, then SIGKILL) when dropped.
///
/// A `std` child rather than a tokio one: `Drop` is synchronous, and holding the unreaped
/// child guarantees its pid is not reused before we signal it.
pub struct Service {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts `command` with stdout and stderr going to `log`.
    ///
    /// # Errors
    /// The log cannot be created or the program cannot be started.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log file handle")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// The process id, for `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has already ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of the process's output, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Waits until `ready` says yes, failing early (with the log tail) if the process exits.
    ///
    /// # Errors
    /// The process exited, or `ready` stayed false until `limit`.
    pub async fn wait_until<F, Fut>(&mut self, limit: Duration, mut ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "{} exited during start-up ({status}); its log ends:\n{}",
                    self.name,
                    self.log_tail(15)
                );
            }
            if ready().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready after {limit:?}; its log ends:\n{}",
                    self.name,
                    self.log_tail(15)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `addr` accepts a TCP connection.
    ///
    /// # Errors
    /// As [`Service::wait_until`].
    pub async fn wait_for_port(&mut self, addr: SocketAddr, limit: Duration) -> Result<()> {
        self.wait_until(limit, || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await
    }

    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // SIGTERM first: nginx's master stops its workers and the proxy drains, neither of
        // which SIGKILL allows (an nginx worker would stay behind, listening).
        let kill = find_program("kill").unwrap_or_else(|| PathBuf::from("kill"));
        let signalled = Command::new(kill)
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !signalled {
            eprintln!("bench: could not send SIGTERM to {}; killing it", self.name);
        } else {
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if self.exited().is_some() {
                    return;
                }
                std::thread::sleep(POLL);
            }
            eprintln!("bench: {} ignored SIGTERM; killing it", self.name);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `lines` lines of a log file (or why it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// A directory of its own under the system temp dir, removed with everything in it on `Drop`.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a new, unique directory.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn create() -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_nanos())
            .unwrap_or_default();
        let name = format!("discount-proxy-bench-{}-{nanos}", std::process::id());
        let path = std::env::temp_dir().join(name);
        // create_dir, not create_dir_all: it fails rather than share an existing directory.
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        // Readable whatever the umask: nginx's workers run as another user when we are root.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            eprintln!("bench: could not remove {}: {err}", self.path.display());
        }
    }
}

/// A loopback port free right now (the OS picks it; the listener is closed again).
///
/// # Errors
/// No port could be bound.
pub fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    listener.local_addr().context("reading a bound port")
}

/// A process's memory as the kernel reports it.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Resident set size now, in bytes (`VmRSS`).
    pub rss: u64,
    /// The highest resident set size so far, in bytes (`VmHWM`).
    pub hwm: u64,
}

/// Reads `VmRSS` and `VmHWM` from `/proc/<pid>/status`.
///
/// # Errors
/// The file cannot be read (the process is gone) or lacks the fields.
pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .with_context(|| format!("{path} has no {name}"))?;
        let kib: u64 = line
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("{path}: {name} is not a number of kB"))?;
        Ok(kib * 1024)
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

/// Finds a program on `PATH`, or in the system directories a non-root or trimmed `PATH`
/// lacks (nginx is in /usr/sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let system = ["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/bin"];
    std::env::split_paths(&path)
        .chain(system.map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
