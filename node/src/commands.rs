//! The Redis commands a node understands: parsing (pure, no I/O) and execution against the table.
//!
//! A request is parsed into a [`Command`], which says by its [`Class`] how the connection must
//! schedule it: writes return a future that is already queued at its partition (so pipelined
//! writes share group commits), reads run inline once the connection's earlier writes are done,
//! and the rest are answered at once. Replies follow Redis's wording, so client libraries that
//! match on error prefixes behave as they do against Redis.
//!
//! Transactions: the connection queues the commands between MULTI and EXEC
//! ([`Command::queueable`]) and remembers WATCHed keys' versions ([`watch`]); [`start_exec`]
//! sends the whole transaction to its partition's writer as one request, which applies it as
//! one plog record (see `docs/architecture.md`, Transactions).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::{self, BoxFuture, Either, FutureExt};
use redis_protocol::resp2::types::BytesFrame as Frame;

use crate::scan::{glob_match, ScanPos};
use crate::Node;
use ferry_engine::error::StoreError;
use ferry_engine::partition::{Expiry, Partition, SetCond, TxCmd, WriteCmd, WriteOutcome};
use ferry_engine::table::Table;
use ferry_proto::Timetag;

/// What `COMMAND` reports about a command, in Redis's terms.
#[derive(Debug)]
pub struct Spec {
    /// Lowercase name.
    pub name: &'static str,
    /// Argument count including the name; negative means "at least".
    pub arity: i64,
    pub flags: &'static [&'static str],
    pub first_key: i64,
    pub last_key: i64,
    pub step: i64,
}

const fn spec(
    name: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
) -> Spec {
    Spec {
        name,
        arity,
        flags,
        first_key: keys.0,
        last_key: keys.1,
        step: keys.2,
    }
}

const W: &[&str] = &["write"];
const WD: &[&str] = &["write", "denyoom"];
const R: &[&str] = &["readonly", "fast"];
const RS: &[&str] = &["readonly"];
const F: &[&str] = &["fast"];
const TX: &[&str] = &["noscript", "loading", "stale", "fast"];
const NOKEYS: (i64, i64, i64) = (0, 0, 0);
const KEY1: (i64, i64, i64) = (1, 1, 1);
const KEYS: (i64, i64, i64) = (1, -1, 1);

/// Every command the node accepts. The index of a spec is its metrics slot.
pub static SPECS: &[Spec] = &[
    spec("ping", -1, F, NOKEYS),
    spec("echo", 2, F, NOKEYS),
    spec("get", 2, R, KEY1),
    spec("set", -3, WD, KEY1),
    spec("del", -2, W, KEYS),
    spec("exists", -2, R, KEYS),
    spec("mget", -2, R, KEYS),
    spec("mset", -3, WD, (1, -1, 2)),
    spec("incr", 2, WD, KEY1),
    spec("incrby", 3, WD, KEY1),
    spec("decr", 2, WD, KEY1),
    spec("decrby", 3, WD, KEY1),
    spec("expire", -3, W, KEY1),
    spec("pexpire", -3, W, KEY1),
    spec("expireat", -3, W, KEY1),
    spec("pexpireat", -3, W, KEY1),
    spec("ttl", 2, R, KEY1),
    spec("pttl", 2, R, KEY1),
    spec("type", 2, R, KEY1),
    spec("strlen", 2, R, KEY1),
    spec("persist", 2, W, KEY1),
    spec("setex", 4, WD, KEY1),
    spec("psetex", 4, WD, KEY1),
    spec("setnx", 3, WD, KEY1),
    spec("getset", 3, WD, KEY1),
    spec("unlink", -2, W, KEYS),
    spec("touch", -2, R, KEYS),
    spec("expiretime", 2, R, KEY1),
    spec("pexpiretime", 2, R, KEY1),
    spec("keys", 2, RS, NOKEYS),
    spec("time", 1, F, NOKEYS),
    spec("scan", -2, RS, NOKEYS),
    spec("dbsize", 1, RS, NOKEYS),
    spec("info", -1, &["loading", "stale"], NOKEYS),
    spec("quit", -1, F, NOKEYS),
    spec("select", 2, &["loading", "stale", "fast"], NOKEYS),
    spec("command", -1, &["loading", "stale"], NOKEYS),
    spec("config", -2, &["admin", "loading", "stale"], NOKEYS),
    spec("client", -2, &["loading", "stale"], NOKEYS),
    spec(
        "hello",
        -1,
        &["noscript", "loading", "stale", "fast"],
        NOKEYS,
    ),
    spec(
        "auth",
        -2,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        NOKEYS,
    ),
    spec("multi", 1, TX, NOKEYS),
    spec("exec", 1, &["noscript", "loading", "stale"], NOKEYS),
    spec("discard", 1, TX, NOKEYS),
    spec("watch", -2, TX, KEYS),
    spec("unwatch", 1, TX, NOKEYS),
];

