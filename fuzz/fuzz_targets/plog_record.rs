//! The plog record decoder (`ferry_proto::PlogRecord::decode`, and `peek_decree`), the format of
//! the plog, the inbox and shipped batches.
//!
//! The input is read as a sequence of records, twice: as given, and with every record's CRC made
//! right (so the body parser behind the checksum is reached). For each record that decodes:
//! it used no more than the input, it re-encodes to exactly the bytes it was decoded from,
//! `peek_decree` agrees with it, and every strict prefix of it is `Incomplete`. For each error,
//! `peek_decree` fails the same way whenever the error comes from the frame (length, checksum),
//! which both share.
#![no_main]

use ferry_fuzz::{fix_record_crcs, MIN_RECORD_LEN, RECORD_HEADER_LEN};
use ferry_proto::{DecodeError, PlogRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    records(data);
    let mut fixed = data.to_vec();
    if fix_record_crcs(&mut fixed, 0) {
        records(&fixed);
    }
});

fn records(data: &[u8]) {
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        match PlogRecord::decode(rest) {
            Ok((rec, used)) => {
                check_record(rest, &rec, used);
                pos += used;
            }
            Err(e) => {
                check_error(rest, e);
                return;
            }
        }
    }
}

fn check_record(input: &[u8], rec: &PlogRecord, used: usize) {
    assert!(
        (MIN_RECORD_LEN..=input.len()).contains(&used),
        "used {used} of {}",
        input.len()
    );
    assert_eq!(used, rec.encoded_len());
    assert!(
        rec.ops.len() <= (used - MIN_RECORD_LEN) / 5,
        "op count bounded by the body"
    );
    let mut again = Vec::new();
    rec.encode(&mut again);
    assert_eq!(
        again,
        &input[..used],
        "a decoded record re-encodes to the bytes it was decoded from"
    );
    assert_eq!(PlogRecord::peek_decree(input), Ok((rec.decree, used)));
    for cut in [
        0,
        RECORD_HEADER_LEN - 1,
        RECORD_HEADER_LEN,
        used / 2,
        used - 1,
    ] {
        match PlogRecord::decode(&input[..cut]) {
            Err(DecodeError::Incomplete { needed }) => {
                assert!(
                    needed >= 1 && cut + needed <= used,
                    "cut {cut} needed {needed}"
                )
            }
            other => panic!("prefix of {cut} of a {used}-byte record: {other:?}"),
        }
    }
}

fn check_error(input: &[u8], e: DecodeError) {
    assert!(!e.to_string().is_empty());
    let peek = PlogRecord::peek_decree(input);
    match e {
        DecodeError::Incomplete { needed } => {
            assert!(needed >= 1);
            assert_eq!(peek, Err(e));
            if input.len() >= RECORD_HEADER_LEN {
                // The header is complete: `needed` is exactly the rest of the body.
                let len = u32::from_le_bytes([input[0], input[1], input[2], input[3]]) as usize;
                assert_eq!(input.len() + needed, RECORD_HEADER_LEN + len);
            }
        }
        DecodeError::TooLarge { .. } | DecodeError::BadChecksum { .. } => assert_eq!(peek, Err(e)),
        // The frame and checksum were fine: peek (which reads only the decree) may succeed.
        DecodeError::Malformed(_) => {
            if let Err(pe) = peek {
                assert_eq!(pe, e, "peek fails only where decode does");
            }
        }
    }
}
