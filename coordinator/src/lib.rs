//! ferry's coordinator: the cluster's metadata in etcd, the duplication status machine, leader
//! election, the admin HTTP API, and the `ferry` CLI's client side.
//!
//! - [`status`]: the dup status machine, a pure function (no I/O).
//! - [`config`]: the shared cluster config and the coordinator's TOML file.
//! - [`meta`]: typed access to `/ferry/<cluster>/...` in etcd, with compare-and-swap; node
//!   registration and the start-up config check, which every process calls.
//! - [`server`]: the coordinator process (start-up, election, admin HTTP API, metrics).
//! - [`api`], [`client`], [`cli`]: the admin API's bodies, its client, and the `ferry` CLI.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod meta;
pub mod server;
pub mod status;
