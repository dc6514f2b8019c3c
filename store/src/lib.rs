//! ferry's storage engine and the `node` server.
//!
//! - [`partition`]: one RocksDB instance plus one plog, with group commit and last-writer-wins.
//! - [`plog`]: the partition's write-ahead log (segments, recovery, GC).
//! - [`engine`]: the RocksDB specifics (key layout, meta keys, tombstone filter).
//! - [`checkpoint`]: checkpoints with a verified manifest.
//! - [`inbox`]: duplicated writes received for a partition, written by the receiver, applied by the node.
//! - [`table`]: P partitions routed by the stable key hash.
//! - [`server`]: the `node` process (RESP, HTTP, config).

pub mod checkpoint;
pub mod clock;
pub mod engine;
pub mod error;
pub mod inbox;
pub mod partition;
pub mod plog;
pub mod server;
pub mod table;

pub use engine::Source;
pub use error::StoreError;
pub use partition::{
    ApplyReport, Expiry, Live, OpenReport, Partition, PartitionOptions, SetCond, WriteCmd,
    WriteOutcome,
};
pub use table::Table;
