//! The command line: `serve` (the default), `simulate-upstream`, `demo`, `warm`, and
//! `completions` and `man`, generated from these definitions (see the `manual` module).

use crate::secret::Secret;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A batching, caching proxy in front of a one-SN-per-request discount service.
#[derive(Debug, Parser)]
#[command(
    name = "discount-proxy",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// The subcommand given, if any; none means `serve`.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The `serve` flags given without a subcommand.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Serve(ServeArgs),
    /// Run a stand-in for the upstream discount service.
    SimulateUpstream(SimulateArgs),
    /// The quick start: the proxy and a simulated upstream (500 ms) in one process.
    Demo(ServeArgs),
    /// Send SNs from a file or stdin to a running proxy in batches, so they are cached.
    Warm(WarmArgs),
    /// Print a completion script for a shell (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Print the man page, or write one page per subcommand into a folder.
    Man(ManArgs),
}

/// Which shell to complete for.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell, like `bash`.
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// Where man pages go.
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write `discount-proxy.1` and a page per subcommand (`discount-proxy-warm.1`, …) here
    /// instead of printing the main page.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// Where the config comes from, and the flags that override it. `Debug` redacts the URLs.
#[derive(Clone, Default, Args)]
pub struct ServeArgs {
    /// The TOML config file [default: config/default.toml, if it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Overrides `server.listen`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Overrides `redis.url`.
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Overrides `upstream.url` (a template with `{sn}`).
    #[arg(long, value_name = "URL")]
    pub upstream_url: Option<String>,
}

impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            config,
            listen,
            redis_url,
            upstream_url,
        } = self;
        let redacted = |url: &Option<String>| url.as_deref().map(crate::config::redacted_url);
        f.debug_struct("ServeArgs")
            .field("config", config)
            .field("listen", listen)
            .field("redis_url", &redacted(redis_url))
            .field("upstream_url", &redacted(upstream_url))
            .finish()
    }
}

impl ServeArgs {
    /// Applies the flags on top of the file and environment.
    pub fn apply(&self, config: &mut crate::config::Config) {
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(url) = &self.redis_url {
            config.redis.url.clone_from(url);
        }
        if let Some(url) = &self.upstream_url {
            config.upstream.url.clone_from(url);
        }
    }
}

/// How the simulated upstream listens and behaves.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1:8001", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Delay before every answer, like the real service's ~0.5 s.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Require `Authorization: Token <TOKEN>` on every request.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

/// What `warm` reads, where it sends it, and how hard it pushes.
#[derive(Debug, Clone, Args)]
pub struct WarmArgs {
    /// The proxy's base URL, like `http://127.0.0.1:8080`.
    #[arg(long, value_name = "URL", value_parser = parse_proxy_url)]
    pub proxy: url::Url,
    /// SNs, one per line, or a CSV (named `*.csv`, or with a comma in its first line) with a
    /// header row [default: stdin].
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The CSV has no header row: its first row is data.
    #[arg(long)]
    pub no_header: bool,
    /// The CSV column holding the SNs: its header name, or its number from 1 [default: 1].
    #[arg(long, value_name = "NAME|N", value_parser = crate::warm::Column::parse)]
    pub column: Option<crate::warm::Column>,
    /// SNs per lookup request.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// Lookup requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// Fetch every SN from the upstream again, even if it is cached (`?refresh=true`).
    #[arg(long)]
    pub refresh: bool,
    /// Sent as `Authorization: Bearer <TOKEN>`, for a proxy with `server.api_tokens` set.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "DISCOUNT_PROXY_CLIENT_TOKEN",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub token: Option<Secret>,
    /// How long one lookup request may take; keep it above the proxy's `server.request_timeout`.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn parse_proxy_url(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|err| format!("not a URL: {err}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("expected http://host:port or https://host:port".to_owned());
    }
    Ok(url)
}

fn parse_secret(raw: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::new(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_means_serve_with_its_flags() {
        let cli = Cli::try_parse_from(["discount-proxy", "--config", "x.toml"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.config, Some(PathBuf::from("x.toml")));
        let cli = Cli::try_parse_from(["discount-proxy", "simulate-upstream", "--latency", "50ms"])
            .unwrap();
        assert!(
            matches!(cli.command, Some(Command::SimulateUpstream(args)) if args.latency == Duration::from_millis(50))
        );
    }

    #[test]
    fn warm_has_defaults_and_bounds() {
        let cli =
            Cli::try_parse_from(["discount-proxy", "warm", "--proxy", "http://h:1", "sns.txt"])
                .unwrap();
        let Some(Command::Warm(args)) = cli.command else {
            panic!("not warm")
        };
        assert_eq!((args.batch_size, args.parallel), (1000, 4));
        assert_eq!(args.file, Some(PathBuf::from("sns.txt")));
        assert!(!args.refresh);
        for bad in [
            &["--batch-size", "0"][..],
            &["--batch-size", "10001"],
            &["--parallel", "65"],
            &["--proxy", "localhost:8080"],
        ] {
            let mut argv = vec!["discount-proxy", "warm", "--proxy", "http://h:1"];
            argv.extend_from_slice(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_warm_token_never_shows_in_debug_output() {
        let cli = Cli::try_parse_from([
            "discount-proxy",
            "warm",
            "--proxy",
            "http://h:1",
            "--token",
            "tok-123",
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains("tok-123"));
    }
}
