//! The read pool: client reads that would touch the disk run on a few blocking threads, never
//! on the async workers, so a read that is slow (a large value, a block not in the cache, a
//! scan) delays only the connection that sent it, never another client's commands or the
//! node's lease keep-alive. (A read that the memtables and the block cache can answer is
//! answered on the spot by the connection: see [`crate::commands::execute_cached`].)
//!
//! A connection hands over a *batch*: the reads it has buffered in a row, answered in order. At
//! most [`ReadPool::slots`] batches run at once, queued fairly (first come, first served) behind
//! each other, and one connection has one batch running at a time. A batch stops after
//! [`BATCH_REPLY_BYTES`] of replies; the connection sends the rest as its next batch once those
//! replies are out, so one client's large values never pile up in memory.

use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt};
use redis_protocol::resp2::types::BytesFrame as Frame;
use tokio::sync::Semaphore;

use crate::commands::{self, Command};
use crate::Node;

/// Reply bytes a connection answers from memory, on its async worker, between two writes to
/// its socket; past them, reads go to the pool even when they are cached.
pub const INLINE_REPLY_BYTES: usize = 256 << 10;
/// Replies a batch produces before it hands the rest of its commands back.
pub const BATCH_REPLY_BYTES: usize = 4 << 20;
/// Most commands in one batch.
pub const MAX_BATCH: usize = 256;

/// The replies of a batch's first commands, and the commands it did not get to.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub frames: Vec<Frame>,
    pub rest: Vec<Command>,
}

/// Bounds how many read batches run at once, on tokio's blocking threads.
pub struct ReadPool {
    slots: Arc<Semaphore>,
    count: usize,
}

impl ReadPool {
    /// A pool of `slots` concurrent batches (at least 1).
    pub fn new(slots: usize) -> ReadPool {
        let count = slots.max(1);
        ReadPool {
            slots: Arc::new(Semaphore::new(count)),
            count,
        }
    }

    /// One batch per core, and at least two, so one slow batch never holds every slot.
    pub fn for_this_machine() -> ReadPool {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        ReadPool::new(cores.max(2))
    }

    pub fn slots(&self) -> usize {
        self.count
    }

    /// Runs `batch` once a slot is free; resolves to its replies, in order.
    pub fn run(&self, node: Arc<Node>, batch: Vec<Command>) -> BoxFuture<'static, Done> {
        let slots = self.slots.clone();
        async move {
            let Ok(permit) = slots.acquire_owned().await else {
                // Only a closed semaphore fails, and nothing closes it.
                return refuse(batch, "ERR internal error: the read pool is closed");
            };
            let n = batch.len();
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let _ = tx.send(execute(&node, batch));
            });
            // Should the thread panic, each command still gets an answer, so the replies stay
            // in step with the requests.
            rx.await.unwrap_or_else(|_| Done {
                frames: (0..n)
                    .map(|_| commands::error("ERR internal error: a read failed; retry it"))
                    .collect(),
                rest: Vec::new(),
            })
        }
        .boxed()
    }
}

/// Runs the commands in order until their replies pass [`BATCH_REPLY_BYTES`].
fn execute(node: &Node, batch: Vec<Command>) -> Done {
    let mut frames = Vec::with_capacity(batch.len());
    let mut bytes = 0usize;
    let mut it = batch.into_iter();
    for cmd in it.by_ref() {
        let frame = commands::execute(node, cmd);
        bytes += frame_bytes(&frame);
        frames.push(frame);
        if bytes >= BATCH_REPLY_BYTES {
            break;
        }
    }
    Done {
        frames,
        rest: it.collect(),
    }
}

fn refuse(batch: Vec<Command>, msg: &str) -> Done {
    Done {
        frames: batch.iter().map(|_| commands::error(msg)).collect(),
        rest: Vec::new(),
    }
}

/// About the bytes a reply takes on the wire.
pub fn frame_bytes(frame: &Frame) -> usize {
    match frame {
        Frame::BulkString(b) | Frame::SimpleString(b) => b.len() + 16,
        Frame::Error(e) => e.len() + 16,
        Frame::Array(items) => 16 + items.iter().map(frame_bytes).sum::<usize>(),
        Frame::Integer(_) | Frame::Null => 16,
    }
}
