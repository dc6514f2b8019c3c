//! The real `receiver` binary against a real etcd, with real certificates, driven by a small
//! QUIC shipper written here. Every test checks what a user would: which keys each inbox holds,
//! which decree is acknowledged, which error a refused shipper is told.
//!
//! Needs the binaries: `cargo build --release --workspace --bins` (scripts/test.sh does it).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use quinn::{Connection, Endpoint, RecvStream, SendStream};

use ferry_certs::{InitOptions, TlsFiles};
use ferry_meta::config::ClusterConfig;
use ferry_meta::{self as meta, MetaStore};
use ferry_proto::wire::{self, ErrorCode, Frame, PROTOCOL_VERSION};
use ferry_proto::Source;
use ferry_proto::{partition_of, ClusterId, Decree, DupId, Op, PartitionId, PlogRecord, Timetag};
use ferry_tests::etcd::{http_get, Etcd};
use ferry_tests::inbox::durable_records;
use ferry_tests::metrics::sum_samples;
use ferry_tests::netns::Place;
use ferry_tests::procs::{bin_path, free_port, loopback, Proc};
use ferry_tests::receiver::{Receiver, ReceiverSpec};

/// The target cluster (where the receiver runs), its node, and the source cluster.
const TARGET: &str = "tj";
const NODE: &str = "tj-n1";
const SOURCE: &str = "bj";
const SOURCE_ID: u8 = 1;
/// In the CA's deployment but not in the duplication group.
const OUTSIDER: &str = "sh";
const TABLE: &str = "users";
const TARGET_PARTITIONS: u32 = 3;
const SOURCE_PARTITIONS: u32 = 8;
const DUP: DupId = DupId(7);
const WAIT: Duration = Duration::from_secs(10);

fn cluster_config() -> ClusterConfig {
    ClusterConfig {
        name: TARGET.into(),
        id: 2,
        duplication_group: [(SOURCE.to_string(), SOURCE_ID), (TARGET.to_string(), 2)]
            .into_iter()
            .collect(),
        partition_hash: "crc32c".into(),
        plog_format_version: 1,
    }
}

fn bj() -> ClusterId {
    ClusterId::new(SOURCE_ID).expect("valid id")
}

/// etcd with the target cluster's config and table, certificates, and one receiver.
struct Harness {
    etcd: Etcd,
    dir: tempfile::TempDir,
    meta: MetaStore,
    spec: ReceiverSpec,
    receiver: Receiver,
    client: Endpoint,
}

impl Harness {
    async fn start() -> Result<Harness> {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await??;
        let dir = tempfile::tempdir()?;
        ferry_certs::init(&InitOptions::new(
            dir.path().join("certs"),
            [SOURCE, TARGET, OUTSIDER],
        ))?;
        // Another deployment's CA, with a certificate that also says `bj`.
        ferry_certs::init(&InitOptions::new(dir.path().join("evil"), [SOURCE]))?;
        let meta = MetaStore::connect(&[etcd.endpoint()], TARGET, Duration::from_secs(3)).await?;
        meta::init_or_check_cluster_config(&meta, &cluster_config()).await?;
        meta.create_table(
            TABLE,
            TARGET_PARTITIONS,
            &[NODE.to_string()],
            meta::now_ms(),
        )
        .await?;
        let client = Endpoint::client(loopback(0))?;
        let spec = ReceiverSpec {
            cluster: TARGET.into(),
            cluster_id: 2,
            group: format!("{{ {SOURCE} = {SOURCE_ID}, {TARGET} = 2 }}"),
            etcd_endpoint: etcd.endpoint(),
            node: NODE.into(),
            data_dir: dir.path().join("data"),
            certs_dir: dir.path().join("certs"),
            dir: dir.path().to_path_buf(),
            place: Place::local(),
            listen: None,
            extra_toml: "inbox_segment_bytes = 65536\nbandwidth_mbps = 100\n".into(),
        };
        let receiver = start_receiver(&spec).await?;
        Ok(Harness {
            etcd,
            dir,
            meta,
            spec,
            receiver,
            client,
        })
    }

    fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }

    /// Starts the receiver again, on new ports, once the old one is gone.
    async fn restart_receiver(&mut self) -> Result<()> {
        self.receiver = start_receiver(&self.spec).await?;
        Ok(())
    }

    /// A connection presenting `cluster`'s shipper certificate of our CA.
    async fn connect(&self, cluster: &str) -> Result<Connection> {
        let files = TlsFiles::shipper(self.dir.path().join("certs"), cluster);
        self.connect_with(&files.ca, &files.cert, &files.key).await
    }

    async fn connect_with(&self, ca: &Path, cert: &Path, key: &Path) -> Result<Connection> {
        let config = ferry_certs::quinn_client_config(ca, cert, key)?;
        let conn = tokio::time::timeout(
            WAIT,
            self.client
                .connect_with(config, self.receiver.quic, "localhost")?,
        )
        .await
        .context("handshake in time")??;
        Ok(conn)
    }

    fn metrics(&self) -> String {
        http_get(self.receiver.http, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    fn health(&self) -> serde_json::Value {
        http_get(self.receiver.http, "/health")
            .ok()
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or_default()
    }

    /// Every record durable in the inbox of source partition `sp` in target partition `tp`.
    fn inbox(&self, tp: u32, sp: u32) -> Vec<PlogRecord> {
        let source = Source {
            cluster: bj(),
            partition: PartitionId(sp),
        };
        durable_records(&self.data_dir().join(TABLE).join(tp.to_string()), source)
            .expect("read the inbox")
    }
}

/// Starts a receiver from `spec` (off the runtime: it waits with blocking sleeps).
async fn start_receiver(spec: &ReceiverSpec) -> Result<Receiver> {
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || Receiver::start(&spec)).await?
}

/// One shipper stream.
struct Client {
    send: SendStream,
    recv: RecvStream,
    buf: Vec<u8>,
}

impl Client {
    async fn open(conn: &Connection) -> Client {
        let (send, recv) = conn.open_bi().await.expect("open a stream");
        Client {
            send,
            recv,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, frame: &Frame) {
        let mut b = Vec::new();
        wire::encode(frame, &mut b);
        self.send_raw(&b).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.expect("send");
    }

    /// The next frame; `Ok(None)` when the receiver finished the stream; `Err` with the
    /// connection's close reason when it broke.
    async fn next(&mut self) -> Result<Option<Frame>, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            match wire::decode(&self.buf) {
                Ok((f, n)) => {
                    self.buf.drain(..n);
                    return Ok(Some(f));
                }
                Err(wire::WireError::Incomplete { .. }) => {}
                Err(e) => return Err(format!("receiver sent a bad frame: {e}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.recv.read_chunk(1 << 20, true)).await {
                Err(_) => return Err("no frame within 10s".into()),
                Ok(Ok(Some(c))) => self.buf.extend_from_slice(&c.bytes),
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(e)) => return Err(e.to_string()),
            }
        }
    }

