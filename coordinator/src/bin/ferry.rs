//! `ferry`: the admin CLI. See `ferry --help` and `docs/operations.md`.

use clap::Parser;

use ferry_coordinator::cli::{run, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
