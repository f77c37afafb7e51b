//! Wire protocol v1: JSON text frames, negotiated with the `chatcluster.v1.json` subprotocol.
//! Plain serde types and the close-code table; no I/O, no runtime. `docs/protocol.md` is the
//! human description of the same thing and must change with it.

use serde::{Deserialize, Serialize};

/// The subprotocol a client offers in `Sec-WebSocket-Protocol`.
pub const SUBPROTOCOL: &str = "chatcluster.v1.json";

/// Longest accepted room name.
pub const MAX_ROOM_NAME: usize = 128;

/// Longest accepted client request id.
pub const MAX_REQUEST_ID: usize = 64;

/// A position in a room's stream: `offset` of the last message seen in stream `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StreamPosition {
    pub epoch: String,
    pub offset: u64,
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Subscribe to a room; with `since`, also receive what was missed after that position.
    Join {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<StreamPosition>,
    },
    Leave {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        room: String,
    },
    /// Send `body` to everyone in `room`; answered by `ack` once it has an offset.
    Publish {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        room: String,
        body: String,
        /// Idempotency key: a publish with a key this user already used in this room is stored
        /// at most once, and its ack carries the first one's offset. Lets a client retry after
        /// `unavailable` or a reconnect without storing the message twice.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    /// The last `limit` messages of a room (all kept ones if omitted), or those after `since`.
    History {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<StreamPosition>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    Presence {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        room: String,
        /// Skips this many users of the list (the `next` of the previous page).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<usize>,
    },
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
}

impl ClientFrame {
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Self::Join { id, .. }
            | Self::Leave { id, .. }
            | Self::Publish { id, .. }
            | Self::History { id, .. }
            | Self::Presence { id, .. }
            | Self::Ping { id } => id.as_deref(),
        }
    }
}

/// Who sent a message or is present in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UserInfo {
    pub id: String,
    pub name: String,
}

/// One room message as stored in history and delivered to subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ChatMessage {
    pub room: String,
    pub offset: u64,
    pub epoch: String,
    pub sender: UserInfo,
    pub body: String,
    /// Milliseconds since the Unix epoch, on the node that sequenced the message.
    pub ts: u64,
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        session_id: String,
        node_id: String,
        user: UserInfo,
        roles: Vec<String>,
        protocol: String,
        /// Seconds between server pings; a client may use it to detect a dead link.
        ping_interval_secs: u64,
        /// True when the connection presented a known `session` token: the session's rooms
        /// are rejoined (a `joined` per room follows, with what was missed).
        #[serde(default)]
        resumed: bool,
    },
    /// Answer to `join`. `offset` is the room's latest offset; `recovered` says whether every
    /// message after `since` was delivered (always `false` when `since` was not given).
    Joined {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        room: String,
        epoch: String,
        offset: u64,
        recovered: bool,
    },
    Left {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        room: String,
    },
    Ack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        room: String,
        offset: u64,
        epoch: String,
    },
    Message(ChatMessage),
    History {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        room: String,
        epoch: String,
        messages: Vec<ChatMessage>,
        /// `false` when older messages than the ones asked for were already dropped (or, for a
        /// request without `since`, did not fit in one page).
        complete: bool,
        /// `true` when messages after these were left out to keep the reply to one page: ask
        /// again with `since` at the last one.
        more: bool,
    },
    /// A user's first connection joined the room.
    UserJoined {
        room: String,
        user: UserInfo,
    },
    /// A user's last connection left the room.
    UserLeft {
        room: String,
        user: UserInfo,
    },
    Presence {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        room: String,
        users: Vec<UserInfo>,
        /// Where the next page starts, when this one did not hold every user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<usize>,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: ErrorCode,
        message: String,
    },
}

