//! The chat core: rooms, sessions, dispatch of protocol frames, admission and drain. It knows
//! nothing of HTTP or WebSocket libraries; connections arrive through `transport::Connection`.

pub mod log;
pub mod outbox;
pub mod room;
pub(crate) mod session;
pub mod sessions;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::auth::{Authenticator, Identity, KeyError};
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::protocol::UserInfo;
use crate::transport::Connection;

use log::{Applied, Command, IdleStream, LocalLog, RoomLog};
use outbox::ConnSignal;
use room::{Room, RoomCapture, RoomImage};
use sessions::Sessions;

pub(crate) fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Why a new connection is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the node is draining; connect to another node")]
    Draining,
    #[error("the node is starting and not caught up with the cluster yet; connect to another node")]
    Starting,
    #[error("the node holds its maximum number of connections")]
    Full,
    #[error("this user holds its maximum of {0} connections on this node")]
    UserFull(usize),
    #[error("this client address holds its maximum of {0} connections on this node")]
    AddressFull(usize),
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::Starting => "starting",
            Self::Full => "too_many_connections",
            Self::UserFull(_) => "too_many_connections_for_user",
            Self::AddressFull(_) => "too_many_connections_from_address",
        }
    }

    /// The HTTP status of the refused handshake: the node is busy (503) or this client has
    /// enough connections (429).
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Draining | Self::Starting | Self::Full => 503,
            Self::UserFull(_) | Self::AddressFull(_) => 429,
        }
    }
}

/// Open connections per user and per client address, for the caps in `limits`.
#[derive(Default)]
struct ClientCounts {
    users: HashMap<String, usize>,
    addresses: HashMap<std::net::IpAddr, usize>,
}

fn count_up<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: K, cap: Option<usize>) -> bool {
    let count = counts.entry(key).or_insert(0);
    if cap.is_some_and(|cap| *count >= cap) {
        return false;
    }
    *count += 1;
    true
}

fn count_down<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

pub struct Hub {
    node_id: String,
    config: NodeConfig,
    auth: Authenticator,
    metrics: Arc<Metrics>,
    rooms: RwLock<HashMap<String, Arc<Room>>>,
    /// Every open connection, to ask them to close (all when draining, a user's when the server
    /// API disconnects it, some when the cluster is evened out).
    connections: Mutex<HashMap<u64, Registered>>,
    next_conn: AtomicU64,
    open: AtomicUsize,
    clients: Mutex<ClientCounts>,
    draining: AtomicBool,
    /// Set once the node was ready: before that it is catching up with the cluster (its rooms'
    /// streams and the session records arrive), and a client let in then would be replayed what
    /// it already has, or not find its session.
    started: AtomicBool,
    /// Orders and stores the rooms' streams: at once alone, through Raft in a cluster.
    log: Arc<dyn RoomLog>,
    sessions: Sessions,
    /// Random per process, so the keys of keyless publishes never repeat across restarts.
    boot: u64,
    next_key: AtomicU64,
    balance: crate::rebalance::Status,
    /// Connections asked to close for a rebalance and not gone yet (they finish their writes
    /// and the close handshake first): the planner does not count them as staying.
    leaving: AtomicUsize,
}

/// An open connection, as the hub knows it.
struct Registered {
    signal: Arc<ConnSignal>,
    user: String,
    opened: Instant,
    /// Its session was moved off a busy node before: it is not moved again.
    moved: bool,
}

/// A reserved connection slot, counted for its client address and, once authenticated, its
/// user; released when dropped.
pub struct Permit {
    hub: Arc<Hub>,
    address: Option<std::net::IpAddr>,
    user: Option<String>,
}

impl Permit {
    /// Counts the connection for `user`, unless that user is at `limits.max_connections_per_user`.
    pub fn claim_user(&mut self, user: &str) -> Result<(), Refusal> {
        let cap = self.hub.config.limits.max_connections_per_user;
        if !count_up(&mut self.hub.client_counts().users, user.to_owned(), Some(cap)) {
            return Err(Refusal::UserFull(cap));
        }
        self.user = Some(user.to_owned());
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.hub.open.fetch_sub(1, Ordering::AcqRel);
        self.hub.metrics.connections.dec();
        let mut counts = self.hub.client_counts();
        if let Some(user) = &self.user {
            count_down(&mut counts.users, user);
        }
        if let Some(address) = &self.address {
            count_down(&mut counts.addresses, address);
        }
    }
}