    async fn expect(&mut self) -> Frame {
        match self.next().await {
            Ok(Some(f)) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Expects an `Error` frame (then the end of the stream); returns its code and message.
    async fn expect_error(&mut self) -> (ErrorCode, String) {
        match self.expect().await {
            Frame::Error(e) => {
                assert_eq!(
                    self.next().await,
                    Ok(None),
                    "the stream ends after the Error"
                );
                (e.code, e.message)
            }
            other => panic!("expected an Error frame, got {other:?}"),
        }
    }

    async fn expect_ack(&mut self) -> u64 {
        match self.expect().await {
            Frame::Ack(a) => a.confirmed_decree.0,
            other => panic!("expected an Ack, got {other:?}"),
        }
    }

    /// Sends Hello and returns the Welcome's confirmed decree.
    async fn welcome(conn: &Connection, sp: u32, token: u64) -> (Client, u64) {
        let mut c = Client::open(conn).await;
        c.send(&hello(SOURCE_ID, TABLE, sp, token)).await;
        match c.expect().await {
            Frame::Welcome(w) => {
                assert!(w.present_files.is_empty());
                (c, w.confirmed_decree.0)
            }
            other => panic!("expected Welcome for partition {sp} token {token}, got {other:?}"),
        }
    }
}

fn hello(cluster_id: u8, table: &str, sp: u32, token: u64) -> Frame {
    Frame::Hello(wire::Hello {
        version: PROTOCOL_VERSION,
        cluster_id: ClusterId::new(cluster_id).expect("valid id"),
        dupid: DUP,
        table: table.into(),
        partition: PartitionId(sp),
        fencing_token: token,
        purpose: wire::Purpose::Log,
    })
}

/// Keys that belong to source partition `sp` of an 8-partition source table.
fn source_keys(sp: u32, n: usize) -> Vec<Vec<u8>> {
    (0..)
        .map(|i| format!("user:{i}").into_bytes())
        .filter(|k| partition_of(k, SOURCE_PARTITIONS) == PartitionId(sp))
        .take(n)
        .collect()
}

/// Records `first..=last` of source partition `sp`: a put of one key each, and every third
/// record also deletes another key; `tag` goes into the values.
fn records(sp: u32, first: u64, last: u64, tag: &str) -> Vec<PlogRecord> {
    let keys = source_keys(sp, 200);
    (first..=last)
        .map(|d| {
            let i = d as usize % keys.len();
            let mut ops = vec![Op::Put {
                key: keys[i].clone(),
                value: format!("{tag}-{d}").into_bytes(),
                expire_at_ms: 0,
            }];
            if d % 3 == 0 {
                ops.push(Op::Delete {
                    key: keys[(i + 100) % keys.len()].clone(),
                });
            }
            PlogRecord {
                decree: Decree(d),
                timetag: Timetag::new(1_700_000_000_000_000 + d, bj(), false),
                ops,
            }
        })
        .collect()
}

fn batch(recs: &[PlogRecord]) -> Frame {
    Frame::Batch(wire::pack_batch(recs, 3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_from_eight_source_partitions_land_in_exactly_their_target_partitions() {
    let h = Harness::start().await.expect("harness");
    let conn = h.connect(SOURCE).await.expect("connect as bj");
    let mut sent: Vec<Vec<PlogRecord>> = Vec::new();
    for sp in 0..SOURCE_PARTITIONS {
        let (mut c, confirmed) = Client::welcome(&conn, sp, 1).await;
        assert_eq!(confirmed, 0, "a fresh inbox has nothing");
        // Two batches in flight at once (a window of 2), then a resend of the first.
        let (a, b) = (records(sp, 1, 20, "v"), records(sp, 21, 45, "v"));
        c.send(&batch(&a)).await;
        c.send(&batch(&b)).await;
        // Acks are cumulative: 20 then 45, or only 45 when the receiver wrote both batches
        // together (the second was queued behind the first).
        let first = c.expect_ack().await;
        if first != 45 {
            assert_eq!(first, 20);
            assert_eq!(c.expect_ack().await, 45);
        }
        c.send(&batch(&a)).await;
        assert_eq!(c.expect_ack().await, 45, "a resent batch is harmless");
        c.send(&Frame::Heartbeat(wire::Heartbeat {
            source_timestamp_us: 1,
            committed_decree: Decree(45),
        }))
        .await;
        assert_eq!(
            c.expect_ack().await,
            45,
            "a heartbeat is answered with the confirmed decree"
        );
        c.send.finish().expect("finish");
        assert_eq!(c.next().await, Ok(None));
        sent.push([a, b].concat());
    }

    for (sp, recs) in sent.iter().enumerate() {
        let sp = sp as u32;
        let mut landed: BTreeSet<(u64, Vec<u8>, bool)> = BTreeSet::new();
        for tp in 0..TARGET_PARTITIONS {
            let inbox = h.inbox(tp, sp);
            let decrees: Vec<u64> = inbox.iter().map(|r| r.decree.0).collect();
            assert_eq!(
                decrees,
                (1..=45).collect::<Vec<_>>(),
                "inbox {tp}/{sp} holds every decree once, in order"
            );
            for (r, orig) in inbox.iter().zip(recs) {
                assert_eq!(r.timetag, orig.timetag);
                for op in &r.ops {
                    assert_eq!(
                        partition_of(op.key(), TARGET_PARTITIONS),
                        PartitionId(tp),
                        "key {:?} is in target partition {tp}",
                        String::from_utf8_lossy(op.key())
                    );
                    let put = matches!(op, Op::Put { .. });
                    assert!(
                        landed.insert((r.decree.0, op.key().to_vec(), put)),
                        "op written twice"
                    );
                }
            }
        }
        let want: BTreeSet<(u64, Vec<u8>, bool)> = recs
            .iter()
            .flat_map(|r| {
                r.ops
                    .iter()
                    .map(|op| (r.decree.0, op.key().to_vec(), matches!(op, Op::Put { .. })))
            })
            .collect();
        assert_eq!(
            landed, want,
            "source partition {sp}: every op landed, nothing else"
        );
    }

    let m = h.metrics();
    assert_eq!(sum_samples(&m, "receiver_batches_total"), 24.0, "{m}");
    // Every batch is acknowledged, the resent one too; its records were durable already, so
    // only the 45 distinct records of each source partition were written.
    assert_eq!(sum_samples(&m, "receiver_records_total"), 8.0 * 45.0, "{m}");
    assert_eq!(sum_samples(&m, "receiver_sessions"), 0.0, "{m}");
    assert_eq!(
        sum_samples(
            &m,
            &format!(r#"receiver_confirmed_decree{{table="{TABLE}",dupid="7",partition="5"}}"#)
        ),
        45.0,
        "{m}"
    );
    assert!(
        sum_samples(&m, r#"receiver_bytes_total{kind="wire"}"#) > 0.0,
        "{m}"
    );
    // One inbox write per batch, except where two queued batches were written together.
    let writes = sum_samples(&m, "receiver_inbox_write_seconds_count");
    assert!((16.0..=24.0).contains(&writes), "{m}");
    // The registration shippers look up.
    let reg = h
        .etcd
        .get(&format!("/ferry/{TARGET}/receivers/{NODE}"))
        .expect("etcdctl")
        .expect("registered");
    assert!(reg.contains(&h.receiver.quic.to_string()), "{reg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shippers_outside_the_group_or_of_another_ca_or_lying_about_their_cluster_are_refused() {
    let h = Harness::start().await.expect("harness");

    // A certificate from another CA: the handshake fails, nothing is ever welcomed.
    let evil = TlsFiles::shipper(h.dir.path().join("evil"), SOURCE);
    let real_ca = h.dir.path().join("certs").join("ca.pem");
    // The client may finish its side of the handshake before the receiver has checked the
    // certificate (TLS 1.3), so the refusal shows at connect or as the connection's close reason.
    let refused = match h.connect_with(&real_ca, &evil.cert, &evil.key).await {
        Err(e) => format!("{e:#}"),
        Ok(conn) => {
            let mut c = match conn.open_bi().await {
                Ok((send, recv)) => Some(Client {
                    send,
                    recv,
                    buf: Vec::new(),
                }),
                Err(_) => None,
            };
            if let Some(c) = c.as_mut() {
                let mut b = Vec::new();
                wire::encode(&hello(SOURCE_ID, TABLE, 0, 1), &mut b);
                let _ = c.send.write_all(&b).await;
                let got = c.next().await;
                assert!(got.is_err(), "a shipper of another CA got {got:?}");
            }
            let reason = tokio::time::timeout(WAIT, conn.closed())
                .await
                .expect("the receiver closes the connection");
            reason.to_string()
        }
    };
    assert!(
        refused.contains("invalid peer certificate"),
        "the receiver refuses the certificate: {refused}"
    );

    // A cluster of our CA that is not in the duplication group.
    let (code, message) = refusal(&h, OUTSIDER, hello(3, TABLE, 0, 1)).await;
    assert_eq!(code, ErrorCode::UNAUTHORIZED.0);
    assert!(
        message.contains("cluster `sh` is not in the duplication group of cluster `tj`"),
        "{message}"
    );
    // The target cluster's own certificate: a cluster does not ship to itself.
    let (code, message) = refusal(&h, TARGET, hello(2, TABLE, 0, 1)).await;
    assert_eq!(code, ErrorCode::UNAUTHORIZED.0);
    assert!(message.contains("this receiver's own cluster"), "{message}");

    // A bj certificate with a Hello that claims another cluster id.
    let conn = h.connect(SOURCE).await.expect("connect as bj");
    let mut c = Client::open(&conn).await;
    c.send(&hello(2, TABLE, 0, 1)).await;
    let (code, message) = c.expect_error().await;
    assert_eq!(code, ErrorCode::UNAUTHORIZED);
    assert!(
        message.contains(
            "the Hello claims cluster id 2 but the certificate is for cluster `bj` (id 1)"
        ),
        "{message}"
    );

    // A table the target does not have.
    let mut c = Client::open(&conn).await;
    c.send(&hello(SOURCE_ID, "orders", 0, 1)).await;
    let (code, message) = c.expect_error().await;
    assert_eq!(code, ErrorCode::UNKNOWN_TABLE);
    assert!(message.contains("ferry table create"), "{message}");

    // A table spread over two nodes: a known limitation, said so.
    h.meta
        .create_table(
            "spread",
            4,
            &[NODE.to_string(), "tj-n2".to_string()],
            meta::now_ms(),
        )
        .await
        .expect("create table");
    let mut c = Client::open(&conn).await;
    c.send(&hello(SOURCE_ID, "spread", 0, 1)).await;
    let (code, message) = c.expect_error().await;
    assert_eq!(code, ErrorCode::UNAVAILABLE);
    assert!(
        message.contains("multi-node target tables are not supported yet"),
        "{message}"
    );

    // The connection itself is still good.
    let (_c, confirmed) = Client::welcome(&conn, 0, 1).await;
    assert_eq!(confirmed, 0);

    let m = h.metrics();
    assert!(
        sum_samples(
            &m,
            r#"receiver_sessions_rejected_total{reason="handshake"}"#
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        sum_samples(
            &m,
            r#"receiver_sessions_rejected_total{reason="unauthorized"}"#
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        sum_samples(
            &m,
            r#"receiver_sessions_rejected_total{reason="unknown_table"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        sum_samples(
            &m,
            r#"receiver_sessions_rejected_total{reason="unavailable"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(sum_samples(&m, "receiver_sessions"), 1.0, "{m}");
}

/// Connects with `cluster`'s certificate and sends `hello`; returns the refusal, whether it
/// came as an Error frame or as the connection's close reason.
async fn refusal(h: &Harness, cluster: &str, hello: Frame) -> (u16, String) {
    let conn = h
        .connect(cluster)
        .await
        .expect("handshake (the CA is ours)");
    let mut c = Client::open(&conn).await;
    c.send(&hello).await;
    match c.next().await {
        Ok(Some(Frame::Error(e))) => (e.code.0, e.message),
        Ok(other) => panic!("expected a refusal, got {other:?}"),
        Err(_) => match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(a)) => (
                a.error_code.into_inner() as u16,
                String::from_utf8_lossy(&a.reason).into_owned(),
            ),
            other => panic!("expected an application close, got {other:?}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_token_is_refused_and_a_newer_one_preempts_the_live_session() {
    let h = Harness::start().await.expect("harness");
    let old_conn = h.connect(SOURCE).await.expect("connect");
    let new_conn = h.connect(SOURCE).await.expect("connect");
    let sp = 4;

    let (mut old, confirmed) = Client::welcome(&old_conn, sp, 5).await;
    assert_eq!(confirmed, 0);
    old.send(&batch(&records(sp, 1, 10, "old"))).await;
    assert_eq!(old.expect_ack().await, 10);

    // An older shipper is refused, and the owner is untouched.
    let mut stale = Client::open(&new_conn).await;
    stale.send(&hello(SOURCE_ID, TABLE, sp, 4)).await;
    let (code, message) = stale.expect_error().await;
    assert_eq!(code, ErrorCode::STALE_FENCING_TOKEN);
    assert!(message.contains("older than token 5"), "{message}");
    old.send(&batch(&records(sp, 11, 12, "old"))).await;
    assert_eq!(old.expect_ack().await, 12);

    // A newer shipper takes over: the old session is told and ended.
    let (mut new, confirmed) = Client::welcome(&new_conn, sp, 7).await;
    assert_eq!(
        confirmed, 12,
        "the newer shipper resumes after what is durable"
    );
    let (code, message) = old.expect_error().await;
    assert_eq!(code, ErrorCode::STALE_FENCING_TOKEN);
    assert!(message.contains("newer fencing token 7"), "{message}");
    // Whatever the old shipper still sends is never written.
    let _ = old
        .send
        .write_all(&{
            let mut b = Vec::new();
            wire::encode(&batch(&records(sp, 13, 30, "old")), &mut b);
            b
        })
        .await;
    new.send(&batch(&records(sp, 13, 15, "new"))).await;
    assert_eq!(new.expect_ack().await, 15);

    // The same shipper reconnecting with the same token replaces its own session.
    let (mut again, confirmed) = Client::welcome(&new_conn, sp, 7).await;
    assert_eq!(confirmed, 15);
    let (code, message) = new.expect_error().await;
    assert_eq!(
        code,
        ErrorCode::SUPERSEDED,
        "not a lost election, so the shipper retries: {message}"
    );
    again.send(&batch(&records(sp, 16, 16, "again"))).await;
    assert_eq!(again.expect_ack().await, 16);

    // With no live session left, the stored token alone still fences an older shipper.
    again.send.finish().expect("finish");
    assert_eq!(again.next().await, Ok(None));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut late = Client::open(&old_conn).await;
    late.send(&hello(SOURCE_ID, TABLE, sp, 6)).await;
    let (code, message) = late.expect_error().await;
    assert_eq!(code, ErrorCode::STALE_FENCING_TOKEN);
    assert!(message.contains("older than token 7"), "{message}");

    for tp in 0..TARGET_PARTITIONS {
        let inbox = h.inbox(tp, sp);
        assert_eq!(
            inbox.iter().map(|r| r.decree.0).collect::<Vec<_>>(),
            (1..=16).collect::<Vec<_>>(),
            "target partition {tp}"
        );
        for r in &inbox {
            for op in &r.ops {
                if let Op::Put { value, .. } = op {
                    let v = String::from_utf8_lossy(value);
                    let want = match r.decree.0 {
                        1..=12 => "old",
                        13..=15 => "new",
                        _ => "again",
                    };
                    assert_eq!(v, format!("{want}-{}", r.decree.0), "decree {}", r.decree);
                }
            }
        }
    }
    // The newest token is durable.
    let fence = std::fs::read_to_string(
        h.data_dir()
            .join(TABLE)
            .join(".fences")
            .join(format!("{SOURCE_ID}-{}-{sp}", DUP.0)),
    )
    .expect("fence file");
    assert_eq!(fence, "7\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_an_error_and_the_receiver_keeps_serving() {
    let h = Harness::start().await.expect("harness");
    let conn = h.connect(SOURCE).await.expect("connect");

    // An unknown frame type.
    let mut c = Client::open(&conn).await;
    c.send_raw(&[0, 0, 0, 0, 99]).await;
    let (code, message) = c.expect_error().await;
    assert_eq!(code, ErrorCode::MALFORMED);
    assert!(message.contains("unknown frame type 99"), "{message}");

    // A length over MAX_FRAME: refused from the header alone.
    let mut c = Client::open(&conn).await;
    c.send_raw(&[0xff, 0xff, 0xff, 0x7f, 1]).await;
    let (code, message) = c.expect_error().await;
    assert_eq!(code, ErrorCode::MALFORMED);
    assert!(message.contains("exceeds the limit"), "{message}");

    // A batch before the Hello.
    let mut c = Client::open(&conn).await;
    c.send(&batch(&records(0, 1, 2, "v"))).await;
    let (code, message) = c.expect_error().await;
    assert_eq!(code, ErrorCode::UNEXPECTED_FRAME);
    assert!(message.contains("must be Hello, not Batch"), "{message}");

    // Another protocol version.
    let mut c = Client::open(&conn).await;
    let mut raw = Vec::new();
    wire::encode(&hello(SOURCE_ID, TABLE, 0, 1), &mut raw);
    raw[wire::FRAME_HEADER_LEN] = 9;
    c.send_raw(&raw).await;
    let (code, _) = c.expect_error().await;
    assert_eq!(code, ErrorCode::UNSUPPORTED_VERSION);

    // A batch whose payload is garbage, after a good one: the good one stays, the bad one is
    // refused and nothing of it is written.
    let (mut c, _) = Client::welcome(&conn, 1, 1).await;
    c.send(&batch(&records(1, 1, 5, "v"))).await;
    assert_eq!(c.expect_ack().await, 5);
    let mut bad = wire::pack_batch(&records(1, 6, 8, "v"), 3);
    bad.zstd = vec![1, 2, 3, 4];
    c.send(&Frame::Batch(bad)).await;
    let (code, message) = c.expect_error().await;
    assert_eq!(code, ErrorCode::BAD_BATCH);
    assert!(message.contains("bad batch"), "{message}");
    // A batch that skips decrees.
    let (mut c, confirmed) = Client::welcome(&conn, 1, 1).await;
    assert_eq!(confirmed, 5);
    c.send(&batch(&records(1, 9, 10, "v"))).await;
    let (code, message) = c.expect_error().await;
    assert_eq!(code, ErrorCode::BAD_BATCH);
    assert!(message.contains("starts after a gap"), "{message}");
    // A frame a shipper never sends after the Welcome.
    let (mut c, _) = Client::welcome(&conn, 1, 1).await;
    c.send(&Frame::Welcome(wire::Welcome {
        confirmed_decree: Decree(1),
        present_files: vec![],
    }))
    .await;
    let (code, _) = c.expect_error().await;
    assert_eq!(code, ErrorCode::UNEXPECTED_FRAME);

    // The receiver is alive and serves a good session on a new connection.
    let conn = h.connect(SOURCE).await.expect("connect again");
    let (mut c, confirmed) = Client::welcome(&conn, 1, 1).await;
    assert_eq!(confirmed, 5);
    c.send(&batch(&records(1, 6, 8, "v"))).await;
    assert_eq!(c.expect_ack().await, 8);
    for tp in 0..TARGET_PARTITIONS {
        assert_eq!(h.inbox(tp, 1).len(), 8);
    }
    assert_eq!(h.health()["stage"], "serving");
    let log = h.receiver.log_text();
    assert!(
        log.contains("WARN") && log.contains("unknown frame type 99"),
        "the bad frame is logged at WARN:\n{log}"
    );
    assert_eq!(
        log.matches("unknown frame type 99").count(),
        1,
        "logged once:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_and_a_restart_the_welcome_returns_the_durable_decree() {
    let mut h = Harness::start().await.expect("harness");
    let sp = 2;
    {
        let conn = h.connect(SOURCE).await.expect("connect");
        let (mut c, _) = Client::welcome(&conn, sp, 3).await;
        c.send(&batch(&records(sp, 1, 30, "v"))).await;
        assert_eq!(c.expect_ack().await, 30);
        c.send(&batch(&records(sp, 31, 50, "v"))).await;
        assert_eq!(c.expect_ack().await, 50);
    }
    // kill -9: only what was acknowledged is promised, and all of it was fsynced.
    h.receiver.proc.kill9();
    h.restart_receiver().await.expect("restart");

    let conn = h.connect(SOURCE).await.expect("connect after restart");
    // The fencing token survived the restart too.
    let mut stale = Client::open(&conn).await;
    stale.send(&hello(SOURCE_ID, TABLE, sp, 2)).await;
    assert_eq!(stale.expect_error().await.0, ErrorCode::STALE_FENCING_TOKEN);
    let (mut c, confirmed) = Client::welcome(&conn, sp, 3).await;
    assert_eq!(confirmed, 50);
    c.send(&batch(&records(sp, 51, 60, "v"))).await;
    assert_eq!(c.expect_ack().await, 60);

    // A graceful stop ends the session with UNAVAILABLE, exits 0 and deregisters.
    let key = format!("/ferry/{TARGET}/receivers/{NODE}");
    assert!(h.etcd.get(&key).expect("etcdctl").is_some());
    let status = h
        .receiver
        .proc
        .terminate(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}: {}", h.receiver.log_text());
    let (code, message) = c.expect_error().await;
    assert_eq!(code, ErrorCode::UNAVAILABLE);
    assert!(message.contains("shutting down"), "{message}");
    assert_eq!(h.etcd.get(&key).expect("etcdctl"), None, "deregistered");
    for tp in 0..TARGET_PARTITIONS {
        assert_eq!(h.inbox(tp, sp).len(), 60);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_differs_from_the_cluster_is_refused_at_start_up() {
    let h = Harness::start().await.expect("harness");
    let config = h.receiver.config.clone();
    let text = std::fs::read_to_string(&config).expect("config");
    let bad = h.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        text.replace("id = 2\n", "id = 3\n")
            .replace("tj = 2 }", "tj = 3 }"),
    )
    .expect("write");
    let out = Command::new(bin_path("receiver"))
        .arg("--config")
        .arg(&bad)
        .args(["--listen", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .output()
        .expect("run receiver");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config field `cluster.id` is 3 here but 2 in etcd"),
        "the error names the field: {err}"
    );

    // While etcd is unreachable the receiver waits in `starting`, and still stops cleanly.
    let http = loopback(free_port());
    let mut cmd = Command::new(bin_path("receiver"));
    cmd.arg("--config")
        .arg(&config)
        .args(["--etcd", &format!("http://{}", loopback(free_port()))])
        .args(["--listen", "127.0.0.1:0", "--http-addr", &http.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut waiting = Proc::spawn("receiver", &mut cmd).expect("spawn");
    let deadline = Instant::now() + WAIT;
    let mut stage = serde_json::Value::Null;
    while Instant::now() < deadline {
        if let Ok((200, body)) = http_get(http, "/health") {
            stage = serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()["stage"]
                .clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stage, "starting");
    let status = waiting.terminate(WAIT).expect("exits after SIGTERM");
    assert!(status.success(), "{status}");

    let out = Command::new(bin_path("receiver"))
        .arg("--config")
        .arg(&config)
        .args(["--node", "a/b"])
        .output()
        .expect("run receiver");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config key `receiver.node`"), "{err}");
}
