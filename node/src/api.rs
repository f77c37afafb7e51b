//! The server API's operations for an application's backend: publish (to one room or many),
//! history, presence, rooms, and disconnecting a user. Publishes take the path clients'
//! publishes take (the room log, with the same idempotency keys), so they reach WebSocket
//! subscribers on every node alike. Transport-free: `http::api` maps these to HTTP and
//! documents them in OpenAPI (`openapi`).

use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::hub::log::{Command, Reply};
use crate::hub::outbox::outbox;
use crate::hub::room::RoomStats;
use crate::hub::session::{history_page, presence_page};
use crate::hub::{Hub, unix_millis};
use crate::protocol::{ChatMessage, ServerFrame, StreamPosition, UserInfo, close, validate_room_name};

pub mod openapi;

/// The sender of API publishes that name none.
pub const DEFAULT_SENDER: &str = "server";
/// Rooms one broadcast may name.
pub const MAX_BROADCAST_ROOMS: usize = 100;
/// Longest user id or name a publish may claim (as the protocol's `id` limit, doubled).
const MAX_USER_CHARS: usize = 128;
/// Longest idempotency key, as for clients.
const MAX_KEY_CHARS: usize = 64;

/// Who an API message is from, as subscribers see it (`sender` of the message).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sender {
    #[schemars(length(min = 1, max = 128), regex(pattern = r"\S"))]
    pub id: String,
    #[schemars(length(min = 1, max = 128), regex(pattern = r"\S"))]
    pub name: String,
}

/// A message to publish.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The message text, at most `limits.max_message_bytes` bytes (else 413).
    pub body: String,
    /// Default `{"id": "server", "name": "server"}`.
    #[serde(default)]
    pub sender: Option<Sender>,
    /// Idempotency key: a retry with the same key and sender is stored at most once (within the
    /// window docs/protocol.md gives for clients' keys).
    #[serde(default)]
    #[schemars(length(min = 1, max = 64))]
    pub key: Option<String>,
}

/// The same message to several rooms.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRequest {
    /// Room names, each at most once.
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_.:@-]+$")))]
    #[schemars(extend("uniqueItems" = true))]
    pub rooms: Vec<String>,
    /// As for a publish.
    pub body: String,
    #[serde(default)]
    pub sender: Option<Sender>,
    /// As for a publish; keys are per room, so one key serves every room.
    #[serde(default)]
    #[schemars(length(min = 1, max = 64))]
    pub key: Option<String>,
}

/// Where a published message was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Published {
    pub room: String,
    /// The message's offset in the room's stream (a retried key answers the first copy's).
    pub offset: u64,
    pub epoch: String,
}

/// One room's outcome in a broadcast: where it was stored, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct BroadcastOutcome {
    pub room: String,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub published: Option<Stored>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Offset and epoch of a stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Stored {
    pub offset: u64,
    pub epoch: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct BroadcastResult {
    /// One per requested room, in the request's order.
    pub results: Vec<BroadcastOutcome>,
}

/// Which part of a room's history to read.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Read forward from just after `since_offset` of this epoch (another epoch than the
    /// room's: from its first message kept, with `complete: false`).
    #[serde(default)]
    pub since_epoch: Option<String>,
    /// Read forward from just after this offset (0 without `since_epoch`: of the room's epoch).
    #[serde(default)]
    pub since_offset: Option<u64>,
    /// At most this many messages (also cut to one page).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One page of a room's history, as the WebSocket `history` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryPage {
    pub room: String,
    pub epoch: String,
    pub messages: Vec<ChatMessage>,
    /// False when older messages than those asked for have left the history.
    pub complete: bool,
    /// Reading forward: more messages follow; ask again from the last one.
    pub more: bool,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PresenceQuery {
    /// Skip this many users (the `next` of the previous page).
    #[serde(default)]
    pub offset: Option<usize>,
}

/// One page of the users present in a room, on any node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PresencePage {
    pub room: String,
    pub users: Vec<UserInfo>,
    /// Where the next page starts, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct RoomList {
    /// The rooms the answering node holds, by name.
    pub rooms: Vec<RoomStats>,
}

/// How to disconnect a user.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DisconnectRequest {
    /// WebSocket close code (default 4502: do not reconnect; 4000 makes clients reconnect at
    /// once, e.g. to pick up new roles).
    #[serde(default)]
    #[schemars(range(min = 4000, max = 4999))]
    pub code: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Disconnected {
    pub user_id: String,
    pub code: u16,
    /// Connections closed on the answering node; the other nodes close theirs as the request
    /// reaches them.
    pub local_connections: usize,
}

