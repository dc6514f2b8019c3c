//! `ferry proxy -t T`: a small RESP proxy that sends each command to the table's current
//! primary, so that applications keep one address across a failover (as Pegasus's meta-proxy
//! in front of its clusters). See `docs/proxy.md`.
//!
//! Three parts:
//!
//! - **Following** ([`Router`]): one task per listed cluster follows that cluster's table key in
//!   the cluster's own etcd (a watch, a re-read every [`POLL`] anyway, and one on demand) and
//!   reads the table's state, its partition table and the nodes' client addresses. The
//!   *primary* is the first listed cluster whose table is `available` (a two-way dup has
//!   several); while none is, as during a failover's fence, the first that is `read_only`,
//!   whose nodes serve reads and refuse writes with their own retryable error. A cluster whose
//!   etcd cannot be read keeps its last state, as the nodes do. Each change of primary is logged.
//! - **Routing** ([`route`], no I/O): a command goes to the primary's node that hosts its key's
//!   partition ([`ferry_proto::partition_of`], the nodes' hash); a keyless command goes to the
//!   node of partition 0; a command whose keys live on several nodes is refused.
//! - **Relaying** ([`Connection`]): a client connection takes every request already buffered (a
//!   pipeline), sends them over one connection per node, to all its nodes at once, and answers
//!   in request order. A reply saying that the table is demoted, a node that cannot be reached,
//!   or no primary at all makes it re-read the clusters and send those commands once more if
//!   their node changed: a refused write was not applied, so sending it again is safe. Otherwise
//!   the client gets the error, a `TRYAGAIN` it retries as it would against a node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::{Bytes, BytesMut};
use futures::future::{join_all, FutureExt};
use futures::StreamExt;
use redis_protocol::codec::Resp2;
use redis_protocol::resp2::types::BytesFrame as Frame;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use ferry_meta::{list_nodes, MetaError, MetaStore, TableState};
use ferry_resp::RequestCodec;

/// `ferry proxy ...`.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// The table.
    #[arg(long, short = 't')]
    pub table: String,
    /// Where clients connect (RESP).
    #[arg(long, default_value = "127.0.0.1:6390")]
    pub listen: SocketAddr,
    /// A cluster that holds the table, and its etcd: `NAME=ENDPOINT[,ENDPOINT...]`. Give every
    /// cluster; when more than one takes writes (a two-way dup), the first listed gets them.
    #[arg(long = "cluster", required = true, value_name = "NAME=ENDPOINTS", value_parser = parse_cluster)]
    pub clusters: Vec<ClusterArg>,
    /// The table's name on one cluster, where it is not `--table`: `NAME=TABLE`.
    #[arg(long = "table-on", value_name = "NAME=TABLE", value_parser = parse_table_on)]
    pub table_on: Vec<(String, String)>,
    /// Longest wait to connect to a node.
    #[arg(long, default_value = "3s", value_parser = humantime_serde::re::humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Longest wait for a node's replies to one pipeline; past it the node's connection is
    /// dropped and its commands answered with an error.
    #[arg(long, default_value = "30s", value_parser = humantime_serde::re::humantime::parse_duration)]
    pub reply_timeout: Duration,
    /// Deadline of one etcd request.
    #[arg(long, default_value = "3s", value_parser = humantime_serde::re::humantime::parse_duration)]
    pub etcd_timeout: Duration,
    /// Most client connections at once; more are refused.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
}

/// One `--cluster NAME=ENDPOINTS`.
#[derive(Debug, Clone)]
pub struct ClusterArg {
    /// The cluster's name (its etcd keys are under `/ferry/<name>/`).
    pub name: String,
    /// Its etcd endpoints.
    pub endpoints: Vec<String>,
}

fn parse_cluster(s: &str) -> Result<ClusterArg, String> {
    let (name, endpoints) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=ENDPOINTS, e.g. bj=http://127.0.0.1:2379"))?;
    let endpoints: Vec<String> = endpoints
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if name.trim().is_empty() || endpoints.is_empty() {
        return Err(format!(
            "`{s}` needs a cluster name and at least one etcd endpoint, e.g. bj=http://127.0.0.1:2379"
        ));
    }
    Ok(ClusterArg {
        name: name.trim().to_string(),
        endpoints,
    })
}

fn parse_table_on(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((c, t)) if !c.trim().is_empty() && !t.trim().is_empty() => {
            Ok((c.trim().to_string(), t.trim().to_string()))
        }
        _ => Err(format!("`{s}` is not NAME=TABLE, e.g. tj=users_tj")),
    }
}

/// How often every cluster is read again even without a change of its table key: partition
/// moves and node addresses are picked up this way.
const POLL: Duration = Duration::from_secs(2);
/// Requests of one client taken together (one pipeline) before their replies are written.
const MAX_BATCH: usize = 512;
/// Request bytes of one client taken together.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Shortest time between two reads of a cluster on demand.
const MIN_REREAD: Duration = Duration::from_millis(20);
/// How long a shutdown waits for connections to finish the commands they started.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs the proxy until SIGTERM or SIGINT.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    ferry_proc::init_tracing();
    let router = Arc::new(Router::connect(&args).await?);
    // Every cluster once, before the port opens: the first client already finds the primary.
    let errors: Vec<String> = join_all((0..router.sides.len()).map(|i| router.refresh_side(i)))
        .await
        .into_iter()
        .zip(&router.sides)
        .filter_map(|(r, side)| r.err().map(|e| format!("{}: {e}", side.name)))
        .collect();
    if errors.len() == router.sides.len() {
        bail!(
            "cannot read table `{}` from any cluster ({})",
            args.table,
            errors.join("; ")
        );
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| ferry_proc::listen_error("clients", "--listen", args.listen, &e))?;
    let local = listener.local_addr().unwrap_or(args.listen);
    println!(
        "proxy for table {} on {local}; primary: {}",
        args.table,
        router.view().describe_primary(&router.sides)
    );

    let cancel = CancellationToken::new();
    ferry_proc::watch_signals(cancel.clone(), "client commands in flight were cut off")
        .context("watch for signals")?;
    let mut followers = JoinSet::new();
    for i in 0..router.sides.len() {
        followers.spawn(router.clone().follow(i, cancel.clone()));
    }
    let settings = Settings {
        connect_timeout: args.connect_timeout,
        reply_timeout: args.reply_timeout,
    };
    let mut conns = accept_loop(
        listener,
        router,
        settings,
        args.max_connections,
        cancel.clone(),
    )
    .await;
    // Connections finish the pipeline they started, then close.
    if tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("some client connections did not finish within {DRAIN:?}; cut them off");
    }
    followers.shutdown().await;
    Ok(())
}