/// The index in [`SPECS`] of a command name, any case.
pub fn spec_index(name: &[u8]) -> Option<usize> {
    SPECS
        .iter()
        .position(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ping(Option<Bytes>),
    Echo(Bytes),
    Get(Bytes),
    Set(SetArgs),
    Del(Vec<Bytes>),
    Exists(Vec<Bytes>),
    MGet(Vec<Bytes>),
    MSet(Vec<(Bytes, Bytes)>),
    /// INCR, INCRBY, DECR, DECRBY.
    IncrBy {
        key: Bytes,
        delta: i64,
    },
    /// EXPIRE and friends (`Some` absolute unix ms; a past time deletes) and PERSIST (`None`).
    Expire {
        key: Bytes,
        at_ms: Option<u64>,
    },
    Ttl {
        key: Bytes,
        millis: bool,
    },
    /// TYPE: "string" or "none".
    Type(Bytes),
    /// EXPIRETIME and PEXPIRETIME: the absolute expiry, in seconds or ms.
    ExpireTime {
        key: Bytes,
        millis: bool,
    },
    /// KEYS pattern: every live key that matches, from every partition.
    Keys(Bytes),
    Time,
    /// CLIENT ID: the connection answers it ([`crate::resp`]).
    ClientId,
    StrLen(Bytes),
    Scan {
        cursor: u64,
        pattern: Option<Bytes>,
        count: usize,
        only_strings: bool,
    },
    DbSize,
    /// Lowercase section names; empty for the default set.
    Info(Vec<String>),
    Quit,
    /// SELECT 0; other databases are refused while parsing.
    Select,
    /// `COMMAND` and its subcommands.
    CommandInfo(CommandSub),
    /// `CONFIG GET` patterns.
    ConfigGet(Vec<Bytes>),
    /// `CLIENT SETNAME`/`SETINFO`, accepted and ignored.
    ClientOk,
    /// `CLIENT GETNAME`.
    ClientGetName,
    /// `HELLO [2|3] [AUTH user pass] [SETNAME name]`: the protocol the connection answers in
    /// from here (the current one if not given), after authenticating if AUTH is given. The
    /// connection carries it out ([`crate::resp`]).
    Hello {
        proto: Option<u8>,
        auth: Option<(Bytes, Bytes)>,
    },
    /// `AUTH [user] password`: the connection carries it out ([`crate::auth`]).
    Auth {
        user: Option<Bytes>,
        password: Bytes,
    },
    /// MULTI, EXEC, DISCARD, UNWATCH: the connection carries them out ([`crate::resp`]).
    Multi,
    Exec,
    Discard,
    Unwatch,
    /// `WATCH key [key ...]`: the connection remembers each key's version ([`watch`]).
    Watch(Vec<Bytes>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetArgs {
    pub key: Bytes,
    pub value: Bytes,
    pub expiry: Expiry,
    pub cond: SetCond,
    pub get: bool,
    /// SETNX: answer 1 or 0, not OK or nil.
    pub integer_reply: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandSub {
    All,
    Count,
    Docs,
    List,
    Info(Vec<Bytes>),
}

/// How a connection schedules a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Answered without touching the data (PING, COMMAND, ...).
    Immediate,
    /// Reads the data: runs once the connection's earlier writes are acknowledged.
    Read,
    /// Goes through a partition's group commit.
    Write,
    /// QUIT: answer, then close after the earlier replies.
    Quit,
    /// MULTI, EXEC, DISCARD, UNWATCH: they change the connection's transaction state.
    Transaction,
}

impl Command {
    pub fn class(&self) -> Class {
        use Command::*;
        match self {
            Set(_) | Del(_) | MSet(_) | IncrBy { .. } | Expire { .. } => Class::Write,
            Get(_)
            | Exists(_)
            | MGet(_)
            | Ttl { .. }
            | Type(_)
            | StrLen(_)
            | ExpireTime { .. }
            | Keys(_)
            | Scan { .. }
            | DbSize
            | Info(_) => Class::Read,
            Quit => Class::Quit,
            Ping(_) | Echo(_) | Select | CommandInfo(_) | ConfigGet(_) | ClientOk
            | ClientGetName | ClientId | Time => Class::Immediate,
            // Like a read, after the earlier replies: the protocol changes between two of them.
            Hello { .. } => Class::Read,
            Auth { .. } => Class::Immediate,
            // A read of the keys' versions: it must see the connection's earlier writes.
            Watch(_) => Class::Read,
            Multi | Exec | Discard | Unwatch => Class::Transaction,
        }
    }

    /// The keys the command reads or writes (none for keyless commands).
    pub fn keys(&self) -> Vec<&Bytes> {
        use Command::*;
        match self {
            Get(key)
            | Type(key)
            | StrLen(key)
            | Ttl { key, .. }
            | ExpireTime { key, .. }
            | IncrBy { key, .. }
            | Expire { key, .. } => vec![key],
            Set(s) => vec![&s.key],
            Del(keys) | Exists(keys) | MGet(keys) | Watch(keys) => keys.iter().collect(),
            MSet(pairs) => pairs.iter().map(|(k, _)| k).collect(),
            _ => Vec::new(),
        }
    }

    /// Whether the command may be queued between MULTI and EXEC: the writes, the keyed reads,
    /// PING and ECHO. `name` is the command's name as the client sent it, for the error. (The
    /// connection carries out MULTI, EXEC, DISCARD and QUIT itself, also inside a transaction.)
    pub fn queueable(&self, name: &[u8]) -> Result<(), CmdError> {
        use Command::*;
        match self {
            Set(_)
            | Del(_)
            | MSet(_)
            | IncrBy { .. }
            | Expire { .. }
            | Get(_)
            | MGet(_)
            | Exists(_)
            | Ttl { .. }
            | Type(_)
            | StrLen(_)
            | Ping(_)
            | Echo(_) => Ok(()),
            Watch(_) => Err(CmdError::Unsupported(
                "WATCH inside MULTI is not allowed".into(),
            )),
            _ => Err(CmdError::Unsupported(format!(
                "ferry does not run {} inside a transaction; send it before MULTI or after EXEC",
                printable(name, 32).to_ascii_uppercase()
            ))),
        }
    }
}

/// A request the node refuses, with Redis's wording (without the leading `-`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdError {
    Empty,
    Unknown {
        name: String,
        args: String,
    },
    Arity(&'static str),
    Syntax,
    NotInteger,
    InvalidExpire(&'static str),
    InvalidCursor,
    DbOutOfRange,
    UnknownSubcommand {
        cmd: &'static str,
        sub: String,
    },
    /// A sentence saying what ferry does not support and what to do instead.
    Unsupported(String),
    /// HELLO with a protocol version other than 2 and 3.
    NoProto,
    /// A whole error line (`NOAUTH ...`, `NOPERM ...`): refused for who the client is.
    Denied(String),
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdError::Empty => f.write_str("ERR empty command"),
            CmdError::NoProto => f.write_str("NOPROTO unsupported protocol version"),
            CmdError::Unknown { name, args } => write!(
                f,
                "ERR unknown command '{name}', with args beginning with: {args}"
            ),
            CmdError::Arity(name) => {
                write!(f, "ERR wrong number of arguments for '{name}' command")
            }
            CmdError::Syntax => f.write_str("ERR syntax error"),
            CmdError::NotInteger => f.write_str("ERR value is not an integer or out of range"),
            CmdError::InvalidExpire(name) => {
                write!(f, "ERR invalid expire time in '{name}' command")
            }
            CmdError::InvalidCursor => f.write_str("ERR invalid cursor"),
            CmdError::DbOutOfRange => f.write_str("ERR DB index is out of range"),
            CmdError::UnknownSubcommand { cmd, sub } => {
                write!(
                    f,
                    "ERR unknown subcommand '{sub}'. Try {} HELP.",
                    cmd.to_ascii_uppercase()
                )
            }
            CmdError::Unsupported(sentence) => write!(f, "ERR {sentence}"),
            CmdError::Denied(line) => f.write_str(line),
        }
    }
}

impl CmdError {
    pub fn to_frame(&self) -> Frame {
        error(self.to_string())
    }
}

/// Default and largest SCAN COUNT: the work of one SCAN call stays bounded.
const SCAN_DEFAULT_COUNT: usize = 10;
const SCAN_MAX_COUNT: usize = 100_000;

/// HELLO's answer for protocol `proto` on connection `id`, as a flat list of field names and
/// values (a map in RESP3: see [`crate::resp`]).
pub fn hello(proto: u8, id: u64) -> Frame {
    let s = |v: &str| Frame::BulkString(Bytes::copy_from_slice(v.as_bytes()));
    Frame::Array(vec![
        s("server"),
        s("redis"),
        s("version"),
        // What INFO reports: the Redis version whose commands the node follows.
        s("7.2.0"),
        s("proto"),
        Frame::Integer(proto.into()),
        s("id"),
        Frame::Integer(id as i64),
        s("mode"),
        s("standalone"),
        s("role"),
        s("master"),
        s("modules"),
        Frame::Array(Vec::new()),
    ])
}

/// Parses a request (name and arguments). `now_ms` is the wall clock, for relative expiries.
pub fn parse(args: &[Bytes], now_ms: u64) -> Result<Command, CmdError> {
    let Some((name, rest)) = args.split_first() else {
        return Err(CmdError::Empty);
    };
    let Some(index) = spec_index(name) else {
        return Err(unknown(name, rest));
    };
    let Some(spec) = SPECS.get(index) else {
        return Err(unknown(name, rest));
    };
    let argc = args.len() as i64;
    if (spec.arity >= 0 && argc != spec.arity) || (spec.arity < 0 && argc < -spec.arity) {
        return Err(CmdError::Arity(spec.name));
    }
    let arg = |i: usize| rest.get(i).cloned().ok_or(CmdError::Arity(spec.name));
    Ok(match spec.name {
        "ping" => match rest {
            [] => Command::Ping(None),
            [msg] => Command::Ping(Some(msg.clone())),
            _ => return Err(CmdError::Arity("ping")),
        },
        "echo" => Command::Echo(arg(0)?),
        "get" => Command::Get(arg(0)?),
        "set" => Command::Set(parse_set(rest, now_ms)?),
        "setex" | "psetex" => {
            let n = int_arg(&arg(1)?)?;
            let ms = if spec.name == "setex" {
                n.checked_mul(1000)
            } else {
                Some(n)
            };
            let at = ms
                .filter(|ms| *ms > 0)
                .and_then(|ms| ms.checked_add(now_ms as i64))
                .ok_or(CmdError::InvalidExpire(spec.name))?;
            Command::Set(SetArgs {
                key: arg(0)?,
                value: arg(2)?,
                expiry: Expiry::At(at as u64),
                cond: SetCond::Always,
                get: false,
                integer_reply: false,
            })
        }
        "setnx" | "getset" => Command::Set(SetArgs {
            key: arg(0)?,
            value: arg(1)?,
            expiry: Expiry::Never,
            cond: if spec.name == "setnx" {
                SetCond::IfAbsent
            } else {
                SetCond::Always
            },
            get: spec.name == "getset",
            integer_reply: spec.name == "setnx",
        }),
        "del" | "unlink" => Command::Del(rest.to_vec()),
        "exists" | "touch" => Command::Exists(rest.to_vec()),
        "expiretime" | "pexpiretime" => Command::ExpireTime {
            key: arg(0)?,
            millis: spec.name == "pexpiretime",
        },
        "keys" => Command::Keys(arg(0)?),
        "time" => Command::Time,
        "mget" => Command::MGet(rest.to_vec()),
        "mset" => {
            if rest.len() % 2 != 0 {
                return Err(CmdError::Arity("mset"));
            }
            let pairs = rest.chunks_exact(2).filter_map(|kv| match kv {
                [k, v] => Some((k.clone(), v.clone())),
                _ => None,
            });
            Command::MSet(pairs.collect())
        }
        "incr" => Command::IncrBy {
            key: arg(0)?,
            delta: 1,
        },
        "decr" => Command::IncrBy {
            key: arg(0)?,
            delta: -1,
        },
        "incrby" => Command::IncrBy {
            key: arg(0)?,
            delta: int_arg(&arg(1)?)?,
        },
        "decrby" => {
            let delta = int_arg(&arg(1)?)?
                .checked_neg()
                .ok_or(CmdError::Unsupported("decrement would overflow".into()))?;
            Command::IncrBy {
                key: arg(0)?,
                delta,
            }
        }
        "expire" | "pexpire" | "expireat" | "pexpireat" => {
            if rest.len() > 2 {
                return Err(CmdError::Unsupported(format!(
                    "{} options NX, XX, GT and LT are not supported by ferry; check the TTL first if you need them",
                    spec.name.to_ascii_uppercase()
                )));
            }
            let n = int_arg(&arg(1)?)?;
            let in_ms = if spec.name.starts_with('p') {
                Some(n)
            } else {
                n.checked_mul(1000)
            };
            let relative = !spec.name.ends_with("at");
            let at = in_ms
                .and_then(|ms| {
                    if relative {
                        ms.checked_add(now_ms as i64)
                    } else {
                        Some(ms)
                    }
                })
                .ok_or(CmdError::InvalidExpire(spec.name))?;
            // A time at or before now deletes the key; clamp negative times to 0 (the past).
            Command::Expire {
                key: arg(0)?,
                at_ms: Some(at.max(0) as u64),
            }
        }
        "persist" => Command::Expire {
            key: arg(0)?,
            at_ms: None,
        },
        "type" => Command::Type(arg(0)?),
        "strlen" => Command::StrLen(arg(0)?),
        "ttl" => Command::Ttl {
            key: arg(0)?,
            millis: false,
        },
        "pttl" => Command::Ttl {
            key: arg(0)?,
            millis: true,
        },
        "scan" => parse_scan(rest)?,
        "dbsize" => Command::DbSize,
        "info" => Command::Info(
            rest.iter()
                .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase())
                .collect(),
        ),
        "quit" => Command::Quit,
        "select" => match int_arg(&arg(0)?)? {
            0 => Command::Select,
            _ => return Err(CmdError::DbOutOfRange),
        },
        "command" => Command::CommandInfo(parse_command_sub(rest)?),
        "config" => {
            let sub = arg(0)?;
            if sub.eq_ignore_ascii_case(b"get") {
                match rest.get(1..) {
                    Some(patterns) if !patterns.is_empty() => Command::ConfigGet(patterns.to_vec()),
                    _ => return Err(CmdError::Arity("config|get")),
                }
            } else if [&b"set"[..], b"rewrite", b"resetstat"]
                .iter()
                .any(|s| sub.eq_ignore_ascii_case(s))
            {
                return Err(CmdError::Unsupported(format!(
                    "CONFIG {} is not supported by ferry; change the node's TOML config and restart it",
                    String::from_utf8_lossy(&sub).to_ascii_uppercase()
                )));
            } else {
                return Err(subcommand("config", &sub));
            }
        }
        "hello" => {
            let protover = match rest.first() {
                None => None,
                Some(v) => match parse_int(v) {
                    Some(2) => Some(2),
                    Some(3) => Some(3),
                    Some(_) => return Err(CmdError::NoProto),
                    None => {
                        return Err(CmdError::Unsupported(
                            "Protocol version is not an integer or out of range".into(),
                        ))
                    }
                },
            };
            let mut opts = rest.iter().skip(1);
            let mut auth = None;
            while let Some(opt) = opts.next() {
                if opt.eq_ignore_ascii_case(b"setname") {
                    opts.next().ok_or(CmdError::Syntax)?;
                } else if opt.eq_ignore_ascii_case(b"auth") {
                    let user = opts.next().ok_or(CmdError::Syntax)?;
                    let pass = opts.next().ok_or(CmdError::Syntax)?;
                    auth = Some((user.clone(), pass.clone()));
                } else {
                    return Err(CmdError::Syntax);
                }
            }
            Command::Hello {
                proto: protover,
                auth,
            }
        }
        "auth" => match rest {
            [password] => Command::Auth {
                user: None,
                password: password.clone(),
            },
            [user, password] => Command::Auth {
                user: Some(user.clone()),
                password: password.clone(),
            },
            _ => return Err(CmdError::Syntax),
        },
        "multi" => Command::Multi,
        "exec" => Command::Exec,
        "discard" => Command::Discard,
        "unwatch" => Command::Unwatch,
        "watch" => Command::Watch(rest.to_vec()),
        "client" => {
            let sub = arg(0)?;
            if sub.eq_ignore_ascii_case(b"setname") || sub.eq_ignore_ascii_case(b"setinfo") {
                Command::ClientOk
            } else if sub.eq_ignore_ascii_case(b"getname") {
                Command::ClientGetName
            } else if sub.eq_ignore_ascii_case(b"id") {
                Command::ClientId
            } else {
                return Err(subcommand("client", &sub));
            }
        }
        _ => return Err(unknown(name, rest)),
    })
}

fn parse_set(rest: &[Bytes], now_ms: u64) -> Result<SetArgs, CmdError> {
    let [key, value, opts @ ..] = rest else {
        return Err(CmdError::Arity("set"));
    };
    let mut set = SetArgs {
        key: key.clone(),
        value: value.clone(),
        expiry: Expiry::Never,
        cond: SetCond::Always,
        get: false,
        integer_reply: false,
    };
    let mut expiry_given = false;
    let mut i = 0;
    while let Some(opt) = opts.get(i) {
        let is = |s: &[u8]| opt.eq_ignore_ascii_case(s);
        if is(b"NX") || is(b"XX") {
            if set.cond != SetCond::Always {
                return Err(CmdError::Syntax);
            }
            set.cond = if is(b"NX") {
                SetCond::IfAbsent
            } else {
                SetCond::IfPresent
            };
        } else if is(b"GET") {
            set.get = true;
        } else if is(b"KEEPTTL") {
            if expiry_given {
                return Err(CmdError::Syntax);
            }
            expiry_given = true;
            set.expiry = Expiry::Keep;
        } else if is(b"EX") || is(b"PX") || is(b"EXAT") || is(b"PXAT") {
            if expiry_given {
                return Err(CmdError::Syntax);
            }
            expiry_given = true;
            i += 1;
            let n = int_arg(opts.get(i).ok_or(CmdError::Syntax)?)?;
            if n <= 0 {
                return Err(CmdError::InvalidExpire("set"));
            }
            let ms = if is(b"EX") || is(b"EXAT") {
                n.checked_mul(1000)
            } else {
                Some(n)
            };
            let relative = is(b"EX") || is(b"PX");
            let at = ms
                .and_then(|ms| {
                    if relative {
                        ms.checked_add(now_ms as i64)
                    } else {
                        Some(ms)
                    }
                })
                .ok_or(CmdError::InvalidExpire("set"))?;
            set.expiry = Expiry::At(at as u64); // at > 0: n > 0 and now >= 0
        } else {
            return Err(CmdError::Syntax);
        }
        i += 1;
    }
    Ok(set)
}

fn parse_scan(rest: &[Bytes]) -> Result<Command, CmdError> {
    let [cursor, opts @ ..] = rest else {
        return Err(CmdError::Arity("scan"));
    };
    let cursor = std::str::from_utf8(cursor)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(CmdError::InvalidCursor)?;
    let (mut pattern, mut count, mut only_strings) = (None, SCAN_DEFAULT_COUNT, true);
    let mut pairs = opts.chunks(2);
    for pair in pairs.by_ref() {
        let [opt, value] = pair else {
            return Err(CmdError::Syntax);
        };
        if opt.eq_ignore_ascii_case(b"MATCH") {
            // `*` matches everything; skip the matcher for it, as Redis does.
            pattern = (value.as_ref() != b"*").then(|| value.clone());
        } else if opt.eq_ignore_ascii_case(b"COUNT") {
            let n = int_arg(value)?;
            if n < 1 {
                return Err(CmdError::Syntax);
            }
            count = (n as u64).min(SCAN_MAX_COUNT as u64) as usize;
        } else if opt.eq_ignore_ascii_case(b"TYPE") {
            // Every ferry value is a string.
            only_strings = value.eq_ignore_ascii_case(b"string");
        } else {
            return Err(CmdError::Syntax);
        }
    }
    Ok(Command::Scan {
        cursor,
        pattern,
        count,
        only_strings,
    })
}

fn parse_command_sub(rest: &[Bytes]) -> Result<CommandSub, CmdError> {
    let Some((sub, names)) = rest.split_first() else {
        return Ok(CommandSub::All);
    };
    let is = |s: &[u8]| sub.eq_ignore_ascii_case(s);
    if is(b"COUNT") {
        Ok(CommandSub::Count)
    } else if is(b"DOCS") {
        Ok(CommandSub::Docs)
    } else if is(b"LIST") {
        Ok(CommandSub::List)
    } else if is(b"INFO") {
        Ok(CommandSub::Info(names.to_vec()))
    } else {
        Err(subcommand("command", sub))
    }
}

pub use ferry_resp::parse_int;

fn int_arg(b: &[u8]) -> Result<i64, CmdError> {
    parse_int(b).ok_or(CmdError::NotInteger)
}

/// Redis's unknown-command error: the name and the first arguments, each quoted and cut short.
fn unknown(name: &[u8], rest: &[Bytes]) -> CmdError {
    let mut args = String::new();
    for a in rest.iter().take(16) {
        args.push('\'');
        args.push_str(&printable(a, 128));
        args.push_str("' ");
    }
    CmdError::Unknown {
        name: printable(name, 128),
        args,
    }
}

fn subcommand(cmd: &'static str, sub: &[u8]) -> CmdError {
    CmdError::UnknownSubcommand {
        cmd,
        sub: printable(sub, 128),
    }
}

/// Client bytes made safe for an error line: at most `max` bytes, no CR/LF.
fn printable(b: &[u8], max: usize) -> String {
    String::from_utf8_lossy(b.get(..max).unwrap_or(b)).replace(['\r', '\n'], " ")
}

// ---- execution -------------------------------------------------------------------------------

/// Answers an immediate or read command. Reads run synchronously: they are RocksDB point lookups
/// or bounded scans, cheaper than a hop to a blocking thread.
pub fn execute(node: &Node, cmd: Command) -> Frame {
    let table = &node.table;
    match cmd {
        Command::Ping(None) => simple("PONG"),
        Command::Ping(Some(msg)) | Command::Echo(msg) => Frame::BulkString(msg),
        Command::Get(key) => read_keys(table, &[key], Answer::Get),
        Command::MGet(keys) => read_keys(table, &keys, Answer::MGet),
        Command::Exists(keys) => read_keys(table, &keys, Answer::Exists),
        Command::Type(key) => read_keys(table, &[key], Answer::Type),
        Command::StrLen(key) => read_keys(table, &[key], Answer::StrLen),
        Command::Ttl { key, millis } => read_keys(table, &[key], Answer::Ttl { millis }),
        Command::ExpireTime { key, millis } => {
            read_keys(table, &[key], Answer::ExpireTime { millis })
        }
        Command::Keys(pattern) => keys(table, &pattern),
        Command::Time => {
            let us = ferry_engine::clock::wall_us();
            Frame::Array(vec![
                Frame::BulkString((us / 1_000_000).to_string().into()),
                Frame::BulkString((us % 1_000_000).to_string().into()),
            ])
        }
        // The connection answers CLIENT ID; reached only by a bug.
        Command::ClientId => error("ERR internal error: CLIENT ID outside a connection"),
        Command::Scan {
            cursor,
            pattern,
            count,
            only_strings,
        } => scan(node, cursor, pattern.as_deref(), count, only_strings),
        Command::DbSize => match db_size(table) {
            Ok(n) => Frame::Integer(i64::try_from(n).unwrap_or(i64::MAX)),
            Err(e) => read_error(&e),
        },
        Command::Info(sections) => Frame::BulkString(info(node, &sections).into()),
        Command::Quit | Command::Select | Command::ClientOk => ok(),
        Command::ClientGetName => Frame::Null,
        Command::Hello { proto, .. } => hello(proto.unwrap_or(2), 0),
        // The connection answers AUTH itself; reached only by a bug.
        Command::Auth { .. } => error("ERR internal error: AUTH outside a connection"),
        Command::CommandInfo(sub) => command_info(sub),
        Command::ConfigGet(patterns) => config_get(node, &patterns),
        Command::Set(_)
        | Command::Del(_)
        | Command::MSet(_)
        | Command::IncrBy { .. }
        | Command::Expire { .. } => error("ERR internal error: a write was executed as a read"),
        Command::Multi
        | Command::Exec
        | Command::Discard
        | Command::Unwatch
        | Command::Watch(_) => {
            error("ERR internal error: a transaction command was executed as a read")
        }
    }
}

/// Starts a write: it is queued at its partition(s) before this returns, so the order of
/// `start_write` calls is the order the partitions see (and pipelined writes to one key apply
/// in order). The future resolves to the reply once the write is durable and applied.
pub fn start_write(node: &Node, cmd: Command) -> BoxFuture<'static, Frame> {
    if let Some(refused) = node.write_block() {
        return Box::pin(future::ready(error(refused)));
    }
    let table = &node.table;
    match cmd {
        Command::MSet(pairs) => {
            let writes: Vec<_> = by_partition(table, pairs, |(k, _)| k)
                .into_iter()
                .map(|(p, pairs)| {
                    submit(
                        p,
                        WriteCmd::MSet {
                            pairs: pairs
                                .into_iter()
                                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                                .collect(),
                        },
                    )
                })
                .collect();
            async move {
                // Every partition's part must succeed for +OK; parts are not atomic together.
                for outcome in future::join_all(writes).await {
                    match outcome {
                        Ok(WriteOutcome::Done) => {}
                        Ok(other) => return unexpected(&other),
                        Err(e) => return write_error(&e),
                    }
                }
                ok()
            }
            .boxed()
        }
        Command::Del(keys) => {
            let writes: Vec<_> = by_partition(table, keys, |k| k)
                .into_iter()
                .map(|(p, keys)| {
                    submit(
                        p,
                        WriteCmd::Del {
                            keys: keys.iter().map(|k| k.to_vec()).collect(),
                        },
                    )
                })
                .collect();
            async move {
                let mut deleted = 0u64;
                for outcome in future::join_all(writes).await {
                    match outcome {
                        Ok(WriteOutcome::Deleted(n)) => deleted += n,
                        Ok(other) => return unexpected(&other),
                        Err(e) => return write_error(&e),
                    }
                }
                Frame::Integer(i64::try_from(deleted).unwrap_or(i64::MAX))
            }
            .boxed()
        }
        // One key, so one partition: SET, INCRBY and friends, EXPIRE and friends.
        single => {
            let Some(key) = single.keys().first().map(|k| (*k).clone()) else {
                return future::ready(execute(node, single)).boxed();
            };
            match write_cmd(single) {
                Ok((cmd, answer)) => write_one(table.partition_for(&key), cmd, answer),
                Err(other) => future::ready(execute(node, other)).boxed(),
            }
        }
    }
}

