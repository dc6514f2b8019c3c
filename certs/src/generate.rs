//! `certs init`: a new CA and, for each cluster, a certificate and key per [`Role`].

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{cluster_uri, valid_cluster_name};
use crate::{CertError, Layout, Role};

/// Validity of new certificates when `--days` is not given.
pub const DEFAULT_DAYS: u32 = 365;

/// Longest validity `certs init` accepts, about 100 years.
const MAX_DAYS: u32 = 36_500;

/// New certificates are valid from a little before now, so that a peer whose clock is slightly
/// behind does not reject a certificate made moments ago in another datacenter.
const BACKDATE: Duration = Duration::hours(1);

/// What `certs init` makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// The directory to write into (see [`Layout`]); created if missing.
    pub out: PathBuf,
    /// One set of certificates per cluster name.
    pub clusters: Vec<String>,
    /// Validity of the CA and of every certificate, from now.
    pub days: u32,
    /// IP SANs for receiver certificates, besides 127.0.0.1 and ::1.
    pub ips: Vec<IpAddr>,
    /// DNS SANs for receiver certificates, besides `localhost`.
    pub dns: Vec<String>,
    /// Overwrite files that already exist.
    pub force: bool,
}

impl InitOptions {
    pub fn new(
        out: impl Into<PathBuf>,
        clusters: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        InitOptions {
            out: out.into(),
            clusters: clusters.into_iter().map(Into::into).collect(),
            days: DEFAULT_DAYS,
            ips: Vec::new(),
            dns: Vec::new(),
            force: false,
        }
    }
}

/// Makes a CA and each cluster's certificates and writes them under `opts.out`. Returns the
/// paths written, CA first. Nothing is written if any check fails, including (without
/// `force`) that none of the files exists yet.
pub fn init(opts: &InitOptions) -> Result<Vec<PathBuf>, CertError> {
    validate(opts)?;
    let layout = Layout::new(&opts.out);
    let mut files: Vec<(PathBuf, String, Secrecy)> = Vec::new();

    let now = OffsetDateTime::now_utc();
    let not_before = now - BACKDATE;
    let not_after = now + Duration::days(i64::from(opts.days));

    let ca_key = KeyPair::generate()?;
    let ca_params = ca_params(not_before, not_after);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    files.push((layout.ca_cert(), ca_cert.pem(), Secrecy::Public));
    files.push((layout.ca_key(), ca_key.serialize_pem(), Secrecy::Secret));
    let issuer = Issuer::new(ca_params, ca_key);

    for cluster in &opts.clusters {
        for role in Role::ALL {
            let key = KeyPair::generate()?;
            let params = leaf_params(cluster, role, opts, not_before, not_after)?;
            let cert = params.signed_by(&key, &issuer)?;
            files.push((layout.cert(cluster, role), cert.pem(), Secrecy::Public));
            files.push((
                layout.key(cluster, role),
                key.serialize_pem(),
                Secrecy::Secret,
            ));
        }
    }

    if !opts.force {
        if let Some((path, ..)) = files.iter().find(|(p, ..)| p.symlink_metadata().is_ok()) {
            return Err(CertError::Exists { path: path.clone() });
        }
    }
    for (path, contents, secrecy) in &files {
        write_file(path, contents.as_bytes(), *secrecy)?;
    }
    Ok(files.into_iter().map(|(p, ..)| p).collect())
}

fn validate(opts: &InitOptions) -> Result<(), CertError> {
    if opts.clusters.is_empty() {
        return Err(CertError::Usage(
            "no cluster given; name each cluster with --cluster NAME".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for c in &opts.clusters {
        if !valid_cluster_name(c) {
            return Err(CertError::InvalidClusterName(c.clone()));
        }
        if !seen.insert(c) {
            return Err(CertError::Usage(format!("cluster `{c}` is given twice")));
        }
    }
    if opts.days == 0 || opts.days > MAX_DAYS {
        return Err(CertError::Usage(format!(
            "--days {} is out of range; use 1 to {MAX_DAYS}",
            opts.days
        )));
    }
    for d in &opts.dns {
        if Ia5String::try_from(d.as_str()).is_err() || d.is_empty() {
            return Err(CertError::Usage(format!(
                "--dns `{d}` is not a valid DNS name"
            )));
        }
    }
    Ok(())
}

fn ca_params(not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn("ferry CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = not_before;
    p.not_after = not_after;
    p
}

fn leaf_params(
    cluster: &str,
    role: Role,
    opts: &InitOptions,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(&format!("ferry {} {cluster}", role.name()));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.not_before = not_before;
    p.not_after = not_after;
    p.subject_alt_names = vec![SanType::URI(Ia5String::try_from(cluster_uri(cluster))?)];
    match role {
        Role::Receiver => {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p.subject_alt_names
                .push(SanType::DnsName(Ia5String::try_from("localhost")?));
            for d in &opts.dns {
                p.subject_alt_names
                    .push(SanType::DnsName(Ia5String::try_from(d.as_str())?));
            }
            let loopback = [
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ];
            let mut ips: Vec<IpAddr> = loopback.to_vec();
            ips.extend(opts.ips.iter().filter(|ip| !loopback.contains(ip)));
            p.subject_alt_names
                .extend(ips.into_iter().map(SanType::IpAddress));
        }
        Role::Shipper => {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    Ok(p)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    dn.push(DnType::CommonName, common_name);
    dn
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrecy {
    Public,
    Secret,
}

/// Writes through a temporary file and a rename, so a crash never leaves half a key, and a key
/// is never readable by others, not even briefly.
fn write_file(path: &Path, contents: &[u8], secrecy: Secrecy) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // A leftover from a crash may have other permissions; start afresh.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(match secrecy {
            Secrecy::Public => 0o644,
            Secrecy::Secret => 0o600,
        });
    }
    #[cfg(not(unix))]
    let _ = secrecy;
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}
