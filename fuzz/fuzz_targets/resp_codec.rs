//! The node's RESP request framing (`ferry_resp::RequestCodec`, a `tokio_util` decoder) on a
//! client's bytes.
//!
//! The first input byte chooses a split point, the rest is the stream. Properties:
//! - how the bytes arrive does not matter: decoding the stream from one buffer, or from two
//!   reads split at the chosen point (and, for short streams, one byte at a time) gives the same
//!   requests, the same refusal, and leaves the same unconsumed bytes;
//! - no request is empty (blank lines, `*0` and `*-1` are skipped), and requests hold no more
//!   bytes than the stream;
//! - the requests, written back as RESP arrays of bulk strings, decode to themselves.
#![no_main]

use bytes::{Bytes, BytesMut};
use ferry_resp::RequestCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

/// Streams up to this long are also fed one byte at a time (quadratic: keep it short).
const BYTEWISE_MAX: usize = 256;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    requests: Vec<Vec<Bytes>>,
    /// The refusal's message, if the stream was refused.
    error: Option<String>,
    /// What was left in the buffer after the last `Ok(None)` (not compared after an error).
    rest: Option<Vec<u8>>,
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let whole = decode_in_reads(input, &[input.len()]);
    let at = split as usize % (input.len() + 1);
    let two = decode_in_reads(input, &[at, input.len()]);
    assert_eq!(two, whole, "split at {at}");
    if input.len() <= BYTEWISE_MAX {
        let ends: Vec<usize> = (1..=input.len()).collect();
        assert_eq!(decode_in_reads(input, &ends), whole, "one byte at a time");
    }

    let total: usize = whole.requests.iter().flatten().map(Bytes::len).sum();
    assert!(total <= input.len());
    for req in &whole.requests {
        assert!(!req.is_empty(), "an empty request is skipped, not returned");
    }

    // Written back as RESP arrays, the requests decode to themselves.
    let mut resp = Vec::new();
    for req in &whole.requests {
        resp.extend_from_slice(format!("*{}\r\n", req.len()).as_bytes());
        for arg in req {
            resp.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            resp.extend_from_slice(arg);
            resp.extend_from_slice(b"\r\n");
        }
    }
    let back = decode_in_reads(&resp, &[resp.len()]);
    assert_eq!(
        back.error, None,
        "re-encoded requests are refused: {resp:?}"
    );
    assert_eq!(back.requests, whole.requests);
    assert_eq!(back.rest.as_deref(), Some(&[][..]));
});

/// Feeds `input` to one codec in reads ending at each of `ends` (increasing, the last being
/// `input.len()`), decoding after each read until `Ok(None)` or an error.
fn decode_in_reads(input: &[u8], ends: &[usize]) -> Outcome {
    let mut codec = RequestCodec::default();
    let mut buf = BytesMut::new();
    let mut requests = Vec::new();
    let mut start = 0;
    for &end in ends {
        buf.extend_from_slice(&input[start..end]);
        start = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(req)) => requests.push(req),
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        requests,
                        error: Some(e.to_string()),
                        rest: None,
                    }
                }
            }
        }
    }
    Outcome {
        requests,
        error: None,
        rest: Some(buf.to_vec()),
    }
}
