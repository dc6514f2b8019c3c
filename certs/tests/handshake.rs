//! Real QUIC handshakes on loopback with the configs `ferry_certs` builds, and the errors a
//! person sees when files are missing, expired or do not belong together.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig};
use quinn::{ClientConfig, Connection, Endpoint};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use ferry_certs::{
    client_config, init, peer_cluster, quinn_client_config, quinn_server_config, server_config,
    CertError, InitOptions, TlsFiles, ALPN,
};

const WAIT: Duration = Duration::from_secs(10);

fn make_certs(dir: &Path) {
    init(&InitOptions::new(dir, ["bj", "tj"])).expect("certs init");
}

/// What each side saw of one connection attempt.
struct Outcome {
    /// The server's view: the client's cluster name, or why the handshake failed.
    server: Result<String, String>,
    /// The client's view: the server's cluster name, or why the connection failed or closed.
    client: Result<String, String>,
    /// The ALPN protocol the client negotiated, when it connected.
    alpn: Option<Vec<u8>>,
    _conns: Vec<Connection>,
}

/// Runs one connection from a client with `client_cfg` to a receiver serving `server_files`.
async fn handshake(server_files: &TlsFiles, client_cfg: ClientConfig) -> Outcome {
    let server_cfg = quinn_server_config(&server_files.ca, &server_files.cert, &server_files.key)
        .expect("server config");
    let server =
        Endpoint::server(server_cfg, SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind server");
    let addr = server.local_addr().expect("server address");
    let accept = tokio::spawn(async move {
        let incoming = server.accept().await.expect("endpoint is open");
        match incoming.await {
            Ok(conn) => match peer_cluster(&conn) {
                Ok(name) => (Ok(name), Some(conn)),
                Err(e) => (Err(e.to_string()), Some(conn)),
            },
            Err(e) => (Err(e.to_string()), None),
        }
    });

    let client = Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind client");
    let mut conns = Vec::new();
    let mut alpn = None;
    let client_result = match client
        .connect_with(client_cfg, addr, "localhost")
        .expect("connect parameters")
        .await
    {
        Ok(conn) => {
            alpn = conn
                .handshake_data()
                .and_then(|d| d.downcast::<HandshakeData>().ok())
                .and_then(|d| d.protocol);
            let r = peer_cluster(&conn).map_err(|e| e.to_string());
            conns.push(conn);
            r
        }
        Err(e) => Err(e.to_string()),
    };
    let (server_result, server_conn) = tokio::time::timeout(WAIT, accept)
        .await
        .expect("server handshake finishes")
        .expect("accept task");
    // In TLS 1.3 the client finishes its handshake before the server has checked the client's
    // certificate, so a rejection reaches the client as a close right after.
    let client_result = match (&server_result, client_result, conns.first()) {
        (Err(_), Ok(_), Some(conn)) => {
            let closed = tokio::time::timeout(WAIT, conn.closed())
                .await
                .expect("the server closes a rejected connection");
            Err(closed.to_string())
        }
        (_, r, _) => r,
    };
    conns.extend(server_conn);
    Outcome {
        server: server_result,
        client: client_result,
        alpn,
        _conns: conns,
    }
}

fn shipper_client(files: &TlsFiles) -> ClientConfig {
    quinn_client_config(&files.ca, &files.cert, &files.key).expect("client config")
}

#[tokio::test]
async fn mutual_tls_names_both_clusters() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let out = handshake(
        &TlsFiles::receiver(dir.path(), "tj"),
        shipper_client(&TlsFiles::shipper(dir.path(), "bj")),
    )
    .await;
    assert_eq!(
        out.server,
        Ok("bj".to_owned()),
        "the receiver sees the shipper's cluster"
    );
    assert_eq!(
        out.client,
        Ok("tj".to_owned()),
        "the shipper sees the receiver's cluster"
    );
    assert_eq!(out.alpn.as_deref(), Some(ALPN));
}

