//! The RESP client port: accepting connections and running each one.
//!
//! A connection reads every request already buffered, starts the writes among them at once (so
//! pipelined writes join the same group commits instead of waiting for each other's fsync),
//! and answers strictly in order. A read that memory can answer (memtable, block cache) is
//! answered on the spot; the others, in a row, go to the read pool as one batch
//! ([`crate::reads`]), so the async workers never wait for the disk. A read that follows unfinished writes
//! of the same connection waits for them (read-your-writes). Replies are flushed once per
//! batch, not once per reply.
//!
//! Between MULTI and EXEC the connection only queues commands (answering `+QUEUED`, or the
//! error that will make EXEC answer `-EXECABORT`); EXEC hands the queue and the WATCHed
//! versions to [`commands::start_exec`], and its reply takes its place in order like a write's.
//!
//! Requests are framed by [`ferry_resp::RequestCodec`].

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ferry_resp::{ProtocolError, RequestCodec};
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{FuturesOrdered, StreamExt};
use redis_protocol::codec::{Resp2, Resp3};
use redis_protocol::resp2::types::BytesFrame as Frame;
use redis_protocol::resp3::types::BytesFrame as Frame3;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::commands::{self, Class, CmdError, Command, Reply};
use crate::Node;
use crate::{auth, reads};
use ferry_proto::limits::MAX_WRITE_BYTES;
use ferry_proto::Timetag;

/// Commands of one connection in flight at once before it stops reading more.
const MAX_PENDING: usize = 1024;
/// Reply bytes a connection buffers before it stops reading more requests.
const MAX_OUTPUT_BYTES: usize = 16 << 20;
/// Past this many reply bytes, write what the socket takes now instead of waiting for the
/// batch to end (a long pipeline of reads would otherwise be answered in one burst at its end).
const EAGER_WRITE_BYTES: usize = 64 << 10;
/// Most commands one transaction may queue. Its size is bounded too: the queued arguments,
/// counted with [`QUEUED_ARG_OVERHEAD`] each, may not pass the partition's write limit.
const MAX_QUEUED: usize = 1 << 16;
const QUEUED_ARG_OVERHEAD: usize = 16;

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
    /// Set by `HELLO 3`: replies go out in RESP3.
    resp3: Option<Resp3>,
    /// This connection's id, as HELLO answers it.
    id: u64,
    /// Encoded replies not yet written.
    out: BytesMut,
    /// Replies in request order: writes in flight, and answers queued behind them.
    pending: FuturesOrdered<BoxFuture<'static, Reply>>,
    /// A read waiting for the writes before it to finish.
    stalled: Option<Command>,
    /// Who the client authenticated as; `None` until it does, where passwords are set.
    user: Option<auth::User>,
    /// Reads buffered in a row, not handed to the read pool yet ([`crate::reads`]).
    reads: Vec<Command>,
    /// Reply bytes of reads answered from memory since the last write to the socket.
    inline_bytes: usize,
    /// No more requests are read (QUIT, end of input, protocol error or shutdown); the
    /// connection closes once everything before is answered.
    closing: bool,
    /// Between MULTI and EXEC: the commands queued so far.
    multi: Option<Transaction>,
    /// WATCHed keys and the version each had then (see [`commands::watch`]), until EXEC,
    /// DISCARD or UNWATCH.
    watched: BTreeMap<Bytes, Option<Timetag>>,
}

/// A transaction being queued, between MULTI and EXEC.
#[derive(Default)]
struct Transaction {
    queued: Vec<Command>,
    /// The queued arguments' bytes, counted as for [`MAX_QUEUED`].
    bytes: usize,
    /// A command was refused while queuing: EXEC answers `-EXECABORT` and runs nothing.
    aborted: bool,
}

/// Connection ids, as HELLO answers them.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

enum Event {
    Request(Option<Result<Vec<Bytes>, ProtocolError>>),
    Replied(Reply),
    Wrote(io::Result<usize>),
    Shutdown,
}

impl Connection {
    fn new(socket: TcpStream, node: Arc<Node>) -> Connection {
        let (rd, wr) = socket.into_split();
        let user = node.users.initial();
        Connection {
            reader: FramedRead::with_capacity(rd, RequestCodec::default(), 16 << 10),
            writer: wr,
            node,
            encoder: Resp2::default(),
            resp3: None,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            out: BytesMut::with_capacity(16 << 10),
            pending: FuturesOrdered::new(),
            stalled: None,
            user,
            reads: Vec::new(),
            inline_bytes: 0,
            closing: false,
            multi: None,
            watched: BTreeMap::new(),
        }
    }

