//! SCAN's server side: the cursor table and Redis glob patterns (MATCH, CONFIG GET).
//!
//! A Redis cursor is a decimal u64 that clients pass back verbatim, but a position in a
//! partitioned table is (partition, last key seen) and keys are arbitrary bytes. So the node keeps
//! a bounded table mapping a cursor id to that position. Old entries are evicted first; a client
//! that comes back with an evicted or unknown id gets `-ERR invalid cursor` and starts over.

use std::collections::BTreeMap;

use parking_lot::Mutex;

/// Where a SCAN continues: in `partition`, after key `after` (from the start when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPos {
    pub partition: u32,
    pub after: Option<Vec<u8>>,
}

impl ScanPos {
    pub const START: ScanPos = ScanPos {
        partition: 0,
        after: None,
    };
}

/// Cursor ids → scan positions, node-wide (a cursor may be continued on another connection, as
/// in Redis), holding at most `capacity` positions.
pub struct CursorTable {
    inner: Mutex<Cursors>,
    capacity: usize,
}

struct Cursors {
    next_id: u64,
    /// Ordered by id, and ids only grow, so the first entry is the oldest.
    positions: BTreeMap<u64, ScanPos>,
}

impl CursorTable {
    /// Default capacity: enough for thousands of concurrent scans, and a few MB of keys at most.
    pub const DEFAULT_CAPACITY: usize = 16_384;

    /// `first_id` should differ between runs of the node (it is derived from the start time), so
    /// that a client holding a cursor from before a restart gets an error rather than a position
    /// in some other scan.
    pub fn new(capacity: usize, first_id: u64) -> CursorTable {
        CursorTable {
            inner: Mutex::new(Cursors {
                next_id: first_id.max(1),
                positions: BTreeMap::new(),
            }),
            capacity: capacity.max(1),
        }
    }

    /// Stores a position and returns its new id (never 0, which means "start" and "done").
    pub fn insert(&self, pos: ScanPos) -> u64 {
        let mut c = self.inner.lock();
        let id = c.next_id;
        // Wrapping past u64::MAX would take centuries of scans; skip 0 anyway.
        c.next_id = c.next_id.checked_add(1).unwrap_or(1);
        while c.positions.len() >= self.capacity {
            c.positions.pop_first();
        }
        c.positions.insert(id, pos);
        id
    }

