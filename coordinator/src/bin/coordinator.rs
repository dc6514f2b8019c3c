//! `coordinator`: one coordinator of a cluster. See `docs/operations.md`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use ferry_coordinator::config::CoordinatorConfig;

/// Runs one coordinator of a ferry cluster. Flags override the config file.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version)]
struct Args {
    /// The TOML config file.
    #[arg(long, short = 'c', env = "FERRY_COORDINATOR_CONFIG")]
    config: PathBuf,
    /// Overrides `coordinator.id`.
    #[arg(long)]
    id: Option<String>,
    /// Overrides `coordinator.listen`.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Overrides `coordinator.advertise`.
    #[arg(long)]
    advertise: Option<String>,
    /// Overrides `etcd.endpoints` (comma-separated).
    #[arg(long, value_delimiter = ',')]
    etcd: Option<Vec<String>>,
    /// Overrides `coordinator.lease_ttl`, e.g. `5s`.
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
    lease_ttl: Option<Duration>,
}

fn main() {
    if let Err(e) = main_inner() {
        // One sentence per cause, outermost first.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn main_inner() -> anyhow::Result<()> {
    let args = Args::parse();
    ferry_proc::init_tracing();
    ferry_proc::failpoints::setup_from_env();
    let mut config = CoordinatorConfig::load(&args.config).context("load the config")?;
    if let Some(v) = args.id {
        config.coordinator.id = Some(v);
    }
    if let Some(v) = args.listen {
        config.coordinator.listen = v;
    }
    if let Some(v) = args.advertise {
        config.coordinator.advertise = Some(v);
    }
    if let Some(v) = args.etcd {
        config.etcd.endpoints = v;
    }
    if let Some(v) = args.lease_ttl {
        config.coordinator.lease_ttl = v;
    }
    config.validate().context("validate the config")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        let on_signal = cancel.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            on_signal.cancel();
        });
        ferry_coordinator::server::run(config, cancel).await
    })
}