#[tokio::test]
async fn client_cert_from_another_ca_is_rejected() {
    let ours = tempfile::tempdir().expect("tempdir");
    let theirs = tempfile::tempdir().expect("tempdir");
    make_certs(ours.path());
    make_certs(theirs.path());
    // The intruder trusts our CA (so it would accept our server) but its own certificate is
    // signed by another CA.
    let intruder = TlsFiles::shipper(theirs.path(), "bj");
    let cfg = quinn_client_config(
        &TlsFiles::receiver(ours.path(), "tj").ca,
        &intruder.cert,
        &intruder.key,
    )
    .expect("client config");
    let out = handshake(&TlsFiles::receiver(ours.path(), "tj"), cfg).await;
    let server_err = out
        .server
        .expect_err("the receiver must refuse the certificate");
    assert!(
        server_err.contains("invalid peer certificate"),
        "server: {server_err}"
    );
    let client_err = out.client.expect_err("the shipper must see the refusal");
    assert!(client_err.contains("certificate"), "client: {client_err}");
}

#[tokio::test]
async fn client_without_cert_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let files = TlsFiles::receiver(dir.path(), "tj");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&files.ca).expect("read ca.pem") {
        roots.add(cert.expect("parse ca.pem")).expect("add root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let cfg = ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).expect("quic")));
    let out = handshake(&files, cfg).await;
    let server_err = out
        .server
        .expect_err("the receiver must require a certificate");
    assert!(
        server_err.contains("peer sent no certificates"),
        "server: {server_err}"
    );
    let client_err = out.client.expect_err("the client must see the refusal");
    assert!(client_err.contains("certificate"), "client: {client_err}");
}

#[tokio::test]
async fn server_cert_cannot_act_as_a_shipper() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    // A receiver certificate has serverAuth only; a stolen one can't be used to ship.
    let cfg = shipper_client(&TlsFiles::receiver(dir.path(), "bj"));
    let out = handshake(&TlsFiles::receiver(dir.path(), "tj"), cfg).await;
    assert!(
        out.server.is_err(),
        "server accepted a server certificate as a client"
    );
    assert!(out.client.is_err());
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let files = TlsFiles::shipper(dir.path(), "bj");
    std::fs::remove_file(&files.key).expect("remove key");
    let err = client_config(&files.ca, &files.cert, &files.key).expect_err("key is missing");
    assert!(
        matches!(&err, CertError::Missing { path, .. } if *path == files.key),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&files.key.display().to_string()), "{msg}");
    assert!(msg.contains("certs init --out"), "{msg}");

    let nowhere = dir.path().join("nowhere");
    let err =
        server_config(&nowhere.join("ca.pem"), &files.cert, &files.key).expect_err("ca is missing");
    assert!(err.to_string().contains("CA certificate"), "{err}");
    assert!(err
        .to_string()
        .contains(&nowhere.join("ca.pem").display().to_string()));
}

#[test]
fn expired_certificate_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let files = TlsFiles::receiver(dir.path(), "tj");
    // Reissue the receiver certificate from the same CA with a validity that ended yesterday.
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(dir.path().join("ca.key")).expect("read ca.key"),
    )
    .expect("parse ca.key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer).expect("sign");
    std::fs::write(&files.cert, cert.pem()).expect("write cert");
    std::fs::write(&files.key, key.serialize_pem()).expect("write key");

    let err = server_config(&files.ca, &files.cert, &files.key).expect_err("cert is expired");
    assert!(
        matches!(&err, CertError::Expired { path, .. } if *path == files.cert),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&files.cert.display().to_string()), "{msg}");
    assert!(msg.contains("expired"), "{msg}");
}

#[test]
fn key_of_another_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let receiver = TlsFiles::receiver(dir.path(), "tj");
    let shipper = TlsFiles::shipper(dir.path(), "tj");
    let err = server_config(&receiver.ca, &receiver.cert, &shipper.key).expect_err("wrong key");
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(&shipper.key.display().to_string()));
}

#[test]
fn garbage_file_is_malformed() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let files = TlsFiles::shipper(dir.path(), "bj");
    std::fs::write(&files.cert, "not a certificate\n").expect("write");
    let err = client_config(&files.ca, &files.cert, &files.key).expect_err("garbage");
    assert!(
        matches!(&err, CertError::Malformed { path, .. } if *path == files.cert),
        "{err:?}"
    );
}
