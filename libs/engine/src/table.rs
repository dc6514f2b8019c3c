//! A table on one node: P partitions, with keys routed by the stable hash of `ferry_proto::hash`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_proto::{partition_of, PartitionId};

use crate::error::StoreError;
use crate::partition::{OpenReport, Partition, PartitionOptions};

pub struct Table {
    name: String,
    partitions: Vec<Arc<Partition>>,
}

impl Table {
    /// Opens (or creates) the table's `count` partitions under `dir/<table>/<p>`, replaying their
    /// plogs in parallel.
    pub fn open(
        dir: &Path,
        name: &str,
        count: u32,
        opts: &PartitionOptions,
    ) -> Result<(Table, Vec<OpenReport>), StoreError> {
        let dirs: Vec<PathBuf> = (0..count)
            .map(|p| dir.join(name).join(p.to_string()))
            .collect();
        let results: Vec<Result<(Partition, OpenReport), StoreError>> = std::thread::scope(|s| {
            let handles: Vec<_> = dirs
                .iter()
                .enumerate()
                .map(|(p, d)| {
                    s.spawn(move || Partition::open(d, PartitionId(p as u32), opts.clone()))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(StoreError::Closed(u32::MAX)))
                })
                .collect()
        });
        let mut partitions = Vec::with_capacity(results.len());
        let mut reports = Vec::with_capacity(results.len());
        for r in results {
            let (p, report) = r?;
            partitions.push(Arc::new(p));
            reports.push(report);
        }
        Ok((
            Table {
                name: name.to_string(),
                partitions,
            },
            reports,
        ))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// The partition that owns `key`.
    pub fn partition_for(&self, key: &[u8]) -> &Arc<Partition> {
        let p = partition_of(key, self.partition_count());
        // partition_of returns an index below the count, and a table has at least one partition.
        &self.partitions[p.0 as usize]
    }

    pub fn partitions(&self) -> &[Arc<Partition>] {
        &self.partitions
    }
}
