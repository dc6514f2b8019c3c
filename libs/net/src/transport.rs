//! QUIC transport tuning, for both ends: receive windows and UDP socket buffers sized to the link,
//! and the congestion controller.
//!
//! A QUIC receiver advertises how many unacknowledged bytes a peer may send (flow-control
//! windows). If the window is smaller than what the link holds in one round trip — the
//! bandwidth-delay product (BDP) — the shipper stalls every RTT however fast the link is. quinn's
//! defaults assume 100 Mbit/s × 100 ms per stream; an inter-datacenter link is often faster. So
//! both ends size, from `bandwidth_mbps` and `rtt_ms`, with [`HEADROOM`] × the BDP:
//!
//! - the per-stream receive window: one session may carry the whole link;
//! - the connection receive window: the sessions of one shipper together fill the link;
//! - the UDP socket receive and send buffers: so a burst of a full window is not dropped by the
//!   kernel before quinn reads it (the kernel caps them at `net.core.rmem_max`/`wmem_max`; the
//!   receiver logs the sizes it got).

use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{TransportConfig, VarInt};

use serde::{Deserialize, Serialize};

/// Windows and buffers are this many bandwidth-delay products. BBR keeps up to 2 × its BDP
/// estimate in flight, and a full bottleneck queue stretches the round trip past the base RTT;
/// a window of only 2 × BDP then limits the sender before the link does, and whenever the
/// receiver pauses reading (a fsync) the link idles. Measured with `bench checkpoint` (1 Gbit/s,
/// 50 ms, 0.1% loss): 2 × BDP copied at 86–88% of iperf3's goodput, 4 × BDP at 96–97%. A receive
/// window is a promise, not an allocation: memory is used only while the receiver falls behind.
pub const HEADROOM: u64 = 4;
/// Floor of every window and buffer: quinn's default stream receive window. Below it, loopback
/// and LAN links would be slower than quinn's defaults for no gain.
const MIN_WINDOW: u64 = 1_250_000;
/// Ceiling: a receive window is memory the receiver promises to buffer per connection.
const MAX_WINDOW: u64 = 1 << 30;
/// Sessions (streams) one shipper may have open at once: one per (dup, partition) it leads plus
/// checkpoint streams.
const MAX_STREAMS: u32 = 1024;
/// A silent connection is closed after this long. Shippers send heartbeats when idle.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a client pings an idle connection.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// A QUIC congestion controller.
///
/// The default is **bbr**. Congestion control governs the *sender*, the shipper; a receiver
/// sends only small `Welcome`, `Ack` and `Error` frames, so its choice barely moves throughput.
/// On a long path with random (non-congestion) loss, a loss-based controller takes every lost
/// packet for congestion and halves its window: with 0.1% loss on a 1 Gbit/s × 50 ms link,
/// quinn's cubic copied a checkpoint at under 2 MB/s, where bbr reached 96% of TCP's goodput
/// (`docs/quic-tuning.md` has the runs). Without loss the two measured alike. quinn marks its
/// BBR experimental; `cubic` stays for a link that must share a bottleneck fairly with TCP, and
/// `newreno` for comparison in benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// Loss-based, quinn's and Linux's default; fair to TCP, but random loss holds it far below
    /// the link.
    Cubic,
    /// Model-based (bandwidth and RTT probing): random loss does not shrink its window.
    /// Experimental in quinn.
    #[default]
    Bbr,
    /// Classic Reno; for comparison only.
    Newreno,
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::Newreno => "newreno",
        })
    }
}

/// The sizes derived from the link, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Bandwidth × RTT.
    pub bdp: u64,
    /// Per-stream receive window.
    pub stream: u64,
    /// Per-connection receive window.
    pub connection: u64,
    /// Requested UDP socket receive and send buffer.
    pub socket_buffer: u64,
}

impl Windows {
    /// Sizes for a link of `bandwidth_mbps` Mbit/s and `rtt_ms` milliseconds round trip.
    pub fn for_link(bandwidth_mbps: u64, rtt_ms: u64) -> Windows {
        // bytes/s × s: Mbit/s × 10^6 / 8 × ms / 1000 = Mbit/s × ms × 125.
        let bdp = bandwidth_mbps.saturating_mul(rtt_ms).saturating_mul(125);
        let headroom = bdp.saturating_mul(HEADROOM).clamp(MIN_WINDOW, MAX_WINDOW);
        Windows {
            bdp,
            stream: headroom,
            connection: headroom,
            socket_buffer: headroom,
        }
    }
}