/// A reply as the connection sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Frame(Frame),
    /// The replies of a batch of reads from the read pool, in order.
    Reads(crate::reads::Done),
    /// RESP2's null array (`*-1`), which [`Frame`] cannot express: EXEC's answer when a watched
    /// key changed. RESP3 has a single null and sends that.
    NullArray,
}

/// WATCH: remembers in `watched` the version of each key not watched yet (a key watched again
/// keeps its first version, as in Redis), for [`start_exec`] to compare. The version is the
/// stored timetag, tombstones included, so any write since counts as a change, a duplicated
/// one too; a key that merely expired has not changed.
pub fn watch(
    node: &Node,
    watched: &mut BTreeMap<Bytes, Option<Timetag>>,
    keys: Vec<Bytes>,
) -> Frame {
    for key in keys {
        if watched.contains_key(&key) {
            continue;
        }
        if watched.len() >= MAX_WATCHED_KEYS {
            return error(format!(
                "ERR ferry watches at most {MAX_WATCHED_KEYS} keys per connection; UNWATCH, or watch fewer keys"
            ));
        }
        match node.table.partition_for(&key).version(&key) {
            Ok(version) => {
                watched.insert(key, version);
            }
            Err(e) => return read_error(&e),
        }
    }
    ok()
}

/// Most keys one connection may WATCH at once.
pub const MAX_WATCHED_KEYS: usize = 1 << 16;

