//! kill -9 of the shipper, then the receiver, then the target node, each while the source takes
//! writes, several rounds: afterwards the target holds exactly the source's content, so no
//! acknowledged write is missing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use ferry_tests::dup::{wait_converged, TwoClusters};

const ROUNDS: usize = 3;

#[test]
fn killing_shipper_receiver_and_target_node_under_load_loses_no_acknowledged_write() -> Result<()> {
    let mut w = TwoClusters::start("users", 4, 4)?;
    w.bj.add_dup("users", "tj")?;

    // A writer on the source: pipelines of 50 SETs, counting what was acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        let mut con = w.bj.redis()?;
        std::thread::spawn(move || -> Result<()> {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut next = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let mut pipe = redis::pipe();
                for i in next..next + 50 {
                    pipe.cmd("SET")
                        .arg(format!("f:{i}"))
                        .arg(format!("value-{i}"))
                        .ignore();
                }
                pipe.query::<()>(&mut con)?;
                next += 50;
                acked.store(next, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
    };

    let pause = || std::thread::sleep(Duration::from_millis(700));
    for round in 0..ROUNDS {
        pause();
        w.bj.shipper.as_mut().context("shipper")?.kill9();
        pause();
        w.bj.start_shipper()?;
        pause();
        w.tj.receiver.as_mut().context("receiver")?.kill9();
        pause();
        w.tj.start_receiver()?;
        pause();
        let etcd = &w.etcd;
        w.tj.restart_node(etcd)?;
        eprintln!(
            "round {round}: {} writes acknowledged so far",
            acked.load(Ordering::Relaxed)
        );
    }
    pause();
    stop.store(true, Ordering::Relaxed);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let total = acked.load(Ordering::Relaxed);
    let entries = wait_converged(&w.bj, &w.tj, Duration::from_secs(120))?;
    eprintln!("{total} acknowledged writes; both clusters hold {entries} entries");
    assert_eq!(entries, total);

    // And every acknowledged write reads back on the target with its value.
    let mut tcon = w.tj.redis()?;
    for chunk in (0..total).collect::<Vec<_>>().chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("f:{i}")).collect();
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut tcon)?;
        for (i, v) in chunk.iter().zip(got) {
            assert_eq!(v, Some(format!("value-{i}")), "f:{i} on the target");
        }
    }
    Ok(())
}
