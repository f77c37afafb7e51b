//! The seam between the chat core and replication: the hub hands every change of a room's
//! stream to a [`RoomLog`] and learns of committed changes when the log applies them
//! ([`Hub::apply`](super::Hub::apply)). A node on its own uses [`LocalLog`], which applies at
//! once; a cluster uses the Raft log in `replication`. The hub never sees which one it has.

use std::sync::{OnceLock, Weak};

use serde::{Deserialize, Serialize};

use super::Hub;
use super::outbox::Outbox;
use super::room::encode;
use super::sessions::SessionRecord;
use crate::protocol::{ErrorCode, ServerFrame, UserInfo};
use crate::transport::Frame;

/// A change of a room's stream, as the log stores it. Applying the same commands in the same
/// order gives the same rooms on every node: offsets, epochs and dedupe come from here only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Starts the room's stream with `epoch` unless it has one.
    Open { room: String, epoch: String },
    /// Appends a message unless one with the same `key` is among the room's recent ones.
    /// `epoch` starts the stream if this is its first message.
    Publish { room: String, key: String, sender: UserInfo, body: String, ts: u64, epoch: String },
    /// Ends the room's stream if it is still `epoch` at `last_offset` (nothing was published
    /// since the room's leader found it idle): its history and dedupe keys go, and the next
    /// message starts a new epoch. Nodes drop the room itself where nobody uses it.
    Forget { room: String, epoch: String, last_offset: u64 },
}

/// A room with a stream that nobody has used for `history.empty_room_ttl_secs`, as the sweep
/// found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleStream {
    pub room: String,
    pub epoch: String,
    pub last_offset: u64,
}

impl Command {
    pub fn room(&self) -> &str {
        match self {
            Self::Open { room, .. } | Self::Publish { room, .. } | Self::Forget { room, .. } => room,
        }
    }

    /// The size of the message body it carries.
    pub fn body_len(&self) -> usize {
        match self {
            Self::Publish { body, .. } => body.len(),
            Self::Open { .. } | Self::Forget { .. } => 0,
        }
    }

    /// The dedupe key of a publish.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Publish { key, .. } => Some(key),
            Self::Open { .. } | Self::Forget { .. } => None,
        }
    }
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Stored at `offset` (or, when `duplicate`, found already stored there).
    Stored {
        offset: u64,
        epoch: String,
        duplicate: bool,
    },
    Opened,
    /// The stream ended (`Forget`), or was kept because it moved on since (`forgotten: false`).
    Forgot {
        forgotten: bool,
    },
}

/// Where the answer to a client's publish goes.
pub struct Reply {
    pub outbox: Outbox,
    pub id: Option<String>,
}

impl Reply {
    pub fn ack_frame(id: Option<String>, room: &str, offset: u64, epoch: &str) -> Frame {
        encode(&ServerFrame::Ack { id, room: room.to_owned(), offset, epoch: epoch.to_owned() })
    }

    pub fn error_frame(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Frame {
        encode(&ServerFrame::Error { id, code, message: message.into() })
    }

    pub fn ack(self, room: &str, offset: u64, epoch: &str) {
        self.outbox.push(&Self::ack_frame(self.id, room, offset, epoch));
    }

    pub fn refuse(self, code: ErrorCode, message: impl Into<String>) {
        self.outbox.push(&Self::error_frame(self.id, code, message));
    }
}

/// How rooms' streams are stored and ordered.
pub trait RoomLog: Send + Sync {
    /// Called once by [`Hub::new`]: the log applies committed commands to this hub.
    fn attach(&self, hub: Weak<Hub>);
    /// Appends a client's publish. The ack (or error) reaches `reply` once the message is
    /// committed and applied on this node, or is returned when the answer is known at once.
    fn publish(&self, command: Command, reply: Reply) -> Option<Frame>;
    /// A join found the room without a stream: start one. The join is answered when it applies.
    fn open(&self, room: &str);
    /// Whether this node can serve clients and order their messages.
    fn ready(&self) -> bool;
    /// A user's first connection on this node joined `room` (`present`), or its last one left.
    fn presence_changed(&self, _room: &str, _user: &UserInfo, _present: bool) {}
    /// A client session's record changed.
    fn session_changed(&self, _record: &SessionRecord) {}
    /// Sends the changed session records to the peers now rather than at the next tick, and
    /// resolves once they are written (within a bound): a client told to reconnect at once
    /// must find its record wherever it lands.
    fn send_sessions_now(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }
    /// Whether room streams must be kept while idle (they are replicated state): then the
    /// sweep hands idle streams to [`RoomLog::forget`] instead of dropping them.
    fn keeps_streams(&self) -> bool {
        false
    }
    /// Ends these idle streams everywhere, through the log.
    fn forget(&self, _idle: Vec<IdleStream>) {}
    /// The server API disconnected `user_id` here: the other nodes close its connections too.
    fn disconnect_user(&self, _user_id: &str, _code: u16) {}
}

/// The log of a node on its own: commands apply at once, in the order they arrive.
#[derive(Default)]
pub struct LocalLog {
    hub: OnceLock<Weak<Hub>>,
}

impl LocalLog {
    fn apply(&self, command: &Command) -> Option<Applied> {
        self.hub.get().and_then(Weak::upgrade).map(|hub| hub.apply(command))
    }
}

impl RoomLog for LocalLog {
    fn attach(&self, hub: Weak<Hub>) {
        let _ = self.hub.set(hub);
    }

    fn publish(&self, command: Command, reply: Reply) -> Option<Frame> {
        let room = command.room().to_owned();
        Some(match self.apply(&command) {
            Some(Applied::Stored { offset, epoch, .. }) => Reply::ack_frame(reply.id, &room, offset, &epoch),
            _ => Reply::error_frame(reply.id, ErrorCode::Internal, "the node is shutting down"),
        })
    }

    fn open(&self, room: &str) {
        self.apply(&Command::Open { room: room.to_owned(), epoch: super::room::new_epoch() });
    }

    fn ready(&self) -> bool {
        true
    }
}
