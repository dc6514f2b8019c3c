//! kill -9 of the shipper, then the receiver, then the target node, each while the source takes
//! writes, several rounds: afterwards the target holds exactly the source's content, so no
//! acknowledged write is missing.

use std::time::Duration;

use anyhow::{Context, Result};

use ferry_tests::dup::{check_written, wait_converged, TwoClusters, Writer};

const ROUNDS: usize = 3;

#[test]
fn killing_shipper_receiver_and_target_node_under_load_loses_no_acknowledged_write() -> Result<()> {
    let mut w = TwoClusters::start("users", 4, 4)?;
    w.bj.add_dup("users", "tj")?;

    // A writer on the source: pipelines of 50 SETs, counting what was acknowledged.
    let writer = Writer::start(&w.bj, "f:", Duration::from_millis(2))?;

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
            writer.acked()
        );
    }
    pause();
    let total = writer.stop()?;
    let entries = wait_converged(&w.bj, &w.tj, Duration::from_secs(120))?;
    eprintln!("{total} acknowledged writes; both clusters hold {entries} entries");
    assert_eq!(entries, total);

    // And every acknowledged write reads back on the target with its value.
    check_written(&w.tj, "f:", total)?;
    Ok(())
}
