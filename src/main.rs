//! The binary: parse the command line, load the config, start telemetry, run.

use clap::Parser;
use discount_proxy::app::{self, CacheChoice};
use discount_proxy::cli::{Cli, Command, ServeArgs, SimulateArgs};
use discount_proxy::config::{Config, LogFormat};
use discount_proxy::secret::Secret;
use discount_proxy::simulator::Simulator;
use discount_proxy::{telemetry, warm};
use std::process::ExitCode;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// mimalloc instead of glibc's malloc: the hit path allocates a few buffers per request on
/// two threads, and glibc's arenas cost ~15 % of its CPU there (see the README's Performance
/// section for the profile). Built with `no_thp`: with transparent huge pages its arenas are
/// touched 2 MiB at a time, which doubled the idle RSS and the growth of big streamed lookups.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Printed from the command line's definition: no config, and no runtime to start.
    match &cli.command {
        Some(Command::Completions(args)) => {
            discount_proxy::manual::completions(args, &mut std::io::stdout().lock());
            return ExitCode::SUCCESS;
        }
        Some(Command::Man(args)) => {
            return match discount_proxy::manual::man(args, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => fail(&anyhow::Error::new(err).context("could not write the man pages")),
            };
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            return fail(&anyhow::Error::new(err).context("could not start the async runtime"));
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            None => serve(&cli.serve).await,
            Some(Command::Serve(args)) => serve(&args).await,
            Some(Command::Demo(args)) => demo(&args).await,
            Some(Command::SimulateUpstream(args)) => simulate(&args).await,
            // A client, not a server: no config, no logs, and an exit status of its own.
            Some(Command::Warm(args)) => return Ok(warm::run(&args).await),
            // Answered above, before the runtime.
            Some(Command::Completions(_) | Command::Man(_)) => Ok(()),
        }
        .map(|()| ExitCode::SUCCESS)
    });
    result.unwrap_or_else(|err| fail(&err))
}

fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::FAILURE
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref())?;
    args.apply(&mut config);
    config.validate()?;
    Ok(config)
}

async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = load_config(args)?;
    init_telemetry(config.log.format)?;
    let listener = app::bind(&config).await?;
    let proxy = app::prepare(&config, listener, CacheChoice::Redis).await?;
    proxy.run(shutdown_signal()).await;
    Ok(())
}

/// The proxy and a simulated upstream in one process, on Redis if it answers (with the
/// in-process tier if `cache.local.enabled`) and the in-process cache if it does not.
async fn demo(args: &ServeArgs) -> anyhow::Result<()> {
    let mut config = load_config(args)?;
    init_telemetry(config.log.format)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = listener.local_addr()?;
    let simulator = Simulator::new(Duration::from_millis(500), config.upstream.token.clone());
    tokio::spawn(simulator.run(listener, std::future::pending()));
    config.upstream.url = format!("http://{upstream_addr}/contract/?sn={{sn}}");
    info!(addr = %upstream_addr, latency = "500ms", "demo: simulated upstream started");
    let listener = app::bind(&config).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let proxy = app::prepare(&config, listener, CacheChoice::RedisIfAnswering).await?;
    info!("demo: try  curl -s {base}/v1/discounts/C2024-0001");
    info!(
        "demo: try  curl -s -H 'Content-Type: application/json' -d '{{\"sns\":[\"C2024-0001\",\"C2024-0002\",\"NF-1\"]}}' {base}/v1/discounts/lookup"
    );
    proxy.run(shutdown_signal()).await;
    Ok(())
}

async fn simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    init_telemetry(LogFormat::Text)?;
    let listener = TcpListener::bind(args.listen).await?;
    info!(addr = %listener.local_addr()?, latency = ?args.latency, "simulated upstream listening");
    let simulator = Simulator::new(args.latency, args.token.clone().map(Secret::new));
    simulator.run(listener, shutdown_signal()).await;
    Ok(())
}

fn init_telemetry(format: LogFormat) -> anyhow::Result<()> {
    telemetry::init(format).map_err(|err| anyhow::anyhow!("could not start logging: {err}"))
}

/// Resolves on the first SIGTERM or Ctrl-C; a second one exits at once.
async fn shutdown_signal() {
    app::termination_signal().await;
    info!("signal received; draining (send another to exit at once)");
    tokio::spawn(async {
        app::termination_signal().await;
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
}
