//! The one error type of this crate. Every variant about a file names it and says what to do.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CertError {
    /// A file a process was told to load does not exist.
    #[error(
        "{what} `{path}` does not exist; create the deployment's certificates with \
         `certs init --out DIR --cluster NAME ...`, or point the process at the right directory"
    )]
    Missing { what: &'static str, path: PathBuf },

    /// A file exists but could not be read (permissions, a directory, an I/O error).
    #[error("cannot read {what} `{path}`: {source}; check that it is a readable file")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A file was read but does not hold what it should (bad PEM, not a certificate, wrong key).
    #[error(
        "{what} `{path}` is malformed: {reason}; regenerate it with \
         `certs init --out DIR --cluster NAME ... --force`"
    )]
    Malformed {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },

    /// A certificate's validity period ended before now.
    #[error(
        "certificate `{path}` expired on {not_after}; issue new certificates with \
         `certs init --out DIR --cluster NAME ... --force` and restart the process"
    )]
    Expired { path: PathBuf, not_after: String },

    /// A certificate's validity period has not started yet (often a clock that is behind).
    #[error("certificate `{path}` is not valid before {not_before}; check this machine's clock")]
    NotYetValid { path: PathBuf, not_before: String },

    /// The private key does not belong to the certificate next to it.
    #[error(
        "private key `{key}` does not match certificate `{cert}`: {source}; use the key that \
         `certs init` wrote beside the certificate"
    )]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },

    /// rustls refused to build a configuration from files that loaded fine.
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),

    /// rustls refused to build the client-certificate verifier from the CA.
    #[error("cannot build the client certificate verifier from CA `{ca}`: {source}")]
    Verifier {
        ca: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },

    /// The rustls configuration offers no cipher suite that QUIC can use for its initial keys.
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),

    /// `certs init` would overwrite a file.
    #[error("`{path}` already exists; pass --force to overwrite it, or choose another --out")]
    Exists { path: PathBuf },

    /// `certs init` could not write a file or make a directory.
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A cluster name is not usable as a directory and URI segment.
    #[error(
        "`{0}` is not a valid cluster name; use 1 to 64 ASCII letters, digits, `-`, `_` or `.`"
    )]
    InvalidClusterName(String),

    /// `certs init` was given nothing to do, or contradictory options.
    #[error("{0}")]
    Usage(String),

    /// rcgen could not generate a key or a certificate.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),

    /// The peer of a connection presented no certificate (a server that does not require one).
    #[error("the peer presented no certificate")]
    NoPeerCertificate,

    /// The peer's certificate does not name exactly one ferry cluster.
    #[error(
        "the peer's certificate does not name a ferry cluster: {0}; issue it with `certs init`"
    )]
    NoClusterIdentity(String),
}
