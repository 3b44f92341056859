//! `wrk` runs: 2 threads, 64 connections, latency distribution on; a Lua script when the
//! request is a POST with a body.

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::time::Duration;
use tokio::process::Command;

/// What one `wrk` run measured.
#[derive(Debug, Clone, Copy)]
pub struct WrkResult {
    /// `Requests/sec:`.
    pub requests_per_sec: f64,
    /// The 99th percentile of the latency distribution.
    pub p99: Duration,
    /// `Non-2xx or 3xx responses:` (0 when absent).
    pub non_2xx: u64,
    /// The sum of `Socket errors:` (connect, read, write, timeout).
    pub socket_errors: u64,
}

impl WrkResult {
    /// A note about failed requests, empty when there were none.
    pub fn failures(&self) -> String {
        match (self.non_2xx, self.socket_errors) {
            (0, 0) => String::new(),
            (bad, errors) => format!("; {bad} non-2xx, {errors} socket errors"),
        }
    }
}

/// A request for `wrk`: a URL, and a JSON body to POST (a GET without one).
pub struct Load<'a> {
    /// The full URL.
    pub url: &'a str,
    /// The JSON body to POST, if any.
    pub json_body: Option<&'a str>,
    /// How long to drive load.
    pub duration: Duration,
}

/// Runs `wrk -t2 -c64 --latency` with `load`, the Lua script (if any) written into `dir`.
///
/// # Errors
/// wrk cannot start, fails, overruns its duration by 30 s, or prints no figures.
pub async fn run(wrk: &Path, dir: &Path, load: &Load<'_>) -> Result<WrkResult> {
    let mut command = Command::new(wrk);
    command
        .args(["-t2", "-c64", "--latency"])
        .arg(format!("-d{}s", load.duration.as_secs().max(1)))
        .kill_on_drop(true);
    if let Some(body) = load.json_body {
        let script = dir.join("post.lua");
        std::fs::write(&script, lua_script(body))
            .with_context(|| format!("writing {}", script.display()))?;
        command.arg("-s").arg(script);
    }
    command.arg(load.url);
    let limit = load.duration + Duration::from_secs(30);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .with_context(|| format!("wrk did not finish within {limit:?}"))?
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&stdout).with_context(|| format!("unexpected wrk output:\n{stdout}"))
}

/// A script that turns every request into the POST of `body`. A long-bracket string, so
/// the JSON needs no escaping.
fn lua_script(body: &str) -> String {
    format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [==[{body}]==]\n"
    )
}

fn parse(output: &str) -> Result<WrkResult> {
    let mut result = WrkResult {
        requests_per_sec: f64::NAN,
        p99: Duration::ZERO,
        non_2xx: 0,
        socket_errors: 0,
    };
    let mut saw_p99 = false;
    for line in output.lines().map(str::trim) {
        if let Some(rate) = line.strip_prefix("Requests/sec:") {
            result.requests_per_sec = rate.trim().parse().context("Requests/sec")?;
        } else if let Some(p99) = line.strip_prefix("99%") {
            result.p99 = parse_duration(p99.trim())?;
            saw_p99 = true;
        } else if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            result.non_2xx = count.trim().parse().context("Non-2xx count")?;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            result.socket_errors = errors
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        }
    }
    if result.requests_per_sec.is_nan() || !saw_p99 {
        bail!("no Requests/sec or 99% line");
    }
    Ok(result)
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.01s`, `1.50m`.
fn parse_duration(text: &str) -> Result<Duration> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("bad number in {text:?}"))?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => bail!("unknown unit in {text:?}"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 3s test @ http://127.0.0.1:4000/v1/discounts/lookup
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.10ms    1.20ms  20.01ms   80.00%
    Req/Sec    10.30k     1.00k   12.00k    70.00%
  Latency Distribution
     50%    2.90ms
     75%    3.50ms
     90%    4.20ms
     99%  812.00us
  61500 requests in 3.00s, 1.20GB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  20500.12
Transfer/sec:    400.00MB
";

    #[test]
    fn rate_p99_and_failures_are_read_from_wrk_output() {
        let result = parse(OUTPUT).unwrap();
        assert!((result.requests_per_sec - 20_500.12).abs() < 1e-6);
        assert_eq!(result.p99, Duration::from_micros(812));
        assert_eq!(result.non_2xx, 7);
        assert_eq!(result.socket_errors, 5);
    }

    #[test]
    fn output_without_figures_is_an_error() {
        assert!(parse("unable to connect to 127.0.0.1:1 Connection refused").is_err());
    }

    #[test]
    fn the_script_posts_the_body_verbatim() {
        let script = lua_script(r#"{"sns":["A-1"]}"#);
        assert!(script.contains(r#"wrk.body = [==[{"sns":["A-1"]}]==]"#));
    }
}
