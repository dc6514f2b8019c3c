//! Acknowledged writes survive `kill -9` of the node.
//!
//! Writers use a real Redis client (the `redis` crate) against the real `node` binary. Each writer
//! owns its keys and does SET, INCR and DEL one at a time, remembering the last acknowledged value
//! of every key and the one write in flight. The node is killed with SIGKILL at a random moment,
//! restarted on the same data directory, and every key must then hold its last acknowledged value,
//! or the value of the write that was in flight (that write may or may not have landed).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_tests::procs::Node;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WRITERS: usize = 16;
const KEYS_PER_WRITER: usize = 40;
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// What one writer knows about its keys.
#[derive(Default)]
struct WriterModel {
    /// Key → last acknowledged value (`None`: deleted or never written).
    known: HashMap<String, Option<String>>,
    /// The write whose reply never came, if the node died during it.
    in_flight: Option<(String, Option<String>)>,
    acked: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() -> Result<()> {
    let rounds: usize = std::env::var("FERRY_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("FERRY_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (replay with FERRY_CRASH_SEED={seed}), {rounds} rounds");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir()?;
    let mut models: Vec<WriterModel> = (0..WRITERS).map(|_| WriterModel::default()).collect();
    let (mut total_in_flight, mut total_landed) = (0u64, 0u64);

    for round in 0..=rounds {
        let mut node = Node::start(dir.path(), 4, &[])
            .with_context(|| format!("start node, round {round}"))?;
        let client = redis::Client::open(node.redis_url())?;
        let (in_flight, landed) = verify_and_settle(&client, &mut models)
            .await
            .with_context(|| format!("round {round} (seed {seed})"))?;
        total_in_flight += in_flight;
        total_landed += landed;
        if round == rounds {
            break;
        }

        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (w, model) in std::mem::take(&mut models).into_iter().enumerate() {
            let client = client.clone();
            let stop = stop.clone();
            let seed = rng.random::<u64>();
            tasks.push(tokio::spawn(async move {
                write_until_error(w, round, client, model, stop, seed).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..900))).await;
        node.proc.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            models.push(t.await?);
        }
    }

    let acked: u64 = models.iter().map(|m| m.acked).sum();
    println!(
        "{rounds} kill -9 rounds: {acked} acknowledged writes, all present; \
         {total_in_flight} writes were in flight and unacknowledged at a kill, {total_landed} of them landed"
    );
    assert!(
        acked > rounds as u64 * WRITERS as u64,
        "the writers made progress every round ({acked} acks)"
    );
    Ok(())
}

/// Does random SET / INCR / DEL on this writer's keys until the node dies (or `stop`).
async fn write_until_error(
    w: usize,
    round: usize,
    client: redis::Client,
    mut model: WriterModel,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> WriterModel {
    let mut rng = StdRng::seed_from_u64(seed);
    let Ok(mut con) = client.get_multiplexed_async_connection().await else {
        return model;
    };
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let (key, new, cmd) = match rng.random_range(0..10) {
            0..=6 => {
                let key = format!("w{w}:k{}", rng.random_range(0..KEYS_PER_WRITER));
                let val = format!("w{w}r{round}s{seq}");
                let mut cmd = redis::cmd("SET");
                cmd.arg(&key).arg(&val);
                (key, Some(val), cmd)
            }
            7..=8 => {
                let key = format!("w{w}:counter");
                let next = match model.known.get(&key).cloned().flatten() {
                    Some(v) => v.parse::<i64>().unwrap_or(0) + 1,
                    None => 1,
                };
                let mut cmd = redis::cmd("INCR");
                cmd.arg(&key);
                (key, Some(next.to_string()), cmd)
            }
            _ => {
                let key = format!("w{w}:k{}", rng.random_range(0..KEYS_PER_WRITER));
                let mut cmd = redis::cmd("DEL");
                cmd.arg(&key);
                (key, None, cmd)
            }
        };
        model.in_flight = Some((key.clone(), new.clone()));
        let reply =
            tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<redis::Value>(&mut con)).await;
        match reply {
            Ok(Ok(value)) => {
                if let (Some(expected), redis::Value::Int(got)) = (&new, &value) {
                    // INCR's reply must be the next value of the model.
                    assert_eq!(
                        expected,
                        &got.to_string(),
                        "INCR {key} replied {got}, expected {expected}"
                    );
                }
                model.known.insert(key, new);
                model.in_flight = None;
                model.acked += 1;
            }
            // The node died (or the connection broke): the write stays in flight.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    model
}

/// Reads every key of every writer and checks it against the model. Afterwards the model holds
/// what the node holds, so the next round starts from known values. Returns (writes that were in
/// flight, of which landed).
async fn verify_and_settle(
    client: &redis::Client,
    models: &mut [WriterModel],
) -> Result<(u64, u64)> {
    let mut con = client.get_multiplexed_async_connection().await?;
    let (mut in_flight, mut landed) = (0, 0);
    for (w, model) in models.iter_mut().enumerate() {
        let mut keys: Vec<String> = (0..KEYS_PER_WRITER).map(|i| format!("w{w}:k{i}")).collect();
        keys.push(format!("w{w}:counter"));
        let values: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut con).await?;
        let flight = model.in_flight.take();
        in_flight += u64::from(flight.is_some());
        for (key, actual) in keys.into_iter().zip(values) {
            let acked = model.known.get(&key).cloned().flatten();
            let flight_value = flight
                .as_ref()
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.clone());
            if actual != acked {
                if flight_value.as_ref() != Some(&actual) {
                    bail!(
                        "key {key}: node has {actual:?}, last acknowledged value was {acked:?} \
                         (in-flight write: {flight_value:?})"
                    );
                }
                landed += 1;
            }
            model.known.insert(key, actual);
        }
    }
    Ok((in_flight, landed))
}
