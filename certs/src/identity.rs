//! The cluster identity inside a certificate: one URI SAN `ferry://cluster/<name>`.

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::CertError;

/// Every ferry certificate carries exactly one URI SAN with this prefix, followed by its
/// cluster's name.
pub const CLUSTER_URI_PREFIX: &str = "ferry://cluster/";

/// The URI SAN for `cluster`: `ferry://cluster/<cluster>`.
pub fn cluster_uri(cluster: &str) -> String {
    format!("{CLUSTER_URI_PREFIX}{cluster}")
}

/// Cluster names are what may sit in a directory name, an etcd key segment and a URI path
/// segment: 1 to 64 ASCII letters, digits, `-`, `_` or `.`, and not `.` or `..`. This is the
/// same rule as the coordinator's.
pub fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name != "."
        && name != ".."
}

/// The cluster name of the peer at the other end of an established connection, from the URI
/// SAN of the end-entity certificate it presented. The TLS handshake has already checked that
/// the certificate chains to the CA, so the name can be trusted.
pub fn peer_cluster(conn: &quinn::Connection) -> Result<String, CertError> {
    let identity = conn.peer_identity().ok_or(CertError::NoPeerCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| CertError::NoPeerCertificate)?;
    let leaf = chain.first().ok_or(CertError::NoPeerCertificate)?;
    cluster_of_cert(leaf)
}

/// The cluster name in a DER certificate's `ferry://cluster/<name>` URI SAN. It is an error if
/// there is none, more than one, or the name is not valid.
pub fn cluster_of_cert(der: &CertificateDer<'_>) -> Result<String, CertError> {
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| CertError::NoClusterIdentity(format!("unparsable certificate ({e})")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::NoClusterIdentity(format!("bad subjectAltName ({e})")))?
        .ok_or_else(|| CertError::NoClusterIdentity("it has no subjectAltName".into()))?;
    let mut names = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => uri.strip_prefix(CLUSTER_URI_PREFIX),
        _ => None,
    });
    let name = names.next().ok_or_else(|| {
        CertError::NoClusterIdentity(format!("no `{CLUSTER_URI_PREFIX}<name>` URI"))
    })?;
    if names.next().is_some() {
        return Err(CertError::NoClusterIdentity(
            "it names more than one cluster".into(),
        ));
    }
    if !valid_cluster_name(name) {
        return Err(CertError::NoClusterIdentity(format!(
            "`{name}` is not a valid cluster name"
        )));
    }
    Ok(name.to_owned())
}