    /// The position of cursor `id`; `Some(START)` for 0. The entry is kept, so a client may retry
    /// a SCAN whose reply it lost.
    pub fn position(&self, id: u64) -> Option<ScanPos> {
        if id == 0 {
            return Some(ScanPos::START);
        }
        self.inner.lock().positions.get(&id).cloned()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Redis's glob matching (`stringmatchlen`): `*`, `?`, `[abc]`, `[^a-z]`, and `\` escapes.
///
/// Runs in O(pattern × subject) at worst: a `*` remembers one backtrack point, which suffices
/// because every other token matches exactly one byte. (Redis's recursive matcher needed a guard
/// against exponential patterns; this one does not.)
pub fn glob_match(pattern: &[u8], subject: &[u8], nocase: bool) -> bool {
    let (mut p, mut s) = (0usize, 0usize);
    // After a `*`: where the pattern resumes, and the subject position the star has swallowed to.
    let mut star: Option<(usize, usize)> = None;
    while let Some(&c) = subject.get(s) {
        match pattern.get(p) {
            Some(b'*') => {
                while pattern.get(p) == Some(&b'*') {
                    p += 1;
                }
                if p == pattern.len() {
                    return true;
                }
                star = Some((p, s));
                continue;
            }
            Some(_) => {
                if let Some(next) = match_one(pattern, p, c, nocase) {
                    p = next;
                    s += 1;
                    continue;
                }
            }
            None => {}
        }
        // Mismatch: let the last star swallow one more byte, or fail.
        match star {
            Some((sp, ss)) => {
                p = sp;
                s = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    while pattern.get(p) == Some(&b'*') {
        p += 1;
    }
    p == pattern.len()
}

/// Matches the single-byte token at `pattern[p]` (not a `*`) against `c`; returns the index after
/// the token on a match.
fn match_one(pattern: &[u8], p: usize, c: u8, nocase: bool) -> Option<usize> {
    let eq = |a: u8, b: u8| {
        if nocase {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    match pattern.get(p)? {
        b'?' => Some(p + 1),
        b'\\' => match pattern.get(p + 1) {
            Some(&lit) => eq(lit, c).then_some(p + 2),
            // A trailing backslash matches itself, as in Redis.
            None => eq(b'\\', c).then_some(p + 1),
        },
        b'[' => {
            let mut i = p + 1;
            let negate = pattern.get(i) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut hit = false;
            // An unterminated class ends with the pattern, as in Redis.
            while let Some(&b) = pattern.get(i) {
                if b == b']' {
                    break;
                }
                if b == b'\\' && i + 1 < pattern.len() {
                    i += 1;
                    hit |= pattern.get(i).is_some_and(|&lit| eq(lit, c));
                } else if pattern.get(i + 1) == Some(&b'-')
                    && pattern.get(i + 2).is_some_and(|&e| e != b']')
                {
                    let (mut lo, mut hi) = (b, pattern.get(i + 2).copied().unwrap_or(b));
                    if lo > hi {
                        std::mem::swap(&mut lo, &mut hi);
                    }
                    let in_range = |x: u8| (lo..=hi).contains(&x);
                    hit |= in_range(c)
                        || (nocase
                            && (in_range(c.to_ascii_lowercase())
                                || in_range(c.to_ascii_uppercase())));
                    i += 2;
                } else {
                    hit |= eq(b, c);
                }
                i += 1;
            }
            // Skip the closing ']' if there is one.
            let next = if pattern.get(i) == Some(&b']') {
                i + 1
            } else {
                i
            };
            (hit != negate).then_some(next)
        }
        &lit => eq(lit, c).then_some(p + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        glob_match(p.as_bytes(), s.as_bytes(), false)
    }

    #[test]
    fn glob_basics() {
        assert!(m("*", ""));
        assert!(m("*", "anything"));
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(m("key:*", "key:1"));
        assert!(!m("key:*", "kez:1"));
        assert!(m("*:1", "key:1"));
        assert!(m("k?y", "key"));
        assert!(!m("k?y", "ky"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("a**", "a"));
        assert!(m("*a*", "bab"));
    }

    #[test]
    fn glob_classes_and_escapes() {
        assert!(m("h[ae]llo", "hello"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(
            m("h[b-a]llo", "hallo"),
            "reversed ranges are swapped, as in Redis"
        );
        assert!(!m("h[a-b]llo", "hcllo"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "aXb"));
        assert!(m("[\\]]", "]"));
        assert!(
            m("a[bc", "ab"),
            "an unterminated class ends with the pattern"
        );
        assert!(m("a\\", "a\\"));
        assert!(glob_match(b"SAVE", b"save", true));
        assert!(glob_match(b"[A-Z]ave", b"save", true));
        assert!(!glob_match(b"SAVE", b"save", false));
    }

    #[test]
    fn glob_is_not_exponential() {
        let subject = "a".repeat(10_000);
        let pattern = format!("{}b", "*a".repeat(50));
        // A backtracking matcher would not finish this in any reasonable time; no timing is
        // asserted (the machines are shared), the suite would simply hang.
        assert!(!m(&pattern, &subject));
    }

    #[test]
    fn glob_never_panics_on_odd_patterns() {
        for p in [
            "[", "[^", "[a-", "[a-]", "\\", "[\\", "*[", "?[", "[]", "[^]", "[-]",
        ] {
            for s in ["", "a", "-", "]", "[", "\\"] {
                let _ = m(p, s);
            }
        }
    }

    #[test]
    fn cursor_table_is_bounded_and_evicts_oldest() {
        let t = CursorTable::new(3, 100);
        let ids: Vec<u64> = (0..5)
            .map(|i| {
                t.insert(ScanPos {
                    partition: i,
                    after: Some(vec![i as u8]),
                })
            })
            .collect();
        assert_eq!(ids, vec![100, 101, 102, 103, 104]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.position(100), None, "evicted");
        assert_eq!(t.position(101), None, "evicted");
        assert_eq!(
            t.position(104),
            Some(ScanPos {
                partition: 4,
                after: Some(vec![4])
            })
        );
        assert_eq!(
            t.position(104),
            Some(ScanPos {
                partition: 4,
                after: Some(vec![4])
            }),
            "a cursor may be retried"
        );
        assert_eq!(t.position(0), Some(ScanPos::START));
        assert_eq!(t.position(999_999), None);
    }

    #[test]
    fn cursor_ids_are_never_zero() {
        let t = CursorTable::new(2, u64::MAX);
        assert_eq!(t.insert(ScanPos::START), u64::MAX);
        assert_eq!(t.insert(ScanPos::START), 1, "wraps past zero");
        let t = CursorTable::new(2, 0);
        assert_eq!(t.insert(ScanPos::START), 1);
    }
}