/// EXEC: runs the `queued` commands as one transaction, if no `watched` key changed since it
/// was watched. Every key, watched or used, must be in one partition (`-CROSSSLOT` otherwise,
/// and nothing runs); the partition's writer then applies the whole transaction as one record,
/// so it is durable, applied and duplicated whole or not at all. Like [`start_write`], the
/// transaction is queued at its partition before this returns. The reply is the array of the
/// commands' replies, a command that fails on the data (INCR of a non-integer) answering its
/// error in its place while the others apply; or [`Reply::NullArray`] when a watched key
/// changed; or one error when the transaction as a whole is refused (a fenced table).
pub fn start_exec(
    node: &Node,
    watched: Vec<(Bytes, Option<Timetag>)>,
    queued: Vec<Command>,
) -> BoxFuture<'static, Reply> {
    let refuse = |frame: Frame| future::ready(Reply::Frame(frame)).boxed();
    let table = &node.table;
    let mut partition: Option<&Arc<Partition>> = None;
    let keys = watched
        .iter()
        .map(|(k, _)| k)
        .chain(queued.iter().flat_map(|c| c.keys()));
    for key in keys {
        let p = table.partition_for(key);
        match partition {
            Some(q) if q.id() != p.id() => {
                return refuse(error(
                    "CROSSSLOT Keys in request don't hash to the same slot",
                ))
            }
            _ => partition = Some(p),
        }
    }
    let Some(partition) = partition else {
        // Keyless (PING, ECHO) or empty: nothing to run in a partition.
        let replies = queued.into_iter().map(|c| execute(node, c)).collect();
        return refuse(Frame::Array(replies));
    };
    if queued.iter().any(|c| c.class() == Class::Write) {
        if let Some(refused) = node.write_block() {
            return refuse(error(refused));
        }
    }
    // Per queued command, its answer: made now (PING, ECHO) or from its outcome.
    let mut steps: Vec<Result<Answer, Frame>> = Vec::with_capacity(queued.len());
    let mut cmds = Vec::with_capacity(queued.len());
    for cmd in queued {
        match tx_cmd(cmd) {
            Ok((tx, answer)) => {
                cmds.push(tx);
                steps.push(Ok(answer));
            }
            Err(keyless) => steps.push(Err(execute(node, keyless))),
        }
    }
    let watched = watched.into_iter().map(|(k, v)| (k.to_vec(), v)).collect();
    let write = submit(partition, WriteCmd::Multi { watched, cmds });
    async move {
        let outcomes = match write.await {
            Ok(WriteOutcome::Multi(outcomes)) => outcomes,
            Ok(WriteOutcome::WatchChanged) => return Reply::NullArray,
            Ok(other) => return Reply::Frame(unexpected(&other)),
            Err(e) => return Reply::Frame(write_error(&e)),
        };
        let mut outcomes = outcomes.into_iter();
        let replies = steps
            .into_iter()
            .map(|step| match step {
                Err(now) => now,
                Ok(answer) => match outcomes.next() {
                    Some(outcome) => answer.reply(outcome),
                    None => error("ERR internal error: the transaction lost a command's outcome"),
                },
            })
            .collect();
        Reply::Frame(Frame::Array(replies))
    }
    .boxed()
}

