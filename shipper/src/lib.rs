//! ferry's shipper. One process per source node: for every duplication in `DS_LOG` and every
//! local partition whose shipping election it wins, it reads durable plog records after the
//! confirmed decree, packs them into zstd batches and streams them to the receiver over QUIC.
//!
//! The protocol logic without I/O (window, retry, lag) is `ferry_dup`'s. The process:
//! - [`config`]: the TOML file and flags.
//! - [`server`]: start-up and the reconcile loop (one task per shipped partition).
//! - [`resume`]: where a session starts (and where a new dup starts).
//! - [`task`]: a partition task: election, sessions by fail mode, progress to etcd.
//! - [`election`]: the per-(dup, partition) etcd election and its fencing token.
//! - [`session`]: one QUIC session with a receiver.
//! - [`tail`]: waking on the node's committed marker (inotify) and reading batches.
//! - [`quic`]: the endpoint and the shared connections (tuning and frame I/O are `ferry_net`'s).
//! - [`error`]: why a session could not find, reach or feed its receiver ([`ShipperError`]).
//! - [`status`], [`metrics`], [`http`]: what `/replica/duplication` and `/metrics` show.

pub mod checkpoint;
pub mod config;
pub mod election;
pub mod error;
pub mod http;
pub mod metrics;
pub mod quic;
pub mod rebootstrap;
pub mod resume;
pub mod server;
pub mod session;
pub mod status;
pub mod tail;
pub mod task;

pub use error::ShipperError;