// ---- following the clusters --------------------------------------------------------------

/// One listed cluster.
struct Side {
    name: String,
    /// The table's name there.
    table: String,
    meta: MetaStore,
}

/// What the proxy knows of every cluster, and which is the primary. Connections read it through
/// a `watch` channel; [`Router::resolve`] reads the clusters again on demand.
struct Router {
    /// The table's name as clients know it (in messages).
    table: String,
    sides: Vec<Side>,
    view: watch::Sender<Arc<View>>,
    /// One on-demand read at a time: the connections that saw the same failure share it.
    resolving: tokio::sync::Mutex<()>,
}

/// One state of every cluster.
#[derive(Debug, Clone, Default)]
struct View {
    /// Bumped at every change.
    generation: u64,
    /// Per listed cluster, what the proxy knows of it.
    sides: Vec<SideView>,
    /// Index into `sides` of the cluster that gets the commands.
    primary: Option<usize>,
    /// The last `primary` that was not `None`.
    last_primary: Option<usize>,
}

/// What the proxy knows of one cluster.
#[derive(Debug, Clone, Default)]
struct SideView {
    /// The last good read; `None` until one succeeded.
    last: Option<Snapshot>,
    /// When the last read, good or not, started.
    read_at: Option<Instant>,
    /// The last read failed: `last` is older.
    failing: bool,
}

/// One cluster's table, as read.
#[derive(Debug, Clone)]
struct Snapshot {
    state: TableState,
    /// Per partition, the node that hosts it, if that node is registered.
    partitions: Vec<Option<Arc<NodeAddr>>>,
}

/// A node and its client address.
#[derive(Debug, PartialEq, Eq, Hash)]
struct NodeAddr {
    name: String,
    addr: String,
}

impl Router {
    async fn connect(args: &ProxyArgs) -> anyhow::Result<Router> {
        let mut sides: Vec<Side> = Vec::new();
        for c in &args.clusters {
            if sides.iter().any(|s| s.name == c.name) {
                bail!("cluster {} is given twice with --cluster", c.name);
            }
            let table = args
                .table_on
                .iter()
                .rev()
                .find(|(name, _)| *name == c.name)
                .map_or_else(|| args.table.clone(), |(_, t)| t.clone());
            let meta = MetaStore::connect(&c.endpoints, &c.name, args.etcd_timeout)
                .await
                .with_context(|| format!("connect to the etcd of cluster {}", c.name))?;
            sides.push(Side {
                name: c.name.clone(),
                table,
                meta,
            });
        }
        if let Some((name, _)) = args
            .table_on
            .iter()
            .find(|(name, _)| !sides.iter().any(|s| s.name == *name))
        {
            bail!("--table-on names cluster {name}, which no --cluster gives");
        }
        let view = View {
            sides: vec![SideView::default(); sides.len()],
            ..View::default()
        };
        Ok(Router {
            table: args.table.clone(),
            sides,
            view: watch::Sender::new(Arc::new(view)),
            resolving: tokio::sync::Mutex::new(()),
        })
    }

    fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// Follows cluster `i` until cancelled: reads it after each change of its table key (an
    /// etcd watch), every [`POLL`] anyway, and [`POLL`] after a failed read. Cancellation-safe.
    async fn follow(self: Arc<Router>, i: usize, cancel: CancellationToken) {
        let Some(side) = self.sides.get(i) else {
            return;
        };
        let key = side.meta.keys().table(&side.table);
        loop {
            let revision = self.refresh_side(i).await.ok();
            let wait = async {
                if let Some(revision) = revision {
                    if tokio::time::timeout(POLL, side.meta.wait_changed(&key, revision)).await
                        != Ok(false)
                    {
                        return;
                    }
                }
                tokio::time::sleep(POLL).await;
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wait => {}
            }
        }
    }

