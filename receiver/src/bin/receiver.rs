//! `receiver`: ferry's receiver. Parses flags, loads the config, sets up logging and runs the
//! server (see `ferry_receiver::server`).

use std::process::ExitCode;

use clap::Parser;

use ferry_receiver::{ReceiverArgs, ReceiverConfig};

fn main() -> ExitCode {
    let args = ReceiverArgs::parse();
    ferry_proc::init_tracing();
    ferry_proc::failpoints::setup_from_env();
    let config = match ReceiverConfig::load(&args) {
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
    match runtime.block_on(ferry_receiver::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
}

/// One sentence on stderr and a non-zero exit.
fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("receiver: {e}");
    ExitCode::FAILURE
}
