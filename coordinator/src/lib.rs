//! ferry's coordinator: the cluster's metadata in etcd, the duplication status machine, leader
//! election, the admin HTTP API, and the `ferry` CLI's client side.
//!
//! - [`config`]: the coordinator's TOML file.
//! - [`server`]: the coordinator process (start-up, election, admin HTTP API, metrics).
//! - [`cli`]: the `ferry` CLI (its API bodies and client are `ferry_admin`).

pub mod cli;
pub mod config;
pub mod proxy;
pub mod server;
