//! One client connection inside the hub: its task loop (inbound frames, outbound queue,
//! heartbeats, close requests) and the handlers for each protocol request.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tokio::time::{Instant, MissedTickBehavior, interval_at};

use super::log::{Command, Reply};
use super::outbox::{CloseCause, Inbox, Outbox, Wake, outbox};
use super::room::{JoinOutcome, LocalPresence, Room, encode, new_epoch};
use super::sessions::SessionRecord;
use super::{Hub, Permit, unix_millis};
use crate::auth::Identity;
use crate::protocol::{
    ChatMessage, ClientFrame, ErrorCode, MAX_REQUEST_ID, SUBPROTOCOL, ServerFrame, StreamPosition, UserInfo, close,
    validate_room_name,
};
use crate::transport::{Connection, Frame, Inbound, TransportError};

/// Frame slots a connection keeps in its write batches between bursts.
const IDLE_BUFFER_CAPACITY: usize = 8;

/// Frames written per wake-up, so a busy room cannot starve this connection's reads and heartbeats.
const FORWARD_BATCH: usize = 256;

pub(super) async fn run<C: Connection>(
    hub: Arc<Hub>,
    mut conn: C,
    identity: Identity,
    resume: Option<String>,
    _permit: Permit,
) {
    let limits = &hub.config.limits;
    let (out, mut inbox) = outbox(limits.outbound_queue_frames, limits.outbound_queue_bytes, hub.metrics.clone());
    let resumed = resume.and_then(|id| hub.sessions.get(&id, &identity.user.id));
    let moved = resumed.as_ref().is_some_and(|r| r.moved);
    let conn_id = hub.register(out.signal().clone(), &identity.user.id, moved);
    let session_id = resumed.as_ref().map_or_else(|| format!("{:032x}", rand::random::<u128>()), |r| r.id.clone());
    let mut session = Session {
        hub: &hub,
        conn_id,
        session_id,
        moved,
        identity,
        outbox: out,
        rooms: HashMap::new(),
        limiter: None,
        frames: frame_limiter(&hub.config.limits),
        strikes: 0,
    };
    let code = session.drive(&mut conn, &mut inbox, resumed).await;
    session.leave_all();
    hub.unregister(conn_id);
    hub.metrics.disconnected(code);
    tracing::debug!(conn_id, code, "connection closed");
}

struct Session<'h> {
    hub: &'h Hub,
    conn_id: u64,
    /// The token a reconnecting client presents to get its rooms back.
    session_id: String,
    /// This session was moved off a busy node once (`rebalance`), and is never moved again.
    moved: bool,
    identity: Identity,
    outbox: Outbox,
    /// Joined rooms, with the position the connection joined them at.
    rooms: HashMap<String, (Arc<Room>, Option<StreamPosition>)>,
    /// Created on the first publish: most connections only read.
    limiter: Option<Box<DefaultDirectRateLimiter>>,
    /// Every frame the client sends spends from this budget.
    frames: Box<DefaultDirectRateLimiter>,
    /// Rate-limited frames in a row (publishes over their rate, or any frame over the budget).
    strikes: u32,
}

fn frame_limiter(limits: &crate::config::LimitsConfig) -> Box<DefaultDirectRateLimiter> {
    let (rate, burst) = limits.frame_budget();
    limiter(rate, burst)
}

/// `rate` per second with bursts of `burst` (zero counts as one; the config refuses zero).
fn limiter(rate: u32, burst: u32) -> Box<DefaultDirectRateLimiter> {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Box::new(RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)))
}

/// How a session ends: with a close we send, or because the client went away.
enum End {
    Close(u16),
    Gone(u16),
}

/// The close reason of a connection moved off a busy node (close code 4000).
pub const REBALANCE_REASON: &str = "rebalance";

