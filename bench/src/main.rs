//! The benchmark: measures PERFORMANCE.md's targets P1–P8 side by side with their
//! references (Redis itself, nginx `proxy_cache`), the proxy on a Redis Cluster against
//! one Redis node, and three proxies on one Redis against one upstream call per SN, in one
//! run on this machine, and prints one table of figure, reference, ratio and verdict.
//!
//! Everything it starts (redis-server, a Redis Cluster, simulated upstreams, proxies, nginx)
//! listens on 127.0.0.1 only and is stopped by pid when the run ends, fails or is interrupted.

mod api;
mod http1;
mod kinds;
mod lab;
mod load;
mod nginx;
mod processes;
mod redis_bench;
mod redis_cluster;
mod report;
mod scenarios;
mod wrk;

use anyhow::{Context, Result};
use clap::Parser;
use lab::Lab;
use report::Report;
use scenarios::{Scale, Selection};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

/// Measure targets P1–P8 against Redis and nginx, a Redis Cluster against one node, and three
/// proxies on one Redis against one upstream call per SN, in one run, and print one table.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// A shorter run: shorter wrk runs, smaller P5, P7 and P8, fewer timed cluster-row batches,
    /// smaller cross-instance export batches (marked as scaled).
    #[arg(long)]
    quick: bool,
    /// Only these scenarios, e.g. `P1,P3`, `cluster` or `instances` (references are measured
    /// as needed).
    #[arg(long, value_name = "LIST")]
    only: Option<String>,
    /// Also write the table as Markdown to FILE.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Dropping the run's future on a signal drops the lab, which stops every child by pid
    // and removes the temp dir.
    let outcome = tokio::select! {
        outcome = run(&args) => outcome,
        () = discount_proxy::app::termination_signal() => Err(anyhow::anyhow!("interrupted; everything started was stopped")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    let scale = if args.quick {
        Scale::quick()
    } else {
        Scale::full()
    };
    let only = match &args.only {
        Some(list) => Selection::parse(list)?,
        None => Selection::all(),
    };
    let started = utc_now();
    let load_at_start = load_average();
    let mut report = Report::default();
    {
        let mut lab = Lab::start(scale).await?;
        for (tool, missing) in [
            ("wrk", &lab.tools.wrk),
            ("nginx", &lab.tools.nginx),
            ("redis-benchmark", &lab.tools.redis_benchmark),
        ] {
            if let Err(na) = missing {
                eprintln!("bench: {tool} missing ({}); its rows print n/a", na.0);
            }
        }
        eprintln!("bench: running in {}", lab.dir().display());
        scenarios::run(&mut lab, only, &mut report).await;
    }
    report.header = header(args, &scale, &started, &load_at_start);
    let text = report.text();
    println!("{text}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, report.markdown())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The lines above the table: when, on what, at which commit, with which options.
fn header(args: &Args, scale: &Scale, started: &str, load_at_start: &str) -> Vec<String> {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mut command = String::from("bench/run");
    if args.quick {
        command += " --quick";
    }
    if let Some(only) = &args.only {
        command += &format!(" --only {only}");
    }
    let scaled = if scale.quick {
        format!(
            " (scaled: wrk {} s, P5 {} SNs, P7 {} SNs, P8 {} s, cluster row {} batches, \
             instances row batches of {} SNs)",
            scale.wrk.as_secs(),
            report::count(scale.p5_sns as u64),
            report::count(scale.p7_sns as u64),
            scale.p8.as_secs(),
            scale.cluster_batches,
            report::count(scale.instances_batch as u64)
        )
    } else {
        format!(" (wrk {} s per row)", scale.wrk.as_secs())
    };
    vec![
        format!(
            "discount-proxy bench, {started} UTC, nproc {cores}, load average {load_at_start} at start, {} at end, commit {}",
            load_average(),
            commit()
        ),
        format!("command: {command}{scaled}"),
    ]
}

/// The 1, 5 and 15 minute load averages from /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

/// `git rev-parse --short HEAD`, with `+dirty` for uncommitted changes; `unknown` outside git.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(hash)
            if git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()) =>
        {
            format!("{hash}+dirty")
        }
        Some(hash) => hash,
        None => "unknown".to_owned(),
    }
}

/// Now as `YYYY-MM-DD HH:MM`, from the Unix clock (civil-from-days, no date crate needed).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or_default();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// Howard Hinnant's algorithm: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_become_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_779), (2026, 11, 22));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
