//! The string and key commands ordinary code uses beside GET and SET, with a real client, each
//! answering as Redis does: SETEX, PSETEX, SETNX, GETSET, UNLINK, TOUCH, EXPIRETIME,
//! PEXPIRETIME, KEYS, TIME and CLIENT ID; and INFO's keyspace and memory fields.

use anyhow::{ensure, Result};

use ferry_tests::procs::Node;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[test]
fn the_common_string_and_key_commands_answer_as_redis_does() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), 4, &[])?;
    let mut con = redis::Client::open(node.redis_url())?.get_connection()?;
    let q = |args: &[&str], con: &mut redis::Connection| -> redis::RedisResult<redis::Value> {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(con)
    };

    // SETEX / PSETEX set a value with an expiry; a zero or negative time is refused.
    let before = now_ms();
    redis::cmd("SETEX")
        .arg("a")
        .arg(100)
        .arg("1")
        .query::<()>(&mut con)?;
    redis::cmd("PSETEX")
        .arg("b")
        .arg(50_000)
        .arg("2")
        .query::<()>(&mut con)?;
    let ttl: i64 = redis::cmd("TTL").arg("a").query(&mut con)?;
    ensure!((99..=100).contains(&ttl), "SETEX ttl {ttl}");
    let at: i64 = redis::cmd("PEXPIRETIME").arg("b").query(&mut con)?;
    ensure!(
        (before + 50_000..=now_ms() + 50_000).contains(&at),
        "PEXPIRETIME {at}"
    );
    let at_s: i64 = redis::cmd("EXPIRETIME").arg("a").query(&mut con)?;
    ensure!(
        (before / 1000 + 99..=now_ms() / 1000 + 100).contains(&at_s),
        "EXPIRETIME {at_s}"
    );
    let e = q(&["SETEX", "a", "0", "x"], &mut con).expect_err("zero ttl");
    ensure!(
        e.to_string().contains("invalid expire time in 'setex'"),
        "{e}"
    );

    // SETNX answers 1 or 0; GETSET the old value.
    let set: i64 = redis::cmd("SETNX").arg("c").arg("first").query(&mut con)?;
    ensure!(set == 1);
    let set: i64 = redis::cmd("SETNX").arg("c").arg("second").query(&mut con)?;
    ensure!(set == 0);
    let old: Option<String> = redis::cmd("GETSET").arg("c").arg("third").query(&mut con)?;
    ensure!(old.as_deref() == Some("first"), "{old:?}");
    let old: Option<String> = redis::cmd("GETSET").arg("new").arg("v").query(&mut con)?;
    ensure!(old.is_none());
    let v: String = redis::cmd("GET").arg("c").query(&mut con)?;
    ensure!(v == "third");
    let ttl: i64 = redis::cmd("EXPIRETIME").arg("c").query(&mut con)?;
    ensure!(ttl == -1, "no expiry: {ttl}");
    let ttl: i64 = redis::cmd("EXPIRETIME").arg("missing").query(&mut con)?;
    ensure!(ttl == -2, "missing key: {ttl}");

    // TOUCH counts the keys that exist; UNLINK deletes as DEL does.
    let n: i64 = redis::cmd("TOUCH")
        .arg("a")
        .arg("c")
        .arg("nope")
        .query(&mut con)?;
    ensure!(n == 2);
    let n: i64 = redis::cmd("UNLINK").arg("a").arg("nope").query(&mut con)?;
    ensure!(n == 1);

    // KEYS: every matching key, from every partition.
    for i in 0..30 {
        redis::cmd("SET")
            .arg(format!("user:{i}"))
            .arg(i)
            .query::<()>(&mut con)?;
    }
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("user:*").query(&mut con)?;
    keys.sort();
    let mut want: Vec<String> = (0..30).map(|i| format!("user:{i}")).collect();
    want.sort();
    ensure!(keys == want, "{keys:?}");
    let keys: Vec<String> = redis::cmd("KEYS").arg("user:1?").query(&mut con)?;
    ensure!(keys.len() == 10, "{keys:?}");

    // TIME is [seconds, microseconds] of the node's clock; CLIENT ID is this connection's.
    let time: Vec<String> = redis::cmd("TIME").query(&mut con)?;
    let secs: i64 = time[0].parse()?;
    ensure!((secs - now_ms() / 1000).abs() <= 2, "{time:?}");
    let us: i64 = time[1].parse()?;
    ensure!((0..1_000_000).contains(&us), "{time:?}");
    let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut con)?;
    let mut other = redis::Client::open(node.redis_url())?.get_connection()?;
    let other_id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut other)?;
    ensure!(id > 0 && other_id != id, "{id} {other_id}");

    // INFO counts what is there: b (PSETEX) is the one key left with an expiry.
    let info: String = redis::cmd("INFO").arg("keyspace").query(&mut con)?;
    ensure!(info.contains("db0:keys=33,expires=1,avg_ttl="), "{info}");
    let info: String = redis::cmd("INFO").arg("memory").query(&mut con)?;
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    ensure!(used > 1 << 20, "{info}");
    Ok(())
}
