//! Passwords on the client port, with real clients: without AUTH every data command is refused
//! with `-NOAUTH`; a wrong password with `-WRONGPASS`; with the password everything works, by
//! AUTH, by HELLO's AUTH, and by redis-rs given the password in its URL; a `readonly` user reads
//! but every write (inside MULTI too) is refused with `-NOPERM`.

use anyhow::{ensure, Result};
use redis::Value;

use ferry_tests::procs::Node;

const CONFIG: &str = r#"
requirepass = "s3cret"

[[users]]
name = "reader"
password = "r-pass"
readonly = true
"#;

fn start() -> Result<(tempfile::TempDir, Node)> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("node.toml");
    std::fs::write(&config, CONFIG)?;
    let data = dir.path().join("data");
    let node = Node::start(&data, 4, &["--config", &config.to_string_lossy()])?;
    Ok((dir, node))
}

fn command(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd
}

fn code(r: redis::RedisResult<Value>) -> Option<String> {
    r.err().and_then(|e| e.code().map(str::to_string))
}

#[test]
fn without_the_password_data_commands_are_refused_and_with_it_they_work() -> Result<()> {
    let (_dir, node) = start()?;
    let url = format!("redis://{}/", node.resp);
    let mut con = redis::Client::open(url.as_str())?.get_connection()?;
    for args in [
        &["GET", "k"][..],
        &["SET", "k", "v"],
        &["PING"],
        &["SCAN", "0"],
        &["MULTI"],
        &["DBSIZE"],
    ] {
        let got = code(command(args).query(&mut con));
        ensure!(got.as_deref() == Some("NOAUTH"), "{args:?}: {got:?}");
    }
    let got = code(redis::cmd("HELLO").arg(3).query(&mut con));
    ensure!(
        got.as_deref() == Some("NOAUTH"),
        "HELLO without AUTH: {got:?}"
    );
    let got = code(redis::cmd("AUTH").arg("wrong").query(&mut con));
    ensure!(got.as_deref() == Some("WRONGPASS"), "{got:?}");
    let got = code(
        redis::cmd("AUTH")
            .arg("reader")
            .arg("s3cret")
            .query(&mut con),
    );
    ensure!(
        got.as_deref() == Some("WRONGPASS"),
        "another user's password: {got:?}"
    );

    redis::cmd("AUTH").arg("s3cret").query::<()>(&mut con)?;
    redis::cmd("SET").arg("k").arg("v").query::<()>(&mut con)?;
    let v: String = redis::cmd("GET").arg("k").query(&mut con)?;
    ensure!(v == "v");

    // The password in the URL: redis-rs sends AUTH itself.
    let url = format!("redis://:s3cret@{}/", node.resp);
    let mut con = redis::Client::open(url.as_str())?.get_connection()?;
    let v: String = redis::cmd("GET").arg("k").query(&mut con)?;
    ensure!(v == "v");

    // HELLO 3 AUTH authenticates and switches to RESP3 in one command.
    let url = format!("redis://{}/", node.resp);
    let mut con = redis::Client::open(url.as_str())?.get_connection()?;
    let hello: Value = redis::cmd("HELLO")
        .arg(3)
        .arg("AUTH")
        .arg("default")
        .arg("s3cret")
        .query(&mut con)?;
    ensure!(matches!(hello, Value::Map(_)), "{hello:?}");
    let v: String = redis::cmd("GET").arg("k").query(&mut con)?;
    ensure!(v == "v");
    Ok(())
}

#[test]
fn a_readonly_user_reads_but_cannot_write() -> Result<()> {
    let (_dir, node) = start()?;
    let mut admin =
        redis::Client::open(format!("redis://:s3cret@{}/", node.resp))?.get_connection()?;
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query::<()>(&mut admin)?;

    let url = format!("redis://reader:r-pass@{}/", node.resp);
    let mut con = redis::Client::open(url.as_str())?.get_connection()?;
    let v: String = redis::cmd("GET").arg("k").query(&mut con)?;
    ensure!(v == "v");
    for args in [&["SET", "k", "w"][..], &["DEL", "k"], &["INCR", "n"]] {
        let got = code(command(args).query(&mut con));
        ensure!(got.as_deref() == Some("NOPERM"), "{args:?}: {got:?}");
    }
    // Inside MULTI the write is refused as it is queued, so EXEC runs nothing.
    redis::cmd("MULTI").query::<()>(&mut con)?;
    let got = code(redis::cmd("SET").arg("k").arg("w").query(&mut con));
    ensure!(got.as_deref() == Some("NOPERM"), "{got:?}");
    let got = code(redis::cmd("EXEC").query(&mut con));
    ensure!(got.as_deref() == Some("EXECABORT"), "{got:?}");
    let v: String = redis::cmd("GET").arg("k").query(&mut admin)?;
    ensure!(v == "v", "nothing the reader sent was written");
    Ok(())
}
