//! The receiver's errors that belong to no one module. Config errors are
//! [`crate::config::ConfigError`], fence-file errors [`crate::fence::FenceError`], inbox errors
//! [`crate::session::InboxError`].

/// Why the receiver refuses a shipper or a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiverError {
    /// A shipper's certificate names a cluster that may not ship here: this cluster itself, one
    /// outside the duplication group, or one whose id there is outside 1..=127.
    #[error("{message}")]
    Unauthorized {
        /// The cluster the certificate names.
        cluster: String,
        /// The sentence to refuse it with ([`ferry_dup::receive::authorize`]'s): what is wrong
        /// and which config or certificate to fix.
        message: String,
    },
}
