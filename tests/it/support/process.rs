//! The real binary as a child process, its log lines collected for the test to wait on.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Runs `discount-proxy` with these arguments and environment variables.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = command(args, envs);
        command.stdin(Stdio::null());
        let mut child = command.spawn().expect("the discount-proxy binary runs");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let streams = [
            child.stdout.take().map(read_box),
            child.stderr.take().map(read_box),
        ];
        let readers = streams
            .into_iter()
            .flatten()
            .map(|stream| {
                let lines = Arc::clone(&lines);
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        lines.lock().unwrap().push(line);
                    }
                })
            })
            .collect();
        Self {
            child,
            lines,
            readers,
        }
    }

    /// `discount-proxy serve` on a free port, with this Redis and these variables.
    pub fn serve(redis_url: &str, envs: &[(&str, &str)]) -> Self {
        Self::spawn(
            &["serve", "--listen", "127.0.0.1:0", "--redis-url", redis_url],
            envs,
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed so far, one string.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for a line containing `needle`, returning it.
    pub async fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|line| line.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} within {timeout:?}; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the `listening addr=…` line and returns the address.
    pub async fn listening_addr(&self) -> SocketAddr {
        let line = self
            .wait_for_line("listening", Duration::from_secs(20))
            .await;
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next());
        addr.and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
        assert!(status.is_ok_and(|s| s.success()));
    }

    /// Waits for the process to exit (failing the test after `timeout`).
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The readers end at EOF: after this, output() has every line.
                for reader in self.readers.drain(..) {
                    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {timeout:?}; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The binary with these arguments, in an environment of our own: no `DISCOUNT_PROXY_…`
/// variable of the test run's, no backtraces; stdout and stderr piped.
fn command(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_discount-proxy"));
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.env("RUST_LOG", "info").env_remove("RUST_BACKTRACE");
    for (key, _) in std::env::vars() {
        if key.starts_with("DISCOUNT_PROXY_") {
            command.env_remove(key);
        }
    }
    command.envs(envs.iter().copied());
    command
}

/// A run of the binary that has ended: how, and what it printed where.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs the binary to its end with `stdin` as its input, stdout and stderr kept apart;
/// fails the test (and kills it) after `timeout`.
pub async fn run_to_end(
    args: &[&str],
    envs: &[(&str, &str)],
    stdin: &str,
    timeout: Duration,
) -> Finished {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::from(command(args, envs));
    command.stdin(Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn().expect("the discount-proxy binary runs");
    let mut input = child.stdin.take().unwrap();
    // A command that exits without reading its input closes the pipe: that is not our failure.
    let _ = input.write_all(stdin.as_bytes()).await;
    drop(input);
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("discount-proxy {args:?} still running after {timeout:?}"))
        .unwrap();
    Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn read_box(stream: impl std::io::Read + Send + 'static) -> Box<dyn std::io::Read + Send> {
    Box::new(stream)
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
