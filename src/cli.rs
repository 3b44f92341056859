//! The command line: `serve` (the default), `simulate-upstream` and `demo`.

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
}

/// Where the config comes from, and the flags that override it.
#[derive(Debug, Clone, Default, Args)]
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
}