/// The body of every error answer, as for refused handshakes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    /// The request field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { field: &'static str, message: String },
    #[error("{message}")]
    TooLarge { field: &'static str, message: String },
    #[error("{0}")]
    Forbidden(String),
    #[error("room {0} is not on this node (no message yet, or forgotten after being idle)")]
    RoomNotFound(String),
    /// Not committed in time (no quorum or no leader reachable): retry with the same key.
    #[error("{0}")]
    Unavailable(String),
    #[error("the node is draining; send to another node")]
    Draining,
    #[error("room would be new and the node holds limits.max_rooms ({0}) rooms")]
    TooManyRooms(usize),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn bad(field: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest { field, message: message.into() }
    }

    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest { .. } => 400,
            Self::Forbidden(_) => 403,
            Self::RoomNotFound(_) => 404,
            Self::TooLarge { .. } => 413,
            Self::TooManyRooms(_) => 429,
            Self::Internal(_) => 500,
            Self::Unavailable(_) | Self::Draining => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::TooLarge { .. } => "too_large",
            Self::Forbidden(_) => "forbidden",
            Self::RoomNotFound(_) => "room_not_found",
            Self::Unavailable(_) => "unavailable",
            Self::Draining => "draining",
            Self::TooManyRooms(_) => "too_many_rooms",
            Self::Internal(_) => "internal",
        }
    }

    pub fn body(&self) -> ErrorBody {
        let field = match self {
            Self::BadRequest { field, .. } | Self::TooLarge { field, .. } => Some((*field).to_owned()),
            _ => None,
        };
        ErrorBody { code: self.code().to_owned(), message: self.to_string(), field }
    }
}

fn check_room(hub: &Hub, room: &str) -> Result<(), ApiError> {
    validate_room_name(room).map_err(|why| ApiError::bad("room", why))?;
    // Rooms no `auth.rooms` rule covers are not the API's to write to when rules are set.
    if !hub.authenticator().has_rule_for(room) {
        return Err(ApiError::Forbidden(format!("no auth.rooms rule covers room {room}")));
    }
    // The bound clients' joins have: a new room is memory on every node.
    let max_rooms = hub.config().limits.max_rooms;
    if hub.existing_room(room).is_none() && hub.room_count() >= max_rooms {
        return Err(ApiError::TooManyRooms(max_rooms));
    }
    Ok(())
}

fn check_message(hub: &Hub, message: &PublishRequest) -> Result<(), ApiError> {
    let max = hub.config().limits.max_message_bytes;
    if message.body.len() > max {
        return Err(ApiError::TooLarge {
            field: "body",
            message: format!("body is {} bytes; at most {max} (limits.max_message_bytes)", message.body.len()),
        });
    }
    if let Some(key) = &message.key
        && !(1..=MAX_KEY_CHARS).contains(&key.chars().count())
    {
        return Err(ApiError::bad("key", format!("key must be 1 to {MAX_KEY_CHARS} characters")));
    }
    if let Some(sender) = &message.sender {
        for (field, value) in [("sender.id", &sender.id), ("sender.name", &sender.name)] {
            if value.trim().is_empty() || value.chars().count() > MAX_USER_CHARS {
                return Err(ApiError::bad(field, format!("{field} must be 1 to {MAX_USER_CHARS} characters")));
            }
        }
    }
    Ok(())
}

/// Publishes `message` to `room` and returns once it is committed and applied on this node.
pub async fn publish(hub: &Arc<Hub>, room: &str, message: PublishRequest) -> Result<Published, ApiError> {
    check_room(hub, room)?;
    check_message(hub, &message)?;
    let stored = store(hub, room, message).await?;
    Ok(Published { room: room.to_owned(), offset: stored.offset, epoch: stored.epoch })
}

async fn store(hub: &Arc<Hub>, room: &str, message: PublishRequest) -> Result<Stored, ApiError> {
    if hub.is_draining() {
        return Err(ApiError::Draining);
    }
    if !hub.is_ready() {
        return Err(ApiError::Unavailable("this node has no quorum: send to another node or retry".into()));
    }
    hub.metrics().publishes.inc();
    let sender = message.sender.map_or_else(
        || UserInfo { id: DEFAULT_SENDER.to_owned(), name: DEFAULT_SENDER.to_owned() },
        |s| UserInfo { id: s.id, name: s.name },
    );
    let key = hub.publish_key('a', &sender, room, message.key);
    let command = Command::Publish {
        room: room.to_owned(),
        key,
        sender,
        body: message.body,
        ts: unix_millis(),
        epoch: crate::hub::room::new_epoch(),
    };
    // The log answers through an outbox, as it answers a client's connection.
    let (answer_to, mut answers) = outbox(4, 64 * 1024, hub.metrics().clone());
    let frame = match hub.log().publish(command, Reply { outbox: answer_to, id: None }) {
        Some(frame) => frame,
        None => {
            let wait = Duration::from_millis(hub.config().cluster.publish_timeout_ms) + Duration::from_secs(1);
            let mut frames = Vec::with_capacity(1);
            let answered = tokio::time::timeout(wait, answers.wait(&mut frames, 1)).await;
            match (answered, frames.pop()) {
                (Ok(_), Some(frame)) => frame,
                _ => return Err(ApiError::Unavailable("not committed in time; retry with the same key".into())),
            }
        }
    };
    match serde_json::from_str::<ServerFrame>(frame.as_str()) {
        Ok(ServerFrame::Ack { offset, epoch, .. }) => Ok(Stored { offset, epoch }),
        Ok(ServerFrame::Error { code, message, .. }) => match code {
            crate::protocol::ErrorCode::Unavailable => Err(ApiError::Unavailable(message)),
            crate::protocol::ErrorCode::Draining => Err(ApiError::Draining),
            _ => Err(ApiError::Internal(message)),
        },
        _ => Err(ApiError::Internal("unexpected answer from the room log".into())),
    }
}

