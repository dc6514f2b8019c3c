//! MULTI / EXEC / DISCARD / WATCH on a real node with real clients: commands are queued and then
//! applied as one record; a transaction refused while queuing applies nothing (so a client that
//! retries it does not apply it twice); keys in different partitions are refused at EXEC with
//! CROSSSLOT and nothing applies; a WATCHed key written by another client makes EXEC answer nil.

use anyhow::{ensure, Result};
use redis::Value;

use ferry_proto::hash::partition_of;
use ferry_tests::procs::Node;

const PARTITIONS: u32 = 4;

fn connect(node: &Node) -> Result<redis::Connection> {
    Ok(redis::Client::open(node.redis_url())?.get_connection()?)
}

/// Sends one command and returns the raw reply, errors included as values.
fn raw(con: &mut redis::Connection, args: &[&str]) -> Result<Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    Ok(match cmd.query::<Value>(con) {
        Ok(v) => v,
        // The code as the server sent it (redis-rs renames some in its message), then the message.
        Err(e) => Value::SimpleString(format!("ERROR {} {e}", e.code().unwrap_or("-"))),
    })
}

/// Writes `request` on a new connection and reads until `expected` arrived (bounded: 10 s);
/// whether the bytes read are exactly `expected`.
fn raw_socket(node: &Node, request: &str, expected: &str) -> Result<bool> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(node.resp)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < expected.len() {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    if got != expected.as_bytes() {
        eprintln!("got {:?}", String::from_utf8_lossy(&got));
    }
    Ok(got == expected.as_bytes())
}

/// The first of the keys `x1`, `x2`, ... (bounded: 1000) that `wanted` takes.
fn key_where(wanted: impl Fn(&[u8]) -> bool) -> Result<String> {
    (1..1000)
        .map(|i| format!("x{i}"))
        .find(|k| wanted(k.as_bytes()))
        .ok_or_else(|| anyhow::anyhow!("none of x1..x999 is in the partition wanted"))
}

fn is_error(v: &Value, needle: &str) -> bool {
    matches!(v, Value::SimpleString(s) if s.starts_with("ERROR") && s.contains(needle))
}

#[test]
fn transactions_queue_then_apply_whole_or_not_at_all() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), PARTITIONS, &[])?;
    let mut con = connect(&node)?;

    // The case: three transactions refused while queuing leave the counter untouched.
    for _ in 0..3 {
        ensure!(raw(&mut con, &["MULTI"])? == Value::Okay);
        let q = raw(&mut con, &["INCR", "c"])?;
        ensure!(q == Value::SimpleString("QUEUED".into()), "{q:?}");
        let bad = raw(&mut con, &["NOSUCHCOMMAND", "x"])?;
        ensure!(is_error(&bad, "unknown command"), "{bad:?}");
        let exec = raw(&mut con, &["EXEC"])?;
        ensure!(is_error(&exec, "EXECABORT"), "{exec:?}");
    }
    let c: Option<i64> = redis::cmd("GET").arg("c").query(&mut con)?;
    ensure!(
        c.is_none(),
        "aborted transactions applied nothing: c = {c:?}"
    );

    // A good one: its own reads see its earlier writes.
    ensure!(raw(&mut con, &["MULTI"])? == Value::Okay);
    for args in [&["INCR", "c"][..], &["INCR", "c"], &["GET", "c"]] {
        ensure!(raw(&mut con, args)? == Value::SimpleString("QUEUED".into()));
    }
    let exec = raw(&mut con, &["EXEC"])?;
    ensure!(
        exec == Value::Array(vec![
            Value::Int(1),
            Value::Int(2),
            Value::BulkString(b"2".to_vec())
        ]),
        "{exec:?}"
    );

    // A run-time error is one element; the other commands apply.
    redis::cmd("SET")
        .arg("s")
        .arg("abc")
        .query::<()>(&mut con)?;
    // (On a plain socket: redis-rs turns an array holding an error into an error of its own.)
    let got = raw_socket(
        &node,
        "*1\r\n$5\r\nMULTI\r\n*2\r\n$4\r\nINCR\r\n$1\r\ns\r\n\
         *3\r\n$3\r\nSET\r\n$5\r\nafter\r\n$1\r\n1\r\n*1\r\n$4\r\nEXEC\r\n",
        "+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n-ERR value is not an integer or out of range\r\n+OK\r\n",
    )?;
    ensure!(
        got,
        "EXEC answers the INCR error in its place and applies the SET"
    );
    let after: Option<String> = redis::cmd("GET").arg("after").query(&mut con)?;
    ensure!(after.as_deref() == Some("1"));

    // redis-rs's atomic pipeline (MULTI ... EXEC, replies parsed from EXEC's array).
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .cmd("INCRBY")
        .arg("p")
        .arg(5)
        .cmd("INCRBY")
        .arg("p")
        .arg(5)
        .query(&mut con)?;
    ensure!((a, b) == (5, 10), "{a} {b}");

    // DISCARD drops what was queued; EXEC and DISCARD without MULTI are refused.
    ensure!(raw(&mut con, &["MULTI"])? == Value::Okay);
    raw(&mut con, &["SET", "discarded", "1"])?;
    ensure!(raw(&mut con, &["DISCARD"])? == Value::Okay);
    let d: Option<String> = redis::cmd("GET").arg("discarded").query(&mut con)?;
    ensure!(d.is_none(), "{d:?}");
    ensure!(is_error(&raw(&mut con, &["EXEC"])?, "EXEC without MULTI"));
    ensure!(is_error(
        &raw(&mut con, &["DISCARD"])?,
        "DISCARD without MULTI"
    ));

    // Nested MULTI is refused without ending the transaction; SCAN inside is refused and aborts.
    ensure!(raw(&mut con, &["MULTI"])? == Value::Okay);
    ensure!(is_error(&raw(&mut con, &["MULTI"])?, "can not be nested"));
    ensure!(is_error(
        &raw(&mut con, &["SCAN", "0"])?,
        "inside a transaction"
    ));
    ensure!(is_error(&raw(&mut con, &["EXEC"])?, "EXECABORT"));
    Ok(())
}

