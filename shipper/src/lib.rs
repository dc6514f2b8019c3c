//! ferry's shipper. One process per source node: for every duplication in `DS_LOG` and every
//! local partition whose shipping election it wins, it reads durable plog records after the
//! confirmed decree, packs them into zstd batches and streams them to the receiver over QUIC.
//!
//! Logic without I/O:
//! - [`window`]: the in-flight window and acks, as a plain state machine.
//! - [`retry`]: what to do after a failure, by fail mode.
//! - [`resume`]: where a session starts (and where a new dup starts).
//! - [`lag`]: commit times in flight, lag, pending mutations, plog retention.
//!
//! The process:
//! - [`config`]: the TOML file and flags.
//! - [`server`]: start-up and the reconcile loop (one task per shipped partition).
//! - [`task`]: a partition task: election, sessions by fail mode, progress to etcd.
//! - [`election`]: the per-(dup, partition) etcd election and its fencing token.
//! - [`session`]: one QUIC session with a receiver.
//! - [`tail`]: waking on the node's committed marker (inotify) and reading batches.
//! - [`quic`]: the endpoint, transport tuning, shared connections, frame reading.
//! - [`status`], [`metrics`], [`http`]: what `/replica/duplication` and `/metrics` show.

pub mod config;
pub mod election;
pub mod http;
pub mod lag;
pub mod metrics;
pub mod quic;
pub mod resume;
pub mod retry;
pub mod server;
pub mod session;
pub mod status;
pub mod tail;
pub mod task;
pub mod window;
