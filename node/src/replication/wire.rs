//! Frames the replication layer sends over the authenticated peer links: member announcements,
//! Raft RPCs multiplexed by group, client commands on their way to a group's leader, and the
//! node-owned ephemeral state (presence, sessions). JSON, externally tagged.

use std::collections::BTreeMap;

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::types::TypeConfig;
use crate::hub::log::Command;
use crate::hub::sessions::SessionRecord;
use crate::protocol::UserInfo;
use crate::rebalance::LoadReport;

/// Who a node is in the cluster, as its peers need to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub raft_id: u64,
    pub ordinal: u32,
    /// Draining: leaders take it out of their groups and it takes no new leadership.
    pub leaving: bool,
    /// It belongs to some group already (so nobody may bootstrap a fresh cluster).
    pub initialized: bool,
    /// It can apply `Command::Forget` (nodes from before it cannot decode it: during a rolling
    /// upgrade from such a build, idle rooms are kept until every node has it).
    #[serde(default)]
    pub forgets_rooms: bool,
    /// It takes `ReplicaFrame::Load` (older builds would log each one as malformed).
    #[serde(default)]
    pub reports_load: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RaftReply {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// The call was addressed to another incarnation of this node, or to a group it lacks.
    WrongMember,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaFrame {
    Member(MemberInfo),
    /// A Raft RPC of group `group`, addressed to Raft member `to`.
    Call {
        call: u64,
        group: u32,
        to: u64,
        rpc: RaftRpc,
    },
    Reply {
        call: u64,
        reply: RaftReply,
    },
    /// A client's command, to the leader of its room's group.
    Propose {
        group: u32,
        command: Command,
    },
    /// The receiver could not take the command (not the leader, or failing): retry now.
    ProposeFailed {
        key: String,
    },
    /// The leader of `group` is leaving and member `to` has its whole log: stand for election
    /// now (the leader grants its vote) instead of after the leader lease and a timeout.
    Elect {
        group: u32,
        to: u64,
    },
    /// Initialize `group` of a fresh cluster with these voters (sent by the bootstrapping node
    /// to the voter meant to lead the group).
    Bootstrap {
        group: u32,
        members: BTreeMap<u64, BasicNode>,
    },
    /// Entry `index` of `group` is committed (sent by the group's leader as it applies it):
    /// apply it now if it is the next one, rather than after this node's own commit.
    Committed {
        group: u32,
        index: u64,
        commands: Vec<Command>,
    },
    /// The sender's connections of `user` in `room` went from none to some (`present`) or back.
    Presence {
        room: String,
        user: UserInfo,
        present: bool,
    },
    /// Every (room, user) the sender has connections for, replacing what was known of it.
    PresenceSnapshot {
        entries: Vec<(String, UserInfo)>,
    },
    Session {
        session: SessionRecord,
    },
    /// The sender's load, every `rebalance::REPORT_EVERY`.
    Load(LoadReport),
    /// The server API disconnected this user: close its connections here too.
    Disconnect {
        user_id: String,
        code: u16,
    },
}

impl ReplicaFrame {
    pub fn encode(&self) -> Utf8Bytes {
        // Our own frame types always serialize: plain structs, strings, numbers and maps.
        Utf8Bytes::from(serde_json::to_string(self).unwrap_or_default())
    }
}