impl Hub {
    /// A hub on its own (`log` is `None`) or sharing rooms with other nodes through `log`.
    pub fn new(
        node_id: String,
        config: NodeConfig,
        metrics: Arc<Metrics>,
        log: Option<Arc<dyn RoomLog>>,
    ) -> Result<Arc<Hub>, KeyError> {
        let auth = Authenticator::from_config(&config.auth)?;
        let hub = Arc::new(Hub {
            node_id,
            config,
            auth,
            metrics,
            rooms: RwLock::default(),
            connections: Mutex::default(),
            next_conn: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            clients: Mutex::default(),
            draining: AtomicBool::new(false),
            started: AtomicBool::new(false),
            log: log.unwrap_or_else(|| Arc::new(LocalLog::default())),
            sessions: Sessions::default(),
            boot: crate::random::random(),
            next_key: AtomicU64::new(1),
            balance: crate::rebalance::Status::default(),
            leaving: AtomicUsize::new(0),
        });
        hub.log.attach(Arc::downgrade(&hub));
        Ok(hub)
    }

    pub fn log(&self) -> &Arc<dyn RoomLog> {
        &self.log
    }

    /// Ready for clients: not draining, and the log can order messages.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.log.ready()
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn authenticator(&self) -> &Authenticator {
        &self.auth
    }

