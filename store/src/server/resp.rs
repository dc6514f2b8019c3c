//! The RESP client port: accepting connections and running each one.
//!
//! A connection reads every request already buffered, starts the writes among them at once (so
//! pipelined writes join the same group commits instead of waiting for each other's fsync),
//! and answers strictly in order. A read that follows unfinished writes of the same connection
//! waits for them (read-your-writes). Replies are flushed once per batch, not once per reply.
//!
//! Decoding is redis-protocol's; [`RequestCodec`] only bounds what a client may make the node
//! buffer, refuses nested arrays before they reach the recursive decoder, and accepts Redis's
//! inline commands (`PING\r\n` from telnet or nc).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{FuturesOrdered, StreamExt};
use redis_protocol::codec::Resp2;
use redis_protocol::resp2::types::BytesFrame as Frame;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::codec::{Decoder, Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::server::commands::{self, Class, Command};
use crate::server::Node;

/// Largest bulk string a client may send (Redis's `proto-max-bulk-len` is 512 MiB; ferry refuses
/// writes over 64 MiB anyway, see `MAX_RECORD_BODY`).
pub const MAX_BULK_BYTES: usize = 64 << 20;
/// Most arguments in one request (as Redis's limit for multibulk length).
pub const MAX_ARGS: usize = 1024 * 1024;
/// Largest request, all arguments together.
pub const MAX_REQUEST_BYTES: usize = 128 << 20;
/// Longest inline command line (as Redis's `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE_BYTES: usize = 64 << 10;
/// Commands of one connection in flight at once before it stops reading more.
const MAX_PENDING: usize = 1024;
/// Reply bytes a connection buffers before it stops reading more requests.
const MAX_OUTPUT_BYTES: usize = 16 << 20;
/// Past this many reply bytes, write what the socket takes now instead of waiting for the
/// batch to end (a long pipeline of reads would otherwise be answered in one burst at its end).
const EAGER_WRITE_BYTES: usize = 64 << 10;

/// Accepts clients until `shutdown` is cancelled; returns the connection tasks still running,
/// which finish their in-flight commands and close on their own once `shutdown` is cancelled.
/// Cancellation-safe: it stops between accepts.
pub async fn accept_loop(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: CancellationToken,
) -> JoinSet<()> {
    let limit = Arc::new(Semaphore::new(node.config.max_connections));
    let mut conns = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        // Reap finished connections so the set does not grow with every client ever seen.
        while conns.try_join_next().is_some() {}
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE/ENFILE: back off instead of spinning, and keep serving the
                // connections we have.
                tracing::warn!(error = %e, "accept failed; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                next_id += 1;
                let span = tracing::debug_span!("conn", id = next_id, %peer);
                let node = node.clone();
                let shutdown = shutdown.clone();
                conns.spawn(
                    async move {
                        node.metrics.connection_opened();
                        match Connection::new(socket, node.clone()).run(shutdown).await {
                            Ok(()) => tracing::debug!("closed"),
                            Err(e) => tracing::debug!(error = %e, "closed with an I/O error"),
                        }
                        node.metrics.connection_closed();
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(_) => {
                node.metrics.connection_rejected();
                tracing::warn!(%peer, max = node.config.max_connections, "refused a client: max_connections reached");
                conns.spawn(reject(socket));
            }
        }
    }
    conns
}

/// Tells a client over the connection limit why, then closes (bounded, so a client that does not
/// read cannot hold the task).
async fn reject(mut socket: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = socket
            .write_all(b"-ERR max number of clients reached\r\n")
            .await;
        let _ = socket.shutdown().await;
    })
    .await;
}

/// One client connection.
struct Connection {
    reader: FramedRead<tokio::net::tcp::OwnedReadHalf, RequestCodec>,
    writer: OwnedWriteHalf,
    node: Arc<Node>,
    encoder: Resp2,
    /// Encoded replies not yet written.
    out: BytesMut,
    /// Replies in request order: writes in flight, and answers queued behind them.
    pending: FuturesOrdered<BoxFuture<'static, Frame>>,
    /// A read waiting for the writes before it to finish.
    stalled: Option<Command>,
    /// No more requests are read (QUIT, end of input, protocol error or shutdown); the
    /// connection closes once everything before is answered.
    closing: bool,
}

enum Event {
    Request(Option<Result<Vec<Bytes>, ProtocolError>>),
    Replied(Frame),
    Wrote(io::Result<usize>),
    Shutdown,
}