/// How a command's reply is made from what the partition did or read.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Set {
        get: bool,
    },
    /// MSET.
    Done,
    /// DEL.
    Deleted,
    /// INCRBY and friends.
    Integer,
    /// EXPIRE and friends, PERSIST.
    Changed,
    Get,
    MGet,
    Exists,
    Type,
    StrLen,
    Ttl {
        millis: bool,
    },
    /// SETNX: 1 if it set the key, else 0.
    Applied,
    ExpireTime {
        millis: bool,
    },
}

impl Answer {
    fn reply(self, outcome: WriteOutcome) -> Frame {
        match (self, outcome) {
            (Answer::Set { get: true }, WriteOutcome::Set { old, .. }) => {
                old.map_or(Frame::Null, |v| Frame::BulkString(v.into()))
            }
            (Answer::Set { .. }, WriteOutcome::Set { applied: true, .. }) => ok(),
            (Answer::Set { .. }, WriteOutcome::Set { applied: false, .. }) => Frame::Null,
            (Answer::Applied, WriteOutcome::Set { applied, .. }) => Frame::Integer(applied.into()),
            (Answer::Done, WriteOutcome::Done) => ok(),
            (Answer::Deleted, WriteOutcome::Deleted(n)) => {
                Frame::Integer(i64::try_from(n).unwrap_or(i64::MAX))
            }
            (Answer::Integer, WriteOutcome::Integer(n)) => Frame::Integer(n),
            (Answer::Integer, WriteOutcome::NotInteger) => CmdError::NotInteger.to_frame(),
            (Answer::Integer, WriteOutcome::Overflow) => {
                error("ERR increment or decrement would overflow")
            }
            (Answer::Changed, WriteOutcome::Changed(changed)) => Frame::Integer(i64::from(changed)),
            (read, WriteOutcome::Values(values)) => read.read_reply(values),
            (_, other) => unexpected(&other),
        }
    }

    /// The reply of a keyed read, from each key's live value and expiry (unix ms, 0 for none).
    fn read_reply(self, values: Vec<Option<(Vec<u8>, u64)>>) -> Frame {
        match self {
            Answer::MGet => {
                return Frame::Array(
                    values
                        .into_iter()
                        .map(|v| v.map_or(Frame::Null, |(v, _)| Frame::BulkString(v.into())))
                        .collect(),
                )
            }
            Answer::Exists => {
                return Frame::Integer(values.iter().filter(|v| v.is_some()).count() as i64)
            }
            _ => {}
        }
        let first = values.into_iter().next().flatten();
        match self {
            Answer::Get => first.map_or(Frame::Null, |(v, _)| Frame::BulkString(v.into())),
            Answer::Type => simple(if first.is_some() { "string" } else { "none" }),
            Answer::StrLen => Frame::Integer(first.map_or(0, |(v, _)| v.len() as i64)),
            Answer::ExpireTime { millis } => match first {
                None => Frame::Integer(-2),
                Some((_, 0)) => Frame::Integer(-1),
                Some((_, at)) => {
                    let at = if millis { at } else { at / 1000 };
                    Frame::Integer(i64::try_from(at).unwrap_or(i64::MAX))
                }
            },
            Answer::Ttl { millis } => match first {
                None => Frame::Integer(-2),
                Some((_, 0)) => Frame::Integer(-1),
                Some((_, at)) => {
                    let left = at.saturating_sub(ferry_engine::clock::wall_ms());
                    let left = if millis {
                        left
                    } else {
                        left.saturating_add(500) / 1000
                    };
                    Frame::Integer(i64::try_from(left).unwrap_or(i64::MAX))
                }
            },
            _ => error("ERR internal error: a write was answered with values"),
        }
    }
}

/// A queued command as a transaction's partition runs it, with how to answer it; a keyless
/// command (PING, ECHO) comes back as it is.
fn tx_cmd(cmd: Command) -> Result<(TxCmd, Answer), Command> {
    let read = |keys: &[Bytes]| TxCmd::Read {
        keys: keys.iter().map(|k| k.to_vec()).collect(),
    };
    let cmd = match write_cmd(cmd) {
        Ok((write, answer)) => return Ok((TxCmd::Write(write), answer)),
        Err(cmd) => cmd,
    };
    Ok(match cmd {
        Command::Get(key) => (read(&[key]), Answer::Get),
        Command::MGet(keys) => (read(&keys), Answer::MGet),
        Command::Exists(keys) => (read(&keys), Answer::Exists),
        Command::Type(key) => (read(&[key]), Answer::Type),
        Command::StrLen(key) => (read(&[key]), Answer::StrLen),
        Command::Ttl { key, millis } => (read(&[key]), Answer::Ttl { millis }),
        other => return Err(other),
    })
}

/// A write command as its partition's writer runs it, with how to answer it; any other command
/// comes back as it is. (MSET and DEL outside a transaction are split by partition first.)
fn write_cmd(cmd: Command) -> Result<(WriteCmd, Answer), Command> {
    Ok(match cmd {
        Command::Set(s) if s.integer_reply => (set_cmd(s), Answer::Applied),
        Command::Set(s) => {
            let get = s.get;
            (set_cmd(s), Answer::Set { get })
        }
        Command::MSet(pairs) => (
            WriteCmd::MSet {
                pairs: pairs
                    .into_iter()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect(),
            },
            Answer::Done,
        ),
        Command::Del(keys) => (
            WriteCmd::Del {
                keys: keys.iter().map(|k| k.to_vec()).collect(),
            },
            Answer::Deleted,
        ),
        Command::IncrBy { key, delta } => (
            WriteCmd::IncrBy {
                key: key.to_vec(),
                delta,
            },
            Answer::Integer,
        ),
        Command::Expire { key, at_ms } => (
            WriteCmd::Expire {
                key: key.to_vec(),
                at_ms,
            },
            Answer::Changed,
        ),
        other => return Err(other),
    })
}

fn set_cmd(s: SetArgs) -> WriteCmd {
    WriteCmd::Set {
        key: s.key.to_vec(),
        value: s.value.to_vec(),
        expiry: s.expiry,
        cond: s.cond,
        get_old: s.get,
    }
}

/// A write to one partition, answered from its outcome.
fn write_one(
    partition: &Arc<Partition>,
    cmd: WriteCmd,
    answer: Answer,
) -> BoxFuture<'static, Frame> {
    let write = submit(partition, cmd);
    async move {
        match write.await {
            Ok(outcome) => answer.reply(outcome),
            Err(e) => write_error(&e),
        }
    }
    .boxed()
}

/// A keyed read outside a transaction: each key from its own partition.
fn read_keys(table: &Table, keys: &[Bytes], answer: Answer) -> Frame {
    let mut values = Vec::with_capacity(keys.len());
    for key in keys {
        match table.partition_for(key).get(key) {
            Ok(found) => values.push(found.map(|l| (l.value, l.expire_at_ms))),
            Err(e) => return read_error(&e),
        }
    }
    answer.read_reply(values)
}

