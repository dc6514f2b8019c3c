//! ferry's receiver. One process per target node: a QUIC server (ALPN `ferry/1`, mutual TLS)
//! that authenticates shippers, fences stale ones, splits each batch by target partition and
//! writes it durably into the node's inbox before acknowledging it.
//!
//! - [`config`]: the TOML file and the flags ([`ReceiverConfig`], [`ReceiverArgs`]).
//! - [`server`]: start-up, the endpoint, connections (authentication), shutdown.
//! - [`session`]: one stream = one (dup, source partition) session: Hello, Welcome, batches,
//!   acks.
//! - [`fence`]: fencing tokens (persisted) and exclusive ownership of each source's inboxes.
//! - [`error`]: [`ReceiverError`], why a shipper is refused.
//! - [`http`], [`metrics`]: `/health` and `/metrics`.
//!
//! Known limitation: a target table must have all its partitions on the receiver's node
//! (single-node targets); a `Hello` for a table spread over several nodes is refused with
//! `UNAVAILABLE`. Checkpoint transfer (`Chunk` streams) is not served yet.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fence;
pub mod http;
pub mod metrics;
pub mod server;
pub mod session;

pub use config::{Congestion, ReceiverArgs, ReceiverConfig, ReceiverSection};
pub use error::ReceiverError;
pub use server::{run, serve, Stage};
