//! A target node deletes the inbox segments it has applied. With 64 KiB inbox segments, 20k
//! duplicated writes roll every inbox over several times; once the target has caught up, each
//! inbox is down to its newest segments (its first ones gone), and the target still holds exactly
//! the source's content, read back key by key.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use ferry_log::plog::list_segments;
use ferry_tests::dup::{check_written, wait_converged, TwoClusters, Writer};

const TABLE: &str = "users";
const WRITES: u64 = 20_000;

/// Every inbox log of the table under a node's data dir, with its segments' first decrees.
fn inboxes(data_dir: &Path) -> Result<Vec<(PathBuf, Vec<u64>)>> {
    let mut out = Vec::new();
    let table = data_dir.join(TABLE);
    for p in std::fs::read_dir(&table).with_context(|| format!("list {}", table.display()))? {
        let inbox = p?.path().join("inbox");
        let Ok(sources) = std::fs::read_dir(&inbox) else {
            continue;
        };
        for s in sources {
            let dir = s?.path();
            let firsts = list_segments(&dir)?
                .iter()
                .map(|s| s.first_decree.0)
                .collect();
            out.push((dir, firsts));
        }
    }
    out.sort();
    Ok(out)
}

#[test]
fn a_target_node_collects_the_inbox_segments_it_has_applied() -> Result<()> {
    let mut w = TwoClusters::start(TABLE, 2, 2)?;
    // Small inbox segments (the smallest the receiver accepts), so they roll over often.
    w.tj.receiver_toml = "inbox_segment_bytes = 65536\n".into();
    if let Some(mut r) = w.tj.receiver.take() {
        r.terminate(Duration::from_secs(10));
    }
    w.tj.start_receiver()?;
    w.bj.add_dup(TABLE, "tj")?;

    let writer = Writer::start(&w.bj, "g:", Duration::from_millis(1))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while writer.acked() < WRITES {
        if Instant::now() > deadline {
            bail!("only {} writes acknowledged in 120 s", writer.acked());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let total = writer.stop()?;
    let entries = wait_converged(&w.bj, &w.tj, Duration::from_secs(120))?;
    assert_eq!(entries, total);

    // Test nodes collect every second (`plog_gc_interval = "1s"`).
    let data_dir = w.tj.node.data_dir.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let now = inboxes(&data_dir)?;
        let collected = !now.is_empty()
            && now
                .iter()
                .all(|(_, firsts)| firsts.len() <= 2 && firsts.first().is_some_and(|f| *f > 1));
        if collected {
            break now;
        }
        if Instant::now() > deadline {
            bail!("inboxes not collected within 30 s: {now:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(last.len(), 4, "2 source partitions × 2 target partitions");
    for (dir, firsts) in &last {
        eprintln!(
            "{}: segments left start at decrees {firsts:?}",
            dir.display()
        );
    }
    check_written(&w.tj, "g:", total)?;
    eprintln!("{total} writes; every inbox collected down to its newest segments");
    Ok(())
}
