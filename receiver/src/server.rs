//! The `receiver` process: start-up, the QUIC endpoint, connections, shutdown.
//!
//! Start-up, in order (`/health` reports `starting` until the last step):
//! 1. validate the config (done by the caller) and open the HTTP port;
//! 2. connect to etcd and check the cluster config against the stored one (a mismatch stops
//!    the start, naming the field; while etcd is unreachable it keeps trying);
//! 3. load the certificates and bind the QUIC endpoint;
//! 4. register `receivers/<node>` under a lease;
//! 5. serve: `/health` says `serving`.
//!
//! Each connection is authenticated once: the shipper's certificate names its cluster, which
//! must be in the duplication group and not this cluster. Each bidirectional stream is then one
//! session ([`crate::session`]).
//!
//! Shutdown (SIGTERM or SIGINT): `/health` says `stopping`, new connections are refused, every
//! session is told `UNAVAILABLE` after the batch it is writing (bounded by `shutdown_grace`),
//! the endpoint closes, and the registration is removed. A second signal exits at once; the
//! inboxes are durable up to the last ack either way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use ferry_proc::{listen_error, watch_signals};
use quinn::{Endpoint, EndpointConfig, TokioRuntime, VarInt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ferry_meta::config::ClusterConfig;
use ferry_meta::{self as meta, MetaError, MetaStore, ReceiverInfo, Registration};
use ferry_proto::wire::{self, ErrorCode, Frame};
use ferry_proto::ClusterId;

use crate::checkpoint::Transfers;
use crate::config::ReceiverConfig;
use crate::error::ReceiverError;
use crate::fence::Fences;
use crate::http;
use crate::metrics::Metrics;
use crate::session::{self, Peer};
use ferry_net::Windows;

/// What every connection and session shares.
pub struct Context {
    pub config: ReceiverConfig,
    pub meta: MetaStore,
    pub fences: Arc<Fences>,
    pub metrics: Arc<Metrics>,
    /// Open checkpoint transfers, for their lane streams.
    pub transfers: Transfers,
}

/// How far the receiver has come, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Starting = 0,
    Serving = 1,
    Stopping = 2,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Starting => "starting",
            Stage::Serving => "serving",
            Stage::Stopping => "stopping",
        }
    }
}

/// A [`Stage`] shared between the server and the HTTP handlers.
#[derive(Debug, Default)]
pub struct StageCell(AtomicU8);

impl StageCell {
    pub fn get(&self) -> Stage {
        match self.0.load(Ordering::Acquire) {
            0 => Stage::Starting,
            1 => Stage::Serving,
            _ => Stage::Stopping,
        }
    }

    pub fn set(&self, stage: Stage) {
        self.0.store(stage as u8, Ordering::Release);
    }
}

/// What `/health` and `/metrics` read.
pub struct Status {
    pub stage: StageCell,
    pub cluster: String,
    pub node: String,
    pub metrics: Arc<Metrics>,
    /// The QUIC address bound, once it is.
    pub quic_addr: OnceLock<SocketAddr>,
    /// The address registered for shippers, once it is.
    pub advertise: OnceLock<String>,
}

/// Runs the receiver until SIGTERM or SIGINT, then shuts down gracefully. A second signal exits
/// at once.
pub async fn run(config: ReceiverConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = watch_signals(shutdown.clone(), "inboxes are durable up to the last ack")
        .context("install the SIGTERM/SIGINT handlers")?;
    let result = serve(config, shutdown).await;
    signals.abort();
    result
}

/// Runs the receiver until `shutdown` is cancelled, then shuts down gracefully.
pub async fn serve(config: ReceiverConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let r = config.receiver.clone();
    let metrics = Arc::new(Metrics::default());
    let status = Arc::new(Status {
        stage: StageCell::default(),
        cluster: config.cluster.name.clone(),
        node: r.node.clone(),
        metrics: metrics.clone(),
        quic_addr: OnceLock::new(),
        advertise: OnceLock::new(),
    });

    // 1. The HTTP port, so that `starting` is observable.
    let http_listener = TcpListener::bind(r.http_addr)
        .await
        .map_err(|e| listen_error("HTTP", "--http-addr", r.http_addr, &e))?;
    let http_addr = http_listener
        .local_addr()
        .context("read the HTTP port's address")?;
    let http_stop = CancellationToken::new();
    let http_task = {
        let router = http::router(status.clone());
        let stop = http_stop.clone();
        tokio::spawn(async move {
            axum::serve(http_listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        })
    };
    let result = start_and_serve(config, status, metrics, shutdown).await;
    http_stop.cancel();
    match http_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
        Ok(Ok(())) => {}
    }
    if result.is_ok() {
        tracing::info!(http = %http_addr, "receiver stopped");
    }
    result
}