fn close_reason(code: u16) -> &'static str {
    match code {
        close::MESSAGE_TOO_BIG => "message too big",
        close::PROTOCOL_ERROR => "WebSocket protocol violation",
        close::INVALID_PAYLOAD => "text frame is not valid UTF-8",
        close::RECONNECT_ELSEWHERE => "node draining: reconnect elsewhere",
        close::SLOW_CONSUMER => "slow consumer: outbound queue overflowed",
        close::IDLE_TIMEOUT => "idle timeout",
        close::TOO_MANY_REQUESTS => "too many requests",
        close::TOKEN_EXPIRED => "token expired",
        close::UNSUPPORTED_DATA => "binary frames are not supported",
        close::DISCONNECTED_BY_SERVER => "disconnected by the server",
        _ => "",
    }
}

fn error(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Frame {
    encode(&ServerFrame::Error { id, code, message: message.into() })
}

impl Session<'_> {
    fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.hub.config.limits.write_timeout_secs)
    }

    /// Runs a write to the client within `limits.write_timeout_secs`; on failure, the code the
    /// connection ends with: 1006 when it broke, 4001 when the client stopped reading.
    async fn bounded(&self, write: impl Future<Output = Result<(), TransportError>>) -> Result<(), u16> {
        match tokio::time::timeout(self.write_timeout(), write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(1006),
            Err(_) => {
                self.hub.metrics.slow_consumer_disconnects.inc();
                Err(close::SLOW_CONSUMER)
            }
        }
    }

    async fn write<C: Connection>(&self, conn: &mut C, frames: &mut Vec<Frame>) -> Result<(), u16> {
        self.bounded(write_all(conn, frames)).await
    }

    async fn drive<C: Connection>(&mut self, conn: &mut C, inbox: &mut Inbox, resumed: Option<SessionRecord>) -> u16 {
        let limits = &self.hub.config.limits;
        let welcome = encode(&ServerFrame::Welcome {
            session_id: self.session_id.clone(),
            node_id: self.hub.node_id.clone(),
            user: self.identity.user.clone(),
            roles: self.identity.roles.clone(),
            protocol: SUBPROTOCOL.to_owned(),
            ping_interval_secs: limits.ping_interval_secs,
            resumed: resumed.is_some(),
        });
        let mut replies = vec![welcome];
        for (room, since) in resumed.map(|r| r.rooms).unwrap_or_default() {
            // A room the session joined before its stream existed was joined at its start.
            let since = since.or_else(|| self.hub.stream_start(&room));
            self.join(None, room, since, &mut replies);
        }
        if let Err(code) = self.write(conn, &mut replies).await {
            return code;
        }
        let ping_every = Duration::from_secs(limits.ping_interval_secs);
        let idle_timeout = Duration::from_secs(limits.idle_timeout_secs);
        // The heartbeat also checks token expiry, so it fires at `exp` if that comes first.
        // An `exp` too far ahead for the clock to represent never ends the connection.
        let expiry = self.identity.expires_at.and_then(|exp| {
            let left = Duration::from_secs(exp).saturating_sub(Duration::from_millis(unix_millis()));
            Instant::now().checked_add(left)
        });
        let first_tick = (Instant::now() + ping_every).min(expiry.unwrap_or(Instant::now() + ping_every));
        let mut heartbeat = interval_at(first_tick, ping_every);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let mut outgoing = Vec::new();
        // The close was asked for from outside (drain, rebalance, the server API), not caused
        // by this connection (idle, limits, protocol errors).
        let mut asked_to_close = false;
        loop {
            let end = tokio::select! {
                inbound = conn.recv() => {
                    last_seen = Instant::now();
                    match inbound {
                        Inbound::Text(text) => {
                            self.hub.metrics.frames_in.inc();
                            let end = self.handle(&text, &mut replies);
                            match self.write(conn, &mut replies).await {
                                Err(code) => Some(End::Gone(code)),
                                Ok(()) => end.map(End::Close),
                            }
                        }
                        Inbound::Activity => self.control_frame().map(End::Close),
                        Inbound::Binary => Some(End::Close(close::UNSUPPORTED_DATA)),
                        Inbound::TooBig => Some(End::Close(close::MESSAGE_TOO_BIG)),
                        Inbound::Malformed(code) => Some(End::Close(code)),
                        Inbound::Closed => {
                            // Lets the transport finish the close handshake it started.
                            let _ = conn.flush().await;
                            Some(End::Gone(close::NORMAL))
                        }
                    }
                }
                wake = inbox.wait(&mut outgoing, FORWARD_BATCH) => match wake {
                    Wake::Frames => self.write(conn, &mut outgoing).await.err().map(End::Gone),
                    Wake::Close(code) => {
                        asked_to_close = true;
                        Some(End::Close(code))
                    }
                },
                _ = heartbeat.tick() => {
                    if last_seen.elapsed() >= idle_timeout {
                        Some(End::Close(close::IDLE_TIMEOUT))
                    } else if expiry.is_some_and(|exp| Instant::now() >= exp) {
                        Some(End::Close(close::TOKEN_EXPIRED))
                    } else {
                        if let Some(expiry) = expiry.filter(|e| *e < Instant::now() + ping_every) {
                            heartbeat.reset_at(expiry);
                        }
                        self.bounded(conn.ping()).await.err().map(End::Gone)
                    }
                }
            };
            match end {
                None => continue,
                Some(End::Gone(code)) => return code,
                Some(End::Close(code)) => {
                    let rebalanced = asked_to_close && self.outbox.signal().close_cause() == CloseCause::Rebalance;
                    self.moved |= rebalanced;
                    // Leaving first fixes each room's position: everything up to it is queued
                    // already, and goes out before the close.
                    let positions = self.leave_all();
                    inbox.take_into(&mut outgoing, usize::MAX);
                    if let Err(code) = self.write(conn, &mut outgoing).await {
                        return code;
                    }
                    // Everything up to these positions was written before the close (unless
                    // frames were refused): the session resumes there. Saved before the close,
                    // which may linger.
                    if !self.outbox.signal().lost_frames() {
                        self.save(&positions);
                        if code == close::RECONNECT_ELSEWHERE {
                            // The client reconnects at once, likely to another node: its record
                            // must be there first, or it would resume from an older one (and
                            // get messages twice) or not at all (and a moved one move again).
                            self.hub.log.send_sessions_now().await;
                        }
                    }
                    let reason = if rebalanced { REBALANCE_REASON } else { close_reason(code) };
                    let closed = tokio::time::timeout(self.write_timeout(), conn.close(code, reason)).await;
                    if rebalanced && closed.is_ok() {
                        self.hub.metrics.rebalance_shed.inc();
                    }
                    return code;
                }
            }
        }
    }

    /// Dispatches one client frame; replies go to `replies`. Returns a close code if the
    /// connection must end.
    fn handle(&mut self, text: &[u8], replies: &mut Vec<Frame>) -> Option<u16> {
        let strikes = self.strikes;
        let end = self.dispatch(text, replies);
        if self.strikes == strikes {
            // Strikes count rate-limited frames in a row: any other frame clears them.
            self.strikes = 0;
        }
        end
    }

    /// Takes one frame from the connection's budget. `Err` when it is spent: a strike, with
    /// the close code once the strikes reach `limits.rate_limit_strikes`.
    fn spend_frame(&mut self) -> Result<(), Option<u16>> {
        if self.frames.check().is_ok() {
            return Ok(());
        }
        self.hub.metrics.rate_limited.inc();
        self.strikes += 1;
        Err((self.strikes >= self.hub.config.limits.rate_limit_strikes).then_some(close::TOO_MANY_REQUESTS))
    }

    /// A ping or pong from the client. They spend the budget too (each ping costs the node a
    /// pong), but are never answered with an error frame: a flood of them only collects strikes.
    fn control_frame(&mut self) -> Option<u16> {
        match self.spend_frame() {
            Ok(()) => {
                self.strikes = 0;
                None
            }
            Err(close) => close,
        }
    }

    fn dispatch(&mut self, text: &[u8], replies: &mut Vec<Frame>) -> Option<u16> {
        if let Err(close) = self.spend_frame() {
            // Not even parsed: a flood costs the node as little as possible.
            if close.is_some() {
                return close;
            }
            let (rate, _) = self.hub.config.limits.frame_budget();
            replies.push(error(None, ErrorCode::RateLimited, format!("at most {rate} frames per second")));
            return None;
        }
        let frame = match serde_json::from_slice::<ClientFrame>(text) {
            Ok(frame) => frame,
            Err(err) => {
                replies.push(parse_error(text, &err));
                return None;
            }
        };
        let id = frame.request_id().map(str::to_owned);
        if id.as_ref().is_some_and(|id| id.len() > MAX_REQUEST_ID) {
            replies.push(error(None, ErrorCode::BadRequest, "id must be at most 64 characters"));
            return None;
        }
        match frame {
            ClientFrame::Join { room, since, .. } => self.join(id, room, since, replies),
            ClientFrame::Leave { room, .. } => self.leave(id, room, replies),
            ClientFrame::Publish { room, body, key, .. } => return self.publish(id, room, body, key, replies),
            ClientFrame::History { room, since, limit, .. } => match self.rooms.get(&room) {
                Some((joined, _)) => {
                    let (epoch, messages, complete) = joined.history(since.as_ref(), limit);
                    let page_bytes = self.hub.config.limits.outbound_queue_bytes / 4;
                    let (messages, complete, more) = history_page(messages, complete, since.is_some(), page_bytes);
                    replies.push(encode(&ServerFrame::History { id, room, epoch, messages, complete, more }));
                }
                None => replies.push(not_joined(id, &room)),
            },
            ClientFrame::Presence { room, offset, .. } => match self.rooms.get(&room) {
                Some((joined, _)) => {
                    let page_bytes = self.hub.config.limits.outbound_queue_bytes / 4;
                    let (users, next) = presence_page(joined.presence(), offset.unwrap_or(0), page_bytes);
                    replies.push(encode(&ServerFrame::Presence { id, room, users, next }))
                }
                None => replies.push(not_joined(id, &room)),
            },
            ClientFrame::Ping { .. } => replies.push(encode(&ServerFrame::Pong { id })),
        }
        None
    }

    fn join(&mut self, id: Option<String>, room: String, since: Option<StreamPosition>, replies: &mut Vec<Frame>) {
        let refusal = if let Err(why) = validate_room_name(&room) {
            Some((ErrorCode::InvalidRoom, why.to_owned()))
        } else if self.hub.is_draining() {
            Some((ErrorCode::Draining, "node draining: reconnect elsewhere".to_owned()))
        } else if self.rooms.contains_key(&room) {
            Some((ErrorCode::AlreadyJoined, format!("already joined {room}")))
        } else if self.rooms.len() >= self.hub.config.limits.max_rooms_per_connection {
            Some((ErrorCode::TooManyRooms, format!("at most {} rooms per connection", self.rooms.len())))
        } else if !self.hub.auth.may_join(&self.identity, &room) {
            Some((ErrorCode::Forbidden, format!("your roles may not join {room}")))
        } else if self.hub.existing_room(&room).is_none() && self.hub.room_count() >= self.hub.config.limits.max_rooms {
            let most = self.hub.config.limits.max_rooms;
            Some((
                ErrorCode::TooManyRooms,
                format!("this node holds its maximum of {most} rooms: join an existing one"),
            ))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            replies.push(error(id, code, message));
            return;
        }
        // A room forgotten by the sweeper between lookup and join is looked up again.
        for _ in 0..3 {
            let target = self.hub.room(&room);
            let user = &self.identity.user;
            let (outcome, presence) = target.join(self.conn_id, self.outbox.clone(), user, id.clone(), since.clone());
            self.presence_changed(&room, presence);
            let position = match outcome {
                JoinOutcome::Gone => continue,
                JoinOutcome::Joined { epoch, offset, recovered, missed } => {
                    replies.extend(missed);
                    let position = StreamPosition { epoch: epoch.clone(), offset };
                    replies.push(encode(&ServerFrame::Joined { id, room: room.clone(), epoch, offset, recovered }));
                    Some(position)
                }
                JoinOutcome::Waiting => {
                    self.hub.log.open(&room);
                    since
                }
            };
            self.rooms.insert(room, (target, position));
            self.save(&HashMap::new());
            return;
        }
        replies.push(error(id, ErrorCode::Internal, "room is being recreated; retry"));
    }

    /// Tells the other nodes when this node's first connection of the user arrived or its last left.
    fn presence_changed(&self, room: &str, presence: LocalPresence) {
        match presence {
            LocalPresence::Unchanged => {}
            LocalPresence::Arrived => self.hub.log.presence_changed(room, &self.identity.user, true),
            LocalPresence::Departed => self.hub.log.presence_changed(room, &self.identity.user, false),
        }
    }

    /// Records the session (every node gets it in a cluster): its rooms, each with the given
    /// position or else the one it was joined at. A client's own close says nothing about what
    /// it read, so only a close the server sent after flushing moves positions forward.
    fn save(&self, positions: &HashMap<String, Option<StreamPosition>>) {
        let rooms = if positions.is_empty() {
            self.rooms.iter().map(|(name, (_, joined_at))| (name.clone(), joined_at.clone())).collect()
        } else {
            positions.iter().map(|(name, position)| (name.clone(), position.clone())).collect()
        };
        let record = SessionRecord {
            id: self.session_id.clone(),
            user_id: self.identity.user.id.clone(),
            rooms,
            updated: unix_millis(),
            moved: self.moved,
        };
        self.hub.log.session_changed(&record);
        self.hub.sessions.merge(record);
    }

    fn leave(&mut self, id: Option<String>, room: String, replies: &mut Vec<Frame>) {
        match self.rooms.remove(&room) {
            Some((joined, _)) => {
                let (presence, _) = joined.leave(self.conn_id, &self.identity.user);
                self.presence_changed(&room, presence);
                self.save(&HashMap::new());
                replies.push(encode(&ServerFrame::Left { id, room }));
            }
            None => replies.push(not_joined(id, &room)),
        }
    }

    fn publish(
        &mut self,
        id: Option<String>,
        room: String,
        body: String,
        key: Option<String>,
        replies: &mut Vec<Frame>,
    ) -> Option<u16> {
        if !self.rooms.contains_key(&room) {
            replies.push(not_joined(id, &room));
            return None;
        }
        if key.as_ref().is_some_and(|k| k.is_empty() || k.len() > MAX_REQUEST_ID) {
            replies.push(error(id, ErrorCode::BadRequest, "key must be 1 to 64 characters"));
            return None;
        }
        if !self.hub.auth.may_publish(&self.identity, &room) {
            replies.push(error(id, ErrorCode::Forbidden, format!("your roles may not publish in {room}")));
            return None;
        }
        let limits = &self.hub.config.limits;
        let limiter = self.limiter.get_or_insert_with(|| limiter(limits.publish_rate_per_sec, limits.publish_burst));
        if limiter.check().is_err() {
            self.hub.metrics.rate_limited.inc();
            self.strikes += 1;
            if self.strikes >= limits.rate_limit_strikes {
                return Some(close::TOO_MANY_REQUESTS);
            }
            replies.push(error(
                id,
                ErrorCode::RateLimited,
                format!("at most {} messages per second", limits.publish_rate_per_sec),
            ));
            return None;
        }
        self.hub.metrics.publishes.inc();
        let sender = self.identity.user.clone();
        let key = self.hub.publish_key('u', &sender, &room, key);
        let command = Command::Publish { room, key, sender, body, ts: unix_millis(), epoch: new_epoch() };
        // Alone the ack comes at once; in a cluster through the outbox, once the message is
        // committed and applied here.
        if let Some(answer) = self.hub.log.publish(command, Reply { outbox: self.outbox.clone(), id }) {
            replies.push(answer);
        }
        None
    }

    /// Leaves every room; returns each room's position at the moment of leaving.
    fn leave_all(&mut self) -> HashMap<String, Option<StreamPosition>> {
        let rooms: Vec<(String, Arc<Room>)> = self.rooms.drain().map(|(name, (room, _))| (name, room)).collect();
        let mut positions = HashMap::with_capacity(rooms.len());
        for (name, room) in rooms {
            let (presence, position) = room.leave(self.conn_id, &self.identity.user);
            self.presence_changed(&name, presence);
            positions.insert(name, position);
        }
        positions
    }
}