/// Publishes one message to several rooms at once; each room's outcome is reported apart.
pub async fn broadcast(hub: &Arc<Hub>, request: BroadcastRequest) -> Result<BroadcastResult, ApiError> {
    if request.rooms.is_empty() || request.rooms.len() > MAX_BROADCAST_ROOMS {
        return Err(ApiError::bad("rooms", format!("rooms must name 1 to {MAX_BROADCAST_ROOMS} rooms")));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = request.rooms.iter().find(|room| !seen.insert(room.as_str())) {
        return Err(ApiError::bad("rooms", format!("room {twice} is named twice")));
    }
    for room in &request.rooms {
        check_room(hub, room)?;
    }
    let message = PublishRequest { body: request.body, sender: request.sender, key: request.key };
    check_message(hub, &message)?;
    let stores = request.rooms.iter().map(|room| store(hub, room, message.clone()));
    let outcomes = futures_util::future::join_all(stores).await;
    let results = request
        .rooms
        .into_iter()
        .zip(outcomes)
        .map(|(room, outcome)| match outcome {
            Ok(stored) => BroadcastOutcome { room, published: Some(stored), error: None },
            Err(error) => BroadcastOutcome { room, published: None, error: Some(error.body()) },
        })
        .collect();
    Ok(BroadcastResult { results })
}

fn existing(hub: &Hub, room: &str) -> Result<Arc<crate::hub::room::Room>, ApiError> {
    validate_room_name(room).map_err(|why| ApiError::bad("room", why))?;
    hub.existing_room(room).ok_or_else(|| ApiError::RoomNotFound(room.to_owned()))
}

/// A page of `room`'s history on this node: the newest messages, or forward from a position.
pub fn history(hub: &Hub, room: &str, query: HistoryQuery) -> Result<HistoryPage, ApiError> {
    if query.limit == Some(0) {
        return Err(ApiError::bad("limit", "limit must be at least 1"));
    }
    let room_ref = existing(hub, room)?;
    let since = match (query.since_epoch, query.since_offset) {
        (None, None) => None,
        (epoch, offset) => Some(StreamPosition {
            epoch: epoch.or_else(|| room_ref.stats().epoch).unwrap_or_default(),
            offset: offset.unwrap_or(0),
        }),
    };
    let (epoch, messages, complete) = room_ref.history(since.as_ref(), query.limit);
    let page_bytes = hub.config().limits.outbound_queue_bytes / 4;
    let (messages, complete, more) = history_page(messages, complete, since.is_some(), page_bytes);
    Ok(HistoryPage { room: room.to_owned(), epoch, messages, complete, more })
}

/// A page of the users present in `room`.
pub fn presence(hub: &Hub, room: &str, query: PresenceQuery) -> Result<PresencePage, ApiError> {
    let users = existing(hub, room)?.presence();
    let page_bytes = hub.config().limits.outbound_queue_bytes / 4;
    let (users, next) = presence_page(users, query.offset.unwrap_or(0), page_bytes);
    Ok(PresencePage { room: room.to_owned(), users, next })
}

pub fn room(hub: &Hub, room: &str) -> Result<RoomStats, ApiError> {
    Ok(existing(hub, room)?.stats())
}

pub fn rooms(hub: &Hub) -> RoomList {
    let mut rooms: Vec<RoomStats> = hub.rooms_snapshot().iter().map(|room| room.stats()).collect();
    rooms.sort_by(|a, b| a.room.cmp(&b.room));
    RoomList { rooms }
}

/// Closes every connection of `user_id`, here and (through the peers) on every node.
pub fn disconnect(hub: &Hub, user_id: &str, request: DisconnectRequest) -> Result<Disconnected, ApiError> {
    if user_id.is_empty() || user_id.chars().count() > MAX_USER_CHARS {
        return Err(ApiError::bad("user", format!("user id must be 1 to {MAX_USER_CHARS} characters")));
    }
    let code = request.code.unwrap_or(close::DISCONNECTED_BY_SERVER);
    if !(4000..=4999).contains(&code) {
        return Err(ApiError::bad("code", "code must be between 4000 and 4999"));
    }
    let local_connections = hub.disconnect_user(user_id, code);
    hub.log().disconnect_user(user_id, code);
    Ok(Disconnected { user_id: user_id.to_owned(), code, local_connections })
}
