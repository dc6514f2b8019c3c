//! How a value is stored in RocksDB: the timetag and the expiry travel with the user bytes, so
//! last-writer-wins can compare against what is stored, tombstones included.
//!
//! Layout: `timetag: u64 BE | expire_at_ms: u64 BE | user bytes`. `expire_at_ms` is wall-clock
//! Unix milliseconds, 0 for "never". A tombstone is a value whose timetag has the delete flag; it
//! has no user bytes.

use crate::record::DecodeError;
use crate::timetag::Timetag;

/// Bytes before the user value.
pub const HEADER_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredValue<'a> {
    pub timetag: Timetag,
    /// Unix milliseconds after which the value reads as absent; 0 means no expiry.
    pub expire_at_ms: u64,
    pub user: &'a [u8],
}

impl<'a> StoredValue<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.user.len());
        encode_into(self.timetag, self.expire_at_ms, self.user, &mut out);
        out
    }

    pub fn decode(bytes: &'a [u8]) -> Result<StoredValue<'a>, DecodeError> {
        let (header, user) =
            bytes
                .split_first_chunk::<HEADER_LEN>()
                .ok_or(DecodeError::Malformed(
                    "stored value shorter than its 16-byte header",
                ))?;
        let (tt, exp) = header.split_at(8);
        Ok(StoredValue {
            timetag: Timetag(u64::from_be_bytes(tt.try_into().map_err(|_| HEADER_ERR)?)),
            expire_at_ms: u64::from_be_bytes(exp.try_into().map_err(|_| HEADER_ERR)?),
            user,
        })
    }

    pub fn is_tombstone(&self) -> bool {
        self.timetag.is_delete()
    }

    /// True when the value has an expiry at or before `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expire_at_ms != 0 && self.expire_at_ms <= now_ms
    }

    /// A live value is neither a tombstone nor expired.
    pub fn is_live(&self, now_ms: u64) -> bool {
        !self.is_tombstone() && !self.is_expired(now_ms)
    }
}

const HEADER_ERR: DecodeError = DecodeError::Malformed("stored value header");

/// Appends the stored form to `out` without building a [`StoredValue`] first.
pub fn encode_into(timetag: Timetag, expire_at_ms: u64, user: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&timetag.0.to_be_bytes());
    out.extend_from_slice(&expire_at_ms.to_be_bytes());
    out.extend_from_slice(user);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn round_trip(tt: u64, exp: u64, user in proptest::collection::vec(any::<u8>(), 0..256)) {
            let v = StoredValue { timetag: Timetag(tt), expire_at_ms: exp, user: &user };
            let bytes = v.encode();
            prop_assert_eq!(StoredValue::decode(&bytes), Ok(v));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let r = StoredValue::decode(&bytes);
            prop_assert_eq!(r.is_ok(), bytes.len() >= HEADER_LEN);
        }
    }

    #[test]
    fn expiry() {
        let v = StoredValue {
            timetag: Timetag(1 << 8 | 1 << 1),
            expire_at_ms: 1000,
            user: b"x",
        };
        assert!(v.is_live(999));
        assert!(!v.is_live(1000));
        let forever = StoredValue {
            expire_at_ms: 0,
            ..v
        };
        assert!(forever.is_live(u64::MAX));
    }
}