    /// Reserves a slot for a new connection, before any handshake work is done.
    pub fn admit(self: &Arc<Self>, address: Option<std::net::IpAddr>) -> Result<Permit, Refusal> {
        if self.is_draining() {
            return Err(Refusal::Draining);
        }
        if !self.started.load(Ordering::Acquire) {
            if !self.is_ready() {
                return Err(Refusal::Starting);
            }
            self.started.store(true, Ordering::Release);
        }
        let max = self.config.limits.max_connections;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| Refusal::Full)?;
        self.metrics.connections.inc();
        // From here on, dropping the permit frees what it holds.
        let mut permit = Permit { hub: self.clone(), address: None, user: None };
        if let Some(address) = address {
            let cap = self.config.limits.max_connections_per_ip;
            if !count_up(&mut self.client_counts().addresses, address, cap) {
                return Err(Refusal::AddressFull(cap.unwrap_or_default()));
            }
            permit.address = Some(address);
        }
        self.metrics.connections_accepted.inc();
        Ok(permit)
    }

    fn client_counts(&self) -> std::sync::MutexGuard<'_, ClientCounts> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one authenticated client connection until it ends; `resume` is the session token
    /// of an earlier connection of the same user, whose rooms it rejoins.
    pub async fn serve<C: Connection>(
        self: Arc<Self>,
        conn: C,
        identity: Identity,
        resume: Option<String>,
        permit: Permit,
    ) {
        session::run(self, conn, identity, resume, permit).await
    }

    /// The dedupe key of a publish: the idempotency key scoped to who sent it (`origin`: `u`
    /// for clients, `a` for the server API, so neither can hit the other's keys), its user and
    /// its room, else one unique to this process (so the log's own retries are stored once).
    /// The key also names the publish while it waits for its commit, so the same key in two
    /// rooms must give two names. Lengths go first: ids and room names may contain `:`.
    pub(crate) fn publish_key(&self, origin: char, user: &UserInfo, room: &str, client_key: Option<String>) -> String {
        match client_key {
            Some(key) => format!("{origin}:{}:{}{}:{room}{key}", user.id.len(), user.id, room.len()),
            None => format!("n:{:016x}:{}", self.boot, self.next_key.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Applies a committed command of the room log to its room.
    pub fn apply(&self, command: &Command) -> Applied {
        let applied = self.room(command.room()).lock().apply(command);
        if applied == (Applied::Forgot { forgotten: true }) {
            let mut rooms = self.rooms.write().unwrap_or_else(|p| p.into_inner());
            if rooms.get(command.room()).is_some_and(|room| room.retire_if_unused()) {
                rooms.remove(command.room());
                self.metrics.rooms.set(rooms.len() as i64);
            }
        }
        applied
    }

    /// Rooms whose joins wait for the stream to start (its `open` is not committed yet); joins
    /// that waited a whole call interval for a position never reached are answered as they are.
    pub fn rooms_awaiting_stream(&self) -> Vec<String> {
        let mut waiting = Vec::new();
        for room in self.rooms_snapshot() {
            let mut st = room.lock();
            if st.epoch.is_none() && st.has_waiters() {
                waiting.push(room.name().to_owned());
            } else {
                st.answer_overdue_waiters();
            }
        }
        waiting.sort();
        waiting
    }

    /// The position before a room's first message, if its stream has started.
    pub(crate) fn stream_start(&self, room: &str) -> Option<crate::protocol::StreamPosition> {
        let epoch = self.existing_room(room)?.lock().epoch.clone()?;
        Some(crate::protocol::StreamPosition { epoch, offset: 0 })
    }

    /// Where the publish with dedupe `key` was stored in `room`, if it is among the recent ones.
    pub fn stored(&self, room: &str, key: &str) -> Option<(u64, String)> {
        let room = self.existing_room(room)?;
        let st = room.lock();
        st.stored_offset(key).map(|offset| (offset, st.epoch.clone().unwrap_or_default()))
    }

    /// The replicated state of every room `wanted` selects, for a snapshot.
    pub fn images(&self, wanted: impl Fn(&str) -> bool) -> Vec<RoomCapture> {
        let mut images: Vec<RoomCapture> = self
            .rooms_snapshot()
            .iter()
            .filter(|r| wanted(r.name()))
            .map(|r| r.lock().capture())
            .filter(|image| image.epoch.is_some())
            .collect();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        images
    }

    /// Makes the rooms `wanted` selects exactly those of a snapshot.
    pub fn install_images(&self, wanted: impl Fn(&str) -> bool, images: Vec<RoomImage>) {
        let names: std::collections::HashSet<String> = images.iter().map(|i| i.name.clone()).collect();
        for room in self.rooms_snapshot() {
            if wanted(room.name()) && !names.contains(room.name()) {
                room.lock().reset();
            }
        }
        for image in images {
            self.room(&image.name.clone()).lock().install(image);
        }
    }

    /// Records that `node` has (or no longer has) connections of `user` in `room`.
    pub fn set_remote_presence(&self, node: &str, room: &str, user: &UserInfo, present: bool) {
        self.room(room).lock().set_remote_presence(node, user, present);
    }

    /// Every (room, user) with connections on this node.
    pub fn local_presence(&self) -> Vec<(String, UserInfo)> {
        let mut entries = Vec::new();
        for room in self.rooms_snapshot() {
            entries.extend(room.lock().local_users().map(|u| (room.name().to_owned(), u.clone())));
        }
        entries
    }

    /// Replaces what is known of `node`'s presence with `entries` (empty: it went away).
    pub fn replace_remote_presence(&self, node: &str, entries: Vec<(String, UserInfo)>) {
        let mut by_room: HashMap<String, Vec<UserInfo>> = HashMap::new();
        for (room, user) in entries {
            by_room.entry(room).or_default().push(user);
        }
        for room in self.rooms_snapshot() {
            let users = by_room.remove(room.name()).unwrap_or_default();
            let keep: Vec<&str> = users.iter().map(|u| u.id.as_str()).collect();
            let mut st = room.lock();
            st.retain_remote_presence(node, &keep);
            for user in &users {
                st.set_remote_presence(node, user, true);
            }
        }
        for (room, users) in by_room {
            let target = self.room(&room);
            let mut st = target.lock();
            for user in &users {
                st.set_remote_presence(node, user, true);
            }
        }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn room_count(&self) -> usize {
        self.rooms.read().map(|r| r.len()).unwrap_or(0)
    }

    pub(crate) fn existing_room(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms.read().ok().and_then(|r| r.get(name).cloned())
    }

    pub(crate) fn rooms_snapshot(&self) -> Vec<Arc<Room>> {
        self.rooms.read().map(|r| r.values().cloned().collect()).unwrap_or_default()
    }

    /// The room named `name`, created on first use; its stream starts with the log's first
    /// command for it.
    pub(crate) fn room(&self, name: &str) -> Arc<Room> {
        if let Some(room) = self.existing_room(name) {
            return room;
        }
        let mut rooms = self.rooms.write().unwrap_or_else(|p| p.into_inner());
        let room = rooms
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Room::new(name.to_owned(), self.config.history.size, self.metrics.clone())));
        let room = room.clone();
        self.metrics.rooms.set(rooms.len() as i64);
        room
    }

    /// The periodic clean-up, alone or in a cluster: rooms idle for `history.empty_room_ttl_secs`
    /// and session records past their time (`now_ms`, Unix milliseconds). Returns the rooms
    /// forgotten.
    pub fn sweep(&self, now: Instant, now_ms: u64) -> usize {
        self.sessions.expire(now_ms);
        self.sweep_rooms(now)
    }

    /// Forgets rooms that have had no subscribers for `history.empty_room_ttl_secs`.
    pub fn sweep_rooms(&self, now: Instant) -> usize {
        let ttl = Duration::from_secs(self.config.history.empty_room_ttl_secs);
        let Some(cutoff) = now.checked_sub(ttl) else { return 0 };
        // A replicated room's stream is state every node must agree on: only the log may drop it.
        let streams_too = !self.log.keeps_streams();
        // Candidates are found under the shared lock, so joins and lookups go on meanwhile; the
        // exclusive lock is taken only to retire them, each checked again under its own lock.
        let (idle, idle_streams): (Vec<String>, Vec<IdleStream>) = {
            let rooms = self.rooms.read().unwrap_or_else(|p| p.into_inner());
            let idle = rooms.iter().filter(|(_, room)| room.is_idle_since(cutoff, streams_too)).map(|(n, _)| n.clone());
            let streams =
                rooms.values().filter(|_| !streams_too).filter_map(|room| room.lock().idle_stream_since(cutoff));
            (idle.collect(), streams.collect())
        };
        if !idle_streams.is_empty() {
            // Dropped on every node once the log commits it (see `apply`).
            self.log.forget(idle_streams);
        }
        if idle.is_empty() {
            return 0;
        }
        let mut rooms = self.rooms.write().unwrap_or_else(|p| p.into_inner());
        let mut forgotten = 0;
        for name in idle {
            if rooms.get(&name).is_some_and(|room| room.retire_if_idle_since(cutoff, streams_too)) {
                rooms.remove(&name);
                forgotten += 1;
            }
        }
        self.metrics.rooms.set(rooms.len() as i64);
        forgotten
    }

    fn register(&self, signal: Arc<ConnSignal>, user_id: &str, moved: bool) -> u64 {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let entry = Registered { signal, user: user_id.to_owned(), opened: Instant::now(), moved };
        self.connections().insert(id, entry);
        id
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Registered>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes every connection of `user_id` on this node with `code`; returns how many.
    pub fn disconnect_user(&self, user_id: &str, code: u16) -> usize {
        let connections = self.connections();
        // Connections asked to close before (and still finishing) are not counted again.
        let mine: Vec<&Arc<ConnSignal>> = connections
            .values()
            .filter(|c| c.user == user_id && c.signal.close_requested().is_none())
            .map(|c| &c.signal)
            .collect();
        for signal in &mine {
            signal.close(code);
        }
        mine.len()
    }

    fn unregister(&self, id: u64) {
        let gone = self.connections().remove(&id);
        if gone.is_some_and(|c| c.signal.close_cause() == outbox::CloseCause::Rebalance) {
            self.leaving.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn movable(c: &Registered, min_age: Duration) -> bool {
        !c.moved && c.opened.elapsed() >= min_age && c.signal.close_requested().is_none()
    }

    /// Connections that [`Hub::shed`] could move now.
    pub fn movable_connections(&self, min_age: Duration) -> usize {
        self.connections().values().filter(|c| Self::movable(c, min_age)).count()
    }

    /// Moves up to `count` connections off this node (close code 4000, reason `rebalance`):
    /// ones open for at least `min_age` whose session was never moved before. Each flushes its
    /// outbox and saves its session first, so the client resumes exactly on the next node.
    /// Returns how many were asked to close.
    pub fn shed(&self, count: usize, min_age: Duration) -> usize {
        let connections = self.connections();
        let eligible = connections.values().filter(|c| Self::movable(c, min_age));
        // Map order is arbitrary per process: the connections shed are a spread of them.
        let asked = eligible
            .take(count)
            .filter(|c| c.signal.close_for(crate::protocol::close::RECONNECT_ELSEWHERE, outbox::CloseCause::Rebalance))
            .count();
        self.leaving.fetch_add(asked, Ordering::AcqRel);
        asked
    }

    /// What this node tells its peers about its load.
    pub fn load_report(&self) -> crate::rebalance::LoadReport {
        crate::rebalance::LoadReport {
            // Those on their way out already count where they land.
            connections: self.open_connections().saturating_sub(self.leaving.load(Ordering::Acquire)) as u64,
            revision: self.config.cluster.revision.clone().unwrap_or_default(),
            ready: self.is_ready(),
            rebalancing: self.balance.rebalancing(),
        }
    }

    pub fn balance(&self) -> &crate::rebalance::Status {
        &self.balance
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stops admitting connections and joins; `/readyz` reports not ready from now on.
    pub fn start_draining(&self) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            self.metrics.draining.set(1);
        }
    }

    /// Asks every connected client to reconnect elsewhere, at most `rate_per_sec` per second so
    /// the remaining nodes are not hit by a reconnect storm. Returns once all were asked.
    pub async fn disconnect_all(&self, rate_per_sec: u32) {
        let signals: Vec<Arc<ConnSignal>> = self.connections().values().map(|c| c.signal.clone()).collect();
        let batch = (rate_per_sec as usize / 10).max(1);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for chunk in signals.chunks(batch) {
            tick.tick().await;
            for signal in chunk {
                signal.close(crate::protocol::close::RECONNECT_ELSEWHERE);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
