//! ferry's duplication protocol logic, without I/O: plain structs and functions fed with events
//! and the current time. The shipper and the receiver are tokio drivers around them.
//!
//! - [`ship`]: [`ship::ShipSession`], one shipping session (Hello/Welcome, the window of
//!   batches, small-batch hold, heartbeats, ack timeout, FAIL_SKIP stripping, lag).
//! - [`receive`]: the receiver's Hello checks, the fencing rule, and [`receive::ReceiveSession`]
//!   (gap refusal, merged appends, acks only after the append is durable).
//! - [`window`]: the in-flight window of batches and their acks.
//! - [`retry`]: what to do after a failure, by fail mode.
//! - [`lag`]: commit times in flight, lag, pending mutations, plog retention.
//! - [`route`]: splitting a batch by target partition.
//! - [`transfer`]: [`transfer::SendCheckpoint`], pushing a partition checkpoint's files over
//!   parallel streams (skip what the target holds, resume partial files, rate limit, progress).
//! - [`sim`]: a deterministic, seeded simulation of shippers and a receiver over faulty links,
//!   checking the shipping invariants after every step.

pub mod lag;
pub mod receive;
pub mod retry;
pub mod route;
pub mod ship;
pub mod sim;
pub mod transfer;
pub mod window;