/// Stable error codes of `error` frames; clients switch on these, never on the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON or misses a field.
    BadRequest,
    /// The `type` is not one this protocol knows.
    UnknownType,
    /// Room name empty, too long or with characters outside `[A-Za-z0-9_.:@-]`.
    InvalidRoom,
    /// Publishing or asking presence of a room the connection has not joined.
    NotJoined,
    /// The client's roles do not allow this.
    Forbidden,
    /// Publishing faster than the configured rate.
    RateLimited,
    /// `limits.max_rooms_per_connection` joined already, or the room would be new and the
    /// node holds `limits.max_rooms`.
    TooManyRooms,
    /// `join` for a room this connection is already in.
    AlreadyJoined,
    /// Binary frames are not part of protocol v1.
    UnsupportedData,
    /// The node is shutting down and accepts no new joins.
    Draining,
    /// The room's stream cannot take the publish now (no quorum: a partition or too many
    /// nodes down, or no answer in time). The message may still have been stored: retry, and
    /// tell apart duplicates by their offset.
    Unavailable,
    /// Something failed on the server; retrying may help.
    Internal,
}

/// Close codes the server uses. 4000–4499: reconnect (with backoff and jitter);
/// 4500–4999: do not reconnect without changing something first.
pub mod close {
    pub const NORMAL: u16 = 1000;
    /// The client broke the WebSocket protocol (RFC 6455), e.g. reserved bits set.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Message larger than `limits.max_message_bytes`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The node is draining: reconnect (to another node) right away, with jitter.
    pub const RECONNECT_ELSEWHERE: u16 = 4000;
    /// The client did not read fast enough and its outbound queue overflowed.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// Nothing received from the client within `limits.idle_timeout_secs`.
    pub const IDLE_TIMEOUT: u16 = 4002;
    /// Sustained publishing above the rate limit.
    pub const TOO_MANY_REQUESTS: u16 = 4003;
    /// The token expired while connected: reconnect only with a fresh token.
    pub const TOKEN_EXPIRED: u16 = 4500;
    /// Binary frames are not part of protocol v1.
    pub const UNSUPPORTED_DATA: u16 = 4501;
    /// The application's backend disconnected this user (server API): do not reconnect until
    /// the application says so.
    pub const DISCONNECTED_BY_SERVER: u16 = 4502;

    /// Whether a client should reconnect after this close code.
    pub fn should_reconnect(code: u16) -> bool {
        !(4500..=4999).contains(&code) && code != NORMAL
    }
}

/// Why a room name is refused, if it is.
pub fn validate_room_name(room: &str) -> Result<(), &'static str> {
    if room.is_empty() || room.len() > MAX_ROOM_NAME {
        return Err("room name must be 1 to 128 characters");
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@');
    if !room.chars().all(allowed) {
        return Err("room name may only contain letters, digits and _ - . : @");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_frames() {
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"join","id":"1","room":"lobby","since":{"epoch":"e1","offset":7}}"#)
                .unwrap();
        assert_eq!(
            f,
            ClientFrame::Join {
                id: Some("1".into()),
                room: "lobby".into(),
                since: Some(StreamPosition { epoch: "e1".into(), offset: 7 })
            }
        );
        let p: ClientFrame = serde_json::from_str(r#"{"type":"publish","room":"r","body":"hi"}"#).unwrap();
        assert_eq!(p.request_id(), None);
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"publish","room":"r"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn server_frames_are_tagged() {
        let f = ServerFrame::Ack { id: Some("9".into()), room: "r".into(), offset: 3, epoch: "e".into() };
        assert_eq!(serde_json::to_string(&f).unwrap(), r#"{"type":"ack","id":"9","room":"r","offset":3,"epoch":"e"}"#);
        let m = ServerFrame::Message(ChatMessage {
            room: "r".into(),
            offset: 1,
            epoch: "e".into(),
            sender: UserInfo { id: "u".into(), name: "U".into() },
            body: "b".into(),
            ts: 5,
        });
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.starts_with(r#"{"type":"message","room":"r","offset":1"#), "{text}");
        assert_eq!(serde_json::from_str::<ServerFrame>(&text).unwrap(), m);
    }

    #[test]
    fn room_names() {
        assert!(validate_room_name("team-1.ops:eu@x").is_ok());
        assert!(validate_room_name("").is_err());
        assert!(validate_room_name("with space").is_err());
        assert!(validate_room_name(&"a".repeat(129)).is_err());
    }

    #[test]
    fn close_code_classes() {
        assert!(close::should_reconnect(close::RECONNECT_ELSEWHERE));
        assert!(close::should_reconnect(close::SLOW_CONSUMER));
        assert!(!close::should_reconnect(close::TOKEN_EXPIRED));
        assert!(!close::should_reconnect(close::NORMAL));
    }
}