    /// Reads cluster `i` and publishes what it read; returns the table key's revision.
    async fn refresh_side(&self, i: usize) -> Result<i64, MetaError> {
        let Some(side) = self.sides.get(i) else {
            return Ok(0);
        };
        let read_at = Instant::now();
        let (snapshot, revision) = match read_side(side).await {
            Ok((s, r)) => (Some(s), Ok(r)),
            Err(e) => (None, Err(e)),
        };
        self.view.send_modify(|view| {
            let mut next = View::clone(view);
            next.generation += 1;
            let Some(slot) = next.sides.get_mut(i) else {
                return;
            };
            slot.read_at = Some(read_at);
            match (snapshot, &revision) {
                (Some(s), _) => {
                    if slot.failing {
                        tracing::info!(cluster = %side.name, "read the table's state again");
                    }
                    slot.last = Some(s);
                    slot.failing = false;
                }
                (None, Err(e)) if !slot.failing => {
                    tracing::warn!(cluster = %side.name, error = %e, "cannot read the table's state; its last known state stays in force");
                    slot.failing = true;
                }
                (None, _) => slot.failing = true,
            }
            next.primary = choose_primary(&next.sides);
            let name = |p: Option<usize>| {
                p.and_then(|p| self.sides.get(p))
                    .map_or("none", |s| s.name.as_str())
                    .to_string()
            };
            match next.primary {
                // Named from the last primary: a failover passes through a moment with none
                // (the old side demoted, the new one not yet promoted), which is not a switch.
                Some(p) if Some(p) != view.last_primary => {
                    let (from, to) = (name(view.last_primary), name(Some(p)));
                    tracing::info!(table = %self.table, %from, %to, "primary of {}: {from} → {to}", self.table);
                    next.last_primary = Some(p);
                }
                Some(p) if view.primary.is_none() => {
                    let to = name(Some(p));
                    tracing::info!(table = %self.table, %to, "primary of {}: {to} again", self.table);
                }
                None if view.primary.is_some() => {
                    let last = name(view.last_primary);
                    tracing::info!(table = %self.table, %last, "no cluster takes writes to {} now (the last primary was {last})", self.table);
                }
                _ => {}
            }
            *view = Arc::new(next);
        });
        revision
    }

    /// The view to route by after a failure seen at `seen_at`: each cluster is read again
    /// unless a read of it started after `seen_at` (or within [`MIN_REREAD`], so that clients
    /// retrying fast cannot flood etcd).
    async fn resolve(&self, seen_at: Instant) -> Arc<View> {
        let _one_at_a_time = self.resolving.lock().await;
        let view = self.view();
        let older: Vec<usize> = (0..self.sides.len())
            .filter(|&i| {
                view.sides
                    .get(i)
                    .and_then(|s| s.read_at)
                    .is_none_or(|at| at < seen_at && at.elapsed() >= MIN_REREAD)
            })
            .collect();
        if older.is_empty() {
            return view;
        }
        join_all(older.into_iter().map(|i| self.refresh_side(i))).await;
        self.view()
    }
}

/// One read of a cluster: the table's state and partitions, the nodes' addresses, and the
/// table key's revision (to watch from).
async fn read_side(side: &Side) -> Result<(Snapshot, i64), MetaError> {
    let (_, revision) = side.meta.table_at(&side.table).await?;
    let table = side.meta.describe_table(&side.table).await?;
    let nodes: HashMap<String, Arc<NodeAddr>> = list_nodes(&side.meta)
        .await?
        .into_iter()
        .map(|n| {
            let addr = Arc::new(NodeAddr {
                name: n.name.clone(),
                addr: n.resp_addr,
            });
            (n.name, addr)
        })
        .collect();
    let partitions = table
        .partitions
        .iter()
        .map(|p| {
            p.as_ref()
                .and_then(|e| e.node.as_ref())
                .and_then(|n| nodes.get(n).cloned())
        })
        .collect();
    Ok((
        Snapshot {
            state: table.info.state,
            partitions,
        },
        revision,
    ))
}

/// The first listed cluster that takes writes, preferring one read just now over one whose
/// etcd is away; if none takes writes, the first that is fenced (`read_only`: it serves reads,
/// and its nodes refuse writes with a retryable error).
fn choose_primary(sides: &[SideView]) -> Option<usize> {
    let rank = |s: &SideView| match (s.last.as_ref()?.state, s.failing) {
        (TableState::Available, false) => Some(0),
        (TableState::Available, true) => Some(1),
        (TableState::ReadOnly, false) => Some(2),
        (TableState::ReadOnly, true) => Some(3),
        (TableState::Demoted | TableState::Creating, _) => None,
    };
    sides
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((rank(s)?, i)))
        .min()
        .map(|(_, i)| i)
}

impl View {
    fn primary(&self) -> Option<(usize, &Snapshot)> {
        let p = self.primary?;
        Some((p, self.sides.get(p)?.last.as_ref()?))
    }

    /// Whether the primary has a partition on the node at `addr`.
    fn uses(&self, addr: &str) -> bool {
        self.primary().is_some_and(|(_, s)| {
            s.partitions
                .iter()
                .any(|n| n.as_ref().is_some_and(|n| n.addr == addr))
        })
    }

    /// `bj (node bj-0 at 127.0.0.1:6379)`, for the start-up line.
    fn describe_primary(&self, sides: &[Side]) -> String {
        let Some((p, s)) = self.primary() else {
            return "none (no cluster takes writes now)".into();
        };
        let mut nodes: Vec<String> = Vec::new();
        for n in s.partitions.iter().flatten() {
            let n = format!("{} at {}", n.name, n.addr);
            if !nodes.contains(&n) {
                nodes.push(n);
            }
        }
        let name = sides.get(p).map_or("?", |s| s.name.as_str());
        let state = match s.state {
            TableState::Available => "",
            _ => ", fenced",
        };
        match nodes.len() {
            0 => format!("{name} (no node registered yet{state})"),
            1 => format!("{name} (node {}{state})", nodes.join("")),
            _ => format!("{name} (nodes {}{state})", nodes.join(", ")),
        }
    }
}

// ---- routing -------------------------------------------------------------------------------

/// Where a command's keys are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keys {
    /// No key: it goes to the node of partition 0.
    None,
    /// The first argument.
    First,
    /// Every argument.
    All,
    /// Every other argument, from the first (MSET).
    Pairs,
    /// The whole table (SCAN, DBSIZE): only while one node hosts every partition.
    Table,
}