impl Connection {
    fn new(socket: TcpStream, node: Arc<Node>) -> Connection {
        let (rd, wr) = socket.into_split();
        Connection {
            reader: FramedRead::with_capacity(rd, RequestCodec::default(), 16 << 10),
            writer: wr,
            node,
            encoder: Resp2::default(),
            out: BytesMut::with_capacity(16 << 10),
            pending: FuturesOrdered::new(),
            stalled: None,
            closing: false,
        }
    }

    /// Serves the client until it quits or disconnects, or until `shutdown` is cancelled and the
    /// commands already started are answered. Cancelling the returned future drops in-flight
    /// replies (the writes themselves still complete in their partitions).
    async fn run(mut self, shutdown: CancellationToken) -> io::Result<()> {
        loop {
            if self.pending.is_empty() {
                if let Some(cmd) = self.stalled.take() {
                    let reply = commands::execute(&self.node, cmd);
                    self.reply(reply);
                }
            }
            if self.closing && self.pending.is_empty() && self.out.is_empty() {
                let _ = self.writer.shutdown().await;
                return Ok(());
            }
            if self.out.len() >= EAGER_WRITE_BYTES {
                match self.writer.try_write(&self.out) {
                    Ok(n) => self.out.advance(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            let reading = !self.closing
                && self.stalled.is_none()
                && self.pending.len() < MAX_PENDING
                && self.out.len() < MAX_OUTPUT_BYTES;
            let (reader, pending, writer, out) = (
                &mut self.reader,
                &mut self.pending,
                &mut self.writer,
                &self.out,
            );
            // Biased, in this order: take every buffered request first, then every finished
            // reply, and write only when neither is ready, so one write carries a whole batch.
            let event = tokio::select! {
                biased;
                req = reader.next(), if reading => Event::Request(req),
                Some(reply) = pending.next(), if !pending.is_empty() => Event::Replied(reply),
                n = writer.write(out), if !out.is_empty() => Event::Wrote(n),
                _ = shutdown.cancelled(), if !self.closing => Event::Shutdown,
            };
            match event {
                Event::Request(Some(Ok(args))) => self.request(args),
                Event::Request(Some(Err(e))) => {
                    // As Redis: answer the protocol error, then close.
                    self.reply(commands::error(format!("ERR Protocol error: {e}")));
                    self.closing = true;
                }
                // The client closed its side; still answer what it sent.
                Event::Request(None) => self.closing = true,
                Event::Replied(reply) => self.encode(reply),
                Event::Wrote(n) => match n? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    n => self.out.advance(n),
                },
                Event::Shutdown => self.closing = true,
            }
        }
    }

    fn request(&mut self, args: Vec<Bytes>) {
        let node = &self.node;
        node.metrics
            .command(args.first().and_then(|name| commands::spec_index(name)));
        let cmd = match commands::parse(&args, crate::clock::wall_ms()) {
            Ok(cmd) => cmd,
            Err(e) => return self.reply(e.to_frame()),
        };
        match cmd.class() {
            Class::Write => {
                let write = commands::start_write(node, cmd);
                self.pending.push_back(write);
            }
            Class::Read if !self.pending.is_empty() => self.stalled = Some(cmd),
            Class::Read | Class::Immediate => {
                let reply = commands::execute(node, cmd);
                self.reply(reply);
            }
            Class::Quit => {
                self.reply(commands::ok());
                self.closing = true;
            }
        }
    }

    /// Queues a reply that is ready now, behind any that are not.
    fn reply(&mut self, frame: Frame) {
        if self.pending.is_empty() {
            self.encode(frame);
        } else {
            self.pending
                .push_back(futures::future::ready(frame).boxed());
        }
    }

    fn encode(&mut self, frame: Frame) {
        if matches!(frame, Frame::Error(_)) {
            self.node.metrics.command_error();
        }
        if let Err(e) = self.encoder.encode(frame, &mut self.out) {
            // Only an internal bug could make a reply unencodable; tell the client rather than
            // desynchronising the stream.
            tracing::error!(error = %e, "cannot encode a reply");
            let _ = self.encoder.encode(
                commands::error("ERR internal error: reply could not be encoded"),
                &mut self.out,
            );
        }
    }
}

/// A request that breaks the protocol or its limits. The connection answers it and closes.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Invalid(String),
    #[error("reading from the client failed: {0}")]
    Io(#[from] io::Error),
}

fn invalid(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::Invalid(msg.into())
}

/// Splits the client's byte stream into requests (lists of arguments).
#[derive(Debug, Default)]
pub struct RequestCodec {
    /// Progress of the bounds check through a multibulk request not yet complete, so a large
    /// request arriving in many reads is checked in linear time.
    scan: Option<Scanned>,
}

#[derive(Debug, Clone, Copy)]
struct Scanned {
    args: usize,
    checked: usize,
    /// Bytes checked so far: the end of the last complete argument.
    offset: usize,
}

impl Decoder for RequestCodec {
    type Item = Vec<Bytes>;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        loop {
            let Some(&first) = src.first() else {
                return Ok(None);
            };
            if first != b'*' {
                match inline(src)? {
                    Some(args) if args.is_empty() => continue,
                    other => return Ok(other),
                }
            }
            match self.check_multibulk(src)? {
                Check::Incomplete => return Ok(None),
                // `*0` and `*-1` are empty requests, which Redis skips.
                Check::Empty(len) => {
                    src.advance(len);
                    continue;
                }
                Check::Complete => {}
            }
            self.scan = None;
            let frame = match redis_protocol::resp2::decode::decode_bytes_mut(src) {
                Ok(Some((frame, _, _))) => frame,
                Ok(None) => {
                    return Err(invalid("incomplete request after its length checks passed"))
                }
                Err(e) => return Err(invalid(e.details().to_string())),
            };
            let Frame::Array(items) = frame else {
                return Err(invalid("expected an array of bulk strings"));
            };
            let mut args = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Frame::BulkString(b) => args.push(b),
                    _ => return Err(invalid("expected '$'")),
                }
            }
            return Ok(Some(args));
        }
    }
}

