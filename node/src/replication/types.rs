//! The Raft type configuration of the room logs, and how rooms and nodes map onto it.

use std::io::Cursor;

use openraft::BasicNode;
use sha2::{Digest, Sha256};

use crate::hub::log::Command;

/// One Raft entry: the hub's commands that reached the group's leader while earlier entries
/// were on their way, in arrival order (see `append_in_order`).
pub type Batch = Vec<Command>;

openraft::declare_raft_types!(
    /// Every room-log group: entries are batches of the hub's commands, members are named by
    /// their peer id.
    pub TypeConfig:
        D = Batch,
        R = (),
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<u64, BasicNode>;
pub type RaftServerMetrics = openraft::metrics::RaftServerMetrics<u64, BasicNode>;
pub type LogId = openraft::LogId<u64>;
pub type Vote = openraft::Vote<u64>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, BasicNode>;

/// A member's Raft id: its ordinal in the high half, the incarnation in the low half. A node
/// that lost its state comes back with a new incarnation, so it never answers for promises
/// (votes, log entries) its earlier self made.
pub fn raft_id(ordinal: u32, incarnation: u32) -> u64 {
    (u64::from(ordinal) << 32) | u64::from(incarnation)
}

pub fn ordinal_of(raft_id: u64) -> u32 {
    (raft_id >> 32) as u32
}

/// A fresh, non-zero incarnation.
pub fn new_incarnation() -> u32 {
    crate::random::random::<u32>().max(1)
}

/// The group a room's log lives in: stable across nodes and restarts.
pub fn group_of(room: &str, partitions: u32) -> u32 {
    let digest = Sha256::digest(room.as_bytes());
    let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    head % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_ordinal_and_groups_are_stable() {
        let id = raft_id(7, 0xdead_beef);
        assert_eq!(ordinal_of(id), 7);
        assert_ne!(raft_id(7, 1), raft_id(7, 2));
        assert_eq!(group_of("lobby", 8), group_of("lobby", 8));
        let spread: std::collections::HashSet<u32> = (0..200).map(|i| group_of(&format!("room-{i}"), 8)).collect();
        assert_eq!(spread.len(), 8, "rooms spread over every group");
    }
}