/// The commands nodes serve (`SPECS` in `node/src/commands.rs`), with where their keys are
/// and whether they write. QUIT is answered by the proxy.
const COMMANDS: &[(&str, Keys, bool)] = &[
    ("ping", Keys::None, false),
    ("echo", Keys::None, false),
    ("get", Keys::First, false),
    ("set", Keys::First, true),
    ("del", Keys::All, true),
    ("exists", Keys::All, false),
    ("mget", Keys::All, false),
    ("mset", Keys::Pairs, true),
    ("incr", Keys::First, true),
    ("incrby", Keys::First, true),
    ("decr", Keys::First, true),
    ("decrby", Keys::First, true),
    ("expire", Keys::First, true),
    ("pexpire", Keys::First, true),
    ("expireat", Keys::First, true),
    ("pexpireat", Keys::First, true),
    ("ttl", Keys::First, false),
    ("pttl", Keys::First, false),
    ("type", Keys::First, false),
    ("strlen", Keys::First, false),
    ("persist", Keys::First, true),
    ("scan", Keys::Table, false),
    ("dbsize", Keys::Table, false),
    ("info", Keys::None, false),
    ("select", Keys::None, false),
    ("command", Keys::None, false),
    ("config", Keys::None, false),
    ("client", Keys::None, false),
];

/// What to do with one command.
#[derive(Debug, Clone)]
enum Route {
    /// Send it to this node.
    Node(Arc<NodeAddr>),
    /// Answer it here. `again`: a retryable refusal that a fresher view may turn into a route.
    Answer { reply: Frame, again: bool },
}

impl Route {
    fn node(&self) -> Option<&Arc<NodeAddr>> {
        match self {
            Route::Node(n) => Some(n),
            Route::Answer { .. } => None,
        }
    }
}

/// Whether `args` writes (a command the proxy does not know counts as one).
fn writes(args: &[Bytes]) -> bool {
    spec(args).is_none_or(|(_, write)| write)
}

fn spec(args: &[Bytes]) -> Option<(Keys, bool)> {
    let name = args.first()?;
    COMMANDS
        .iter()
        .find(|(n, _, _)| n.as_bytes().eq_ignore_ascii_case(name))
        .map(|&(_, keys, write)| (keys, write))
}

/// Where `args` goes under `view`. `table` and `sides` only name things in errors.
fn route(view: &View, table: &str, sides: &[Side], args: &[Bytes]) -> Route {
    let answer = |msg: String| Route::Answer {
        reply: error(msg),
        again: false,
    };
    let Some(name) = args.first() else {
        return answer("ERR empty command".into());
    };
    let Some((keys, _)) = spec(args) else {
        return answer(refusal(name, args.get(1..).unwrap_or_default()));
    };
    let Some((p, snapshot)) = view.primary() else {
        return Route::Answer {
            reply: error(format!(
                "TRYAGAIN no cluster takes writes to `{table}` now (failover in progress?); retry in a few seconds"
            )),
            again: true,
        };
    };
    let cluster = sides.get(p).map_or("?", |s| s.name.as_str());
    let rest = args.get(1..).unwrap_or_default();
    let key_args: Vec<&Bytes> = match keys {
        Keys::None | Keys::Table => Vec::new(),
        Keys::First => rest.iter().take(1).collect(),
        Keys::All => rest.iter().collect(),
        Keys::Pairs => rest.iter().step_by(2).collect(),
    };
    let count = snapshot.partitions.len() as u32;
    let mut partitions: Vec<usize> = key_args
        .iter()
        .map(|k| ferry_proto::partition_of(k, count).0 as usize)
        .collect();
    if partitions.is_empty() {
        // A keyless command, or one without its key, which the node answers with its arity
        // error.
        partitions.push(0);
    }
    let mut node: Option<&Arc<NodeAddr>> = None;
    for &pid in &partitions {
        let Some(n) = snapshot.partitions.get(pid).and_then(Option::as_ref) else {
            return Route::Answer {
                reply: error(format!(
                    "TRYAGAIN partition {pid} of `{table}` on {cluster} has no node now; retry in a few seconds"
                )),
                again: true,
            };
        };
        match node {
            Some(first) if first.addr != n.addr => {
                return answer(format!(
                    "ERR the keys of this {} are on more than one node of `{table}` on {cluster} ({} and {}); send them in separate commands",
                    printable(name, 32).to_ascii_uppercase(),
                    first.name,
                    n.name
                ))
            }
            _ => node = Some(n),
        }
    }
    if keys == Keys::Table {
        if let Some(other) = snapshot
            .partitions
            .iter()
            .flatten()
            .find(|n| node.is_some_and(|first| first.addr != n.addr))
        {
            return answer(format!(
                "ERR {} through the proxy needs `{table}` on one node, and on {cluster} it is on several ({} among them); send it to each node",
                printable(name, 32).to_ascii_uppercase(),
                other.name
            ));
        }
    }
    match node {
        Some(n) => Route::Node(n.clone()),
        None => answer("ERR internal error: no partition for the command".into()),
    }
}

/// The answer to a command that nodes do not serve, in Redis's words where Redis has them.
fn refusal(name: &[u8], rest: &[Bytes]) -> String {
    let upper = printable(name, 128).to_ascii_uppercase();
    match upper.as_str() {
        "MULTI" | "EXEC" | "DISCARD" | "WATCH" | "UNWATCH" => format!(
            "ERR {upper} is not supported: ferry has no transactions; send the commands on their own"
        ),
        "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" | "UNSUBSCRIBE" | "PUNSUBSCRIBE"
        | "SUNSUBSCRIBE" | "PUBLISH" | "MONITOR" => {
            format!("ERR {upper} is not supported: ferry has no pub/sub")
        }
        "HELLO" => "NOPROTO ferry speaks RESP2 only; connect without HELLO".into(),
        _ => {
            let mut args = String::new();
            for a in rest.iter().take(16) {
                args.push('\'');
                args.push_str(&printable(a, 128));
                args.push_str("' ");
            }
            format!(
                "ERR unknown command '{}', with args beginning with: {args}",
                printable(name, 128)
            )
        }
    }
}

