//! From certificate files to rustls and quinn configurations with mutual TLS.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{CertError, Layout, Role, ALPN};

/// The three files one process loads: the CA that signs its peers, and its own certificate and
/// key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files of `role` in `cluster` under a `certs init --out dir` directory.
    pub fn new(dir: impl Into<PathBuf>, cluster: &str, role: Role) -> TlsFiles {
        let layout = Layout::new(dir);
        TlsFiles {
            ca: layout.ca_cert(),
            cert: layout.cert(cluster, role),
            key: layout.key(cluster, role),
        }
    }

    /// A receiver's files: `dir/ca.pem`, `dir/<cluster>/receiver.{pem,key}`.
    pub fn receiver(dir: impl Into<PathBuf>, cluster: &str) -> TlsFiles {
        TlsFiles::new(dir, cluster, Role::Receiver)
    }

    /// A shipper's files: `dir/ca.pem`, `dir/<cluster>/shipper.{pem,key}`.
    pub fn shipper(dir: impl Into<PathBuf>, cluster: &str) -> TlsFiles {
        TlsFiles::new(dir, cluster, Role::Shipper)
    }
}

/// A TLS 1.3 server configuration with ALPN `ferry/1` that presents `cert` (with `key`) and
/// requires every client to present a certificate signed by the CA in `ca`.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<rustls::ServerConfig, CertError> {
    let provider = provider();
    let roots = Arc::new(load_roots(ca)?);
    let chain = load_chain(cert)?;
    let key_der = load_key(key)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|source| CertError::Verifier {
            ca: ca.to_path_buf(),
            source,
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .map_err(|e| key_error(cert, key, e))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// A TLS 1.3 client configuration with ALPN `ferry/1` that presents `cert` (with `key`) and
/// trusts only servers whose certificate is signed by the CA in `ca`. The server name given to
/// `connect` must be one of the server certificate's DNS or IP SANs (`localhost`, 127.0.0.1,
/// or what `certs init --ip/--dns` added).
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<rustls::ClientConfig, CertError> {
    let provider = provider();
    let roots = load_roots(ca)?;
    let chain = load_chain(cert)?;
    let key_der = load_key(key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| key_error(cert, key, e))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// [`server_config`] wrapped for a quinn endpoint, with quinn's default transport.
pub fn quinn_server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<quinn::ServerConfig, CertError> {
    let quic = QuicServerConfig::try_from(server_config(ca, cert, key)?)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// [`client_config`] wrapped for a quinn endpoint, with quinn's default transport.
pub fn quinn_client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<quinn::ClientConfig, CertError> {
    let quic = QuicClientConfig::try_from(client_config(ca, cert, key)?)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// Certificate and key files are a few KiB; anything larger is not one of ours, and is refused
/// before it is read into memory.
const MAX_FILE: u64 = 1 << 20;

const CA_CERT: &str = "CA certificate";
const CERT: &str = "certificate";
const KEY: &str = "private key";

/// ring, passed explicitly to every builder: the process needs no default provider, and
/// nothing depends on which one another crate might have installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_roots(path: &Path) -> Result<RootCertStore, CertError> {
    let certs = load_certs(CA_CERT, path)?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| CertError::Malformed {
            what: CA_CERT,
            path: path.to_path_buf(),
            reason: format!("not usable as a trust anchor ({e})"),
        })?;
    }
    Ok(roots)
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    load_certs(CERT, path)
}

/// Reads every certificate of a PEM file and checks that each parses and is valid now.
fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read_bounded(what, path)?;
    let malformed = |reason: String| CertError::Malformed {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| malformed(format!("bad PEM ({e})")))?;
    if certs.is_empty() {
        return Err(malformed("it holds no `CERTIFICATE` PEM block".into()));
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    for der in &certs {
        let (_, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| malformed(format!("not an X.509 certificate ({e})")))?;
        let validity = cert.validity();
        if validity.not_after.timestamp() < now {
            return Err(CertError::Expired {
                path: path.to_path_buf(),
                not_after: validity.not_after.to_string(),
            });
        }
        if validity.not_before.timestamp() > now {
            return Err(CertError::NotYetValid {
                path: path.to_path_buf(),
                not_before: validity.not_before.to_string(),
            });
        }
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read_bounded(KEY, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| CertError::Malformed {
        what: KEY,
        path: path.to_path_buf(),
        reason: match e {
            pem::Error::NoItemsFound => "it holds no `PRIVATE KEY` PEM block".into(),
            e => format!("bad PEM ({e})"),
        },
    })
}

fn read_bounded(what: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    let unreadable = |source| CertError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => CertError::Missing {
            what,
            path: path.to_path_buf(),
        },
        _ => unreadable(e),
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(CertError::Malformed {
            what,
            path: path.to_path_buf(),
            reason: format!("it is larger than {MAX_FILE} bytes"),
        });
    }
    Ok(bytes)
}

/// `with_single_cert` and `with_client_auth_cert` fail when the key does not parse or does not
/// match the certificate; say which.
fn key_error(cert: &Path, key: &Path, e: rustls::Error) -> CertError {
    match e {
        rustls::Error::InconsistentKeys(_) => CertError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source: e,
        },
        e => CertError::Malformed {
            what: KEY,
            path: key.to_path_buf(),
            reason: e.to_string(),
        },
    }
}
