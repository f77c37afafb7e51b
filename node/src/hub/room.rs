//! One room: its ordered stream (epoch + offsets), the bounded history ring, the keys of recent
//! publishes, the subscribed connections and the presence of users. Everything about a room
//! happens under its one lock, so ordering, history and fan-out agree. The stream changes only
//! by applying the room log's commands ([`RoomState::apply`]), in log order, on every node.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, ServerFrame, StreamPosition, UserInfo};
use crate::transport::Frame;

use super::log::{Applied, Command, IdleStream};
use super::outbox::Outbox;

/// Publish keys remembered per room at least, so a retried publish is stored once even in a
/// room with a small history.
pub const MIN_DEDUPE_WINDOW: usize = 1000;
/// Beyond that minimum, keys are kept for this long (by the publishes' own timestamps), so a
/// retry after a failover or a node restart is stored once however busy the room is...
pub const DEDUPE_WINDOW_MS: u64 = 60_000;
/// ...up to this many keys per room: every snapshot carries them, and 100 000 made snapshots
/// slow enough to raise the p99 latency of a busy room tenfold (`chat-bench cluster`).
pub const MAX_DEDUPE_KEYS: usize = 10_000;

/// A stored message and its serialized `message` frame (shared by every delivery).
pub struct Stored {
    pub message: ChatMessage,
    pub frame: Frame,
}

/// A room's replicated state, as snapshots carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomImage {
    pub name: String,
    pub epoch: Option<String>,
    pub last_offset: u64,
    pub history: Vec<ChatMessage>,
    /// Recent publish keys, oldest first: key, the offset it was stored at, its publish's `ts`.
    pub keys: Vec<(String, u64, u64)>,
}

/// A room's replicated state captured for a snapshot without copying it: the history shares
/// the stored messages and the keys their strings, so the capture (which holds up the group's
/// applies) costs little however large the room is. Serializes exactly as a `RoomImage`.
#[derive(Serialize)]
pub struct RoomCapture {
    pub name: String,
    pub epoch: Option<String>,
    last_offset: u64,
    #[serde(serialize_with = "shared_messages")]
    history: Vec<Arc<Stored>>,
    #[serde(serialize_with = "shared_keys")]
    keys: Vec<(Arc<str>, u64, u64)>,
}

fn shared_messages<S: serde::Serializer>(history: &[Arc<Stored>], out: S) -> Result<S::Ok, S::Error> {
    out.collect_seq(history.iter().map(|stored| &stored.message))
}

fn shared_keys<S: serde::Serializer>(keys: &[(Arc<str>, u64, u64)], out: S) -> Result<S::Ok, S::Error> {
    out.collect_seq(keys.iter().map(|(key, offset, ts)| (&**key, offset, ts)))
}

/// What a connection gets back when it joins.
pub enum JoinOutcome {
    Joined {
        epoch: String,
        offset: u64,
        recovered: bool,
        missed: Vec<Frame>,
    },
    /// The room's stream is not known on this node yet (a cluster room first seen here):
    /// `joined` follows through the outbox once it is.
    Waiting,
    /// The room was forgotten meanwhile: look it up again.
    Gone,
}

/// A join that waits for the room's stream.
struct Waiter {
    conn: u64,
    outbox: Outbox,
    id: Option<String>,
    since: Option<StreamPosition>,
    /// Seen by one sweep already: the next one answers it with what there is.
    overdue: bool,
}

/// A user's presence in a room: connections on this node, and the other nodes that have some.
struct Presence {
    user: UserInfo,
    local: usize,
    remote: BTreeSet<String>,
}

impl Presence {
    fn present(&self) -> bool {
        self.local > 0 || !self.remote.is_empty()
    }
}

/// What a presence change means for the rest of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalPresence {
    Unchanged,
    /// The user's first connection on this node joined.
    Arrived,
    /// The user's last connection on this node left.
    Departed,
}

pub struct Room {
    name: String,
    state: Mutex<RoomState>,
}

/// A room as the server API lists it: its stream, who is present anywhere in the cluster, and
/// how many connections on this node are subscribed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct RoomStats {
    pub room: String,
    /// The stream's epoch; absent until its first message (or `join`) is committed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// The offset of the latest message (0: none yet).
    pub last_offset: u64,
    /// Users with a connection in the room, on any node.
    pub present_users: usize,
    /// Connections subscribed to the room on the node that answers.
    pub local_subscribers: usize,
}