#[test]
fn keys_in_two_partitions_are_refused_at_exec_and_nothing_applies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), PARTITIONS, &[])?;
    let mut con = connect(&node)?;
    let first = "x0".to_string();
    let other =
        key_where(|k| partition_of(k, PARTITIONS) != partition_of(first.as_bytes(), PARTITIONS))?;
    ensure!(raw(&mut con, &["MULTI"])? == Value::Okay);
    raw(&mut con, &["SET", &first, "1"])?;
    raw(&mut con, &["SET", &other, "1"])?;
    let exec = raw(&mut con, &["EXEC"])?;
    ensure!(is_error(&exec, "CROSSSLOT"), "{exec:?}");
    let n: i64 = redis::cmd("EXISTS")
        .arg(&first)
        .arg(&other)
        .query(&mut con)?;
    ensure!(n == 0, "nothing applied: {n} of the keys exist");

    // Keys of one partition are fine.
    let same =
        key_where(|k| partition_of(k, PARTITIONS) == partition_of(first.as_bytes(), PARTITIONS))?;
    let (): () = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg(&first)
        .arg("1")
        .ignore()
        .cmd("SET")
        .arg(&same)
        .arg("1")
        .ignore()
        .query(&mut con)?;
    let n: i64 = redis::cmd("EXISTS")
        .arg(&first)
        .arg(&same)
        .query(&mut con)?;
    ensure!(n == 2, "{n}");
    Ok(())
}

#[test]
fn a_watched_key_written_by_another_client_makes_exec_answer_nil() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), PARTITIONS, &[])?;
    let mut a = connect(&node)?;
    let mut b = connect(&node)?;

    ensure!(raw(&mut a, &["WATCH", "k"])? == Value::Okay);
    redis::cmd("SET")
        .arg("k")
        .arg("theirs")
        .query::<()>(&mut b)?;
    ensure!(raw(&mut a, &["MULTI"])? == Value::Okay);
    raw(&mut a, &["SET", "k", "mine"])?;
    let exec = raw(&mut a, &["EXEC"])?;
    ensure!(exec == Value::Nil, "a changed watch answers nil: {exec:?}");
    let k: String = redis::cmd("GET").arg("k").query(&mut a)?;
    ensure!(k == "theirs", "{k}");

    // Without interference (and the watch gone after EXEC) it applies.
    ensure!(raw(&mut a, &["WATCH", "k"])? == Value::Okay);
    ensure!(raw(&mut a, &["MULTI"])? == Value::Okay);
    raw(&mut a, &["SET", "k", "mine"])?;
    let exec = raw(&mut a, &["EXEC"])?;
    ensure!(exec == Value::Array(vec![Value::Okay]), "{exec:?}");
    let k: String = redis::cmd("GET").arg("k").query(&mut b)?;
    ensure!(k == "mine", "{k}");

    // UNWATCH forgets: a write after it does not abort.
    ensure!(raw(&mut a, &["WATCH", "k"])? == Value::Okay);
    ensure!(raw(&mut a, &["UNWATCH"])? == Value::Okay);
    redis::cmd("SET")
        .arg("k")
        .arg("again")
        .query::<()>(&mut b)?;
    ensure!(raw(&mut a, &["MULTI"])? == Value::Okay);
    raw(&mut a, &["GET", "k"])?;
    let exec = raw(&mut a, &["EXEC"])?;
    ensure!(
        exec == Value::Array(vec![Value::BulkString(b"again".to_vec())]),
        "{exec:?}"
    );
    // WATCH inside MULTI is refused (and aborts).
    ensure!(raw(&mut a, &["MULTI"])? == Value::Okay);
    ensure!(is_error(
        &raw(&mut a, &["WATCH", "k"])?,
        "WATCH inside MULTI"
    ));
    ensure!(is_error(&raw(&mut a, &["EXEC"])?, "EXECABORT"));
    Ok(())
}