async fn start_and_serve(
    config: ReceiverConfig,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let r = config.receiver.clone();
    // 2. etcd and the cluster config.
    let meta = MetaStore::connect(&config.etcd.endpoints, &config.cluster.name, r.etcd_timeout)
        .await
        .context("connect to etcd")?;
    let checked = retry_while_unavailable("check the cluster config", &shutdown, || {
        meta::check_cluster_config(&meta, &config.cluster)
    })
    .await;
    match checked {
        None => return Ok(()),
        Some(Err(e)) => return Err(anyhow!("{e}")).context("check the cluster config in etcd"),
        Some(Ok(())) => {}
    }

    // 3. Certificates and the QUIC endpoint.
    let files = ferry_certs::TlsFiles::receiver(&r.certs_dir, &config.cluster.name);
    let mut server_config = ferry_certs::quinn_server_config(&files.ca, &files.cert, &files.key)
        .map_err(|e| anyhow!("{e}"))
        .context("load the receiver's certificates")?;
    let windows = Windows::for_link(r.bandwidth_mbps, r.rtt_ms);
    server_config.transport_config(Arc::new(ferry_net::transport::transport_config(
        windows,
        r.congestion,
        r.rtt_ms,
    )));
    let (socket, recv_buf, send_buf) =
        ferry_net::transport::bind_udp(r.listen, windows.socket_buffer)
            .map_err(|e| listen_error("QUIC (UDP)", "--listen", r.listen, &e))?;
    if (recv_buf as u64) < windows.socket_buffer {
        tracing::warn!(
            wanted = windows.socket_buffer,
            granted = recv_buf,
            "the kernel capped the UDP receive buffer below the link's bandwidth-delay product \
             ×2; raise net.core.rmem_max (and wmem_max) for full throughput on a long link"
        );
    }
    let endpoint = Endpoint::new(
        EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(TokioRuntime),
    )
    .context("start the QUIC endpoint")?;
    let quic_addr = endpoint
        .local_addr()
        .context("read the QUIC endpoint's address")?;
    let _ = status.quic_addr.set(quic_addr);

    // 4. Register where shippers find us.
    let advertise = r.advertise.clone().unwrap_or_else(|| quic_addr.to_string());
    let _ = status.advertise.set(advertise.clone());
    let registered = retry_while_unavailable("register the receiver", &shutdown, || {
        meta::register_receiver(&meta, ReceiverInfo::new(&r.node, &advertise), r.lease_ttl)
    })
    .await;
    let registration = match registered {
        None => {
            endpoint.close(VarInt::from_u32(0), b"receiver stopping");
            return Ok(());
        }
        Some(Err(e)) => {
            endpoint.close(VarInt::from_u32(0), b"receiver stopping");
            return Err(anyhow!("{e}")).context("register the receiver in etcd");
        }
        Some(Ok(reg)) => reg,
    };

    // 5. Serve.
    let ctx = Arc::new(Context {
        fences: Arc::new(Fences::new(&r.data_dir)),
        config,
        meta,
        metrics,
        transfers: Transfers::default(),
    });
    status.stage.set(Stage::Serving);
    tracing::info!(
        quic = %quic_addr,
        %advertise,
        cluster = %ctx.config.cluster.name,
        node = %r.node,
        data_dir = %r.data_dir.display(),
        stream_window = windows.stream,
        udp_recv_buffer = recv_buf,
        udp_send_buffer = send_buf,
        congestion = %r.congestion,
        "receiver ready"
    );
    let sessions = TaskTracker::new();
    let conns_stop = CancellationToken::new();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => i,
        };
        let Some(incoming) = incoming else { break };
        sessions.spawn(handle_connection(
            ctx.clone(),
            incoming,
            sessions.clone(),
            conns_stop.clone(),
        ));
    }

    status.stage.set(Stage::Stopping);
    stop(ctx, endpoint, sessions, conns_stop, registration).await;
    Ok(())
}

/// The graceful part of shutdown.
async fn stop(
    ctx: Arc<Context>,
    endpoint: Endpoint,
    sessions: TaskTracker,
    conns_stop: CancellationToken,
    registration: Registration,
) {
    let grace = ctx.config.receiver.shutdown_grace;
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        sessions = ctx.fences.live_sessions(),
        "stopping: refusing new connections, ending sessions after their current batch"
    );
    endpoint.set_server_config(None);
    conns_stop.cancel();
    ctx.fences.stop_all(
        ErrorCode::UNAVAILABLE,
        "the receiver is shutting down; reconnect once it is back (or to its replacement)",
    );
    sessions.close();
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        tracing::warn!("sessions still busy after the shutdown grace; closing the endpoint");
    }
    endpoint.close(VarInt::from_u32(0), b"receiver stopping");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    registration.deregister().await;
}

