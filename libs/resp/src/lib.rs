//! The RESP request framing of the node's client port: it splits a client's byte stream into
//! requests (lists of arguments). Decoding is redis-protocol's; [`RequestCodec`] only bounds what
//! a client may make the node buffer, refuses nested arrays before they reach the recursive
//! decoder, and accepts Redis's inline commands (`PING\r\n` from telnet or nc).
//!
//! A crate of its own, without the node's RocksDB, so that it can be fuzzed cheaply
//! (`fuzz/`).

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Frame;
use tokio_util::codec::Decoder;

/// Largest bulk string a client may send (Redis's `proto-max-bulk-len` is 512 MiB; ferry refuses
/// writes over 64 MiB anyway, see `ferry_proto::limits`).
pub const MAX_BULK_BYTES: usize = 64 << 20;
/// Most arguments in one request (as Redis's limit for multibulk length).
pub const MAX_ARGS: usize = 1024 * 1024;
/// Largest request, all arguments together.
pub const MAX_REQUEST_BYTES: usize = 128 << 20;
/// Longest inline command line (as Redis's `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE_BYTES: usize = 64 << 10;
/// A request that breaks the protocol or its limits. The connection answers it and closes.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Invalid(String),
    #[error("reading from the client failed: {0}")]
    Io(#[from] io::Error),
}

fn invalid(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::Invalid(msg.into())
}

/// Splits the client's byte stream into requests (lists of arguments).
#[derive(Debug, Default)]
pub struct RequestCodec {
    /// Progress of the bounds check through a multibulk request not yet complete, so a large
    /// request arriving in many reads is checked in linear time.
    scan: Option<Scanned>,
}

#[derive(Debug, Clone, Copy)]
struct Scanned {
    args: usize,
    checked: usize,
    /// Bytes checked so far: the end of the last complete argument.
    offset: usize,
}

impl Decoder for RequestCodec {
    type Item = Vec<Bytes>;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        loop {
            let Some(&first) = src.first() else {
                return Ok(None);
            };
            if first != b'*' {
                match inline(src)? {
                    Some(args) if args.is_empty() => continue,
                    other => return Ok(other),
                }
            }
            match self.check_multibulk(src)? {
                Check::Incomplete => return Ok(None),
                // `*0` and `*-1` are empty requests, which Redis skips.
                Check::Empty(len) => {
                    src.advance(len);
                    continue;
                }
                Check::Complete => {}
            }
            self.scan = None;
            let frame = match redis_protocol::resp2::decode::decode_bytes_mut(src) {
                Ok(Some((frame, _, _))) => frame,
                Ok(None) => {
                    return Err(invalid("incomplete request after its length checks passed"))
                }
                Err(e) => return Err(invalid(e.details().to_string())),
            };
            let Frame::Array(items) = frame else {
                return Err(invalid("expected an array of bulk strings"));
            };
            let mut args = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Frame::BulkString(b) => args.push(b),
                    _ => return Err(invalid("expected '$'")),
                }
            }
            return Ok(Some(args));
        }
    }
}

enum Check {
    Incomplete,
    Empty(usize),
    Complete,
}

impl RequestCodec {
    /// Checks the shape and lengths of the multibulk request at the start of `src` without
    /// decoding it: `*N` then N bulk strings `$L`, each within the limits. Nested arrays are
    /// refused here, before they can reach the recursive decoder.
    fn check_multibulk(&mut self, src: &mut BytesMut) -> Result<Check, ProtocolError> {
        let mut s = match self.scan {
            Some(s) => s,
            None => {
                let Some((n, offset)) = length_line(src, 0)? else {
                    return Ok(Check::Incomplete);
                };
                if n <= 0 {
                    return Ok(Check::Empty(offset));
                }
                if n as u64 > MAX_ARGS as u64 {
                    return Err(invalid("invalid multibulk length"));
                }
                Scanned {
                    args: n as usize,
                    checked: 0,
                    offset,
                }
            }
        };
        while s.checked < s.args {
            match src.get(s.offset) {
                None => break,
                Some(b'$') => {}
                Some(&other) => {
                    return Err(invalid(format!(
                        "expected '$', got '{}'",
                        char::from(other).escape_default()
                    )))
                }
            }
            let Some((len, data)) = length_line(src, s.offset)? else {
                break;
            };
            if len < 0 || len as u64 > MAX_BULK_BYTES as u64 {
                return Err(invalid("invalid bulk length"));
            }
            let end = data + len as usize + 2;
            if end > MAX_REQUEST_BYTES {
                return Err(invalid(format!(
                    "request larger than {} MiB",
                    MAX_REQUEST_BYTES >> 20
                )));
            }
            if end > src.len() {
                // Make room for the whole argument at once rather than growing by doubling.
                src.reserve(end - src.len());
                break;
            }
            // The decoder skips the two bytes after the data without looking at them.
            if src.get(end - 2..end) != Some(&b"\r\n"[..]) {
                return Err(invalid("expected CRLF after a bulk string"));
            }
            s.checked += 1;
            s.offset = end;
        }
        self.scan = Some(s);
        Ok(if s.checked == s.args {
            Check::Complete
        } else {
            Check::Incomplete
        })
    }
}

