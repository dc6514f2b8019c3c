//! Reading a target partition's inboxes from the outside, as a test checks what a receiver
//! made durable.

use std::path::Path;

use anyhow::{Context, Result};
use ferry_log::plog::{list_segments, Committed, PlogReader};
use ferry_proto::{PlogRecord, Source};

/// Every record durable in the inbox of `source` in the partition in `partition_dir`: from the
/// oldest segment up to the committed marker. None if nothing was ever made durable there.
pub fn durable_records(partition_dir: &Path, source: Source) -> Result<Vec<PlogRecord>> {
    let dir = ferry_log::inbox::inbox_dir(partition_dir, source);
    let Some(committed) = Committed::read(&dir).context("read the committed marker")? else {
        return Ok(Vec::new());
    };
    let segments = list_segments(&dir).context("list the inbox segments")?;
    let Some(first) = segments.first() else {
        return Ok(Vec::new());
    };
    PlogReader::new(&dir, first.first_decree)
        .read(committed.decree, usize::MAX)
        .with_context(|| format!("read the inbox {}", dir.display()))
}
