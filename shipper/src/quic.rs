//! The QUIC side: one client endpoint per process, one connection per remote receiver shared by
//! every partition task that ships to it (each session is a stream on it), reopened after it
//! fails. Windows and UDP socket buffers are sized to the link (see
//! [`crate::config::window_bytes`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_proto::wire::{self, Frame};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, Mutex};

use crate::config::{Congestion, ShipperConfig};

/// The name the receivers' certificates carry (`certs init` puts `localhost` in every
/// receiver certificate; add the real name with `--dns` and it can be configured here later).
pub const SERVER_NAME: &str = "localhost";

/// The process's QUIC client.
pub struct Quic {
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<String, Arc<Mutex<Option<quinn::Connection>>>>>,
    connect_timeout: Duration,
}

impl Quic {
    /// Binds the UDP socket (buffers sized to the link), loads the shipper's certificate and
    /// builds the transport.
    pub fn new(config: &ShipperConfig) -> anyhow::Result<Quic> {
        let s = &config.shipper;
        let files = ferry_certs::TlsFiles::shipper(&s.certs_dir, &config.cluster.name);
        let mut client = ferry_certs::quinn_client_config(&files.ca, &files.cert, &files.key)
            .context("load the shipper's TLS certificate")?;
        client.transport_config(Arc::new(transport(
            s.window_bytes(),
            s.rtt_ms,
            s.congestion,
        )));
        let socket = std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))
            .context("bind the shipper's UDP socket")?;
        size_socket_buffers(&socket, s.window_bytes() as usize);
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .context("start the QUIC endpoint")?;
        endpoint.set_default_client_config(client);
        Ok(Quic {
            endpoint,
            conns: Mutex::new(HashMap::new()),
            connect_timeout: Duration::from_secs(10),
        })
    }

    /// The live connection to `addr`, opening one if there is none or the last one failed.
    /// Concurrent callers for one address wait for the same attempt.
    pub async fn connection(&self, addr: &str) -> Result<quinn::Connection, String> {
        let slot = self
            .conns
            .lock()
            .await
            .entry(addr.to_string())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let sa = resolve(addr).await?;
        let connecting = self
            .endpoint
            .connect(sa, SERVER_NAME)
            .map_err(|e| format!("cannot connect to receiver {addr}: {e}"))?;
        let conn = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("QUIC handshake with receiver {addr} failed: {e}")),
            Err(_) => {
                return Err(format!(
                    "receiver {addr} did not answer the QUIC handshake within {}s",
                    self.connect_timeout.as_secs()
                ))
            }
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Closes every connection (shutdown).
    pub async fn close(&self) {
        self.endpoint
            .close(VarInt::from_u32(0), b"shipper stopping");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The transport: flow-control windows of `window` bytes, the expected RTT as the initial
/// estimate, keep-alives so an idle session's path stays open through NATs and firewalls, and
/// the chosen congestion controller.
pub fn transport(window: u64, rtt_ms: u64, congestion: Congestion) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let w = VarInt::from_u64(window).unwrap_or(VarInt::MAX);
    t.stream_receive_window(w);
    t.receive_window(w);
    t.send_window(window);
    t.initial_rtt(Duration::from_millis(rtt_ms));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    match congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::Newreno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    t
}

/// Asks the kernel for `bytes` of UDP send and receive buffer; it caps them at
/// `net.core.{w,r}mem_max`, in which case this says what to raise.
fn size_socket_buffers(socket: &std::net::UdpSocket, bytes: usize) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot inspect the UDP socket; keeping the kernel's buffer sizes");
            return;
        }
    };
    let _ = state.set_send_buffer_size(socket.into(), bytes);
    let _ = state.set_recv_buffer_size(socket.into(), bytes);
    let send = state.send_buffer_size(socket.into()).unwrap_or(0);
    let recv = state.recv_buffer_size(socket.into()).unwrap_or(0);
    // Linux reads back twice what it granted (bookkeeping overhead), so a granted request reads
    // back at least `bytes`; a capped one reads back less.
    if send < bytes || recv < bytes {
        tracing::warn!(
            wanted = bytes,
            send,
            recv,
            "the kernel capped the UDP socket buffers below twice the bandwidth-delay product; raise net.core.wmem_max and net.core.rmem_max (sysctl) for full throughput"
        );
    } else {
        tracing::info!(send, recv, "UDP socket buffers sized to the link");
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve receiver address {addr}: {e}"))?;
    addrs.find(SocketAddr::is_ipv4).ok_or_else(|| {
        format!("receiver address {addr} has no IPv4 address; the shipper binds an IPv4 socket")
    })
}

/// Writes one frame.
pub async fn send_frame(send: &mut SendStream, frame: &Frame) -> Result<(), String> {
    let mut buf = Vec::new();
    wire::encode(frame, &mut buf);
    send.write_all(&buf)
        .await
        .map_err(|e| format!("sending to the receiver failed: {e}"))
}

/// Decodes the receiver's frames in a task of its own (so waiting for one is
/// cancellation-safe), and stops that task when dropped.
pub struct FrameReader {
    rx: mpsc::Receiver<Result<Frame, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl FrameReader {
    /// Starts reading `recv`. A frame that does not decode ends the stream with an error
    /// sentence; it never panics.
    pub fn spawn(recv: RecvStream) -> FrameReader {
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(read_frames(recv, tx));
        FrameReader { rx, task }
    }

    /// The next frame, or why there is none. Cancellation-safe.
    pub async fn recv(&mut self) -> Result<Frame, String> {
        match self.rx.recv().await {
            Some(r) => r,
            None => Err("the receiver's stream ended".into()),
        }
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_frames(mut recv: RecvStream, tx: mpsc::Sender<Result<Frame, String>>) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        loop {
            match wire::decode(&buf) {
                Ok((frame, used)) => {
                    buf.drain(..used);
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                Err(wire::WireError::Incomplete { .. }) => break,
                Err(e) => {
                    let _ = tx
                        .send(Err(format!(
                            "the receiver sent a frame that does not decode: {e}"
                        )))
                        .await;
                    return;
                }
            }
        }
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Ok(None) => {
                let _ = tx.send(Err("the receiver closed the stream".into())).await;
                return;
            }
            Err(e) => {
                let _ = tx
                    .send(Err(format!("reading from the receiver failed: {e}")))
                    .await;
                return;
            }
        }
    }
}
