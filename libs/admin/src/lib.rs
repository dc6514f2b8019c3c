//! ferry's admin API: the request and response bodies of the coordinator's HTTP API ([`api`]) and
//! the HTTP client ([`client`]) that the `ferry` CLI and the other processes (a shipper asking a
//! remote coordinator for receivers, say) call it with.

pub mod api;
pub mod client;
