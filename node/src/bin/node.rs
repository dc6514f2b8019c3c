//! `node`: ferry's storage node. Parses flags, loads the config, sets up logging and runs the
//! server (see `ferry_node`).

use std::process::ExitCode;

use clap::Parser;
use ferry_node::{self as server, NodeArgs, NodeConfig};

fn main() -> ExitCode {
    let args = NodeArgs::parse();
    ferry_proc::init_tracing();
    ferry_proc::failpoints::setup_from_env();
    let config = match NodeConfig::load(&args) {
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
    match runtime.block_on(server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
}

/// One sentence on stderr and a non-zero exit.
fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("node: {e}");
    ExitCode::FAILURE
}