pub struct RoomState {
    name: String,
    /// The stream's identity; `None` until this node learns it from the room's owner.
    pub(crate) epoch: Option<String>,
    /// The last applied (committed) offset.
    pub(crate) last_offset: u64,
    history: VecDeque<Arc<Stored>>,
    history_size: usize,
    /// Keys of recent publishes and where they were stored, so a retry is stored once.
    keys: HashMap<Arc<str>, u64>,
    /// The keys in the order they were stored, with their offsets and their publishes' `ts`.
    key_order: VecDeque<(Arc<str>, u64, u64)>,
    subscribers: HashMap<u64, Outbox>,
    waiters: Vec<Waiter>,
    presence: HashMap<String, Presence>,
    empty_since: Option<Instant>,
    /// Set when the room was forgotten; a join that raced with that must look it up again.
    removed: bool,
    metrics: Arc<Metrics>,
}

pub(crate) fn encode(frame: &ServerFrame) -> Frame {
    // Serializing our own frame types cannot fail: every field is a plain string or number.
    Frame::from(serde_json::to_string(frame).unwrap_or_default())
}

pub(crate) fn new_epoch() -> String {
    format!("{:016x}", crate::random::random::<u64>())
}

impl Room {
    /// A room without a stream yet: the log's first command for it starts one.
    pub fn new(name: String, history_size: usize, metrics: Arc<Metrics>) -> Self {
        let state = RoomState {
            name: name.clone(),
            epoch: None,
            last_offset: 0,
            history: VecDeque::new(),
            history_size,
            keys: HashMap::new(),
            key_order: VecDeque::new(),
            subscribers: HashMap::new(),
            waiters: Vec::new(),
            presence: HashMap::new(),
            empty_since: Some(Instant::now()),
            removed: false,
            metrics,
        };
        Self { name, state: Mutex::new(state) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, RoomState> {
        // A panic while holding the lock leaves consistent data (no multi-step invariants are
        // broken midway by a panic-free path), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes `conn` and returns what it missed after `since`, or `Waiting` when the
    /// stream is not known here yet. Also reports whether the user just arrived on this node.
    pub fn join(
        &self,
        conn: u64,
        outbox: Outbox,
        user: &UserInfo,
        id: Option<String>,
        since: Option<StreamPosition>,
    ) -> (JoinOutcome, LocalPresence) {
        let mut st = self.lock();
        if st.removed {
            return (JoinOutcome::Gone, LocalPresence::Unchanged);
        }
        let presence = st.add_local_presence(user, conn);
        st.empty_since = None;
        // No stream yet, or a resume from further along than this node has applied (it is
        // catching up): the join is answered once the stream gets there.
        let ahead =
            since.as_ref().is_some_and(|pos| Some(&pos.epoch) == st.epoch.as_ref() && pos.offset > st.last_offset);
        let Some(epoch) = st.epoch.clone().filter(|_| !ahead) else {
            st.waiters.push(Waiter { conn, outbox, id, since, overdue: false });
            return (JoinOutcome::Waiting, presence);
        };
        let (recovered, missed) = match &since {
            Some(pos) => st.since(pos),
            None => (false, Vec::new()),
        };
        st.subscribers.insert(conn, outbox);
        (JoinOutcome::Joined { epoch, offset: st.last_offset, recovered, missed }, presence)
    }

    /// Unsubscribes `conn`; tells the others if that was the user's last connection here.
    /// Returns the room's position at that moment: everything up to it was queued to `conn`.
    pub fn leave(&self, conn: u64, user: &UserInfo) -> (LocalPresence, Option<StreamPosition>) {
        let mut st = self.lock();
        let position = st.epoch.clone().map(|epoch| StreamPosition { epoch, offset: st.last_offset });
        let was_waiting = st.waiters.iter().any(|w| w.conn == conn);
        st.waiters.retain(|w| w.conn != conn);
        if st.subscribers.remove(&conn).is_none() && !was_waiting {
            return (LocalPresence::Unchanged, position);
        }
        let presence = st.remove_local_presence(user);
        if st.subscribers.is_empty() && st.waiters.is_empty() {
            st.empty_since = Some(Instant::now());
        }
        // A join still waiting for the stream has seen nothing.
        (presence, if was_waiting { None } else { position })
    }

    /// History after `since` (when it is in this epoch), else the last `limit` messages.
    /// The flag is false when older messages than those asked for are gone.
    pub fn history(&self, since: Option<&StreamPosition>, limit: Option<usize>) -> (String, Vec<ChatMessage>, bool) {
        let st = self.lock();
        let epoch = st.epoch.clone().unwrap_or_default();
        let (complete, start) = match since {
            Some(pos) if Some(&pos.epoch) == st.epoch.as_ref() => {
                let skip = st.history.iter().take_while(|s| s.message.offset <= pos.offset).count();
                (st.covers(pos.offset), skip)
            }
            Some(_) => (false, 0),
            None => {
                let wanted = limit.unwrap_or(usize::MAX);
                let start = st.history.len().saturating_sub(wanted);
                let oldest = st.history.front().map_or(st.last_offset + 1, |s| s.message.offset);
                (start > 0 || oldest <= 1, start)
            }
        };
        let take = limit.unwrap_or(usize::MAX);
        let messages = st.history.iter().skip(start).take(take).map(|s| s.message.clone()).collect();
        (epoch, messages, complete)
    }

    /// What the server API shows of the room.
    pub fn stats(&self) -> RoomStats {
        let st = self.lock();
        RoomStats {
            room: st.name.clone(),
            epoch: st.epoch.clone(),
            last_offset: st.last_offset,
            present_users: st.presence.values().filter(|p| p.present()).count(),
            local_subscribers: st.subscribers.len(),
        }
    }

    pub fn presence(&self) -> Vec<UserInfo> {
        let st = self.lock();
        let mut users: Vec<UserInfo> = st.presence.values().filter(|p| p.present()).map(|p| p.user.clone()).collect();
        users.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        users
    }

    /// Marks the room removed if it has had no subscribers (and no one elsewhere is present)
    /// since before `cutoff`; a room with a stream only when `streams_too`.
    pub fn retire_if_idle_since(&self, cutoff: Instant, streams_too: bool) -> bool {
        let mut st = self.lock();
        let idle = st.idle_since(cutoff, streams_too);
        if idle {
            st.removed = true;
        }
        idle
    }

    /// Marks the room removed if it has no stream and nobody on this node uses it (after a
    /// `Command::Forget`).
    pub fn retire_if_unused(&self) -> bool {
        let mut st = self.lock();
        let unused = st.epoch.is_none() && st.unused();
        if unused {
            st.removed = true;
        }
        unused
    }

    /// Whether `retire_if_idle_since` would retire the room now (it may change before).
    pub fn is_idle_since(&self, cutoff: Instant, streams_too: bool) -> bool {
        self.lock().idle_since(cutoff, streams_too)
    }
}

impl RoomState {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn idle_since(&self, cutoff: Instant, streams_too: bool) -> bool {
        (streams_too || self.epoch.is_none()) && self.unused() && self.empty_since.is_some_and(|t| t <= cutoff)
    }

    /// Whether every message after `offset` is still in history.
    fn covers(&self, offset: u64) -> bool {
        if offset > self.last_offset {
            return false;
        }
        match self.history.front() {
            Some(oldest) => offset + 1 >= oldest.message.offset,
            None => offset == self.last_offset,
        }
    }

    fn since(&self, pos: &StreamPosition) -> (bool, Vec<Frame>) {
        if Some(&pos.epoch) != self.epoch.as_ref() {
            return (false, self.history.iter().map(|s| s.frame.clone()).collect());
        }
        let missed = self.history.iter().filter(|s| s.message.offset > pos.offset).map(|s| s.frame.clone()).collect();
        (self.covers(pos.offset), missed)
    }

    pub(crate) fn stored_offset(&self, key: &str) -> Option<u64> {
        self.keys.get(key).copied()
    }

    /// Applies one command of the room log. Deterministic: every node gets the same result.
    pub(crate) fn apply(&mut self, command: &Command) -> Applied {
        match command {
            Command::Open { epoch, .. } => {
                if self.epoch.is_none() {
                    self.epoch = Some(epoch.clone());
                    self.answer_waiters();
                }
                Applied::Opened
            }
            Command::Publish { key, sender, body, ts, epoch, .. } => {
                if self.epoch.is_none() {
                    self.epoch = Some(epoch.clone());
                    self.answer_waiters();
                }
                let epoch = self.epoch.clone().unwrap_or_default();
                if let Some(&offset) = self.keys.get(key.as_str()) {
                    return Applied::Stored { offset, epoch, duplicate: true };
                }
                let offset = self.last_offset + 1;
                self.last_offset = offset;
                let message = ChatMessage {
                    room: self.name.clone(),
                    offset,
                    epoch: epoch.clone(),
                    sender: sender.clone(),
                    body: body.clone(),
                    ts: *ts,
                };
                self.store(message, true);
                self.remember_key(Arc::from(key.as_str()), offset, *ts);
                // A message is activity too (the server API publishes into rooms nobody has
                // joined): the idle time counts from the last one. Local only, like `empty_since`
                // itself: it decides when this node proposes a `Forget`, not what applying does.
                if self.unused() {
                    self.empty_since = Some(Instant::now());
                }
                if !self.waiters.is_empty() {
                    self.answer_waiters();
                }
                Applied::Stored { offset, epoch, duplicate: false }
            }
            Command::Forget { epoch, last_offset, .. } => {
                let forgotten = self.epoch.as_ref() == Some(epoch) && self.last_offset == *last_offset;
                if forgotten {
                    self.epoch = None;
                    self.last_offset = 0;
                    self.history.clear();
                    self.keys.clear();
                    self.key_order.clear();
                }
                Applied::Forgot { forgotten }
            }
        }
    }

    /// The stream's position, if it has one and the room is idle since `cutoff` (for
    /// `Command::Forget`).
    pub(crate) fn idle_stream_since(&self, cutoff: Instant) -> Option<IdleStream> {
        let epoch = self.epoch.clone()?;
        self.idle_since(cutoff, true).then(|| IdleStream {
            room: self.name.clone(),
            epoch,
            last_offset: self.last_offset,
        })
    }

    /// Nobody on this node uses the room: no subscribers, waiting joins or present users.
    fn unused(&self) -> bool {
        self.subscribers.is_empty() && self.waiters.is_empty() && self.presence.is_empty()
    }

    /// Adds a message to history, delivering it to the subscribers when `deliver`.
    fn store(&mut self, message: ChatMessage, deliver: bool) {
        let frame = encode(&ServerFrame::Message(message.clone()));
        if deliver {
            self.broadcast(&frame, None);
            self.metrics.messages_committed.inc();
        }
        if self.history_size == 0 {
            return;
        }
        if self.history.len() >= self.history_size {
            self.history.pop_front();
        }
        self.history.push_back(Arc::new(Stored { message, frame }));
    }

    /// Deterministic on every node: what is forgotten depends only on the log.
    fn remember_key(&mut self, key: Arc<str>, offset: u64, ts: u64) {
        self.keys.insert(key.clone(), offset);
        self.key_order.push_back((key, offset, ts));
        let keep = self.history_size.max(MIN_DEDUPE_WINDOW);
        let cap = keep.max(MAX_DEDUPE_KEYS);
        while let Some((_, _, oldest_ts)) = self.key_order.front() {
            let len = self.key_order.len();
            let expired = len > keep && oldest_ts.saturating_add(DEDUPE_WINDOW_MS) < ts;
            if !(expired || len > cap) {
                break;
            }
            if let Some((old, _, _)) = self.key_order.pop_front() {
                self.keys.remove(&old);
            }
        }
    }

    /// The replicated part of the room, for a snapshot.
    pub(crate) fn capture(&self) -> RoomCapture {
        RoomCapture {
            name: self.name.clone(),
            epoch: self.epoch.clone(),
            last_offset: self.last_offset,
            history: self.history.iter().cloned().collect(),
            keys: self.key_order.iter().cloned().collect(),
        }
    }

    /// Replaces the replicated part with a snapshot's. Subscribers get the messages they had
    /// not received yet (same epoch); joins that waited for the stream are answered.
    pub(crate) fn install(&mut self, image: RoomImage) {
        let delivered = if self.epoch.is_some() && self.epoch == image.epoch { self.last_offset } else { u64::MAX };
        self.epoch = image.epoch;
        self.last_offset = image.last_offset;
        self.history.clear();
        for message in image.history {
            let deliver = message.offset > delivered;
            self.store(message, deliver);
        }
        self.keys.clear();
        self.key_order.clear();
        for (key, offset, ts) in image.keys {
            self.remember_key(Arc::from(key), offset, ts);
        }
        self.answer_waiters();
    }

    /// Forgets the stream (a snapshot that does not hold the room).
    pub(crate) fn reset(&mut self) {
        self.epoch = None;
        self.last_offset = 0;
        self.history.clear();
        self.keys.clear();
        self.key_order.clear();
    }

    /// Answers the joins that can be answered: all when `all`, else those not ahead of us.
    fn answer_waiters_where(&mut self, all: bool) {
        let Some(epoch) = self.epoch.clone() else { return };
        let (ready, ahead): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters).into_iter().partition(|w| {
            all || w.since.as_ref().is_none_or(|pos| pos.epoch != epoch || pos.offset <= self.last_offset)
        });
        self.waiters = ahead;
        for waiter in ready {
            let (recovered, missed) = match &waiter.since {
                Some(pos) => self.since(pos),
                None => (false, Vec::new()),
            };
            for frame in &missed {
                waiter.outbox.push(frame);
            }
            let joined = ServerFrame::Joined {
                id: waiter.id,
                room: self.name.clone(),
                epoch: epoch.clone(),
                offset: self.last_offset,
                recovered,
            };
            waiter.outbox.push(&encode(&joined));
            self.subscribers.insert(waiter.conn, waiter.outbox);
        }
    }

    fn answer_waiters(&mut self) {
        self.answer_waiters_where(false);
    }

    /// Answers joins that waited through a whole sweep interval for a position this node never
    /// reached (a stale or made-up `since`): with what there is, `recovered: false`.
    pub(crate) fn answer_overdue_waiters(&mut self) {
        if self.waiters.iter().any(|w| w.overdue) {
            self.answer_waiters_where(true);
        }
        for waiter in &mut self.waiters {
            waiter.overdue = true;
        }
    }

    pub(crate) fn has_waiters(&self) -> bool {
        !self.waiters.is_empty()
    }

    fn add_local_presence(&mut self, user: &UserInfo, conn: u64) -> LocalPresence {
        let entry = self.presence.entry(user.id.clone()).or_insert_with(|| Presence {
            user: user.clone(),
            local: 0,
            remote: BTreeSet::new(),
        });
        let was_present = entry.present();
        entry.local += 1;
        let arrived = entry.local == 1;
        if !was_present {
            let event = encode(&ServerFrame::UserJoined { room: self.name.clone(), user: user.clone() });
            self.broadcast(&event, Some(conn));
        }
        if arrived { LocalPresence::Arrived } else { LocalPresence::Unchanged }
    }

    fn remove_local_presence(&mut self, user: &UserInfo) -> LocalPresence {
        let Some(entry) = self.presence.get_mut(&user.id) else { return LocalPresence::Unchanged };
        entry.local = entry.local.saturating_sub(1);
        if entry.local > 0 {
            return LocalPresence::Unchanged;
        }
        self.forget_if_absent(&user.id);
        LocalPresence::Departed
    }

    /// Records whether `node` has connections of `user` here; events go to local subscribers
    /// only when the user's cluster-wide presence changes.
    pub(crate) fn set_remote_presence(&mut self, node: &str, user: &UserInfo, present: bool) {
        if present {
            let entry = self.presence.entry(user.id.clone()).or_insert_with(|| Presence {
                user: user.clone(),
                local: 0,
                remote: BTreeSet::new(),
            });
            let was_present = entry.present();
            entry.remote.insert(node.to_owned());
            if !was_present {
                let event = encode(&ServerFrame::UserJoined { room: self.name.clone(), user: user.clone() });
                self.broadcast(&event, None);
            }
        } else if let Some(entry) = self.presence.get_mut(&user.id)
            && entry.remote.remove(node)
        {
            self.forget_if_absent(&user.id);
        }
    }

    /// Drops every presence entry of `node` except the users in `keep`.
    pub(crate) fn retain_remote_presence(&mut self, node: &str, keep: &[&str]) {
        let gone: Vec<String> = self
            .presence
            .iter()
            .filter(|(id, p)| p.remote.contains(node) && !keep.contains(&id.as_str()))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(entry) = self.presence.get_mut(&id) {
                entry.remote.remove(node);
            }
            self.forget_if_absent(&id);
        }
    }

    /// Users with connections on this node.
    pub(crate) fn local_users(&self) -> impl Iterator<Item = &UserInfo> {
        self.presence.values().filter(|p| p.local > 0).map(|p| &p.user)
    }

    fn forget_if_absent(&mut self, user_id: &str) {
        if let Some(entry) = self.presence.get(user_id).filter(|p| !p.present()) {
            let event = encode(&ServerFrame::UserLeft { room: self.name.clone(), user: entry.user.clone() });
            self.presence.remove(user_id);
            self.broadcast(&event, None);
            if self.unused() {
                // The last user anywhere left: the idle time counts from now.
                self.empty_since = Some(Instant::now());
            }
        }
    }

    fn broadcast(&self, frame: &Frame, except: Option<u64>) {
        let queued = self.subscribers.iter().filter(|(id, outbox)| Some(**id) != except && outbox.push(frame)).count();
        self.metrics.frames_out.inc_by(queued as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(key: &str, ts: u64) -> Command {
        let sender = UserInfo { id: "u".into(), name: "U".into() };
        Command::Publish { room: "r".into(), key: key.into(), sender, body: key.into(), ts, epoch: "e".into() }
    }

    fn stored_again(room: &Room, key: &str, ts: u64) -> bool {
        matches!(room.lock().apply(&publish(key, ts)), Applied::Stored { duplicate: false, .. })
    }

    #[test]
    fn forget_ends_the_stream_only_if_nothing_came_since() {
        let room = Room::new("r".into(), 10, Arc::new(Metrics::new()));
        assert!(stored_again(&room, "k1", 1));
        let forget = |epoch: &str, last_offset| Command::Forget { room: "r".into(), epoch: epoch.into(), last_offset };
        // Proposed when the room was at offset 0, or for another epoch: it moved on, kept.
        assert_eq!(room.lock().apply(&forget("e", 0)), Applied::Forgot { forgotten: false });
        assert_eq!(room.lock().apply(&forget("other", 1)), Applied::Forgot { forgotten: false });
        assert_eq!(room.lock().last_offset, 1);

        assert_eq!(room.lock().apply(&forget("e", 1)), Applied::Forgot { forgotten: true });
        let st = room.lock();
        assert!(st.epoch.is_none() && st.last_offset == 0 && st.history.is_empty(), "history gone");
        drop(st);
        // Its keys went with it: the same key is a new message in the new stream, at offset 1.
        let again = Command::Publish {
            room: "r".into(),
            key: "k1".into(),
            sender: UserInfo { id: "u".into(), name: "U".into() },
            body: "b".into(),
            ts: 2,
            epoch: "e2".into(),
        };
        assert_eq!(room.lock().apply(&again), Applied::Stored { offset: 1, epoch: "e2".into(), duplicate: false });
        assert!(!room.retire_if_unused(), "a room with a stream is not retired");
    }

    #[test]
    fn keys_are_kept_for_the_window_however_busy_the_room_is() {
        let room = Room::new("r".into(), 10, Arc::new(Metrics::new()));
        assert!(stored_again(&room, "first", 1_000));
        // 5 000 more in 30 s: far beyond the 1 000-key minimum, inside the time window.
        for i in 0..5_000u64 {
            assert!(stored_again(&room, &format!("k{i}"), 1_000 + i * 6));
        }
        assert!(!stored_again(&room, "first", 31_000), "a retry within the window is the same publish");
        // Once the window has passed, keys beyond the minimum are forgotten...
        assert!(stored_again(&room, "late", 1_000 + DEDUPE_WINDOW_MS + 1));
        assert!(stored_again(&room, "first", 1_000 + DEDUPE_WINDOW_MS + 2), "forgotten after the window");
        // ...but the last 1 000 are always kept, and snapshots carry them.
        assert!(!stored_again(&room, "k4999", 10_000_000));
        let captured = serde_json::to_vec(&room.lock().capture()).expect("a capture serializes");
        let image: RoomImage = serde_json::from_slice(&captured).expect("as an image");
        let copy = Room::new("r".into(), 10, Arc::new(Metrics::new()));
        copy.lock().install(image);
        assert!(!stored_again(&copy, "k4500", 10_000_001), "a snapshot keeps the keys");
    }

    #[test]
    fn keys_are_capped_per_room() {
        let room = Room::new("r".into(), 10, Arc::new(Metrics::new()));
        for i in 0..=MAX_DEDUPE_KEYS as u64 {
            room.lock().apply(&publish(&format!("k{i}"), 5));
        }
        assert_eq!(room.lock().keys.len(), MAX_DEDUPE_KEYS);
        assert!(stored_again(&room, "k0", 5), "the oldest key went over the cap");
    }
}