/// The reply of a keyed read or a command that reads nothing, if it can be made from memory
/// alone (the memtables and the block cache): such a command is answered on the spot. `None`
/// for a command that would read the disk or scans, which goes to the read pool.
pub fn execute_cached(node: &Node, cmd: &Command) -> Option<Frame> {
    let (keys, answer) = match cmd {
        Command::Get(key) => (std::slice::from_ref(key), Answer::Get),
        Command::MGet(keys) => (&keys[..], Answer::MGet),
        Command::Exists(keys) => (&keys[..], Answer::Exists),
        Command::Type(key) => (std::slice::from_ref(key), Answer::Type),
        Command::StrLen(key) => (std::slice::from_ref(key), Answer::StrLen),
        Command::Ttl { key, millis } => {
            (std::slice::from_ref(key), Answer::Ttl { millis: *millis })
        }
        Command::ExpireTime { key, millis } => (
            std::slice::from_ref(key),
            Answer::ExpireTime { millis: *millis },
        ),
        cmd if cmd.class() == Class::Immediate => return Some(execute(node, cmd.clone())),
        _ => return None,
    };
    let mut values = Vec::with_capacity(keys.len());
    for key in keys {
        match node.table.partition_for(key).get_cached(key) {
            Ok(Some(found)) => values.push(found.map(|l| (l.value, l.expire_at_ms))),
            Ok(None) => return None,
            Err(e) => return Some(read_error(&e)),
        }
    }
    Some(answer.read_reply(values))
}

/// Sends a write to its partition now (by polling the write future once) and returns the rest
/// of it. `Partition::write` queues on its first poll when the queue has room, and otherwise
/// waits in the queue's fair (FIFO) line; either way a later `submit` cannot overtake it.
/// Unconstrained: tokio's cooperative budget must not make that first poll a no-op.
fn submit(
    partition: &Arc<Partition>,
    cmd: WriteCmd,
) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send + 'static {
    let partition = Arc::clone(partition);
    let mut write = Box::pin(tokio::task::unconstrained(async move {
        partition.write(cmd).await
    }));
    // A no-op waker is enough: the caller polls the returned future again (with its own waker)
    // before it waits, so no wake-up is lost.
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    match write.as_mut().poll(&mut cx) {
        Poll::Ready(done) => Either::Left(future::ready(done)),
        Poll::Pending => Either::Right(write as Pin<Box<_>>),
    }
}

