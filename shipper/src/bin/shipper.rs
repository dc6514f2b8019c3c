//! `shipper`: ferry's shipper. Parses flags, loads the config, sets up logging and runs the
//! process (see `ferry_shipper::server`) until SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use ferry_shipper::config::{ShipperArgs, ShipperConfig};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = ShipperArgs::parse();
    ferry_proc::init_tracing();
    ferry_proc::failpoints::setup_from_env();
    let config = match ShipperConfig::load(&args) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let cancel = CancellationToken::new();
    let result = runtime.block_on(async {
        let stop = cancel.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("stopping: resigning elections and writing the last progress");
            stop.cancel();
        });
        ferry_shipper::server::run(config, cancel).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
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

/// One sentence on stderr and a non-zero exit.
fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("shipper: {e}");
    ExitCode::FAILURE
}
