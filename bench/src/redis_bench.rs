//! Redis's own speed on the keys the proxy stored: `redis-benchmark --csv` with an explicit
//! command, and `redis-cli` to find those keys.

use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::process::Command;

/// The longest a tool may run before the row fails.
const LIMIT: Duration = Duration::from_secs(90);

/// What `redis-benchmark` measured for one command.
#[derive(Debug, Clone, Copy)]
pub struct BenchResult {
    /// Commands per second.
    pub rps: f64,
    /// The 99th percentile latency in milliseconds, when this version prints it.
    pub p99_ms: Option<f64>,
}

/// `redis-benchmark -c 32 -n <requests> --csv <command...>` against `redis`.
///
/// # Errors
/// The tool fails, overruns, or prints no figure.
pub async fn run(
    tool: &Path,
    redis: SocketAddr,
    requests: u64,
    command: &[String],
) -> Result<BenchResult> {
    let mut process = aimed_at(tool, redis);
    process
        .args(["-c", "32", "-n", &requests.to_string(), "--csv"])
        .args(command)
        .kill_on_drop(true);
    let stdout = output(process).await?;
    parse_csv(&stdout).with_context(|| format!("unexpected redis-benchmark output:\n{stdout}"))
}

/// `redis-benchmark` or `redis-cli` pointed at the bench's Redis.
fn aimed_at(tool: &Path, redis: SocketAddr) -> Command {
    let mut command = Command::new(tool);
    command.args([
        "-h",
        &redis.ip().to_string(),
        "-p",
        &redis.port().to_string(),
    ]);
    command
}

/// The keys matching `pattern`, found with `SCAN` (`redis-cli --scan`), sorted.
///
/// # Errors
/// redis-cli fails or overruns.
pub async fn scan(cli: &Path, redis: SocketAddr, pattern: &str) -> Result<Vec<String>> {
    let mut process = aimed_at(cli, redis);
    process
        .args(["--scan", "--pattern", pattern])
        .kill_on_drop(true);
    let stdout = output(process).await?;
    let mut keys: Vec<String> = stdout.lines().map(str::to_owned).collect();
    keys.sort();
    Ok(keys)
}

/// The length in bytes of the value stored at `key` (`STRLEN`).
///
/// # Errors
/// redis-cli fails or answers something else than a number.
pub async fn strlen(cli: &Path, redis: SocketAddr, key: &str) -> Result<u64> {
    let mut process = aimed_at(cli, redis);
    process.args(["STRLEN", key]).kill_on_drop(true);
    let stdout = output(process).await?;
    stdout
        .trim()
        .parse()
        .with_context(|| format!("STRLEN {key} answered {stdout:?}"))
}

async fn output(mut process: Command) -> Result<String> {
    let output = tokio::time::timeout(LIMIT, process.output())
        .await
        .with_context(|| {
            format!(
                "{:?} did not finish within {LIMIT:?}",
                process.as_std().get_program()
            )
        })?
        .with_context(|| format!("running {:?}", process.as_std().get_program()))?;
    if !output.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            process.as_std().get_program(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The CSV: a header line (`"test","rps",…,"p99_latency_ms",…`) and one line per test. Older
/// versions print no header and only `"test","rps"`.
fn parse_csv(output: &str) -> Result<BenchResult> {
    let rows: Vec<Vec<&str>> = output
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            line.split("\",\"")
                .map(|cell| cell.trim_matches('"'))
                .collect()
        })
        .collect();
    let header = rows.iter().find(|row| row.first() == Some(&"test"));
    let column = |name: &str, default: Option<usize>| {
        header
            .and_then(|header| header.iter().position(|cell| *cell == name))
            .or(default)
    };
    let data = rows
        .iter()
        .rfind(|row| row.first() != Some(&"test"))
        .context("no result line")?;
    let cell = |index: Option<usize>| index.and_then(|i| data.get(i)).and_then(|c| c.parse().ok());
    Ok(BenchResult {
        rps: cell(column("rps", Some(1))).context("no rps figure")?,
        p99_ms: cell(column("p99_latency_ms", None)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rps_and_p99_are_read_by_column_name() {
        let output = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"MGET k1 k2\",\"41500.00\",\"0.362\",\"0.088\",\"0.359\",\"0.519\",\"0.583\",\"4.583\"\n";
        let result = parse_csv(output).unwrap();
        assert!((result.rps - 41_500.0).abs() < 1e-9);
        assert_eq!(result.p99_ms, Some(0.583));
    }

    #[test]
    fn old_headerless_output_gives_rps_only() {
        let result = parse_csv("\"GET k\",\"85000.00\"\n").unwrap();
        assert!((result.rps - 85_000.0).abs() < 1e-9);
        assert_eq!(result.p99_ms, None);
    }
}
