//! Every etcd key of a cluster, in one place (DESIGN.md, "Metadata in etcd").
//!
//! ```text
//! /ferry/<cluster>/config                                  cluster config (JSON)
//! /ferry/<cluster>/nodes/<node>                            node addresses, under a lease
//! /ferry/<cluster>/tables/<table>                          table (JSON)
//! /ferry/<cluster>/tables/<table>/partitions/<p>           owning node (JSON)
//! /ferry/<cluster>/dups/<table>/<dupid>                    dup (JSON)
//! /ferry/<cluster>/dups/<table>/<dupid>/progress/<p>       confirmed decree (JSON)
//! /ferry/<cluster>/dups/<table>/<dupid>/checkpoint/<p>     checkpoint manifest (JSON)
//! /ferry/<cluster>/failover/<table>                        the table's last failover (JSON)
//! /ferry/<cluster>/state_acks/<table>/<node>               a node's answer to the table state
//! /ferry/<cluster>/election/coordinator/<lease>            coordinator election (etcd API)
//! /ferry/<cluster>/seq/dupid                               last dupid handed out
//! /ferry/<cluster>/seq/table_id                            last table id handed out
//! ```

use ferry_proto::{DupId, PartitionId};

/// Builds the keys of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys of cluster `cluster`.
    pub fn new(cluster: &str) -> Keys {
        Keys {
            root: format!("/ferry/{cluster}/"),
        }
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        self.root
            .trim_start_matches("/ferry/")
            .trim_end_matches('/')
    }

    /// `/ferry/<cluster>/`.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The stored cluster config.
    pub fn config(&self) -> String {
        format!("{}config", self.root)
    }

    /// Prefix of the node registry.
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }

    /// One registered node.
    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.root)
    }

    /// Prefix of every table key (tables and their partitions).
    pub fn tables(&self) -> String {
        format!("{}tables/", self.root)
    }

    /// One table.
    pub fn table(&self, table: &str) -> String {
        format!("{}tables/{table}", self.root)
    }

    /// Prefix of a table's partition table.
    pub fn partitions(&self, table: &str) -> String {
        format!("{}tables/{table}/partitions/", self.root)
    }

    /// One partition's entry.
    pub fn partition(&self, table: &str, p: PartitionId) -> String {
        format!("{}tables/{table}/partitions/{p}", self.root)
    }

    /// Prefix of every dup of a table (dups and their subtrees).
    pub fn dups(&self, table: &str) -> String {
        format!("{}dups/{table}/", self.root)
    }

    /// Prefix of every dup of every table.
    pub fn all_dups(&self) -> String {
        format!("{}dups/", self.root)
    }

    /// One dup.
    pub fn dup(&self, table: &str, dupid: DupId) -> String {
        format!("{}dups/{table}/{dupid}", self.root)
    }

    /// Prefix of a dup's subtree (progress, checkpoints).
    pub fn dup_subtree(&self, table: &str, dupid: DupId) -> String {
        format!("{}dups/{table}/{dupid}/", self.root)
    }

    /// A dup's progress on one partition.
    pub fn progress(&self, table: &str, dupid: DupId, p: PartitionId) -> String {
        format!("{}dups/{table}/{dupid}/progress/{p}", self.root)
    }

    /// A full dup's checkpoint transfer progress on one partition (written by its shipper).
    pub fn transfer(&self, table: &str, dupid: DupId, p: PartitionId) -> String {
        format!("{}dups/{table}/{dupid}/transfer/{p}", self.root)
    }

    /// A dup's re-bootstrap of one partition (the log was collected past what it confirmed).
    pub fn rebootstrap(&self, table: &str, dupid: DupId, p: PartitionId) -> String {
        format!("{}dups/{table}/{dupid}/rebootstrap/{p}", self.root)
    }

    /// A dup's checkpoint on one partition.
    pub fn checkpoint(&self, table: &str, dupid: DupId, p: PartitionId) -> String {
        format!("{}dups/{table}/{dupid}/checkpoint/{p}", self.root)
    }

    /// Prefix of every failover record.
    pub fn failovers(&self) -> String {
        format!("{}failover/", self.root)
    }

    /// A table's failover record.
    pub fn failover(&self, table: &str) -> String {
        format!("{}failover/{table}", self.root)
    }

    /// The leader's last return check of a table: no other cluster took its writes over (see
    /// [`crate::failover::Checked`]).
    pub fn checked(&self, table: &str) -> String {
        format!("{}checked/{table}", self.root)
    }

    /// Prefix of every table's return check.
    pub fn all_checked(&self) -> String {
        format!("{}checked/", self.root)
    }

    /// Prefix of the nodes' answers to every table's state.
    pub fn all_state_acks(&self) -> String {
        format!("{}state_acks/", self.root)
    }

    /// Prefix of the nodes' answers to a table's state.
    pub fn state_acks(&self, table: &str) -> String {
        format!("{}state_acks/{table}/", self.root)
    }

    /// One node's answer to a table's state.
    pub fn state_ack(&self, table: &str, node: &str) -> String {
        format!("{}state_acks/{table}/{node}", self.root)
    }

    /// The coordinator election's name (etcd's election API puts candidates under it).
    pub fn coordinator_election(&self) -> String {
        format!("{}election/coordinator", self.root)
    }

    /// Prefix of the receiver registry.
    pub fn receivers(&self) -> String {
        format!("{}receivers/", self.root)
    }

    /// The receiver beside one node.
    pub fn receiver(&self, node: &str) -> String {
        format!("{}receivers/{node}", self.root)
    }

    /// The shipping election of one (dup, partition); its leader's create revision is the
    /// fencing token the receiver checks.
    pub fn shipper_election(&self, table: &str, dupid: DupId, p: PartitionId) -> String {
        format!("{}election/dup/{table}/{dupid}/{p}", self.root)
    }

    /// The last dupid handed out.
    pub fn dupid_seq(&self) -> String {
        format!("{}seq/dupid", self.root)
    }

    /// The last table id handed out.
    pub fn table_id_seq(&self) -> String {
        format!("{}seq/table_id", self.root)
    }

    /// The part of `key` after `prefix`, if `key` is directly under it (no further `/`).
    pub fn leaf<'k>(key: &'k [u8], prefix: &str) -> Option<&'k str> {
        let rest = key.strip_prefix(prefix.as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        (!rest.is_empty() && !rest.contains('/')).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_design() {
        let k = Keys::new("bj");
        assert_eq!(k.dup("users", DupId(7)), "/ferry/bj/dups/users/7");
        assert_eq!(
            k.progress("users", DupId(7), PartitionId(3)),
            "/ferry/bj/dups/users/7/progress/3"
        );
        assert_eq!(
            k.partition("users", PartitionId(0)),
            "/ferry/bj/tables/users/partitions/0"
        );
        assert_eq!(
            Keys::leaf(b"/ferry/bj/tables/users", &k.tables()),
            Some("users")
        );
        assert_eq!(
            Keys::leaf(b"/ferry/bj/tables/users/partitions/0", &k.tables()),
            None
        );
    }
}
