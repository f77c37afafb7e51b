//! Frames between nodes on a peer link: JSON text frames, tagged by `t`. Kept apart from the
//! client protocol: clients can never send or receive these.

use serde::{Deserialize, Serialize};

use crate::protocol::{ErrorCode, UserInfo};

/// Close code for a dial from the node whose id sorts higher: the lower one dials instead.
pub const CLOSE_DIAL_BACK: u16 = 4100;
/// Close code for a peer that failed the HMAC challenge.
pub const CLOSE_AUTH_FAILED: u16 = 4101;
/// Close code for a link replaced by a newer one between the same pair.
pub const CLOSE_REPLACED: u16 = 4102;

/// Identifies a publish cluster-wide: the node the client is on and that node's counter. Kept
/// with the message so a publish retried after an owner change is stored once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublishId {
    pub node: String,
    pub seq: u64,
}

/// A room message as the sequencer proposes it; `term` is the sequencer's ownership term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub offset: u64,
    pub term: u64,
    pub pid: PublishId,
    pub sender: UserInfo,
    pub body: String,
    pub ts: u64,
}

/// A room's position on one node, exchanged when a link comes up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomDigest {
    pub room: String,
    pub epoch: String,
    pub committed: u64,
}

/// How a publish ended, sent back to the node the client is on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Stored { offset: u64, epoch: String },
    Refused { code: ErrorCode, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum PeerFrame {
    /// Acceptor → dialer, first frame: who I am and the nonce to sign.
    Challenge { node_id: String, nonce: String },
    /// Dialer → acceptor: who I am, where my peer port is, my nonce, and my proof.
    Hello { node_id: String, peer_addr: String, nonce: String, mac: String },
    /// Acceptor → dialer: the acceptor's proof over the dialer's nonce.
    Accepted { mac: String },

    /// A client's publish, on its way to the room's owner. `hops` bounds forwarding loops
    /// while views of membership differ.
    Publish { room: String, pid: PublishId, sender: UserInfo, body: String, ts: u64, hops: u8 },
    /// Owner → the publisher's node.
    PublishResult { room: String, pid: PublishId, outcome: Outcome },
    /// A node that ranks first for a room asks to sequence it from `term` on. Answered with
    /// `Promise` (and from then on appends of older terms are refused) or `Refuse`.
    Claim { room: String, term: u64, epoch: Option<String>, after: u64 },
    /// Everything the sender holds after the claimer's `after`: committed messages and the
    /// proposed, not yet committed tail.
    Promise { room: String, term: u64, epoch: Option<String>, committed: u64, entries: Vec<Entry> },
    /// The claim or append carried a term older than one already promised.
    Refuse { room: String, term: u64 },
    /// Owner → every node: store these proposed messages.
    Append { room: String, epoch: String, term: u64, entries: Vec<Entry> },
    /// The sender stored the owner's entries `from..=to` of `term`.
    Appended { room: String, term: u64, from: u64, to: u64 },
    /// Owner → every node: entries of `term` up to `upto` are committed; deliver them.
    Commit { room: String, epoch: String, term: u64, upto: u64 },
    /// Asks for committed messages after `after` (a gap, or a room this node does not know).
    Fetch { room: String, after: u64 },
    /// Committed messages of a room, the answer to `Fetch` and to a digest.
    Entries { room: String, epoch: String, committed: u64, entries: Vec<Entry> },
    /// Sent on every new link: the rooms the sender knows and how far.
    Digest { rooms: Vec<RoomDigest> },
    /// The sender has answered the digest.
    SyncDone,
    /// The sender is draining: it owns no room from now on.
    Leaving,
    /// The sender's connections of `user` in `room` went from none to some (`present`) or back.
    Presence { room: String, user: UserInfo, present: bool },
    /// Every (room, user) the sender has connections for, replacing what was known of it.
    PresenceSnapshot { entries: Vec<(String, UserInfo)> },
    /// A client session as last seen: its user and its rooms with the last delivered positions.
    Session { session: SessionRecord },
}

/// What a reconnecting client's session token brings back: its rooms and where it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub user_id: String,
    pub rooms: Vec<(String, Option<crate::protocol::StreamPosition>)>,
    /// Unix milliseconds of the last update, for expiry.
    pub updated: u64,
}