fn printable(b: &[u8], max: usize) -> String {
    String::from_utf8_lossy(b.get(..max).unwrap_or(b)).replace(['\r', '\n'], " ")
}

/// An error reply; CR and LF would break the framing, so they become spaces.
fn error(msg: impl Into<String>) -> Frame {
    let msg: String = msg.into();
    Frame::Error(msg.replace(['\r', '\n'], " ").into())
}

/// Whether a node's reply says that its table is demoted: another cluster may take the write.
fn demoted(reply: &Frame) -> bool {
    matches!(reply, Frame::Error(e) if e.starts_with("TRYAGAIN") && e.contains("is demoted"))
}

// ---- relaying ------------------------------------------------------------------------------

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
struct Settings {
    connect_timeout: Duration,
    reply_timeout: Duration,
}

/// Accepts clients until `cancel`; returns the connection tasks still running.
/// Cancellation-safe: it stops between accepts.
async fn accept_loop(
    listener: TcpListener,
    router: Arc<Router>,
    settings: Settings,
    max_connections: usize,
    cancel: CancellationToken,
) -> JoinSet<()> {
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut conns = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while conns.try_join_next().is_some() {}
        let (mut socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually out of file descriptors: back off, keep serving the clients we have.
                tracing::warn!(error = %e, "accept failed; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = max_connections, "refused a client: --max-connections reached");
            conns.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = socket
                        .write_all(b"-ERR max number of clients reached\r\n")
                        .await;
                })
                .await;
            });
            continue;
        };
        next_id += 1;
        let conn = Connection::new(socket, router.clone(), settings);
        let cancel = cancel.clone();
        conns.spawn(
            async move {
                match conn.run(cancel).await {
                    Ok(()) => tracing::debug!("closed"),
                    Err(e) => tracing::debug!(error = %e, "closed with an I/O error"),
                }
                drop(permit);
            }
            .instrument(tracing::debug_span!("client", id = next_id, %peer)),
        );
    }
    conns
}

/// One client connection, with its connections to the nodes.
struct Connection {
    reader: FramedRead<OwnedReadHalf, RequestCodec>,
    writer: OwnedWriteHalf,
    router: Arc<Router>,
    settings: Settings,
    /// One connection per node address, made when first needed.
    backends: HashMap<String, Backend>,
    /// The view generation `backends` was last pruned at.
    pruned_at: u64,
}

/// A connection to one node.
struct Backend {
    reader: FramedRead<OwnedReadHalf, Resp2>,
    writer: OwnedWriteHalf,
}

/// What became of one command sent to a node.
enum Outcome {
    /// The answer to pass back.
    Done(Frame),
    /// Not applied (or a read): it may be sent to a new route; otherwise this is the answer.
    Again(Frame),
}

impl Outcome {
    fn reply(self) -> Frame {
        match self {
            Outcome::Done(f) | Outcome::Again(f) => f,
        }
    }
}

impl Connection {
    fn new(socket: TcpStream, router: Arc<Router>, settings: Settings) -> Connection {
        let (rd, wr) = socket.into_split();
        Connection {
            reader: FramedRead::with_capacity(rd, RequestCodec::default(), 16 << 10),
            writer: wr,
            router,
            settings,
            backends: HashMap::new(),
            pruned_at: 0,
        }
    }