    /// Serves the client until it quits or disconnects, or until `shutdown` is cancelled and the
    /// commands already started are answered. Cancelling the returned future drops in-flight
    /// replies (the writes themselves still complete in their partitions).
    async fn run(mut self, shutdown: CancellationToken) -> io::Result<()> {
        loop {
            if self.pending.is_empty() {
                if let Some(cmd) = self.stalled.take() {
                    self.dispatch(cmd);
                }
            }
            if !self.reads.is_empty() {
                // Every request already here joins the batch before it goes to the pool.
                match self
                    .reading()
                    .then(|| self.reader.next().now_or_never())
                    .flatten()
                {
                    Some(req) => {
                        self.on_request(req);
                        continue;
                    }
                    None => self.flush_reads(),
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
            let reading = self.reading();
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
                Event::Request(req) => self.on_request(req),
                Event::Replied(reply) => self.encode_reply(reply),
                Event::Wrote(n) => match n? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    n => {
                        self.out.advance(n);
                        self.inline_bytes = 0;
                    }
                },
                Event::Shutdown => self.closing = true,
            }
        }
    }

    /// Whether the connection takes more requests now.
    fn reading(&self) -> bool {
        !self.closing
            && self.stalled.is_none()
            && self.pending.len() < MAX_PENDING
            && self.out.len() < MAX_OUTPUT_BYTES
    }

    fn on_request(&mut self, req: Option<Result<Vec<Bytes>, ProtocolError>>) {
        match req {
            Some(Ok(args)) => self.request(args),
            Some(Err(e)) => {
                // As Redis: answer the protocol error, then close.
                self.reply(commands::error(format!("ERR Protocol error: {e}")));
                self.closing = true;
            }
            // The client closed its side; still answer what it sent.
            None => self.closing = true,
        }
    }

