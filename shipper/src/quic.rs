//! The QUIC side: one client endpoint per process, one connection per remote receiver shared by
//! every partition task that ships to it (each session is a stream on it), reopened after it
//! fails. Windows and UDP socket buffers are sized to the link (see
//! [`ferry_net::Windows::for_link`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_net::transport::{bind_udp, client_transport_config};
use quinn::VarInt;
use tokio::sync::Mutex;

use crate::config::ShipperConfig;
use crate::error::ShipperError;

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
        client.transport_config(Arc::new(client_transport_config(
            s.window_bytes(),
            s.rtt_ms,
            s.congestion,
        )));
        let (socket, recv, send) = bind_udp(SocketAddr::from(([0, 0, 0, 0], 0)), s.window_bytes())
            .context("bind the shipper's UDP socket")?;
        let wanted = s.window_bytes() as usize;
        // Linux reads back twice what it granted (bookkeeping overhead), so a granted request
        // reads back at least `wanted`; a capped one reads back less.
        if send < wanted || recv < wanted {
            tracing::warn!(
                wanted,
                send,
                recv,
                "the kernel capped the UDP socket buffers below the windows sized to the link (4 × its bandwidth-delay product); raise net.core.wmem_max and net.core.rmem_max (sysctl) for full throughput"
            );
        } else {
            tracing::info!(send, recv, "UDP socket buffers sized to the link");
        }
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
    pub async fn connection(&self, addr: &str) -> Result<quinn::Connection, ShipperError> {
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
        let connecting = match self.endpoint.connect(sa, SERVER_NAME) {
            Ok(c) => c,
            Err(source) => {
                return Err(ShipperError::Connect {
                    addr: addr.to_owned(),
                    source,
                })
            }
        };
        let conn = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => {
                return Err(ShipperError::Handshake {
                    addr: addr.to_owned(),
                    source,
                })
            }
            Err(_) => {
                return Err(ShipperError::HandshakeTimeout {
                    addr: addr.to_owned(),
                    timeout: self.connect_timeout,
                })
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

async fn resolve(addr: &str) -> Result<SocketAddr, ShipperError> {
    let mut addrs = match tokio::net::lookup_host(addr).await {
        Ok(a) => a,
        Err(source) => {
            return Err(ShipperError::Resolve {
                addr: addr.to_owned(),
                source,
            })
        }
    };
    addrs
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| ShipperError::NoIpv4 {
            addr: addr.to_owned(),
        })
}
