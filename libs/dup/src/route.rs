//! Routing a source batch to the target's partitions. The target may have another partition
//! count than the source, so each op goes to `partition_of(key, T)` of the *target* table.
//!
//! Every target partition gets every record, with only its own ops, and a record with none of
//! them is kept with no ops: each inbox then holds the source's decrees without gaps, so each
//! target partition's progress reaches the source's decree (see `ferry_log::inbox`).

use ferry_proto::{partition_of, PlogRecord};

/// Splits `records` into `partition_count` lists, one per target partition, each with every
/// record (same decree and timetag) holding only the ops whose key maps to that partition.
pub fn split(records: Vec<PlogRecord>, partition_count: u32) -> Vec<Vec<PlogRecord>> {
    let n = partition_count.max(1) as usize;
    let mut out: Vec<Vec<PlogRecord>> = (0..n).map(|_| Vec::with_capacity(records.len())).collect();
    for rec in records {
        let mut ops: Vec<Vec<ferry_proto::Op>> = (0..n).map(|_| Vec::new()).collect();
        for op in rec.ops {
            let tp = partition_of(op.key(), partition_count.max(1)).0 as usize;
            // partition_of returns < partition_count; the fallback keeps a bad hash from
            // panicking the receiver.
            let slot = tp.min(n - 1);
            ops[slot].push(op);
        }
        for (tp, ops) in ops.into_iter().enumerate() {
            out[tp].push(PlogRecord {
                decree: rec.decree,
                timetag: rec.timetag,
                ops,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use ferry_proto::{ClusterId, Decree, Op, PartitionId, Timetag};

    use super::*;

    fn put(k: &str) -> Op {
        Op::Put {
            key: k.as_bytes().to_vec(),
            value: b"v".to_vec(),
            expire_at_ms: 0,
        }
    }

    #[test]
    fn every_partition_gets_every_decree_and_only_its_keys() {
        let cluster = ClusterId::new(1).expect("valid");
        let keys: Vec<String> = (0..50).map(|i| format!("key{i}")).collect();
        let records: Vec<PlogRecord> = keys
            .chunks(7)
            .enumerate()
            .map(|(i, chunk)| PlogRecord {
                decree: Decree(100 + i as u64),
                timetag: Timetag::new(1_000 + i as u64, cluster, false),
                ops: chunk
                    .iter()
                    .enumerate()
                    .map(|(j, k)| {
                        if j % 3 == 0 {
                            Op::Delete {
                                key: k.as_bytes().to_vec(),
                            }
                        } else {
                            put(k)
                        }
                    })
                    .collect(),
            })
            .collect();
        let parts = split(records.clone(), 3);
        assert_eq!(parts.len(), 3);
        let mut seen = Vec::new();
        for (tp, recs) in parts.iter().enumerate() {
            let decrees: Vec<u64> = recs.iter().map(|r| r.decree.0).collect();
            assert_eq!(
                decrees,
                (100..100 + records.len() as u64).collect::<Vec<_>>()
            );
            for (r, orig) in recs.iter().zip(&records) {
                assert_eq!(r.timetag, orig.timetag);
                for op in &r.ops {
                    assert_eq!(partition_of(op.key(), 3), PartitionId(tp as u32));
                    seen.push(op.clone());
                }
            }
        }
        // Nothing lost, nothing duplicated, op order within a partition kept.
        let all: Vec<Op> = records.into_iter().flat_map(|r| r.ops).collect();
        assert_eq!(seen.len(), all.len());
        for op in &all {
            assert_eq!(seen.iter().filter(|o| *o == op).count(), 1);
        }
    }

    #[test]
    fn one_partition_keeps_the_batch_as_it_is() {
        let r = PlogRecord {
            decree: Decree(1),
            timetag: Timetag(1 << 8),
            ops: vec![put("a"), put("b")],
        };
        assert_eq!(split(vec![r.clone()], 1), vec![vec![r]]);
        assert_eq!(split(Vec::new(), 4), vec![Vec::<PlogRecord>::new(); 4]);
    }
}