    /// Hands the batched reads to the read pool; their replies take their place in order.
    fn flush_reads(&mut self) {
        if self.reads.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.reads);
        let run = self.node.reads.run(self.node.clone(), batch);
        self.pending.push_back(run.map(Reply::Reads).boxed());
    }

    fn request(&mut self, args: Vec<Bytes>) {
        self.node
            .metrics
            .command(args.first().and_then(|name| commands::spec_index(name)));
        let parsed = commands::parse(&args, ferry_engine::clock::wall_ms())
            .and_then(|cmd| self.permitted(cmd, &args));
        if self.multi.is_some() {
            return self.queue(parsed, &args);
        }
        self.dispatch_parsed(parsed);
    }

    /// Refuses a command the connection's user may not run (see [`crate::auth`]).
    fn permitted(&self, cmd: Command, args: &[Bytes]) -> Result<Command, CmdError> {
        let denied = |frame: Frame| match frame {
            Frame::Error(line) => CmdError::Denied(line.to_string()),
            _ => CmdError::Denied("ERR internal error: a refusal without a message".into()),
        };
        match &self.user {
            None if !matches!(
                cmd,
                Command::Auth { .. } | Command::Hello { .. } | Command::Quit
            ) =>
            {
                Err(denied(auth::noauth()))
            }
            Some(user) if user.readonly && cmd.class() == Class::Write => Err(denied(
                auth::noperm(user, args.first().map_or(&b""[..], |n| &n[..])),
            )),
            _ => Ok(cmd),
        }
    }

    fn dispatch(&mut self, cmd: Command) {
        if let Command::ClientId = cmd {
            return self.reply(Frame::Integer(self.id as i64));
        }
        if let Command::Auth { user, password } = cmd {
            let reply = match self.node.users.check(user.as_ref(), &password) {
                Ok(user) => {
                    self.user = Some(user);
                    commands::ok()
                }
                Err(refusal) => refusal,
            };
            return self.reply(reply);
        }
        let class = cmd.class();
        // A read with nothing before it joins the batch for the read pool; PING and the like
        // too, so that they keep their place. HELLO and WATCH change the connection's state.
        let batched = self.pending.is_empty()
            && matches!(class, Class::Read | Class::Immediate)
            && !matches!(cmd, Command::Hello { .. } | Command::Watch(_));
        if batched {
            // Answered from memory on the spot while nothing waits before it, up to a budget
            // of reply bytes (a pipeline of large cached values goes to the pool too).
            if self.reads.is_empty() && self.inline_bytes < reads::INLINE_REPLY_BYTES {
                if let Some(frame) = commands::execute_cached(&self.node, &cmd) {
                    self.inline_bytes += reads::frame_bytes(&frame);
                    return self.reply(frame);
                }
            }
            self.reads.push(cmd);
            if self.reads.len() >= reads::MAX_BATCH {
                self.flush_reads();
            }
            return;
        }
        self.flush_reads();
        match class {
            Class::Write => {
                let write = commands::start_write(&self.node, cmd);
                self.pending.push_back(write.map(Reply::Frame).boxed());
            }
            Class::Read if !self.pending.is_empty() => self.stalled = Some(cmd),
            Class::Read | Class::Immediate => self.read(cmd),
            Class::Quit => {
                self.reply(commands::ok());
                self.closing = true;
            }
            Class::Transaction => self.transaction(cmd),
        }
    }

    /// Inside MULTI: queues the command, or refuses it (and EXEC will answer `-EXECABORT`).
    /// EXEC, DISCARD and QUIT run at once; a nested MULTI is refused without aborting.
    fn queue(&mut self, parsed: Result<Command, CmdError>, args: &[Bytes]) {
        let cmd = match parsed {
            Ok(cmd @ (Command::Exec | Command::Discard | Command::Quit)) => {
                return self.dispatch(cmd)
            }
            Ok(Command::Multi) => {
                return self.reply(commands::error("ERR MULTI calls can not be nested"))
            }
            other => other,
        };
        let Some(tx) = self.multi.as_mut() else {
            // Not reached: the caller checked that a transaction is open.
            return self.dispatch_parsed(cmd);
        };
        let name = args.first().map_or(&b""[..], |n| &n[..]);
        let bytes: usize = args.iter().map(|a| a.len() + QUEUED_ARG_OVERHEAD).sum();
        let checked = cmd.and_then(|cmd| {
            cmd.queueable(name)?;
            if tx.queued.len() >= MAX_QUEUED || tx.bytes.saturating_add(bytes) > MAX_WRITE_BYTES {
                return Err(CmdError::Unsupported(format!(
                    "the transaction is larger than ferry takes ({MAX_QUEUED} commands or {MAX_WRITE_BYTES} bytes); split it into smaller ones"
                )));
            }
            Ok(cmd)
        });
        let reply = match checked {
            Ok(cmd) => {
                tx.queued.push(cmd);
                tx.bytes += bytes;
                Frame::SimpleString(Bytes::from_static(b"QUEUED"))
            }
            Err(e) => {
                tx.aborted = true;
                e.to_frame()
            }
        };
        self.reply(reply);
    }

    /// Runs a parsed request outside a transaction, or answers its error.
    fn dispatch_parsed(&mut self, parsed: Result<Command, CmdError>) {
        match parsed {
            Ok(cmd) => self.dispatch(cmd),
            Err(e) => self.reply(e.to_frame()),
        }
    }

    /// MULTI, EXEC, DISCARD and UNWATCH.
    fn transaction(&mut self, cmd: Command) {
        let reply = match cmd {
            Command::Multi => {
                self.multi = Some(Transaction::default());
                commands::ok()
            }
            // EXEC ends the transaction and forgets the watches, whatever it answers (as in
            // Redis, an EXEC without MULTI leaves the watches).
            Command::Exec => match self.multi.take() {
                None => commands::error("ERR EXEC without MULTI"),
                Some(tx) => {
                    let watched = std::mem::take(&mut self.watched);
                    if tx.aborted {
                        commands::error(
                            "EXECABORT Transaction discarded because of previous errors.",
                        )
                    } else {
                        let watched = watched.into_iter().collect();
                        let exec = commands::start_exec(&self.node, watched, tx.queued);
                        self.pending.push_back(exec);
                        return;
                    }
                }
            },
            Command::Discard => match self.multi.take() {
                None => commands::error("ERR DISCARD without MULTI"),
                Some(_) => {
                    self.watched.clear();
                    commands::ok()
                }
            },
            Command::Unwatch => {
                self.watched.clear();
                commands::ok()
            }
            other => commands::error(format!(
                "ERR internal error: {other:?} is not a transaction command"
            )),
        };
        self.reply(reply);
    }

    /// Answers HELLO and WATCH, and cheap commands behind other replies (reads that touch the
    /// data go to the read pool in batches instead).
    fn read(&mut self, cmd: Command) {
        if let Command::Hello { proto, auth } = cmd {
            match auth {
                Some((user, password)) => match self.node.users.check(Some(&user), &password) {
                    Ok(user) => self.user = Some(user),
                    Err(refusal) => return self.reply(refusal),
                },
                None if self.user.is_none() => return self.reply(auth::noauth_hello()),
                None => {}
            }
            // Every earlier reply is out in the old protocol; this one and the rest in the new.
            let proto = proto.unwrap_or(if self.resp3.is_some() { 3 } else { 2 });
            self.resp3 = (proto == 3).then(|| Resp3::new(false));
            let reply = commands::hello(proto, self.id);
            return self.encode_as(reply, true);
        }
        if let Command::Watch(keys) = cmd {
            let reply = commands::watch(&self.node, &mut self.watched, keys);
            return self.reply(reply);
        }
        if matches!(cmd.class(), Class::Read) {
            // Not reached: a read behind other replies waits (`stalled`), then joins a batch.
            self.reads.push(cmd);
            return self.flush_reads();
        }
        let reply = commands::execute(&self.node, cmd);
        self.reply(reply);
    }

    /// Queues a reply that is ready now, behind any that are not.
    fn reply(&mut self, frame: Frame) {
        self.flush_reads();
        if self.pending.is_empty() {
            self.encode(frame);
        } else {
            self.pending
                .push_back(futures::future::ready(Reply::Frame(frame)).boxed());
        }
    }

    fn encode_reply(&mut self, reply: Reply) {
        match reply {
            Reply::Frame(frame) => self.encode(frame),
            Reply::Reads(done) => {
                for frame in done.frames {
                    self.encode(frame);
                }
                if !done.rest.is_empty() {
                    // The batch stopped at its reply budget: the rest runs next, before
                    // anything that came after it.
                    let run = self.node.reads.run(self.node.clone(), done.rest);
                    self.pending.push_front(run.map(Reply::Reads).boxed());
                }
            }
            Reply::NullArray if self.resp3.is_some() => self.encode(Frame::Null),
            Reply::NullArray => self.out.extend_from_slice(b"*-1\r\n"),
        }
    }

    fn encode(&mut self, frame: Frame) {
        self.encode_as(frame, false)
    }

    /// Encodes a reply in the connection's protocol; in RESP3, `as_map` sends a flat list of
    /// names and values as a map (HELLO's answer).
    fn encode_as(&mut self, frame: Frame, as_map: bool) {
        if matches!(frame, Frame::Error(_)) {
            self.node.metrics.command_error();
        }
        let encoded = match &mut self.resp3 {
            Some(codec) => codec
                .encode(resp3(frame, as_map), &mut self.out)
                .map_err(|e| e.to_string()),
            None => self
                .encoder
                .encode(frame, &mut self.out)
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = encoded {
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

/// A reply in RESP3: the same values, with HELLO's field list as a map.
fn resp3(frame: Frame, as_map: bool) -> Frame3 {
    match frame {
        Frame::SimpleString(data) => Frame3::SimpleString {
            data,
            attributes: None,
        },
        Frame::Error(data) => Frame3::SimpleError {
            data,
            attributes: None,
        },
        Frame::Integer(data) => Frame3::Number {
            data,
            attributes: None,
        },
        Frame::BulkString(data) => Frame3::BlobString {
            data,
            attributes: None,
        },
        Frame::Null => Frame3::Null,
        Frame::Array(items) if as_map => {
            let mut map = redis_protocol::resp3::types::FrameMap::default();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                map.insert(resp3(k, false), resp3(v, false));
            }
            Frame3::Map {
                data: map,
                attributes: None,
            }
        }
        Frame::Array(items) => Frame3::Array {
            data: items.into_iter().map(|f| resp3(f, false)).collect(),
            attributes: None,
        },
    }
}