fn not_joined(id: Option<String>, room: &str) -> Frame {
    error(id, ErrorCode::NotJoined, format!("join {room} first"))
}

/// An error frame for input that is not a valid client frame: `unknown_type` when the `type`
/// is a string we do not know, `bad_request` otherwise, echoing the `id` when there is one.
fn parse_error(text: &[u8], err: &serde_json::Error) -> Frame {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(rename = "type")]
        kind: Option<serde_json::Value>,
        id: Option<serde_json::Value>,
    }
    const KNOWN: [&str; 6] = ["join", "leave", "publish", "history", "presence", "ping"];
    let envelope = serde_json::from_slice::<Envelope>(text).ok();
    let id = envelope.as_ref().and_then(|e| e.id.as_ref()).and_then(|v| v.as_str()).map(str::to_owned);
    match envelope.and_then(|e| e.kind).as_ref().and_then(|k| k.as_str().map(str::to_owned)) {
        Some(kind) if !KNOWN.contains(&kind.as_str()) => {
            error(id, ErrorCode::UnknownType, format!("unknown message type {kind:?}"))
        }
        _ => error(id, ErrorCode::BadRequest, format!("invalid frame: {err}")),
    }
}

/// Writes the frames (draining the buffer for reuse) and flushes once.
/// Messages one `history` reply carries at most.
const HISTORY_PAGE_MESSAGES: usize = 500;
/// What a message adds to a reply besides its body (ids, names, offsets, JSON).
const MESSAGE_OVERHEAD_BYTES: usize = 160;

