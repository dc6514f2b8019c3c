//! ferry's log files: the plog a node writes and a shipper reads, and the inbox a receiver writes
//! and a node applies. No RocksDB: the shipper and the receiver link this crate, not the engine.
//!
//! - [`layout`]: where every shared file of a data dir is, in one place.
//! - [`plog`]: segment files of CRC-checked records, recovery (torn tails), the writer, the
//!   reader that any process can run, the committed marker, GC.
//! - [`nodelog`]: the node's commit log, one fsync per round for every partition's writes.
//! - [`inbox`]: the receiver's end of one source partition's inbox log.
//! - [`staging`]: the receiver's staging directory of an incoming checkpoint (full duplication).
//! - [`clock`]: wall-clock readings for commit times.
//! - [`watch`]: waking readers when a log's committed marker is written (inotify).

pub mod clock;
pub mod error;
pub mod inbox;
pub mod layout;
pub mod nodelog;
pub mod plog;
pub mod staging;
pub mod watch;

pub use error::LogError;
pub use layout::Layout;
