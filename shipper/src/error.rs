//! Why a session could not find, reach or feed its receiver. The session ends with the message
//! as a [`ferry_dup::ship::Failure::Transport`], and `/replica/duplication` shows it as the
//! partition's `last_error`, so each one says what failed and what to do. Config errors are
//! [`crate::config::ConfigError`].

use std::time::Duration;

/// A shipping session's error before or outside the protocol: the receiver lookup, the QUIC
/// connection, a frame send.
#[derive(Debug, thiserror::Error)]
pub enum ShipperError {
    /// The target table has no partitions placed yet (it is still being created).
    #[error("target table `{table}` has no partitions placed yet; retrying")]
    NoPartitions { table: String },
    /// A partition of the target table has no receiver registered.
    #[error(
        "target partition {partition} of table `{table}` has no receiver{}; start the receiver beside that node",
        on_node(node.as_deref())
    )]
    NoReceiver {
        table: String,
        partition: u32,
        /// The node the partition is placed on, if known.
        node: Option<String>,
    },
    /// The target table's partitions are served by more than one receiver, which this shipper
    /// does not support yet.
    #[error(
        "target table `{table}` is spread over receivers {first} and {second}; this shipper supports one receiver per target table for now, so place all its partitions on one node"
    )]
    SpreadReceivers {
        table: String,
        first: String,
        second: String,
    },
    /// The receiver's address does not resolve.
    #[error("cannot resolve receiver address {addr}: {source}; check the address the receiver advertises (receiver.advertise) and this host's DNS")]
    Resolve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The receiver's address resolves to IPv6 addresses only.
    #[error("receiver address {addr} has no IPv4 address; the shipper binds an IPv4 socket, so advertise the receiver at an IPv4 address (receiver.advertise)")]
    NoIpv4 { addr: String },
    /// The QUIC endpoint refused to start a connection.
    #[error("cannot connect to receiver {addr}: {source}; check the address the receiver advertises (receiver.advertise)")]
    Connect {
        addr: String,
        #[source]
        source: quinn::ConnectError,
    },
    /// The QUIC or TLS handshake failed.
    #[error("QUIC handshake with receiver {addr} failed: {source}; check that the receiver runs there and that both clusters' certificates come from the same `certs init`")]
    Handshake {
        addr: String,
        #[source]
        source: quinn::ConnectionError,
    },
    /// The receiver did not answer the handshake in time.
    #[error("receiver {addr} did not answer the QUIC handshake within {}s; check that the receiver runs there and that UDP to its port is open", timeout.as_secs())]
    HandshakeTimeout { addr: String, timeout: Duration },
    /// Writing a frame to the receiver failed.
    #[error(transparent)]
    Send(#[from] ferry_net::StreamError),
    /// The receiver's flow control kept a frame from being sent within the ack timeout.
    #[error("the receiver did not take more data within {timeout:?} (flow control stalled); check the receiver's disk and the link, or raise shipper.ack_timeout")]
    SendStalled { timeout: Duration },
}

/// ` (node n)`, or nothing when the node is not known.
fn on_node(node: Option<&str>) -> String {
    node.map(|n| format!(" (node {n})")).unwrap_or_default()
}