/// One shipper connection: authenticate it, then run a session per stream it opens.
async fn handle_connection(
    ctx: Arc<Context>,
    incoming: quinn::Incoming,
    sessions: TaskTracker,
    stop: CancellationToken,
) {
    let addr = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            ctx.metrics.rejected("handshake");
            tracing::warn!(peer = %addr, error = %e,
                "QUIC/TLS handshake failed; a shipper needs a client certificate signed by this deployment's CA");
            return;
        }
    };
    let cluster = match ferry_certs::peer_cluster(&conn) {
        Ok(c) => c,
        Err(e) => {
            let message = format!(
                "the shipper's certificate names no ferry cluster ({e}); make its certificate with `certs init`"
            );
            refuse_connection(&ctx, &conn, "no_identity", message).await;
            return;
        }
    };
    let cluster_id = match authorize(&ctx.config.cluster, &cluster) {
        Ok(id) => id,
        Err(e) => {
            refuse_connection(&ctx, &conn, ErrorCode::UNAUTHORIZED.name(), e.to_string()).await;
            return;
        }
    };
    let peer = Arc::new(Peer {
        cluster,
        cluster_id,
        addr,
    });
    tracing::info!(peer = %addr, cluster = %peer.cluster, "shipper connected");
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            s = conn.accept_bi() => s,
        };
        match stream {
            Ok((send, recv)) => {
                sessions.spawn(session::run(ctx.clone(), peer.clone(), send, recv));
            }
            Err(e) => {
                tracing::debug!(peer = %addr, reason = %e, "connection closed");
                break;
            }
        }
    }
}

/// The id of `cluster` if a shipper of it may ship to this cluster: it must be in the
/// duplication group, and not this cluster itself. Else why not, in the sentence to refuse it
/// with (the rule is [`ferry_dup::receive::authorize`]'s).
pub fn authorize(ours: &ClusterConfig, cluster: &str) -> Result<ClusterId, ReceiverError> {
    let group = ours
        .duplication_group
        .iter()
        .map(|(name, id)| (name.as_str(), *id));
    ferry_dup::receive::authorize(&ours.name, group, cluster).map_err(|r| {
        ReceiverError::Unauthorized {
            cluster: cluster.to_owned(),
            message: r.message,
        }
    })
}

/// Refuses an authenticated-by-CA but unauthorized connection: answers the first stream it
/// opens with an `Error` frame, then closes the connection with the same code and message.
async fn refuse_connection(ctx: &Context, conn: &quinn::Connection, reason: &str, message: String) {
    let code = ErrorCode::UNAUTHORIZED;
    ctx.metrics.rejected(reason);
    tracing::warn!(peer = %conn.remote_address(), %code, reason = %message, "connection refused");
    let frame = Frame::Error(wire::Error {
        code,
        message: message.clone(),
    });
    let answer = async {
        let (mut send, _recv) = conn.accept_bi().await.ok()?;
        let mut buf = Vec::new();
        wire::encode(&frame, &mut buf);
        send.write_all(&buf).await.ok()?;
        send.finish().ok()?;
        // Closing the connection discards unacknowledged stream data: wait for the ack.
        let _ = send.stopped().await;
        Some(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), answer).await;
    let reason: Vec<u8> = message.into_bytes().into_iter().take(512).collect();
    conn.close(VarInt::from_u32(u32::from(code.0)), &reason);
}

/// Runs `op` until it succeeds or fails with something other than etcd being unreachable,
/// waiting with bounded backoff in between. `None` if `shutdown` came first.
async fn retry_while_unavailable<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut op: F,
) -> Option<Result<T, MetaError>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, MetaError>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        match op().await {
            Err(e @ MetaError::Unavailable { .. }) => {
                tracing::warn!(error = %e, "cannot {what} yet; retrying");
            }
            other => return Some(other),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tj() -> ClusterConfig {
        ClusterConfig {
            name: "tj".into(),
            id: 2,
            duplication_group: [("bj".to_string(), 1u8), ("tj".to_string(), 2u8)]
                .into_iter()
                .collect(),
            partition_hash: "crc32c".into(),
            plog_format_version: 1,
        }
    }

    #[test]
    fn only_other_clusters_of_the_group_are_authorized() {
        assert_eq!(authorize(&tj(), "bj").map(ClusterId::get), Ok(1));
        let e = authorize(&tj(), "tj").expect_err("itself").to_string();
        assert!(e.contains("this receiver's own cluster"), "{e}");
        let e = authorize(&tj(), "sh")
            .expect_err("outside the group")
            .to_string();
        assert!(
            e.contains("cluster `sh` is not in the duplication group of cluster `tj` (bj, tj)"),
            "{e}"
        );
    }
}
