//! The shipper ⇄ receiver wire protocol (ALPN `ferry/1`): length-prefixed, versioned frames.
//! See `docs/protocol.md`.
