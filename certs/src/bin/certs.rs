//! `certs`: makes a deployment's CA and per-cluster certificates. See the `ferry_certs` crate
//! docs for the file layout.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ferry_certs::{init, InitOptions, DEFAULT_DAYS};

#[derive(Parser)]
#[command(
    name = "certs",
    version,
    about = "Make and inspect ferry's TLS certificates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a CA and, for each cluster, a receiver (server) and a shipper (client) certificate.
    ///
    /// Writes DIR/ca.pem, DIR/ca.key and DIR/<cluster>/{receiver,shipper}.{pem,key}.
    Init {
        /// Directory to write into; created if missing.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A cluster to make certificates for; repeat for each cluster.
        #[arg(long = "cluster", value_name = "NAME", required = true)]
        clusters: Vec<String>,
        /// Days the CA and the certificates stay valid.
        #[arg(long, default_value_t = DEFAULT_DAYS)]
        days: u32,
        /// An extra IP address for the receiver certificates (127.0.0.1 and ::1 are always in).
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// An extra DNS name for the receiver certificates (`localhost` is always in).
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Init {
            out,
            clusters,
            days,
            ips,
            dns,
            force,
        } => {
            let opts = InitOptions {
                out,
                clusters,
                days,
                ips,
                dns,
                force,
            };
            match init(&opts) {
                Ok(files) => {
                    for f in files {
                        println!("wrote {}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("certs init: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
