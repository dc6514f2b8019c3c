//! HELLO on a real node with a real client: redis-rs connecting with `protocol=resp3` (it opens
//! with `HELLO 3`, as redis-py 8 does by default) gets RESP3 replies, a RESP2 client keeps
//! RESP2, other protocol versions are refused, and without passwords configured HELLO AUTH
//! as the `default` user succeeds (as in Redis, whose default user then has no password).

use anyhow::{ensure, Context as _, Result};
use redis::Value;

use ferry_tests::procs::Node;

#[test]
fn hello_3_gives_resp3_and_hello_2_keeps_resp2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), 4, &[])?;

    let url = format!("redis://{}/?protocol=resp3", node.resp);
    let mut con = redis::Client::open(url)?
        .get_connection()
        .context("redis-rs connects with HELLO 3")?;
    redis::cmd("SET").arg("a").arg("1").query::<()>(&mut con)?;
    let got: Option<String> = redis::cmd("GET").arg("a").query(&mut con)?;
    ensure!(got.as_deref() == Some("1"), "{got:?}");
    let missing: Value = redis::cmd("GET").arg("nope").query(&mut con)?;
    ensure!(
        missing == Value::Nil,
        "a missing key is RESP3's null: {missing:?}"
    );
    let n: i64 = redis::cmd("INCR").arg("ctr").query(&mut con)?;
    ensure!(n == 1, "{n}");
    let many: Vec<Option<String>> = redis::cmd("MGET").arg("a").arg("nope").query(&mut con)?;
    ensure!(many == vec![Some("1".to_string()), None], "{many:?}");
    let hello: Value = redis::cmd("HELLO").arg(3).query(&mut con)?;
    let Value::Map(fields) = &hello else {
        anyhow::bail!("HELLO 3 answers a map in RESP3: {hello:?}");
    };
    ensure!(
        fields
            .iter()
            .any(|(k, v)| *k == Value::BulkString(b"proto".to_vec()) && *v == Value::Int(3)),
        "{hello:?}"
    );

    // A RESP2 connection: HELLO 2 answers a flat list, and the protocol stays RESP2.
    let mut con2 = redis::Client::open(format!("redis://{}/", node.resp))?.get_connection()?;
    let hello: Value = redis::cmd("HELLO").arg(2).query(&mut con2)?;
    ensure!(
        matches!(&hello, Value::Array(a) if a.len() == 14),
        "HELLO 2 answers a flat list: {hello:?}"
    );
    let e = redis::cmd("HELLO")
        .arg(4)
        .query::<Value>(&mut con2)
        .expect_err("refused");
    ensure!(e.code() == Some("NOPROTO"), "{e}");
    let hello: Value = redis::cmd("HELLO")
        .arg(2)
        .arg("AUTH")
        .arg("default")
        .arg("anything")
        .query(&mut con2)?;
    ensure!(
        matches!(&hello, Value::Array(a) if a.len() == 14),
        "HELLO 2 AUTH as the password-less default user: {hello:?}"
    );
    let got: Option<String> = redis::cmd("GET").arg("a").query(&mut con2)?;
    ensure!(got.as_deref() == Some("1"), "{got:?}");
    Ok(())
}
