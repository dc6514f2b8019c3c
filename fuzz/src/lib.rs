//! Helpers shared by the fuzz targets in `fuzz_targets/`. Not used by ferry itself.

/// Bytes of a plog record header (`len: u32 | crc: u32`).
pub const RECORD_HEADER_LEN: usize = ferry_proto::record::RECORD_HEADER_LEN;

/// Smallest record body: decree, timetag and op count.
pub const MIN_BODY_LEN: usize = 8 + 8 + 4;

/// Smallest encoded record, header included.
pub const MIN_RECORD_LEN: usize = RECORD_HEADER_LEN + MIN_BODY_LEN;

/// Walks `buf[from..]` as a sequence of plog records and overwrites each record's CRC with the
/// CRC-32C of its body, stopping at the first header whose length is implausible or runs past
/// the end. Returns true when it changed anything.
///
/// libFuzzer would rarely guess a checksum; with this, a target can run its input both as given
/// (bad checksums, torn tails) and with the checksums made right (the record parser behind them).
pub fn fix_record_crcs(buf: &mut [u8], from: usize) -> bool {
    let mut pos = from;
    let mut changed = false;
    while let Some(header) = buf.get(pos..pos + RECORD_HEADER_LEN) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let body_start = pos + RECORD_HEADER_LEN;
        let Some(body_end) = body_start.checked_add(len) else {
            break;
        };
        if len < MIN_BODY_LEN || body_end > buf.len() {
            break;
        }
        let crc = crc32c::crc32c(&buf[body_start..body_end]).to_le_bytes();
        if buf[pos + 4..pos + 8] != crc {
            buf[pos + 4..pos + 8].copy_from_slice(&crc);
            changed = true;
        }
        pos = body_end;
    }
    changed
}

/// Reads a little-endian u64 at `at`, if the bytes are there.
pub fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    let b = buf.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

/// Reads a little-endian u32 at `at`, if the bytes are there.
pub fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}