    /// Serves the client until it quits or disconnects, or until `cancel` (between pipelines).
    /// Cancelling the future itself drops the replies of the pipeline in flight.
    async fn run(mut self, cancel: CancellationToken) -> std::io::Result<()> {
        let mut encoder = Resp2::default();
        let mut out = BytesMut::new();
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = self.reader.next() => r,
            };
            // Every request already buffered, up to the bounds; the last reply closes.
            let mut batch: Vec<Vec<Bytes>> = Vec::new();
            let mut bytes = 0usize;
            let mut last: Option<Option<Frame>> = None;
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    None => last = Some(None),
                    Some(Err(e)) => {
                        last = Some(Some(error(format!("ERR Protocol error: {e}"))));
                    }
                    Some(Ok(args)) => {
                        if args
                            .first()
                            .is_some_and(|n| n.eq_ignore_ascii_case(b"quit"))
                        {
                            last = Some(Some(Frame::SimpleString(Bytes::from_static(b"OK"))));
                        } else {
                            bytes += args.iter().map(Bytes::len).sum::<usize>();
                            batch.push(args);
                        }
                    }
                }
                if last.is_none() && batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                    next = self.reader.next().now_or_never();
                }
            }
            let replies = self.execute(&batch).await;
            out.clear();
            let closing = last.is_some();
            for reply in replies.into_iter().chain(last.flatten()) {
                if let Err(e) = encoder.encode(reply, &mut out) {
                    tracing::error!(error = %e, "cannot encode a reply");
                    let _ = encoder.encode(
                        error("ERR internal error: reply could not be encoded"),
                        &mut out,
                    );
                }
            }
            self.writer.write_all(&out).await?;
            if closing {
                let _ = self.writer.shutdown().await;
                return Ok(());
            }
        }
    }

    /// Answers a pipeline, in order.
    async fn execute(&mut self, batch: &[Vec<Bytes>]) -> Vec<Frame> {
        let router = self.router.clone();
        let view = router.view();
        if view.generation != self.pruned_at {
            // Connections to nodes the primary no longer uses (after a switch) are closed.
            self.backends.retain(|addr, _| view.uses(addr));
            self.pruned_at = view.generation;
        }
        let routes: Vec<Route> = batch
            .iter()
            .map(|args| route(&view, &router.table, &router.sides, args))
            .collect();
        let mut outcomes = self.send(batch, routes.iter().cloned().enumerate()).await;
        let again: Vec<usize> = (0..batch.len())
            .filter(|&i| matches!(outcomes.get(i), Some(Some(Outcome::Again(_)))))
            .collect();
        if !again.is_empty() {
            let fresh = router.resolve(Instant::now()).await;
            let retries: Vec<(usize, Route)> = again
                .into_iter()
                .filter_map(|i| {
                    let new = route(&fresh, &router.table, &router.sides, batch.get(i)?);
                    let old = routes.get(i)?;
                    let moved = match (old.node(), new.node()) {
                        (_, None) => false,
                        (None, Some(_)) => true,
                        (Some(a), Some(b)) => a.addr != b.addr,
                    };
                    moved.then_some((i, new))
                })
                .collect();
            if !retries.is_empty() {
                tracing::debug!(commands = retries.len(), "sending again to the new route");
                for (i, outcome) in self.send(batch, retries).await.into_iter().enumerate() {
                    if let (Some(o), Some(slot)) = (outcome, outcomes.get_mut(i)) {
                        *slot = Some(o);
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.map_or_else(|| error("ERR internal error: no reply"), Outcome::reply))
            .collect()
    }

    /// Sends the routed commands (index into `batch`, route), to all their nodes at once;
    /// returns an outcome at each index sent.
    async fn send(
        &mut self,
        batch: &[Vec<Bytes>],
        routed: impl IntoIterator<Item = (usize, Route)>,
    ) -> Vec<Option<Outcome>> {
        let mut outcomes: Vec<Option<Outcome>> = (0..batch.len()).map(|_| None).collect();
        // Per node, in request order: each node answers its own commands in order.
        let mut groups: Vec<(Arc<NodeAddr>, Vec<usize>)> = Vec::new();
        for (i, route) in routed {
            match route {
                Route::Answer { reply, again } => {
                    if let Some(slot) = outcomes.get_mut(i) {
                        *slot = Some(if again {
                            Outcome::Again(reply)
                        } else {
                            Outcome::Done(reply)
                        });
                    }
                }
                Route::Node(node) => match groups.iter_mut().find(|(n, _)| n.addr == node.addr) {
                    Some((_, idx)) => idx.push(i),
                    None => groups.push((node, vec![i])),
                },
            }
        }
        let settings = self.settings;
        let exchanges = groups.into_iter().map(|(node, idx)| {
            let backend = self.backends.remove(&node.addr);
            let requests: Vec<&[Bytes]> = idx
                .iter()
                .filter_map(|&i| batch.get(i).map(Vec::as_slice))
                .collect();
            async move {
                let (backend, answers) = exchange(backend, &node, &requests, settings).await;
                (node, idx, backend, answers)
            }
        });
        for (node, idx, backend, answers) in join_all(exchanges).await {
            if let Some(b) = backend {
                self.backends.insert(node.addr.clone(), b);
            }
            for (i, outcome) in idx.into_iter().zip(answers) {
                if let Some(slot) = outcomes.get_mut(i) {
                    *slot = Some(outcome);
                }
            }
        }
        outcomes
    }
}

/// Sends `requests` to `node` (connecting first if `backend` is `None`) and reads their replies,
/// both at once so that neither side's buffers can fill and stall the other. Returns the
/// connection if it is still good, and one outcome per request.
async fn exchange(
    backend: Option<Backend>,
    node: &NodeAddr,
    requests: &[&[Bytes]],
    settings: Settings,
) -> (Option<Backend>, Vec<Outcome>) {
    let mut backend = match backend {
        Some(b) => b,
        None => match connect(node, settings.connect_timeout).await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(node = %node.name, addr = %node.addr, error = %e, "cannot connect to the node");
                let reply = error(format!(
                    "TRYAGAIN cannot reach node {} at {} ({e}); retry in a few seconds",
                    node.name, node.addr
                ));
                return (
                    None,
                    requests
                        .iter()
                        .map(|_| Outcome::Again(reply.clone()))
                        .collect(),
                );
            }
        },
    };
    let mut wire = BytesMut::new();
    let mut encoder = Resp2::default();
    for args in requests {
        let frame = Frame::Array(args.iter().cloned().map(Frame::BulkString).collect());
        if let Err(e) = encoder.encode(frame, &mut wire) {
            // Only a bug could make a request of bulk strings unencodable.
            tracing::error!(error = %e, "cannot encode a request");
        }
    }
    let mut replies: Vec<Frame> = Vec::with_capacity(requests.len());
    let result = {
        let Backend { reader, writer } = &mut backend;
        let write = async {
            writer.write_all(&wire).await?;
            Ok::<(), std::io::Error>(())
        };
        let read = async {
            while replies.len() < requests.len() {
                match reader.next().await {
                    Some(Ok(frame)) => replies.push(frame),
                    Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                    None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                }
            }
            Ok(())
        };
        tokio::time::timeout(settings.reply_timeout, async {
            tokio::try_join!(write, read)
        })
        .await
    };
    let failure = match result {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {:?}", settings.reply_timeout)),
    };
    let answered = replies.len();
    let mut outcomes: Vec<Outcome> = replies
        .into_iter()
        .map(|r| {
            if demoted(&r) {
                Outcome::Again(r)
            } else {
                Outcome::Done(r)
            }
        })
        .collect();
    let Some(failure) = failure else {
        return (Some(backend), outcomes);
    };
    tracing::debug!(node = %node.name, addr = %node.addr, error = %failure, "lost the connection to the node");
    for args in requests.iter().skip(answered) {
        outcomes.push(if writes(args) {
            // It may have been applied: sending it again could apply it twice.
            Outcome::Done(error(format!(
                "ERR the connection to node {} at {} broke before it answered ({failure}); the write may or may not have been applied",
                node.name, node.addr
            )))
        } else {
            Outcome::Again(error(format!(
                "TRYAGAIN the connection to node {} at {} broke before it answered ({failure}); retry in a few seconds",
                node.name, node.addr
            )))
        });
    }
    (None, outcomes)
}

