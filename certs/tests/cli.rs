//! The `certs` binary as an operator runs it.

use std::path::Path;
use std::process::{Command, Output};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use ferry_certs::{cluster_of_cert, Layout, Role};

fn certs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_certs"))
        .args(args)
        .output()
        .expect("run certs")
}

fn read_cert(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).expect("read certificate")
}

#[test]
fn init_writes_the_documented_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("pki");
    let out_s = out.to_str().expect("utf-8 temp path");
    let run = certs(&[
        "init",
        "--out",
        out_s,
        "--cluster",
        "bj",
        "--cluster",
        "tj",
        "--days",
        "30",
        "--ip",
        "10.1.2.3",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let layout = Layout::new(&out);
    assert!(layout.ca_cert().is_file());
    assert!(layout.ca_key().is_file());
    for cluster in ["bj", "tj"] {
        for role in Role::ALL {
            let cert = read_cert(&layout.cert(cluster, role));
            assert_eq!(cluster_of_cert(&cert).expect("cluster SAN"), cluster);
            assert!(layout.key(cluster, role).is_file());
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(layout.key("bj", Role::Shipper))
            .expect("stat key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "keys are private");
    }
    // The extra IP is in the receiver certificate (as 4 raw bytes in the SAN).
    let der = read_cert(&layout.cert("tj", Role::Receiver));
    assert!(der.as_ref().windows(4).any(|w| w == [10, 1, 2, 3]));
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8 temp path");
    assert!(certs(&["init", "--out", out, "--cluster", "bj"])
        .status
        .success());
    let ca_before = std::fs::read(dir.path().join("ca.pem")).expect("read ca");

    let again = certs(&["init", "--out", out, "--cluster", "bj"]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("ca.pem")).expect("read ca"),
        ca_before
    );

    let forced = certs(&["init", "--out", out, "--cluster", "bj", "--force"]);
    assert!(forced.status.success());
    assert_ne!(
        std::fs::read(dir.path().join("ca.pem")).expect("read ca"),
        ca_before
    );
}

#[test]
fn init_rejects_bad_cluster_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8 temp path");
    let run = certs(&["init", "--out", out, "--cluster", "../etc"]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("not a valid cluster name"), "{stderr}");
    assert!(
        !dir.path().join("ca.pem").exists(),
        "nothing is written on error"
    );
}
