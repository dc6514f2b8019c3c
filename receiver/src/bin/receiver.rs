//! `receiver`: ferry's receiver. Parses flags, loads the config, sets up logging and runs the
//! server (see `ferry_receiver::server`).

use std::process::ExitCode;

use clap::Parser;

use ferry_receiver::{ReceiverArgs, ReceiverConfig};

fn main() -> ExitCode {
    let args = ReceiverArgs::parse();
    ferry_proc::main(
        "receiver",
        || ReceiverConfig::load(&args),
        ferry_receiver::run,
    )
}
