//! Frames on a QUIC stream: writing one, and reading a peer's in a task of their own.

use ferry_proto::wire::{self, Frame};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;

/// Why a stream carries no more frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Writing to the peer failed (the connection or the stream is gone).
    #[error("sending to the {peer} failed: {reason}")]
    Send { peer: &'static str, reason: String },
    /// Reading from the peer failed.
    #[error("reading from the {peer} failed: {reason}")]
    Read { peer: &'static str, reason: String },
    /// The peer finished its side of the stream.
    #[error("the {peer} closed the stream")]
    Closed { peer: &'static str },
    /// The peer sent bytes that are not a frame; the session cannot go on.
    #[error("the {peer} sent a frame that does not decode: {reason}")]
    Malformed { peer: &'static str, reason: String },
}

/// Writes one frame. `peer` names the other end in the error ("receiver").
pub async fn send_frame(
    send: &mut SendStream,
    frame: &Frame,
    peer: &'static str,
) -> Result<(), StreamError> {
    fail::fail_point!("frame-send", |_| {
        // As a reset stream looks to the sender.
        let _ = send.reset(quinn::VarInt::from_u32(0));
        Err(StreamError::Send {
            peer,
            reason: "injected by the frame-send failpoint".into(),
        })
    });
    let mut buf = Vec::new();
    wire::encode(frame, &mut buf);
    send.write_all(&buf).await.map_err(|e| StreamError::Send {
        peer,
        reason: e.to_string(),
    })
}

/// Decodes the peer's frames in a task of its own (so waiting for one is cancellation-safe),
/// and stops that task when dropped.
pub struct FrameReader {
    rx: mpsc::Receiver<Result<Frame, StreamError>>,
    task: tokio::task::JoinHandle<()>,
    peer: &'static str,
}

impl FrameReader {
    /// Starts reading `recv`. A frame that does not decode ends the stream with an error; it
    /// never panics.
    pub fn spawn(recv: RecvStream, peer: &'static str) -> FrameReader {
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(read_frames(recv, tx, peer));
        FrameReader { rx, task, peer }
    }

    /// The next frame, or why there is none. Cancellation-safe.
    pub async fn recv(&mut self) -> Result<Frame, StreamError> {
        match self.rx.recv().await {
            Some(r) => r,
            None => Err(StreamError::Closed { peer: self.peer }),
        }
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_frames(
    mut recv: RecvStream,
    tx: mpsc::Sender<Result<Frame, StreamError>>,
    peer: &'static str,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        loop {
            match wire::decode(&buf) {
                Ok((frame, used)) => {
                    buf.drain(..used);
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                Err(wire::WireError::Incomplete { .. }) => break,
                Err(e) => {
                    let reason = e.to_string();
                    let _ = tx.send(Err(StreamError::Malformed { peer, reason })).await;
                    return;
                }
            }
        }
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Ok(None) => {
                let _ = tx.send(Err(StreamError::Closed { peer })).await;
                return;
            }
            Err(e) => {
                let reason = e.to_string();
                let _ = tx.send(Err(StreamError::Read { peer, reason })).await;
                return;
            }
        }
    }
}