/// Cuts a history reply to one page (`HISTORY_PAGE_MESSAGES`, about `page_bytes`, at least one
/// message), so it always fits the connection's write buffer. Paging forward from `since`
/// keeps the oldest messages and says there are `more`; the latest messages (no `since`) keep
/// the newest and are then not `complete`. Returns (messages, complete, more).
pub(crate) fn history_page(
    mut messages: Vec<ChatMessage>,
    complete: bool,
    forward: bool,
    page_bytes: usize,
) -> (Vec<ChatMessage>, bool, bool) {
    let fits = |picked: &mut usize, bytes: &mut usize, m: &ChatMessage| {
        *bytes += m.body.len() + MESSAGE_OVERHEAD_BYTES;
        *picked += 1;
        *picked == 1 || (*picked <= HISTORY_PAGE_MESSAGES && *bytes <= page_bytes)
    };
    let (mut picked, mut bytes) = (0, 0);
    if forward {
        let keep = messages.iter().take_while(|m| fits(&mut picked, &mut bytes, m)).count();
        let more = keep < messages.len();
        messages.truncate(keep);
        (messages, complete, more)
    } else {
        let keep = messages.iter().rev().take_while(|m| fits(&mut picked, &mut bytes, m)).count();
        let cut = messages.len() - keep;
        messages.drain(..cut);
        (messages, complete && cut == 0, false)
    }
}