enum Check {
    Incomplete,
    Empty(usize),
    Complete,
}

impl RequestCodec {
    /// Checks the shape and lengths of the multibulk request at the start of `src` without
    /// decoding it: `*N` then N bulk strings `$L`, each within the limits. Nested arrays are
    /// refused here, before they can reach the recursive decoder.
    fn check_multibulk(&mut self, src: &mut BytesMut) -> Result<Check, ProtocolError> {
        let mut s = match self.scan {
            Some(s) => s,
            None => {
                let Some((n, offset)) = length_line(src, 0)? else {
                    return Ok(Check::Incomplete);
                };
                if n <= 0 {
                    return Ok(Check::Empty(offset));
                }
                if n as u64 > MAX_ARGS as u64 {
                    return Err(invalid("invalid multibulk length"));
                }
                Scanned {
                    args: n as usize,
                    checked: 0,
                    offset,
                }
            }
        };
        while s.checked < s.args {
            match src.get(s.offset) {
                None => break,
                Some(b'$') => {}
                Some(&other) => {
                    return Err(invalid(format!(
                        "expected '$', got '{}'",
                        char::from(other).escape_default()
                    )))
                }
            }
            let Some((len, data)) = length_line(src, s.offset)? else {
                break;
            };
            if len < 0 || len as u64 > MAX_BULK_BYTES as u64 {
                return Err(invalid("invalid bulk length"));
            }
            let end = data + len as usize + 2;
            if end > MAX_REQUEST_BYTES {
                return Err(invalid(format!(
                    "request larger than {} MiB",
                    MAX_REQUEST_BYTES >> 20
                )));
            }
            if end > src.len() {
                // Make room for the whole argument at once rather than growing by doubling.
                src.reserve(end - src.len());
                break;
            }
            // The decoder skips the two bytes after the data without looking at them.
            if src.get(end - 2..end) != Some(&b"\r\n"[..]) {
                return Err(invalid("expected CRLF after a bulk string"));
            }
            s.checked += 1;
            s.offset = end;
        }
        self.scan = Some(s);
        Ok(if s.checked == s.args {
            Check::Complete
        } else {
            Check::Incomplete
        })
    }
}

