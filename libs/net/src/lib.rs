//! ferry's QUIC plumbing, shared by the shipper (client) and the receiver (server):
//!
//! - [`transport`]: windows and UDP socket buffers sized to the link, the congestion controller.
//! - [`frames`]: writing a frame to a stream and reading a peer's frames.

pub mod frames;
pub mod transport;

pub use frames::{send_frame, FrameReader, StreamError};
pub use transport::{Congestion, Windows};
