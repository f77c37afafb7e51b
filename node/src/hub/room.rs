//! One room: its ordered stream (epoch + offsets), the bounded history ring, the subscribed
//! connections and the presence of users. Everything about a room happens under its one lock,
//! so sequencing, history and fan-out agree. In a cluster the room's stream is sequenced by its
//! owner (`replication`); this node applies committed messages here in offset order.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::cluster::wire::{Entry, PublishId};
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, ServerFrame, StreamPosition, UserInfo};
use crate::replication::stream::Replica;
use crate::transport::Frame;

use super::outbox::Outbox;

/// A stored message and its serialized `message` frame (shared by every delivery).
pub struct Stored {
    pub message: ChatMessage,
    pub frame: Frame,
    pub pid: Option<PublishId>,
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

pub struct RoomState {
    name: String,
    /// The stream's identity; `None` until this node learns it from the room's owner.
    pub(crate) epoch: Option<String>,
    /// The last applied (committed) offset.
    pub(crate) last_offset: u64,
    history: VecDeque<Arc<Stored>>,
    history_size: usize,
    /// Publish ids of the messages in history, so a retried publish is not stored twice.
    pids: HashMap<PublishId, u64>,
    subscribers: HashMap<u64, Outbox>,
    waiters: Vec<Waiter>,
    presence: HashMap<String, Presence>,
    empty_since: Option<Instant>,
    /// Set when the room was forgotten; a join that raced with that must look it up again.
    removed: bool,
    metrics: Arc<Metrics>,
    /// Ownership and replication state (cluster mode only).
    pub(crate) replica: Replica,
}

pub(crate) fn encode(frame: &ServerFrame) -> Frame {
    // Serializing our own frame types cannot fail: every field is a plain string or number.
    Frame::from(serde_json::to_string(frame).unwrap_or_default())
}

pub(crate) fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Room {
    /// A room whose stream starts here (`epoch` given) or is learnt from its owner (`None`).
    pub fn new(name: String, epoch: Option<String>, history_size: usize, metrics: Arc<Metrics>) -> Self {
        let state = RoomState {
            name: name.clone(),
            epoch,
            last_offset: 0,
            history: VecDeque::new(),
            history_size,
            pids: HashMap::new(),
            subscribers: HashMap::new(),
            waiters: Vec::new(),
            presence: HashMap::new(),
            empty_since: Some(Instant::now()),
            removed: false,
            metrics,
            replica: Replica::default(),
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
        let Some(epoch) = st.epoch.clone() else {
            st.waiters.push(Waiter { conn, outbox, id, since });
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

    /// Sequences, stores and delivers a message on a node that is not in a cluster.
    pub fn publish(&self, pid: PublishId, sender: &UserInfo, body: String, ts: u64) -> (u64, String) {
        let mut st = self.lock();
        let entry = Entry { offset: st.last_offset + 1, term: 0, pid, sender: sender.clone(), body, ts };
        st.apply(&entry);
        (st.last_offset, st.epoch.clone().unwrap_or_default())
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

    pub fn presence(&self) -> Vec<UserInfo> {
        let st = self.lock();
        let mut users: Vec<UserInfo> = st.presence.values().filter(|p| p.present()).map(|p| p.user.clone()).collect();
        users.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        users
    }

    /// Marks the room removed if it has had no subscribers (and no one elsewhere is present)
    /// since before `cutoff`.
    pub fn retire_if_idle_since(&self, cutoff: Instant) -> bool {
        let mut st = self.lock();
        let idle = st.subscribers.is_empty()
            && st.waiters.is_empty()
            && st.presence.is_empty()
            && st.replica.is_idle()
            && st.empty_since.is_some_and(|t| t <= cutoff);
        if idle {
            st.removed = true;
        }
        idle
    }
}

impl RoomState {
    pub fn name(&self) -> &str {
        &self.name
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

    /// The offset a publish id was stored at, if it is still in history.
    pub(crate) fn stored_offset(&self, pid: &PublishId) -> Option<u64> {
        self.pids.get(pid).copied()
    }

    /// Stores the next message of the stream and queues it to every subscriber. The caller
    /// guarantees `entry.offset == last_offset + 1` and a known epoch.
    pub(crate) fn apply(&mut self, entry: &Entry) {
        let epoch = self.epoch.clone().unwrap_or_default();
        self.last_offset = entry.offset;
        let message = ChatMessage {
            room: self.name.clone(),
            offset: entry.offset,
            epoch,
            sender: entry.sender.clone(),
            body: entry.body.clone(),
            ts: entry.ts,
        };
        let frame = encode(&ServerFrame::Message(message.clone()));
        self.broadcast(&frame, None);
        self.push_history(Stored { message, frame, pid: Some(entry.pid.clone()) });
        self.metrics.messages_committed.inc();
    }

    fn push_history(&mut self, stored: Stored) {
        if self.history_size == 0 {
            return;
        }
        if self.history.len() >= self.history_size
            && let Some(old) = self.history.pop_front()
            && let Some(pid) = &old.pid
        {
            self.pids.remove(pid);
        }
        if let Some(pid) = &stored.pid {
            self.pids.insert(pid.clone(), stored.message.offset);
        }
        self.history.push_back(Arc::new(stored));
    }

    /// Committed messages after `after` (all kept ones if `after` is older than the window).
    pub(crate) fn entries_after(&self, after: u64, term: u64) -> Vec<Entry> {
        self.history
            .iter()
            .filter(|s| s.message.offset > after)
            .map(|s| Entry {
                offset: s.message.offset,
                term,
                pid: s.pid.clone().unwrap_or_else(|| PublishId { node: String::new(), seq: s.message.offset }),
                sender: s.message.sender.clone(),
                body: s.message.body.clone(),
                ts: s.message.ts,
            })
            .collect()
    }

    /// Takes on a stream learnt from another node: `entries` are its committed messages up to
    /// `committed`. Messages this node already has are kept; a gap or another epoch replaces
    /// the local history. Joins that waited for the stream are answered.
    pub(crate) fn adopt(&mut self, epoch: &str, committed: u64, entries: &[Entry]) {
        let same_epoch = self.epoch.as_deref() == Some(epoch);
        let contiguous = entries.first().is_none_or(|e| e.offset <= self.last_offset + 1);
        if !same_epoch || !contiguous {
            self.history.clear();
            self.pids.clear();
            self.epoch = Some(epoch.to_owned());
            self.last_offset = entries.first().map_or(committed, |e| e.offset - 1);
            self.replica.pending.clear();
        }
        for entry in entries {
            if entry.offset <= self.last_offset {
                continue;
            }
            if entry.offset != self.last_offset + 1 {
                break;
            }
            self.apply(entry);
        }
        self.last_offset = self.last_offset.max(committed);
        self.replica.pending.retain(|offset, _| *offset > committed);
        self.answer_waiters();
    }

    /// Sets the epoch of a stream that starts here, and answers waiting joins.
    pub(crate) fn start_stream(&mut self, epoch: String) {
        self.epoch = Some(epoch);
        self.answer_waiters();
    }

    fn answer_waiters(&mut self) {
        let Some(epoch) = self.epoch.clone() else { return };
        for waiter in std::mem::take(&mut self.waiters) {
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
        }
    }

    fn broadcast(&self, frame: &Frame, except: Option<u64>) {
        let queued = self.subscribers.iter().filter(|(id, outbox)| Some(**id) != except && outbox.push(frame)).count();
        self.metrics.frames_out.inc_by(queued as u64);
    }
}