/// Groups items by the partition of their key, keeping their order within a partition.
fn by_partition<'t, T>(
    table: &'t Table,
    items: Vec<T>,
    key: impl Fn(&T) -> &Bytes,
) -> Vec<(&'t Arc<Partition>, Vec<T>)> {
    let mut groups: BTreeMap<u32, (&'t Arc<Partition>, Vec<T>)> = BTreeMap::new();
    for item in items {
        let p = table.partition_for(key(&item));
        groups
            .entry(p.id().0)
            .or_insert_with(|| (p, Vec::new()))
            .1
            .push(item);
    }
    groups.into_values().collect()
}

fn scan(
    node: &Node,
    cursor: u64,
    pattern: Option<&[u8]>,
    count: usize,
    only_strings: bool,
) -> Frame {
    let Some(mut pos) = node.cursors.position(cursor) else {
        return CmdError::InvalidCursor.to_frame();
    };
    let partitions = node.table.partitions();
    let mut keys = Vec::new();
    let mut budget = count;
    while let Some(partition) = partitions.get(pos.partition as usize) {
        let page = match partition.scan(pos.after.as_deref(), budget) {
            Ok(page) => page,
            Err(e) => return read_error(&e),
        };
        let examined = page.keys.len();
        keys.extend(
            page.keys
                .into_iter()
                .filter(|k| only_strings && pattern.is_none_or(|p| glob_match(p, k, false)))
                .map(|k| Frame::BulkString(k.into())),
        );
        match page.next_after {
            // The partition has more: the budget is spent.
            Some(after) => {
                pos.after = Some(after);
                break;
            }
            None => {
                pos = ScanPos {
                    partition: pos.partition + 1,
                    after: None,
                };
                budget = budget.saturating_sub(examined);
                if budget == 0 {
                    break;
                }
            }
        }
    }
    let next = if pos.partition as usize >= partitions.len() {
        0
    } else {
        node.cursors.insert(pos)
    };
    Frame::Array(vec![
        Frame::BulkString(next.to_string().into()),
        Frame::Array(keys),
    ])
}

/// KEYS: every partition scanned whole (it runs on the read pool, as SCAN does).
fn keys(table: &Table, pattern: &[u8]) -> Frame {
    let mut out = Vec::new();
    for p in table.partitions() {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = match p.scan(after.as_deref(), 1024) {
                Ok(page) => page,
                Err(e) => return read_error(&e),
            };
            out.extend(
                page.keys
                    .into_iter()
                    .filter(|k| crate::scan::glob_match(pattern, k, false))
                    .map(|k| Frame::BulkString(k.into())),
            );
            match page.next_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    Frame::Array(out)
}

fn db_size(table: &Table) -> Result<u64, StoreError> {
    let mut n = 0;
    for p in table.partitions() {
        n += p.count_live()?;
    }
    Ok(n)
}

/// Whether INFO with `sections` includes `section`.
fn info_wants(sections: &[String], section: &str) -> bool {
    sections.is_empty()
        || sections
            .iter()
            .any(|s| s == "all" || s == "everything" || s == "default" || s == section)
}

fn info(node: &Node, sections: &[String]) -> String {
    let wants = |s: &str| info_wants(sections, s);
    let mut out = String::new();
    let table = &node.table;
    let config = &node.config;
    if wants("server") {
        let uptime = node.started.elapsed().as_secs();
        out += "# Server\r\n";
        out += "redis_version:7.2.0\r\n";
        out += &format!("ferry_version:{}\r\n", env!("CARGO_PKG_VERSION"));
        out += "redis_mode:standalone\r\n";
        out += &format!("os:{} {}\r\n", std::env::consts::OS, std::env::consts::ARCH);
        out += &format!("process_id:{}\r\n", std::process::id());
        out += &format!("tcp_port:{}\r\n", node.resp_addr.port());
        out += &format!(
            "uptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\n",
            uptime / 86_400
        );
        out += &format!("cluster_name:{}\r\n", config.cluster);
        out += &format!("cluster_id:{}\r\n", config.cluster_id.unwrap_or(0));
        out += &format!(
            "table:{}\r\npartitions:{}\r\n",
            table.name(),
            table.partition_count()
        );
        out += "\r\n";
    }
    if wants("clients") {
        out += "# Clients\r\n";
        out += &format!("connected_clients:{}\r\n", node.metrics.connections());
        out += &format!("maxclients:{}\r\n", config.max_connections);
        out += "blocked_clients:0\r\n";
        out += "\r\n";
    }
    if wants("memory") {
        // The process's resident memory (RocksDB's memtables and block cache included).
        let rss = resident_bytes();
        out += "# Memory\r\n";
        out += &format!(
            "used_memory:{rss}\r\nused_memory_human:{:.2}M\r\nused_memory_rss:{rss}\r\n",
            rss as f64 / (1 << 20) as f64
        );
        out += "maxmemory:0\r\nmaxmemory_policy:noeviction\r\n\r\n";
    }
    if wants("replication") {
        // Duplication between clusters is not Redis replication: this node has no replicas and
        // follows no primary. Whether it takes writes now is `ferry_writes_refused`.
        out += "# Replication\r\nrole:master\r\nconnected_slaves:0\r\n";
        out += &format!(
            "ferry_writes_refused:{}\r\n\r\n",
            u8::from(node.write_block().is_some())
        );
    }
    if wants("persistence") {
        out += "# Persistence\r\n";
        out +=
            "loading:0\r\naof_enabled:1\r\naof_fsync:always\r\nrdb_changes_since_last_save:0\r\n";
        let (mut writes, mut commits, mut fsync_us, mut plog_bytes) = (0u64, 0u64, 0u64, 0u64);
        for p in table.partitions() {
            let s = p.stats();
            writes += s.writes_total.load(std::sync::atomic::Ordering::Relaxed);
            commits += s
                .group_commits_total
                .load(std::sync::atomic::Ordering::Relaxed);
            fsync_us += s
                .fsync_micros_total
                .load(std::sync::atomic::Ordering::Relaxed);
            plog_bytes += s
                .plog_bytes_total
                .load(std::sync::atomic::Ordering::Relaxed);
        }
        out += &format!("ferry_writes:{writes}\r\nferry_group_commits:{commits}\r\n");
        out += &format!(
            "ferry_fsync_seconds:{:.3}\r\nferry_plog_bytes:{plog_bytes}\r\n",
            fsync_us as f64 / 1e6
        );
        for p in table.partitions() {
            out += &format!(
                "partition{}:committed_decree={}\r\n",
                p.id().0,
                p.committed_decree().0
            );
        }
        out += "\r\n";
    }
    if wants("stats") {
        out += "# Stats\r\n";
        out += &format!(
            "total_connections_received:{}\r\n",
            node.metrics.connections_received()
        );
        out += &format!(
            "total_commands_processed:{}\r\n",
            node.metrics.commands_processed()
        );
        out += &format!(
            "rejected_connections:{}\r\n",
            node.metrics.rejected_connections()
        );
        out += "\r\n";
    }
    if wants("keyspace") {
        out += "# Keyspace\r\n";
        let counts = table
            .partitions()
            .iter()
            .try_fold((0u64, 0u64, 0u64), |acc, p| {
                p.key_counts()
                    .map(|c| (acc.0 + c.keys, acc.1 + c.expires, acc.2 + c.ttl_ms_total))
            });
        match counts {
            Ok((0, _, _)) => {}
            Ok((keys, expires, ttl_total)) => {
                let avg_ttl = ttl_total.checked_div(expires).unwrap_or(0);
                out += &format!("db0:keys={keys},expires={expires},avg_ttl={avg_ttl}\r\n")
            }
            Err(e) => {
                out += &format!(
                    "# keyspace unavailable: {}\r\n",
                    printable(e.to_string().as_bytes(), 512)
                )
            }
        }
        out += "\r\n";
    }
    out
}

/// Resident set size of this process in bytes, from `/proc/self/status` (0 where unreadable).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn command_info(sub: CommandSub) -> Frame {
    let describe = |s: &Spec| {
        Frame::Array(vec![
            Frame::BulkString(s.name.into()),
            Frame::Integer(s.arity),
            Frame::Array(s.flags.iter().map(|f| simple(f)).collect()),
            Frame::Integer(s.first_key),
            Frame::Integer(s.last_key),
            Frame::Integer(s.step),
            Frame::Array(vec![]),
            Frame::Array(vec![]),
            Frame::Array(vec![]),
            Frame::Array(vec![]),
        ])
    };
    match sub {
        CommandSub::All => Frame::Array(SPECS.iter().map(describe).collect()),
        CommandSub::Count => Frame::Integer(SPECS.len() as i64),
        // Clients (redis-cli) fall back to their built-in help when there are no docs.
        CommandSub::Docs => Frame::Array(vec![]),
        CommandSub::List => Frame::Array(
            SPECS
                .iter()
                .map(|s| Frame::BulkString(s.name.into()))
                .collect(),
        ),
        CommandSub::Info(names) => Frame::Array(
            names
                .iter()
                .map(|n| {
                    spec_index(n)
                        .and_then(|i| SPECS.get(i))
                        .map_or(Frame::Null, describe)
                })
                .collect(),
        ),
    }
}

/// The Redis settings that clients and benchmarks ask about, answered truthfully for ferry:
/// every write is fsynced before it is acknowledged, as with `appendfsync always`.
fn config_get(node: &Node, patterns: &[Bytes]) -> Frame {
    let c = &node.config;
    let params: [(&str, String); 11] = [
        ("save", String::new()),
        ("appendonly", "yes".into()),
        ("appendfsync", "always".into()),
        ("databases", "1".into()),
        ("maxclients", c.max_connections.to_string()),
        ("port", node.resp_addr.port().to_string()),
        ("bind", node.resp_addr.ip().to_string()),
        ("timeout", "0".into()),
        ("maxmemory", "0".into()),
        ("maxmemory-policy", "noeviction".into()),
        ("cluster-enabled", "no".into()),
    ];
    let mut out = Vec::new();
    for (name, value) in &params {
        if patterns
            .iter()
            .any(|p| glob_match(p, name.as_bytes(), true))
        {
            out.push(Frame::BulkString(Bytes::from_static(name.as_bytes())));
            out.push(Frame::BulkString(value.clone().into()));
        }
    }
    Frame::Array(out)
}

// ---- replies ---------------------------------------------------------------------------------

pub fn ok() -> Frame {
    simple("OK")
}

fn simple(s: &str) -> Frame {
    Frame::SimpleString(Bytes::copy_from_slice(s.as_bytes()))
}

/// An error reply; CR and LF would break the framing, so they become spaces.
pub fn error(msg: impl Into<String>) -> Frame {
    let mut msg: String = msg.into();
    if msg.contains(['\r', '\n']) {
        msg = msg.replace(['\r', '\n'], " ");
    }
    Frame::Error(msg.into())
}

/// A failed write: nothing was acknowledged, and the reply says what failed.
fn write_error(e: &StoreError) -> Frame {
    if let StoreError::Fenced(sentence) = e {
        return error(sentence.clone());
    }
    if e.is_disk_full() {
        return error(
            "ERR the node's disk is full, so the write was refused; free space on the node's data disk, then retry",
        );
    }
    error(format!("ERR write failed and was not acknowledged: {e}"))
}

fn read_error(e: &StoreError) -> Frame {
    error(format!("ERR read failed: {e}"))
}

fn unexpected(outcome: &WriteOutcome) -> Frame {
    error(format!(
        "ERR internal error: unexpected write outcome {outcome:?}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn req(line: &str) -> Vec<Bytes> {
        line.split(' ')
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    fn p(line: &str) -> Result<Command, CmdError> {
        parse(&req(line), NOW)
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn arity_errors_use_redis_wording() {
        for (line, name) in [
            ("GET", "get"),
            ("get a b", "get"),
            ("SET a", "set"),
            ("mset a", "mset"),
            ("mset a 1 b", "mset"),
            ("incr", "incr"),
            ("incrby a", "incrby"),
            ("ttl", "ttl"),
            ("ping a b", "ping"),
            ("dbsize x", "dbsize"),
            ("select", "select"),
            ("scan", "scan"),
            ("del", "del"),
            ("echo", "echo"),
        ] {
            let e = p(line).expect_err(line);
            assert_eq!(
                e.to_string(),
                format!("ERR wrong number of arguments for '{name}' command"),
                "{line}"
            );
        }
    }

    #[test]
    fn unknown_commands_quote_their_arguments() {
        let e = p("lpush x 1").expect_err("lpush is not supported");
        assert_eq!(
            e.to_string(),
            "ERR unknown command 'lpush', with args beginning with: 'x' '1' "
        );
        let e = parse(&[b("foo\r\nbar")], NOW).expect_err("unknown");
        assert!(!e.to_string().contains(['\r', '\n']));
        assert_eq!(parse(&[], NOW), Err(CmdError::Empty));
        let long = "x".repeat(10_000);
        assert!(
            p(&format!("{long} {long}"))
                .expect_err("unknown")
                .to_string()
                .len()
                < 400
        );
    }

    #[test]
    fn names_are_case_insensitive() {
        assert_eq!(p("gEt k"), Ok(Command::Get(b("k"))));
        assert_eq!(p("PING"), Ok(Command::Ping(None)));
        assert_eq!(p("ping hi"), Ok(Command::Ping(Some(b("hi")))));
    }

    #[test]
    fn set_options() {
        let set = |line: &str| match p(line) {
            Ok(Command::Set(s)) => Ok(s),
            Ok(other) => panic!("{line}: parsed as {other:?}"),
            Err(e) => Err(e),
        };
        let s = set("SET k v").expect("plain");
        assert_eq!(
            (s.expiry, s.cond, s.get),
            (Expiry::Never, SetCond::Always, false)
        );
        assert_eq!(
            set("SET k v EX 10").expect("ex").expiry,
            Expiry::At(NOW + 10_000)
        );
        assert_eq!(
            set("SET k v px 10").expect("px").expiry,
            Expiry::At(NOW + 10)
        );
        assert_eq!(
            set("SET k v EXAT 2000000000").expect("exat").expiry,
            Expiry::At(2_000_000_000_000)
        );
        assert_eq!(set("SET k v PXAT 5").expect("pxat").expiry, Expiry::At(5));
        assert_eq!(
            set("SET k v KEEPTTL").expect("keepttl").expiry,
            Expiry::Keep
        );
        assert_eq!(set("SET k v NX").expect("nx").cond, SetCond::IfAbsent);
        let s = set("SET k v XX GET PX 5").expect("xx get px");
        assert_eq!(
            (s.cond, s.get, s.expiry),
            (SetCond::IfPresent, true, Expiry::At(NOW + 5))
        );
        assert!(set("SET k v NX GET").expect("nx get").get);

        for bad in [
            "SET k v NX XX",
            "SET k v EX 1 PX 1",
            "SET k v EX 1 KEEPTTL",
            "SET k v KEEPTTL EX 1",
            "SET k v EX",
            "SET k v FOO",
        ] {
            assert_eq!(set(bad), Err(CmdError::Syntax), "{bad}");
        }
        assert_eq!(set("SET k v EX x"), Err(CmdError::NotInteger));
        assert_eq!(set("SET k v EX +1"), Err(CmdError::NotInteger));
        assert_eq!(set("SET k v EX 0"), Err(CmdError::InvalidExpire("set")));
        assert_eq!(set("SET k v PX -5"), Err(CmdError::InvalidExpire("set")));
        assert_eq!(
            set("SET k v EX 9223372036854775807"),
            Err(CmdError::InvalidExpire("set"))
        );
        assert_eq!(
            CmdError::InvalidExpire("set").to_string(),
            "ERR invalid expire time in 'set' command"
        );
    }

    #[test]
    fn integers_parse_like_redis() {
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"-12"), Some(-12));
        assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"+1",
            b" 1",
            b"1 ",
            b"01",
            b"-0",
            b"1.5",
            b"9223372036854775808",
            b"\xff",
        ] {
            assert_eq!(parse_int(bad), None, "{bad:?}");
        }
        assert_eq!(p("incrby k x"), Err(CmdError::NotInteger));
        assert_eq!(
            p("incrby k -3"),
            Ok(Command::IncrBy {
                key: b("k"),
                delta: -3
            })
        );
        assert_eq!(
            p("decrby k 3"),
            Ok(Command::IncrBy {
                key: b("k"),
                delta: -3
            })
        );
        assert_eq!(
            p("decr k"),
            Ok(Command::IncrBy {
                key: b("k"),
                delta: -1
            })
        );
        assert!(
            p("decrby k -9223372036854775808").is_err(),
            "negating i64::MIN overflows"
        );
    }

    #[test]
    fn expire_family() {
        assert_eq!(
            p("expire k 10"),
            Ok(Command::Expire {
                key: b("k"),
                at_ms: Some(NOW + 10_000)
            })
        );
        assert_eq!(
            p("pexpire k 10"),
            Ok(Command::Expire {
                key: b("k"),
                at_ms: Some(NOW + 10)
            })
        );
        assert_eq!(
            p("expireat k 10"),
            Ok(Command::Expire {
                key: b("k"),
                at_ms: Some(10_000)
            })
        );
        assert_eq!(
            p("pexpireat k 10"),
            Ok(Command::Expire {
                key: b("k"),
                at_ms: Some(10)
            })
        );
        assert_eq!(
            p("expire k -100000000000"),
            Ok(Command::Expire {
                key: b("k"),
                at_ms: Some(0)
            }),
            "past: deletes"
        );
        assert_eq!(
            p("persist k"),
            Ok(Command::Expire {
                key: b("k"),
                at_ms: None
            })
        );
        assert_eq!(
            p("expire k 9223372036854775807"),
            Err(CmdError::InvalidExpire("expire"))
        );
        assert_eq!(p("expire k x"), Err(CmdError::NotInteger));
        assert!(matches!(p("expire k 10 NX"), Err(CmdError::Unsupported(_))));
        assert_eq!(
            p("ttl k"),
            Ok(Command::Ttl {
                key: b("k"),
                millis: false
            })
        );
        assert_eq!(
            p("pttl k"),
            Ok(Command::Ttl {
                key: b("k"),
                millis: true
            })
        );
    }

    #[test]
    fn multi_key_commands() {
        assert_eq!(
            p("mset a 1 b 2"),
            Ok(Command::MSet(vec![(b("a"), b("1")), (b("b"), b("2"))]))
        );
        assert_eq!(p("del a b"), Ok(Command::Del(vec![b("a"), b("b")])));
        assert_eq!(p("exists a a"), Ok(Command::Exists(vec![b("a"), b("a")])));
        assert_eq!(p("mget a"), Ok(Command::MGet(vec![b("a")])));
    }

    #[test]
    fn scan_options() {
        assert_eq!(
            p("scan 0"),
            Ok(Command::Scan {
                cursor: 0,
                pattern: None,
                count: 10,
                only_strings: true
            })
        );
        assert_eq!(
            p("SCAN 42 MATCH user:* COUNT 100"),
            Ok(Command::Scan {
                cursor: 42,
                pattern: Some(b("user:*")),
                count: 100,
                only_strings: true
            })
        );
        assert_eq!(
            p("scan 0 match *"),
            Ok(Command::Scan {
                cursor: 0,
                pattern: None,
                count: 10,
                only_strings: true
            })
        );
        assert_eq!(
            p("scan 0 count 999999999"),
            Ok(Command::Scan {
                cursor: 0,
                pattern: None,
                count: SCAN_MAX_COUNT,
                only_strings: true
            })
        );
        assert_eq!(
            p("scan 0 type list"),
            Ok(Command::Scan {
                cursor: 0,
                pattern: None,
                count: 10,
                only_strings: false
            })
        );
        assert_eq!(p("scan x"), Err(CmdError::InvalidCursor));
        assert_eq!(p("scan -1"), Err(CmdError::InvalidCursor));
        assert_eq!(
            p("scan 18446744073709551615"),
            Ok(Command::Scan {
                cursor: u64::MAX,
                pattern: None,
                count: 10,
                only_strings: true
            })
        );
        assert_eq!(p("scan 0 count 0"), Err(CmdError::Syntax));
        assert_eq!(p("scan 0 count x"), Err(CmdError::NotInteger));
        assert_eq!(p("scan 0 match"), Err(CmdError::Syntax));
        assert_eq!(p("scan 0 foo bar"), Err(CmdError::Syntax));
    }

    #[test]
    fn admin_commands() {
        assert_eq!(p("select 0"), Ok(Command::Select));
        assert_eq!(p("select 1"), Err(CmdError::DbOutOfRange));
        assert_eq!(p("select x"), Err(CmdError::NotInteger));
        assert_eq!(p("command"), Ok(Command::CommandInfo(CommandSub::All)));
        assert_eq!(
            p("command docs"),
            Ok(Command::CommandInfo(CommandSub::Docs))
        );
        assert_eq!(
            p("COMMAND COUNT"),
            Ok(Command::CommandInfo(CommandSub::Count))
        );
        assert_eq!(
            p("command foo").map_err(|e| e.to_string()),
            Err("ERR unknown subcommand 'foo'. Try COMMAND HELP.".to_string())
        );
        assert_eq!(
            p("config get save"),
            Ok(Command::ConfigGet(vec![b("save")]))
        );
        assert_eq!(
            p("config get save appendonly"),
            Ok(Command::ConfigGet(vec![b("save"), b("appendonly")]))
        );
        assert_eq!(p("config get"), Err(CmdError::Arity("config|get")));
        assert!(matches!(
            p("config set save x"),
            Err(CmdError::Unsupported(_))
        ));
        assert_eq!(p("client setname x"), Ok(Command::ClientOk));
        assert_eq!(p("info"), Ok(Command::Info(vec![])));
        assert_eq!(
            p("info Keyspace"),
            Ok(Command::Info(vec!["keyspace".into()]))
        );
        assert_eq!(p("quit"), Ok(Command::Quit));
    }

    #[test]
    fn classes() {
        assert_eq!(p("set a b").map(|c| c.class()), Ok(Class::Write));
        assert_eq!(p("persist a").map(|c| c.class()), Ok(Class::Write));
        assert_eq!(p("get a").map(|c| c.class()), Ok(Class::Read));
        assert_eq!(p("scan 0").map(|c| c.class()), Ok(Class::Read));
        assert_eq!(p("ping").map(|c| c.class()), Ok(Class::Immediate));
        assert_eq!(p("quit").map(|c| c.class()), Ok(Class::Quit));
    }

    #[test]
    fn every_spec_is_reachable_and_lowercase() {
        for (i, s) in SPECS.iter().enumerate() {
            assert_eq!(spec_index(s.name.to_ascii_uppercase().as_bytes()), Some(i));
            assert_eq!(s.name, s.name.to_ascii_lowercase());
        }
    }

    #[test]
    fn error_replies_never_carry_line_breaks() {
        match error("ERR a\r\nb") {
            Frame::Error(s) => assert_eq!(&*s, "ERR a  b"),
            other => panic!("not an error frame: {other:?}"),
        }
    }

    /// A fuzz-like sweep: no argument list makes the parser panic.
    #[test]
    fn parser_never_panics() {
        let words = [
            "set",
            "get",
            "ex",
            "px",
            "exat",
            "pxat",
            "nx",
            "xx",
            "get",
            "keepttl",
            "-1",
            "0",
            "99999999999999999999",
            "",
            "\u{0}",
            "scan",
            "match",
            "count",
            "type",
            "mset",
            "config",
            "command",
            "client",
            "info",
            "expire",
            "select",
        ];
        let mut seed = 7u64;
        for _ in 0..20_000 {
            let n = (seed % 7) as usize;
            let args: Vec<Bytes> = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    b(words[(seed >> 33) as usize % words.len()])
                })
                .collect();
            let _ = parse(&args, NOW);
        }
    }
}
