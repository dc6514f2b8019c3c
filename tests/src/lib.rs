//! Shared helpers for ferry's integration tests: find the built binaries, pick free loopback
//! ports, run processes that are killed when the test ends.

pub mod cluster;
pub mod delay;
pub mod dup;
pub mod etcd;
pub mod netns;
pub mod procs;
