//! The shipper ⇄ receiver frame decoder (`ferry_proto::wire::decode`) and the batch unpacker
//! (`unpack_batch`), on hostile bytes: this is the first code a peer's bytes reach.
//!
//! Each input is used twice:
//! 1. As a frame stream: every frame that decodes must use no more than the input, pass its own
//!    limit check, re-encode to exactly the bytes it was decoded from, and decode again to an
//!    equal frame. A decoded `Batch` is unpacked, a `Chunk` checked. `Incomplete` must be honest:
//!    supplying the `needed` bytes gives something that is no longer "incomplete".
//! 2. As a batch with a real zstd payload: the first 13 bytes give the header (first decree,
//!    count, flags), the rest is the batch's raw bytes, compressed here (a fuzzer cannot guess
//!    zstd frames). Record checksums are fixed up when flag bit 0 is set, so the record parser
//!    inside the batch is reached. What unpacks must match its header exactly and re-encode to
//!    the raw bytes.
#![no_main]

use ferry_fuzz::{fix_record_crcs, u32_at, u64_at, MIN_RECORD_LEN};
use ferry_proto::wire::{self, Batch, Frame, WireError, FRAME_HEADER_LEN};
use ferry_proto::{Decree, PlogRecord};
use libfuzzer_sys::fuzz_target;

/// The `max_raw` given to `unpack_batch`: small, to keep executions fast.
const MAX_RAW: usize = 1 << 20;
/// Largest `needed` the Incomplete check pads up to.
const MAX_PAD: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    frames(data);
    synthesized_batch(data);
});

fn frames(data: &[u8]) {
    let mut pos = 0;
    // A few frames back to back, as they arrive on a stream.
    for _ in 0..8 {
        let rest = &data[pos..];
        match wire::decode(rest) {
            Ok((frame, used)) => {
                check_frame(rest, &frame, used);
                pos += used;
            }
            Err(WireError::Incomplete { needed }) => {
                check_incomplete(rest, needed);
                return;
            }
            Err(e) => {
                // Every error maps to a code and a message for the `Error` frame.
                let _ = e.code().name();
                assert!(!e.to_string().is_empty());
                return;
            }
        }
    }
}

fn check_frame(input: &[u8], frame: &Frame, used: usize) {
    assert!(
        (FRAME_HEADER_LEN..=input.len()).contains(&used),
        "used {used} of {} bytes",
        input.len()
    );
    assert_eq!(
        frame.check_limits(),
        Ok(()),
        "a decoded frame is within the limits the decoder enforces: {frame:?}"
    );
    let mut again = Vec::new();
    wire::encode(frame, &mut again);
    assert_eq!(
        again,
        &input[..used],
        "re-encoding gives the bytes the frame was decoded from"
    );
    let (back, n) = wire::decode(&again).expect("a re-encoded frame decodes");
    assert_eq!(n, again.len());
    assert_eq!(&back, frame, "re-encoded frame decodes to an equal frame");
    // Every strict prefix is incomplete (a few cuts, not all: that would be quadratic).
    for cut in [
        0,
        1,
        FRAME_HEADER_LEN - 1,
        FRAME_HEADER_LEN,
        used / 2,
        used - 1,
    ] {
        if cut < used {
            match wire::decode(&input[..cut]) {
                Err(WireError::Incomplete { needed }) => {
                    assert!(
                        needed >= 1 && cut + needed <= used,
                        "cut {cut} needed {needed}"
                    )
                }
                other => panic!("prefix of {cut} of a {used}-byte frame: {other:?}"),
            }
        }
    }
    match frame {
        Frame::Batch(b) => check_batch(b, None),
        Frame::Chunk(c) => {
            if let Ok(bytes) = wire::unpack_chunk(c) {
                assert_eq!(bytes.len(), c.len as usize);
                assert_eq!(crc32c::crc32c(&bytes), c.crc32c);
            }
        }
        _ => {}
    }
}

