//! What every ferry process does the same way around its own work: logging set-up, signals,
//! one-sentence errors for a port that cannot be bound and for a config file that does not parse,
//! and the runtime control of the [`failpoints`].

pub mod failpoints;

use std::fmt;
use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::anyhow;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// The body of a server process's `main`: sets up logging and the failpoints, loads the config
/// with `load`, starts a multi-threaded runtime and runs `run` on it to its end. Any failure is
/// one sentence on stderr, prefixed with `name`, and a non-zero exit.
pub fn main<C, E, F>(
    name: &str,
    load: impl FnOnce() -> Result<C, E>,
    run: impl FnOnce(C) -> F,
) -> std::process::ExitCode
where
    E: fmt::Display,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let fail = |e: &dyn fmt::Display| {
        eprintln!("{name}: {e}");
        std::process::ExitCode::FAILURE
    };
    init_tracing();
    failpoints::setup_from_env();
    let config = match load() {
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
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
}

/// Logs to stderr at `RUST_LOG` (default `info`), with colours only on a terminal.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// A bind failure as one sentence with what to do (shared by every ferry server process).
pub fn listen_error(what: &str, flag: &str, addr: SocketAddr, e: &std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("another process uses it; stop that process or choose another {flag}")
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!("no local interface has that address; choose another {flag}")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!("ports below 1024 need privileges; choose another {flag}")
        }
        _ => format!("check {flag}"),
    };
    anyhow!("cannot listen for {what} on {addr} ({e}); {hint}")
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT, and exits at once on the second, logging
/// `on_second` (what that costs, e.g. "the next start replays the plogs").
pub fn watch_signals(
    shutdown: CancellationToken,
    on_second: &'static str,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without waiting; {on_second}");
        std::process::exit(130);
    }))
}

/// A TOML config that could not be read or parsed (the per-process config errors wrap it).
#[derive(Debug, thiserror::Error)]
pub enum TomlError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}; check the --config path", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config, or has an unknown key.
    #[error("config file {} is invalid: {message}", path.display())]
    Parse {
        path: std::path::PathBuf,
        /// toml's message on one line ([`one_line`]): it names the key and quotes the line.
        message: String,
    },
    /// Config text given directly (not a file) is not valid TOML for this config.
    #[error("config is invalid: {message}")]
    Text {
        /// toml's message on one line ([`one_line`]).
        message: String,
    },
}

/// Reads and parses the TOML config file at `path`; does not validate.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, TomlError> {
    let text = std::fs::read_to_string(path).map_err(|source| TomlError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e: toml::de::Error| TomlError::Parse {
        path: path.to_path_buf(),
        message: one_line(&e, &text).to_string(),
    })
}

/// Parses TOML config text; does not validate.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, TomlError> {
    toml::from_str(text).map_err(|e: toml::de::Error| TomlError::Text {
        message: one_line(&e, text).to_string(),
    })
}

/// toml's errors span several lines (with a source excerpt); a start-up error is one sentence
/// that still shows the offending line, so the key is named.
pub fn one_line<'a>(e: &'a toml::de::Error, text: &'a str) -> impl fmt::Display + 'a {
    struct OneLine<'a>(&'a toml::de::Error, &'a str);
    impl fmt::Display for OneLine<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let msg = self.0.message().trim_end_matches('\n');
            let Some(start) = self.0.span().map(|s| s.start) else {
                return f.write_str(msg);
            };
            let before = self.1.get(..start).unwrap_or(self.1);
            let line_no = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let line = self
                .1
                .get(line_start..)
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default()
                .trim();
            write!(f, "{msg} at line {line_no}: `{line}`")
        }
    }
    OneLine(e, text)
}
