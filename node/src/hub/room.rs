//! One room: its ordered stream (epoch + offsets), the bounded history ring, the subscribed
//! connections and the presence of users. Everything about a room happens under its one lock,
//! so sequencing, history and fan-out agree.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, ServerFrame, StreamPosition, UserInfo};
use crate::transport::Frame;

use super::outbox::Outbox;

/// A stored message and its serialized `message` frame (shared by every delivery).
pub struct Stored {
    pub message: ChatMessage,
    pub frame: Frame,
}

/// What a connection gets back when it joins.
pub struct JoinOutcome {
    pub epoch: String,
    pub offset: u64,
    pub recovered: bool,
    pub missed: Vec<Frame>,
}

pub struct Room {
    name: String,
    state: Mutex<RoomState>,
}

struct RoomState {
    epoch: String,
    last_offset: u64,
    history: VecDeque<Arc<Stored>>,
    subscribers: HashMap<u64, Outbox>,
    presence: HashMap<String, (UserInfo, usize)>,
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
    format!("{:016x}", rand::random::<u64>())
}

impl Room {
    pub fn new(name: String, metrics: Arc<Metrics>) -> Self {
        let state = RoomState {
            epoch: new_epoch(),
            last_offset: 0,
            history: VecDeque::new(),
            subscribers: HashMap::new(),
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

    fn lock(&self) -> MutexGuard<'_, RoomState> {
        // A panic while holding the lock leaves consistent data (no multi-step invariants are
        // broken midway by a panic-free path), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes `conn` and returns what it missed after `since`; `None` if the room was
    /// forgotten meanwhile (look it up again).
    pub fn join(
        &self,
        conn: u64,
        outbox: Outbox,
        user: &UserInfo,
        since: Option<&StreamPosition>,
    ) -> Option<JoinOutcome> {
        let mut st = self.lock();
        if st.removed {
            return None;
        }
        let (recovered, missed) = match since {
            Some(pos) => st.since(pos),
            None => (false, Vec::new()),
        };
        if st.add_presence(user) {
            let event = encode(&ServerFrame::UserJoined { room: self.name.clone(), user: user.clone() });
            st.broadcast(&event, Some(conn));
        }
        st.subscribers.insert(conn, outbox);
        st.empty_since = None;
        Some(JoinOutcome { epoch: st.epoch.clone(), offset: st.last_offset, recovered, missed })
    }

    /// Unsubscribes `conn`; tells the others if that was the user's last connection here.
    pub fn leave(&self, conn: u64, user: &UserInfo) {
        let mut st = self.lock();
        if st.subscribers.remove(&conn).is_none() {
            return;
        }
        if st.remove_presence(&user.id) {
            let event = encode(&ServerFrame::UserLeft { room: self.name.clone(), user: user.clone() });
            st.broadcast(&event, None);
        }
        if st.subscribers.is_empty() {
            st.empty_since = Some(Instant::now());
        }
    }

    /// Sequences a message, stores it and queues it to every subscriber. Returns its offset and
    /// its epoch.
    pub fn publish(&self, sender: &UserInfo, body: String, ts: u64, history_size: usize) -> (u64, String) {
        let mut st = self.lock();
        st.last_offset += 1;
        let message = ChatMessage {
            room: self.name.clone(),
            offset: st.last_offset,
            epoch: st.epoch.clone(),
            sender: sender.clone(),
            body,
            ts,
        };
        let frame = encode(&ServerFrame::Message(message.clone()));
        st.broadcast(&frame, None);
        if history_size > 0 {
            if st.history.len() >= history_size {
                st.history.pop_front();
            }
            st.history.push_back(Arc::new(Stored { message, frame }));
        }
        (st.last_offset, st.epoch.clone())
    }

    /// History after `since` (when it is in this epoch), else the last `limit` messages.
    /// The flag is false when older messages than those asked for are gone.
    pub fn history(&self, since: Option<&StreamPosition>, limit: Option<usize>) -> (String, Vec<ChatMessage>, bool) {
        let st = self.lock();
        let (complete, start) = match since {
            Some(pos) if pos.epoch == st.epoch => {
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
        (st.epoch.clone(), messages, complete)
    }

    pub fn presence(&self) -> Vec<UserInfo> {
        let st = self.lock();
        let mut users: Vec<UserInfo> = st.presence.values().map(|(u, _)| u.clone()).collect();
        users.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        users
    }

    /// Marks the room removed if it has had no subscribers since before `cutoff`.
    pub fn retire_if_idle_since(&self, cutoff: Instant) -> bool {
        let mut st = self.lock();
        let idle = st.subscribers.is_empty() && st.empty_since.is_some_and(|t| t <= cutoff);
        if idle {
            st.removed = true;
        }
        idle
    }
}

impl RoomState {
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
        if pos.epoch != self.epoch {
            return (false, self.history.iter().map(|s| s.frame.clone()).collect());
        }
        let missed = self.history.iter().filter(|s| s.message.offset > pos.offset).map(|s| s.frame.clone()).collect();
        (self.covers(pos.offset), missed)
    }

    fn add_presence(&mut self, user: &UserInfo) -> bool {
        let entry = self.presence.entry(user.id.clone()).or_insert_with(|| (user.clone(), 0));
        entry.1 += 1;
        entry.1 == 1
    }

    fn remove_presence(&mut self, user_id: &str) -> bool {
        match self.presence.get_mut(user_id) {
            Some((_, count)) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                self.presence.remove(user_id);
                true
            }
            None => false,
        }
    }

    fn broadcast(&self, frame: &Frame, except: Option<u64>) {
        let queued = self.subscribers.iter().filter(|(id, outbox)| Some(**id) != except && outbox.push(frame)).count();
        self.metrics.frames_out.inc_by(queued as u64);
    }
}