/// Parses the `*N\r\n` or `$L\r\n` line at `at`: returns the number and the offset after the
/// line, or `None` if the line is not complete yet.
fn length_line(src: &[u8], at: usize) -> Result<Option<(i64, usize)>, ProtocolError> {
    // A length line is short; bound the search so garbage without CRLF is refused early.
    const MAX_LINE: usize = 24;
    let rest = src.get(at + 1..).unwrap_or_default();
    let window = rest.get(..MAX_LINE).unwrap_or(rest);
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if rest.len() >= MAX_LINE {
            Err(invalid("invalid length line"))
        } else {
            Ok(None)
        };
    };
    match rest.get(cr + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(invalid("invalid length line")),
    }
    let digits = window.get(..cr).unwrap_or_default();
    let n = commands::parse_int(digits).ok_or_else(|| invalid("invalid length"))?;
    Ok(Some((n, at + 1 + cr + 2)))
}

/// Splits an inline command (`SET a 1\r\n`) on whitespace. Returns `Some(vec![])` for a blank
/// line. Quotes are not interpreted; send RESP arrays for binary-safe arguments.
fn inline(src: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(nl) = src.iter().take(MAX_INLINE_BYTES).position(|&b| b == b'\n') else {
        return if src.len() >= MAX_INLINE_BYTES {
            Err(invalid("too big inline request"))
        } else {
            Ok(None)
        };
    };
    let line = src.split_to(nl + 1).freeze();
    let mut args = Vec::new();
    let mut start = None;
    for (i, b) in line.iter().enumerate() {
        match (b.is_ascii_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                args.push(line.slice(s..i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        args.push(line.slice(s..));
    }
    Ok(Some(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> (Vec<Vec<String>>, Option<String>) {
        let mut codec = RequestCodec::default();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(args)) => out.push(
                    args.iter()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect(),
                ),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }

    #[test]
    fn decodes_pipelined_requests() {
        let (reqs, err) = decode_all(
            b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$0\r\n\r\n*1\r\n$4\r\nPI",
        );
        assert_eq!(err, None);
        assert_eq!(reqs, vec![vec!["GET", "a"], vec!["SET", "b", ""]]);
    }

    #[test]
    fn decodes_byte_by_byte() {
        let input = b"*3\r\n$3\r\nSET\r\n$5\r\nhello\r\n$5\r\nworld\r\n";
        let mut codec = RequestCodec::default();
        let mut buf = BytesMut::new();
        let mut got = None;
        for (i, b) in input.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            match codec.decode(&mut buf).expect("valid prefix") {
                Some(args) => {
                    assert_eq!(i, input.len() - 1, "complete only at the last byte");
                    got = Some(args);
                }
                None => assert!(i < input.len() - 1),
            }
        }
        assert_eq!(got.expect("decoded").len(), 3);
        assert!(buf.is_empty());
    }

    #[test]
    fn inline_commands_and_blank_lines() {
        let (reqs, err) = decode_all(b"PING\r\n\r\nset  a   1\n*0\r\n*-1\r\nget a\r\n");
        assert_eq!(err, None);
        assert_eq!(
            reqs,
            vec![vec!["PING"], vec!["set", "a", "1"], vec!["get", "a"]]
        );
    }

    #[test]
    fn refuses_nested_arrays_and_bad_lengths() {
        for (input, want) in [
            (&b"*1\r\n*1\r\n$1\r\na\r\n"[..], "expected '$'"),
            (b"*2\r\n$1\r\na\r\n:1\r\n", "expected '$'"),
            (b"*99999999999\r\n", "invalid multibulk length"),
            (b"*1\r\n$-5\r\n", "invalid bulk length"),
            (b"*1\r\n$999999999999\r\n", "invalid bulk length"),
            (b"*x\r\n", "invalid length"),
            (b"*1\r\n$1\r\nab\r\n", "expected CRLF"),
            (
                b"*1234567890123456789012345678901234567890",
                "invalid length line",
            ),
        ] {
            let (_, err) = decode_all(input);
            let err = err.unwrap_or_else(|| panic!("{input:?} must be refused"));
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }

    #[test]
    fn deep_nesting_cannot_overflow_the_stack() {
        let input = b"*1\r\n".repeat(1_000_000);
        let (_, err) = decode_all(&input);
        assert!(err.is_some());
    }

    #[test]
    fn huge_inline_line_is_refused() {
        let input = vec![b'a'; MAX_INLINE_BYTES + 1];
        assert_eq!(
            decode_all(&input).1.as_deref(),
            Some("too big inline request")
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 1u64;
        let alphabet = b"*$:+-\r\n0123456789abc";
        for _ in 0..5_000 {
            let len = (seed % 40) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    alphabet[(seed >> 33) as usize % alphabet.len()]
                })
                .collect();
            let _ = decode_all(&input);
        }
    }
}