/// The transport of the receiver's (server) QUIC endpoint: windows from `windows`, the chosen congestion
/// controller, and stream and idle limits.
pub fn transport_config(windows: Windows, congestion: Congestion, rtt_ms: u64) -> TransportConfig {
    let mut t = TransportConfig::default();
    // Both values are clamped to MAX_WINDOW (1 GiB), far below VarInt's 2^62 limit.
    let var = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
    t.stream_receive_window(var(windows.stream))
        .receive_window(var(windows.connection))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .initial_rtt(Duration::from_millis(rtt_ms))
        .max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    set_congestion(&mut t, congestion);
    t
}

/// The transport of the shipper's (client) endpoint: flow-control windows of `window` bytes, the
/// expected RTT as the initial estimate, keep-alives so an idle session's path stays open
/// through NATs and firewalls, and the chosen congestion controller.
pub fn client_transport_config(
    window: u64,
    rtt_ms: u64,
    congestion: Congestion,
) -> TransportConfig {
    let mut t = TransportConfig::default();
    let w = VarInt::from_u64(window).unwrap_or(VarInt::MAX);
    t.stream_receive_window(w)
        .receive_window(w)
        .send_window(window)
        .initial_rtt(Duration::from_millis(rtt_ms))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    set_congestion(&mut t, congestion);
    t
}

fn set_congestion(t: &mut TransportConfig, congestion: Congestion) {
    match congestion {
        Congestion::Cubic => t.congestion_controller_factory(Arc::new(CubicConfig::default())),
        Congestion::Bbr => t.congestion_controller_factory(Arc::new(BbrConfig::default())),
        Congestion::Newreno => t.congestion_controller_factory(Arc::new(NewRenoConfig::default())),
    };
}

/// The UDP socket of an endpoint, bound to `addr`, with receive and send buffers of
/// `buffer_bytes` requested (`Windows::socket_buffer`). Returns the socket and the (receive,
/// send) sizes the kernel granted.
pub fn bind_udp(addr: SocketAddr, buffer_bytes: u64) -> std::io::Result<(UdpSocket, usize, usize)> {
    let socket = UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    let want = usize::try_from(buffer_bytes).unwrap_or(usize::MAX);
    // A refusal here is not fatal: the kernel's default buffers work, only slower on a long
    // fat link. The sizes granted are reported either way.
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), want) {
        tracing::warn!(error = %e, bytes = want, "cannot set the UDP receive buffer size");
    }
    if let Err(e) = state.set_send_buffer_size((&socket).into(), want) {
        tracing::warn!(error = %e, bytes = want, "cannot set the UDP send buffer size");
    }
    let recv = state.recv_buffer_size((&socket).into()).unwrap_or(0);
    let send = state.send_buffer_size((&socket).into()).unwrap_or(0);
    Ok((socket, recv, send))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_bandwidth_delay_product() {
        // 1 Gbit/s × 50 ms = 6.25 MB; four times that for headroom.
        let w = Windows::for_link(1000, 50);
        assert_eq!(w.bdp, 6_250_000);
        assert_eq!(w.stream, 25_000_000);
        assert_eq!(w.connection, 25_000_000);
        assert_eq!(w.socket_buffer, 25_000_000);
        // 10 Gbit/s × 100 ms = 125 MB: 500 MB, under the ceiling.
        assert_eq!(Windows::for_link(10_000, 100).stream, 500_000_000);
        // A slow, short link gets quinn's default.
        assert_eq!(Windows::for_link(10, 1).stream, 1_250_000);
        // Tiny links get the floor, huge ones the ceiling.
        assert_eq!(Windows::for_link(1, 1).stream, MIN_WINDOW);
        assert_eq!(Windows::for_link(400_000, 10_000).stream, MAX_WINDOW);
        assert_eq!(Windows::for_link(u64::MAX, u64::MAX).connection, MAX_WINDOW);
    }

    #[test]
    fn udp_buffers_are_requested() {
        let w = Windows::for_link(100, 10);
        let (socket, recv, send) =
            bind_udp("127.0.0.1:0".parse().expect("addr"), w.socket_buffer).expect("bind loopback");
        assert!(socket.local_addr().expect("bound").port() > 0);
        // The kernel may cap the request at rmem_max, but never grants less than its default.
        assert!(recv > 0 && send > 0, "recv {recv} send {send}");
    }
}
