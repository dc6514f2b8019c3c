//! ferry's certificates: a private CA per deployment, one certificate per (cluster, process role),
//! and the rustls/quinn configurations every ferry process builds from them.
//!
//! Shippers and receivers talk across datacenters over QUIC with mutual TLS (ALPN [`ALPN`],
//! `ferry/1`). Both sides present a certificate signed by the deployment's CA, and each
//! certificate names its cluster in a URI SAN, `ferry://cluster/<name>`, which
//! [`peer_cluster`] reads back after the handshake. The receiver uses it to check that the
//! shipper's cluster is in the duplication group and matches the `cluster_id` of its `Hello`.
//!
//! # Files
//!
//! `certs init --out DIR --cluster bj --cluster tj` writes:
//!
//! ```text
//! DIR/ca.pem                 the CA certificate (trust anchor for every process)
//! DIR/ca.key                 the CA private key (keep it offline; only `certs` needs it)
//! DIR/<cluster>/receiver.pem server certificate: serverAuth, DNS `localhost`, IP 127.0.0.1
//!                            (plus `--ip`/`--dns`), URI `ferry://cluster/<cluster>`
//! DIR/<cluster>/receiver.key its private key
//! DIR/<cluster>/shipper.pem  client certificate: clientAuth, URI `ferry://cluster/<cluster>`
//! DIR/<cluster>/shipper.key  its private key
//! ```
//!
//! Certificates and keys are PEM (keys PKCS#8, ECDSA P-256); keys are written with mode 0600.
//! Existing files are never overwritten unless `--force` is given. [`Layout`] computes these
//! paths, and [`TlsFiles::receiver`] / [`TlsFiles::shipper`] bundle the three a process loads.
//!
//! # Loading
//!
//! ```no_run
//! # fn main() -> Result<(), ferry_certs::CertError> {
//! let files = ferry_certs::TlsFiles::receiver("certs", "tj");
//! let server = ferry_certs::quinn_server_config(&files.ca, &files.cert, &files.key)?;
//! # let _ = server; Ok(()) }
//! ```
//!
//! Every loader checks that the files exist, parse, belong together and are within their
//! validity period, and its errors name the file and say how to fix it. The rustls configs use
//! the `ring` provider explicitly, so no process-wide default provider has to be installed.
//! The transport parameters (windows, congestion control) are the caller's: set them on the
//! returned `quinn` config with `transport_config`.

mod error;
mod generate;
mod identity;
mod load;

pub use error::CertError;
pub use generate::{init, InitOptions, DEFAULT_DAYS};
pub use identity::{
    cluster_of_cert, cluster_uri, peer_cluster, valid_cluster_name, CLUSTER_URI_PREFIX,
};
pub use load::{client_config, quinn_client_config, quinn_server_config, server_config, TlsFiles};

use std::path::{Path, PathBuf};

/// The ALPN protocol id of ferry's shipper ⇄ receiver protocol. Both sides require it.
pub const ALPN: &[u8] = b"ferry/1";

/// A process role that gets its own certificate in each cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// QUIC server of the target cluster: server certificate (serverAuth).
    Receiver,
    /// QUIC client of the source cluster: client certificate (clientAuth).
    Shipper,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Receiver, Role::Shipper];

    /// The file stem of this role's certificate and key.
    pub fn name(self) -> &'static str {
        match self {
            Role::Receiver => "receiver",
            Role::Shipper => "shipper",
        }
    }
}

/// Where `certs init --out DIR` puts each file (see the crate docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Layout {
        Layout { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/ca.pem`.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `DIR/ca.key`.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// `DIR/<cluster>/<role>.pem`.
    pub fn cert(&self, cluster: &str, role: Role) -> PathBuf {
        self.dir.join(cluster).join(format!("{}.pem", role.name()))
    }

    /// `DIR/<cluster>/<role>.key`.
    pub fn key(&self, cluster: &str, role: Role) -> PathBuf {
        self.dir.join(cluster).join(format!("{}.key", role.name()))
    }
}
