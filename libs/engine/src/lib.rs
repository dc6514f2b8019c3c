//! ferry's storage engine, the only crate that links RocksDB.
//!
//! - [`partition`]: one RocksDB instance plus one plog, with group commit and last-writer-wins.
//! - [`engine`]: the RocksDB specifics (key layout, meta keys, tombstone filter).
//! - [`checkpoint`]: checkpoints with a verified manifest.
//! - [`install`]: a follower partition built from the source's checkpoints (full duplication).
//! - [`inbox`]: applying the duplicated writes a receiver made durable in an inbox.
//! - [`table`]: P partitions routed by the stable key hash.
//! - [`clock`]: the hybrid clock that stamps writes.
//!
//! The plog and inbox files themselves are [`ferry_log`]'s, which the shipper and the receiver
//! use without RocksDB.

pub mod checkpoint;
pub mod clock;
pub mod engine;
pub mod error;
pub mod inbox;
pub mod install;
pub mod partition;
pub mod table;

pub use error::StoreError;
pub use ferry_proto::Source;
pub use partition::{
    ApplyReport, Expiry, Live, OpenReport, Partition, PartitionOptions, SetCond, WriteCmd,
    WriteOutcome,
};
pub use table::Table;