async fn connect(node: &NodeAddr, timeout: Duration) -> std::io::Result<Backend> {
    let socket = tokio::time::timeout(timeout, TcpStream::connect(node.addr.as_str()))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            )
        })??;
    let _ = socket.set_nodelay(true);
    let (rd, wr) = socket.into_split();
    Ok(Backend {
        reader: FramedRead::new(rd, Resp2::default()),
        writer: wr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Option<Arc<NodeAddr>> {
        Some(Arc::new(NodeAddr {
            name: name.into(),
            addr: format!("{name}:6379"),
        }))
    }

    fn snapshot(state: TableState, partitions: Vec<Option<Arc<NodeAddr>>>) -> SideView {
        SideView {
            last: Some(Snapshot { state, partitions }),
            read_at: Some(Instant::now()),
            failing: false,
        }
    }

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn view(sides: Vec<SideView>) -> View {
        View {
            generation: 1,
            primary: choose_primary(&sides),
            last_primary: None,
            sides,
        }
    }

    fn reply(r: &Route) -> String {
        match r {
            Route::Answer {
                reply: Frame::Error(e),
                ..
            } => e.to_string(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn the_primary_is_the_first_available_then_the_first_fenced() {
        use TableState::*;
        let s = |state| snapshot(state, vec![node("a")]);
        assert_eq!(choose_primary(&[s(Demoted), s(Available)]), Some(1));
        assert_eq!(choose_primary(&[s(Available), s(Available)]), Some(0));
        assert_eq!(choose_primary(&[s(ReadOnly), s(Demoted)]), Some(0));
        assert_eq!(choose_primary(&[s(ReadOnly), s(Available)]), Some(1));
        assert_eq!(choose_primary(&[s(Demoted), s(Creating)]), None);
        assert_eq!(
            choose_primary(&[SideView::default(), s(Available)]),
            Some(1)
        );
        let mut stale = s(Available);
        stale.failing = true;
        assert_eq!(choose_primary(&[stale.clone(), s(Available)]), Some(1));
        assert_eq!(choose_primary(&[stale, s(Demoted)]), Some(0));
    }

    #[test]
    fn commands_go_to_their_keys_node() {
        let parts = vec![node("n0"), node("n1"), node("n0"), node("n1")];
        let v = view(vec![snapshot(TableState::Available, parts)]);
        let on = |s: &str| match route(&v, "users", &[], &args(s)) {
            Route::Node(n) => n.name.clone(),
            other => reply(&other),
        };
        for k in ["a", "b", "c", "key:1", "key:2"] {
            let p = ferry_proto::partition_of(k.as_bytes(), 4).0;
            let want = if p.is_multiple_of(2) { "n0" } else { "n1" };
            assert_eq!(on(&format!("SET {k} 1")), want);
            assert_eq!(on(&format!("get {k}")), want);
        }
        assert_eq!(on("PING"), "n0");
        assert_eq!(on("GET"), "n0");
        // Keys on both nodes.
        let (mut on0, mut on1) = (None, None);
        for i in 0..100 {
            let k = format!("k{i}");
            match ferry_proto::partition_of(k.as_bytes(), 4).0 % 2 {
                0 => on0 = Some(k),
                _ => on1 = Some(k),
            }
        }
        let (a, b) = (on0.unwrap_or_default(), on1.unwrap_or_default());
        assert!(on(&format!("MGET {a} {b}")).contains("more than one node"));
        assert!(
            on(&format!("MSET {a} {b}")).starts_with("n"),
            "values are not keys"
        );
        assert!(on(&format!("MSET {a} 1 {b} 2")).contains("more than one node"));
        assert!(on("DBSIZE").contains("on several"));
        assert!(on("MULTI").contains("no transactions"));
        assert!(on("LPUSH x 1").starts_with("ERR unknown command 'LPUSH'"));
    }

    #[test]
    fn without_a_primary_or_a_node_the_answer_is_retryable() {
        let v = view(vec![snapshot(TableState::Demoted, vec![node("n0")])]);
        let r = route(&v, "users", &[], &args("SET a 1"));
        assert!(matches!(r, Route::Answer { again: true, .. }));
        assert!(reply(&r).starts_with("TRYAGAIN no cluster takes writes to `users`"));
        let v = view(vec![snapshot(TableState::Available, vec![None])]);
        let r = route(&v, "users", &[], &args("SET a 1"));
        assert!(matches!(r, Route::Answer { again: true, .. }));
        assert!(reply(&r).starts_with("TRYAGAIN partition 0"));
        // Nothing a client sends makes routing panic.
        for s in ["", "\u{0}", "set", "mset a", "del", "scan 0"] {
            let _ = route(&v, "users", &[], &args(s));
        }
        let _ = route(&v, "users", &[], &[]);
    }

    #[test]
    fn only_demoted_refusals_move() {
        assert!(demoted(&error(
            "TRYAGAIN table `users` is demoted: another cluster serves its writes now"
        )));
        assert!(!demoted(&error(
            "TRYAGAIN table `users` is read-only (fenced, e.g. during failover)"
        )));
        assert!(!demoted(&Frame::BulkString(Bytes::from_static(
            b"TRYAGAIN is demoted"
        ))));
    }

    #[test]
    fn cluster_flags_parse() {
        let c = parse_cluster("bj=http://a:1, http://b:2").expect("valid");
        assert_eq!(c.name, "bj");
        assert_eq!(c.endpoints, vec!["http://a:1", "http://b:2"]);
        assert!(parse_cluster("bj").is_err());
        assert!(parse_cluster("bj=").is_err());
        assert!(parse_cluster("=http://a:1").is_err());
        assert_eq!(
            parse_table_on("tj=users2").expect("valid"),
            ("tj".into(), "users2".into())
        );
        assert!(parse_table_on("tj=").is_err());
    }

    /// A node on loopback that answers each request with `answer`; returns its address.
    async fn fake_node(
        answer: impl Fn(&[Bytes]) -> Frame + Send + Sync + 'static,
    ) -> std::io::Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = socket.into_split();
                    let mut requests = FramedRead::new(rd, RequestCodec::default());
                    while let Some(Ok(args)) = requests.next().await {
                        let mut out = BytesMut::new();
                        let _ = Resp2::default().encode(answer(&args), &mut out);
                        if wr.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(addr)
    }

    fn at(name: &str, addr: &str) -> Option<Arc<NodeAddr>> {
        Some(Arc::new(NodeAddr {
            name: name.into(),
            addr: addr.into(),
        }))
    }

    /// A proxy on loopback routing by `view` (no clusters to read: `resolve` keeps the view);
    /// returns its router and address.
    async fn proxy(view: View) -> std::io::Result<(Arc<Router>, String)> {
        let router = Arc::new(Router {
            table: "users".into(),
            sides: Vec::new(),
            view: watch::Sender::new(Arc::new(view)),
            resolving: tokio::sync::Mutex::new(()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let settings = Settings {
            connect_timeout: Duration::from_secs(1),
            reply_timeout: Duration::from_secs(5),
        };
        tokio::spawn(accept_loop(
            listener,
            router.clone(),
            settings,
            8,
            CancellationToken::new(),
        ));
        Ok((router, addr))
    }

    /// Sends `requests` in one write and reads as many replies.
    async fn pipeline(addr: &str, requests: &[&str]) -> anyhow::Result<Vec<Frame>> {
        let (rd, mut wr) = TcpStream::connect(addr).await?.into_split();
        let mut out = BytesMut::new();
        for r in requests {
            let frame = Frame::Array(args(r).into_iter().map(Frame::BulkString).collect());
            Resp2::default().encode(frame, &mut out)?;
        }
        wr.write_all(&out).await?;
        let mut replies = FramedRead::new(rd, Resp2::default());
        let mut got = Vec::new();
        while got.len() < requests.len() {
            match tokio::time::timeout(Duration::from_secs(10), replies.next()).await? {
                Some(frame) => got.push(frame?),
                None => bail!("the proxy closed after {} replies", got.len()),
            }
        }
        Ok(got)
    }

    fn ok() -> Frame {
        Frame::SimpleString(Bytes::from_static(b"OK"))
    }

    #[tokio::test]
    async fn writes_the_demoted_side_refuses_go_to_the_new_primary() -> anyhow::Result<()> {
        let taken = Arc::new(std::sync::Mutex::new(Vec::<Bytes>::new()));
        let to_b = taken.clone();
        let b = fake_node(move |args| {
            if let Some(key) = args.get(1) {
                to_b.lock().expect("not poisoned").push(key.clone());
            }
            ok()
        })
        .await?;
        let switch: Arc<std::sync::OnceLock<Arc<Router>>> = Arc::default();
        let (on_a, b_addr) = (switch.clone(), b.clone());
        // The old side: refuses writes as demoted and, at the first, the proxy learns of the
        // new primary (as its etcd watch would), after it routed the pipeline to this node.
        let a = fake_node(move |args| {
            if !args.first().is_some_and(|n| n.eq_ignore_ascii_case(b"set")) {
                return Frame::BulkString(Bytes::from_static(b"from a"));
            }
            if let Some(router) = on_a.get() {
                router.view.send_modify(|v| {
                    *v = Arc::new(view(vec![snapshot(
                        TableState::Available,
                        vec![at("b", &b_addr)],
                    )]))
                });
            }
            error("TRYAGAIN table `users` is demoted: another cluster serves its writes now")
        })
        .await?;
        let (router, addr) = proxy(view(vec![snapshot(
            TableState::Available,
            vec![at("a", &a)],
        )]))
        .await?;
        let _ = switch.set(router);
        let got = pipeline(&addr, &["SET k1 v", "GET k1", "SET k2 v", "PING"]).await?;
        assert_eq!(got.first(), Some(&ok()), "{got:?}");
        assert_eq!(got.get(2), Some(&ok()), "{got:?}");
        assert_eq!(got.len(), 4);
        assert_eq!(
            *taken.lock().expect("not poisoned"),
            vec![Bytes::from_static(b"k1"), Bytes::from_static(b"k2")]
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_node_that_cannot_be_reached_gets_a_retryable_error() -> anyhow::Result<()> {
        let gone = TcpListener::bind("127.0.0.1:0")
            .await?
            .local_addr()?
            .to_string();
        let (_router, addr) = proxy(view(vec![snapshot(
            TableState::Available,
            vec![at("a", &gone)],
        )]))
        .await?;
        let got = pipeline(&addr, &["SET k v", "QUIT"]).await?;
        match got.first() {
            Some(Frame::Error(e)) => {
                assert!(e.starts_with("TRYAGAIN cannot reach node a at"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(got.get(1), Some(&ok()));
        Ok(())
    }
}