/// `needed` more bytes complete what is known: with them the answer is no longer Incomplete
/// with the same total, i.e. the decoder never asks for more than the frame holds.
fn check_incomplete(input: &[u8], needed: usize) {
    assert!(needed >= 1);
    if needed > MAX_PAD {
        // Only a header can ask for this much: it must announce at least that much body.
        let len = u32_at(input, 0).expect("a large need comes from a complete header") as usize;
        assert_eq!(input.len() + needed, FRAME_HEADER_LEN + len);
        return;
    }
    let mut padded = input.to_vec();
    padded.resize(input.len() + needed, 0);
    match wire::decode(&padded) {
        Ok((_, used)) => assert_eq!(
            used,
            padded.len(),
            "padding to `needed` completes the frame"
        ),
        Err(WireError::Incomplete { needed: more }) => {
            // Only the header was missing; now its length is known.
            assert!(
                input.len() < FRAME_HEADER_LEN,
                "asked for {needed}, then {more} more"
            );
        }
        Err(_) => {}
    }
}

/// A batch whose payload is a real zstd frame of bytes chosen by the fuzzer.
fn synthesized_batch(data: &[u8]) {
    let (Some(first), Some(count), Some(&flags)) = (u64_at(data, 0), u32_at(data, 8), data.get(12))
    else {
        return;
    };
    let mut raw = data[13..].to_vec();
    if flags & 1 != 0 {
        fix_record_crcs(&mut raw, 0);
    }
    // Small counts, so that headers consistent with the payload are common.
    let count = if flags & 2 != 0 { count } else { count % 8 };
    let (first_decree, last_decree) = if count == 0 && flags & 4 == 0 {
        (Decree::ZERO, Decree::ZERO)
    } else {
        let last = first.wrapping_add(count as u64).wrapping_sub(1);
        // Bit 3: a header that lies about its last decree.
        let last = if flags & 8 != 0 { last ^ 1 } else { last };
        (Decree(first), Decree(last))
    };
    // Bits 4..: a raw_len that lies by a little, either way.
    let raw_len = match flags >> 4 {
        0 => raw.len() as u32,
        d if d < 8 => (raw.len() as u32).wrapping_add(d as u32),
        d => (raw.len() as u32).wrapping_sub((d - 7) as u32),
    };
    let batch = Batch {
        first_decree,
        last_decree,
        count,
        raw_len,
        zstd: zstd::bulk::compress(&raw, 1).expect("zstd compresses memory"),
    };
    check_batch(&batch, Some(&raw));
}

/// Unpacks `batch`; whatever unpacks must match the header exactly, and (when the raw bytes are
/// known) re-encode to them.
fn check_batch(batch: &Batch, raw: Option<&[u8]>) {
    let records = match wire::unpack_batch(batch, MAX_RAW) {
        Ok(records) => records,
        Err(e) => {
            assert!(
                e.code() == wire::ErrorCode::BAD_BATCH,
                "unpack errors are bad batches: {e:?}"
            );
            return;
        }
    };
    assert_eq!(records.len(), batch.count as usize);
    assert!(records.len() * MIN_RECORD_LEN <= batch.raw_len as usize);
    if records.is_empty() {
        assert_eq!(batch.first_decree, Decree::ZERO);
        assert_eq!(batch.last_decree, Decree::ZERO);
        assert_eq!(batch.raw_len, 0);
    } else {
        assert_eq!(records[0].decree, batch.first_decree);
        assert_eq!(records[records.len() - 1].decree, batch.last_decree);
        for w in records.windows(2) {
            assert_eq!(w[0].decree.0.checked_add(1), Some(w[1].decree.0));
        }
    }
    let mut encoded = Vec::new();
    for r in &records {
        r.encode(&mut encoded);
    }
    assert_eq!(encoded.len(), batch.raw_len as usize);
    if let Some(raw) = raw {
        assert_eq!(encoded, raw, "unpacked records re-encode to the raw bytes");
    }
    // And the shipper's packing of the same records unpacks to them again.
    let repacked = wire::pack_batch(&records, 1);
    assert_eq!(
        (
            repacked.first_decree,
            repacked.last_decree,
            repacked.count,
            repacked.raw_len
        ),
        (
            batch.first_decree,
            batch.last_decree,
            batch.count,
            batch.raw_len
        )
    );
    let again: Vec<PlogRecord> = wire::unpack_batch(&repacked, MAX_RAW).expect("repacked batch");
    assert_eq!(again, records);
}
