//! `node`: ferry's storage node. Parses flags, loads the config, sets up logging and runs the
//! server (see `ferry_node`).

use std::process::ExitCode;

use clap::Parser;
use ferry_node::{NodeArgs, NodeConfig};

fn main() -> ExitCode {
    let args = NodeArgs::parse();
    ferry_proc::main("node", || NodeConfig::load(&args), ferry_node::run)
}