/// Parses the `*N\r\n` or `$L\r\n` line at `at`: returns the number and the offset after the
/// line, or `None` if the line is not complete yet.
fn length_line(src: &[u8], at: usize) -> Result<Option<(i64, usize)>, ProtocolError> {
    // A length line is short; bound the search so garbage without CRLF is refused early.
    const MAX_LINE: usize = 24;
    let rest = src.get(at + 1..).unwrap_or_default();
    let window = rest.get(..MAX_LINE).unwrap_or(rest);
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if rest.len() >= MAX_LINE {
            Err(invalid("invalid length line"))
        } else {
            Ok(None)
        };
    };
    match rest.get(cr + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(invalid("invalid length line")),
    }
    let digits = window.get(..cr).unwrap_or_default();
    let n = parse_int(digits).ok_or_else(|| invalid("invalid length"))?;
    Ok(Some((n, at + 1 + cr + 2)))
}

/// Splits an inline command (`SET a 1\r\n`) on whitespace. Returns `Some(vec![])` for a blank
/// line. Quotes are not interpreted; send RESP arrays for binary-safe arguments.
fn inline(src: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(nl) = src.iter().take(MAX_INLINE_BYTES).position(|&b| b == b'\n') else {
        return if src.len() >= MAX_INLINE_BYTES {
            Err(invalid("too big inline request"))
        } else {
            Ok(None)
        };
    };
    let line = src.split_to(nl + 1).freeze();
    let mut args = Vec::new();
    let mut start = None;
    for (i, b) in line.iter().enumerate() {
        match (b.is_ascii_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                args.push(line.slice(s..i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        args.push(line.slice(s..));
    }
    Ok(Some(args))
}

/// Parses an integer argument as Redis does (`string2ll`): optional '-', digits, no leading
/// zeros, no '+', no spaces, fits in i64.
pub fn parse_int(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || !digits.bytes().all(|c| c.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    if s == "-0" {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> (Vec<Vec<String>>, Option<String>) {
        let mut codec = RequestCodec::default();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(args)) => out.push(
                    args.iter()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect(),
                ),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }

    #[test]
    fn decodes_pipelined_requests() {
        let (reqs, err) = decode_all(
            b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$0\r\n\r\n*1\r\n$4\r\nPI",
        );
        assert_eq!(err, None);
        assert_eq!(reqs, vec![vec!["GET", "a"], vec!["SET", "b", ""]]);
    }

    #[test]
    fn decodes_byte_by_byte() {
        let input = b"*3\r\n$3\r\nSET\r\n$5\r\nhello\r\n$5\r\nworld\r\n";
        let mut codec = RequestCodec::default();
        let mut buf = BytesMut::new();
        let mut got = None;
        for (i, b) in input.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            match codec.decode(&mut buf).expect("valid prefix") {
                Some(args) => {
                    assert_eq!(i, input.len() - 1, "complete only at the last byte");
                    got = Some(args);
                }
                None => assert!(i < input.len() - 1),
            }
        }
        assert_eq!(got.expect("decoded").len(), 3);
        assert!(buf.is_empty());
    }

    #[test]
    fn inline_commands_and_blank_lines() {
        let (reqs, err) = decode_all(b"PING\r\n\r\nset  a   1\n*0\r\n*-1\r\nget a\r\n");
        assert_eq!(err, None);
        assert_eq!(
            reqs,
            vec![vec!["PING"], vec!["set", "a", "1"], vec!["get", "a"]]
        );
    }

    #[test]
    fn refuses_nested_arrays_and_bad_lengths() {
        for (input, want) in [
            (&b"*1\r\n*1\r\n$1\r\na\r\n"[..], "expected '$'"),
            (b"*2\r\n$1\r\na\r\n:1\r\n", "expected '$'"),
            (b"*99999999999\r\n", "invalid multibulk length"),
            (b"*1\r\n$-5\r\n", "invalid bulk length"),
            (b"*1\r\n$999999999999\r\n", "invalid bulk length"),
            (b"*x\r\n", "invalid length"),
            (b"*1\r\n$1\r\nab\r\n", "expected CRLF"),
            (
                b"*1234567890123456789012345678901234567890",
                "invalid length line",
            ),
        ] {
            let (_, err) = decode_all(input);
            let err = err.unwrap_or_else(|| panic!("{input:?} must be refused"));
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }

    #[test]
    fn deep_nesting_cannot_overflow_the_stack() {
        let input = b"*1\r\n".repeat(1_000_000);
        let (_, err) = decode_all(&input);
        assert!(err.is_some());
    }

    #[test]
    fn huge_inline_line_is_refused() {
        let input = vec![b'a'; MAX_INLINE_BYTES + 1];
        assert_eq!(
            decode_all(&input).1.as_deref(),
            Some("too big inline request")
        );
    }

    /// Feeds `input` in two reads, split at `at`.
    fn decode_split(input: &[u8], at: usize) -> (Vec<Vec<String>>, Option<String>) {
        let mut codec = RequestCodec::default();
        let at = at.min(input.len());
        let mut buf = BytesMut::from(&input[..at]);
        let mut out = Vec::new();
        for rest in [&input[at..], &[][..]] {
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(args)) => out.push(
                        args.iter()
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect(),
                    ),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e.to_string())),
                }
            }
            buf.extend_from_slice(rest);
        }
        (out, None)
    }

    proptest::proptest! {
        /// Garbage never panics, and how the bytes arrive does not matter: split into two reads
        /// anywhere, the stream decodes to the same requests and the same refusal.
        #[test]
        fn garbage_decodes_the_same_however_it_arrives(
            input in proptest::collection::vec(
                proptest::sample::select(b"*$:+-\r\n0123456789abc".to_vec()),
                0..64,
            ),
            at in 0usize..64,
        ) {
            proptest::prop_assert_eq!(decode_split(&input, at), decode_all(&input));
        }
    }
}
