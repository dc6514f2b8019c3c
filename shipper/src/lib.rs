//! ferry's shipper. One process per source node: for every duplication in `DS_LOG` and every
//! local partition whose shipping election it wins, it reads durable plog records after the
//! confirmed decree, packs them into zstd batches and streams them to the receiver over QUIC.
//!
//! - [`window`]: the in-flight window and acks, as a plain state machine without I/O.
//! - [`retry`]: what to do after a failure, by fail mode.

pub mod retry;
pub mod window;
