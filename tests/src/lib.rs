//! ferry's integration tests (`tests/*.rs`) drive the real binaries against a real etcd. Their
//! helpers are [`ferry_harness`]'s, re-exported here under the names the tests use.

pub use ferry_harness::{
    cluster, delay, dup, etcd, failover, inbox, metrics, netns, procs, receiver,
};
