//! Running ferry's real processes on this machine: etcd on free loopback ports, coordinators,
//! nodes, receivers and shippers of two clusters, a delaying (and cuttable) UDP relay, network
//! namespaces, a link emulator that joins two of them for any protocol; and reading what they
//! leave: inboxes on disk, `/metrics` text. The integration tests (`tests/`) and the benchmarks
//! (`bench/`) both use it; every process it starts is killed when its handle is dropped.

pub mod cluster;
pub mod delay;
pub mod dup;
pub mod etcd;
pub mod failover;
pub mod inbox;
pub mod link;
pub mod metrics;
pub mod netns;
pub mod procs;
pub mod receiver;
