//! `shipper`: ferry's shipper. Parses flags, loads the config, sets up logging and runs the
//! process (see `ferry_shipper::server`) until SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use ferry_shipper::config::{ShipperArgs, ShipperConfig};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = ShipperArgs::parse();
    ferry_proc::main(
        "shipper",
        || ShipperConfig::load(&args),
        |config| async move {
            let cancel = CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("stopping: resigning elections and writing the last progress");
                stop.cancel();
            });
            ferry_shipper::server::run(config, cancel).await
        },
    )
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