/// Users one `presence` reply carries at most.
const PRESENCE_PAGE_USERS: usize = 1000;
/// What a user adds to a reply besides its id and name (JSON).
const USER_OVERHEAD_BYTES: usize = 24;

/// The page of a room's users starting at `offset` that fits about `page_bytes` (at least one
/// user), and where the next page starts if there is one.
pub(crate) fn presence_page(users: Vec<UserInfo>, offset: usize, page_bytes: usize) -> (Vec<UserInfo>, Option<usize>) {
    let total = users.len();
    let mut bytes = 0;
    let page: Vec<UserInfo> = users
        .into_iter()
        .skip(offset)
        .enumerate()
        .take_while(|(i, user)| {
            bytes += user.id.len() + user.name.len() + USER_OVERHEAD_BYTES;
            *i == 0 || (*i < PRESENCE_PAGE_USERS && bytes <= page_bytes)
        })
        .map(|(_, user)| user)
        .collect();
    let end = offset + page.len();
    (page, (end < total).then_some(end))
}

async fn write_all<C: Connection>(
    conn: &mut C,
    replies: &mut Vec<Frame>,
) -> Result<(), crate::transport::TransportError> {
    if replies.is_empty() {
        return Ok(());
    }
    for frame in replies.drain(..) {
        conn.feed(frame).await?;
    }
    // A burst (a room's presence, a long resume) must not leave a big buffer on an idle connection.
    replies.shrink_to(IDLE_BUFFER_CAPACITY);
    conn.flush().await
}
